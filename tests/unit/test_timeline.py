"""Timeline parsing and per-chunk prompt state."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamdit.errors import ConfigError
from streamdit.runtime.timeline import Timeline


def test_json_and_toml_agree(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(
        '{"entries": [{"chunk": 0, "prompt": "a"}, {"chunk": 2, "prompt": "b", "transition": "soft",'
        ' "blend_chunks": 3}, {"chunk": 6, "prompt": "c"}]}'
    )
    (tmp_path / "a.toml").write_text(
        '[[entries]]\nchunk = 0\nprompt = "a"\n[[entries]]\nchunk = 2\nprompt = "b"\ntransition = "soft"\n'
        'blend_chunks = 3\n[[entries]]\nchunk = 6\nprompt = "c"\n'
    )
    j, t = Timeline.load(tmp_path / "a.json"), Timeline.load(tmp_path / "a.toml")
    assert j.entries == t.entries
    states = [j.state(k) for k in range(8)]
    assert [s.prompt for s in states] == ["a", "a", "b", "b", "b", "b", "c", "c"]
    assert [round(s.alpha, 3) for s in states] == [1, 1, 0.333, 0.667, 1, 1, 1, 1]
    assert [s.previous for s in states[2:5]] == ["a", "a", None]
    assert [s.soft_active for s in states] == [False, False, True, True, True, False, False, False]
    assert [s.hard_cut for s in states] == [False] * 6 + [True, False]


def test_chunk0_is_never_a_cut_and_single_prompt_works() -> None:
    tl = Timeline.single("x")
    assert tl.state(0).hard_cut is False and tl.state(9).prompt == "x"


def test_missing_file_names_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field=timeline"):
        Timeline.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ("[]", "chunk 0"),
        ('[{"chunk": -1, "prompt": "a"}]', "chunk"),
        ('[{"chunk": 0, "prompt": ""}]', "prompt"),
        (
            '[{"chunk": 0, "prompt": "a"}, {"chunk": 1, "prompt": "b", "blend_chunks": 0}]',
            "blend_chunks",
        ),
        ('[{"chunk": true, "prompt": "a"}]', "chunk"),
        ('"nope"', "entries"),
    ],
)
def test_bad_entries_name_the_field(tmp_path: Path, entries: str, needle: str) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"entries": ' + entries + "}")
    with pytest.raises(ConfigError, match=needle):
        Timeline.load(path)


def test_immediate_cut_is_a_hard_cut_that_drops_in_flight_chunks(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(
        '{"entries": [{"chunk": 0, "prompt": "a"}, {"chunk": 2, "prompt": "b", "transition": "hard"},'
        ' {"chunk": 4, "prompt": "c", "transition": "cut"}]}'
    )
    states = [Timeline.load(tmp_path / "t.json").state(k) for k in range(6)]
    assert [s.hard_cut for s in states] == [False, False, True, False, True, False]
    assert [s.drop_in_flight for s in states] == [False, False, False, False, True, False]
