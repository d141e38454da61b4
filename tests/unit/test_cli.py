"""End-to-end CLI runs of the `single` topology on the tiny preset (CPU).

Covers: determinism (same seed → bit-identical .npy, different prompt → different output),
frames written == sum of per-chunk `frames` in metrics, timelines (hard cut bumps the epoch and
restarts the VAE stream; soft transition de-weights the cache), video-to-video, bad input →
exit 2 before any model work, the plan assertion, and crash / Ctrl-C leaving a valid video.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from streamdit.cli import main
from streamdit.media import count_mp4_frames, read_npy_header_shape
from streamdit.runtime.metrics import read_metrics

GEOM = ["--height", "32", "--width", "48"]
pytestmark = pytest.mark.timeout(120)


def _run(tmp_path: Path, name: str, *extra: str, chunks: int = 3) -> tuple[int, Path, Path]:
    out = tmp_path / f"{name}.npy"
    metrics = tmp_path / f"{name}.jsonl"
    rc = main(
        [
            "run",
            *GEOM,
            "--chunks",
            str(chunks),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
            *extra,
        ]
    )
    return rc, out, metrics


def _metrics(path: Path) -> list[dict]:
    return read_metrics(path).chunks


def test_same_seed_is_bit_identical_and_prompt_changes_output(tmp_path: Path) -> None:
    rc1, out1, m1 = _run(tmp_path, "a", "--seed", "7")
    rc2, out2, _ = _run(tmp_path, "b", "--seed", "7")
    rc3, out3, _ = _run(tmp_path, "c", "--seed", "7", "--prompt", "a blue whale in deep water")
    assert (rc1, rc2, rc3) == (0, 0, 0)
    a, b, c = np.load(out1), np.load(out2), np.load(out3)
    assert a.dtype == np.uint8 and a.shape[1:] == (32, 48, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 1.0, "output must not be a constant image"
    rows = _metrics(m1)
    assert a.shape[0] == sum(r["frames"] for r in rows) == 9 + 12 + 12
    assert [r["generator_calls"] for r in rows] == [4, 5, 5]  # 4 steps (+1 recompute after chunk 0)
    assert [r["call_id"] for r in rows] == [0, 1, 2]
    for key in ("phase_a_ms", "phase_b_ms", "phase_c_ms", "cache_epoch", "chunk_index"):
        assert all(key in r for r in rows)


def test_timeline_hard_and_soft_transitions(tmp_path: Path) -> None:
    tl = tmp_path / "tl.toml"
    tl.write_text(
        '[[entries]]\nchunk = 0\nprompt = "a fox"\n'
        '[[entries]]\nchunk = 1\nprompt = "a fox at night"\ntransition = "soft"\n'
        '[[entries]]\nchunk = 3\nprompt = "a city"\ntransition = "hard"\n'
    )
    rc, out, m = _run(tmp_path, "tl", "--timeline", str(tl), chunks=5)
    assert rc == 0
    rows = _metrics(m)
    assert [r["cache_epoch"] for r in rows] == [0, 0, 0, 1, 1]
    assert [r["transition"] for r in rows] == ["start", "soft", "soft", "hard", "none"]
    assert [r["frames"] for r in rows] == [9, 12, 12, 9, 12]  # the VAE stream restarts at the cut
    assert [r["kv_recompute"] for r in rows] == [False, True, True, False, True]
    assert np.load(out).shape[0] == sum(r["frames"] for r in rows)


def test_mp4_output_is_valid_and_complete(tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    metrics = tmp_path / "v.jsonl"
    assert main(["run", *GEOM, "--chunks", "2", "--out", str(out), "--metrics", str(metrics)]) == 0
    assert count_mp4_frames(out) == sum(r["frames"] for r in _metrics(metrics)) == 21


def test_video_to_video(tmp_path: Path) -> None:
    src = tmp_path / "in.mp4"
    with av.open(str(src), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, : (i * 2) % 64] = (200, 40, 90)
            for pkt in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(pkt)
        for pkt in stream.encode(None):
            container.mux(pkt)
    rc, out, m = _run(tmp_path, "v2v", "--input-video", str(src), chunks=5)
    assert rc == 0
    rows = _metrics(m)
    assert len(rows) == 2  # 30 input frames cover 9 + 12 output frames, not a third chunk
    assert [r["generator_calls"] for r in rows] == [2, 3]  # v2v default: 2 steps
    assert np.load(out).shape[0] == 21


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--height", "40"], "height"),
        (["--width", "50"], "width"),
        (["--step-list", "500,750"], "denoising_step_list"),
        (["--input-video", "/nonexistent/in.mp4"], "input_video"),
        (["--topology", "pp", "--nproc", "1"], "nproc"),
        (["--queue-depth", "0"], "queue_depth"),
        (["--recompute", "r0", "--local-attn-frames", "5"], "local_attn_frames"),
    ],
)
def test_bad_input_exits_2_naming_the_field(tmp_path: Path, capsys, args: list[str], needle: str) -> None:
    out = tmp_path / "o.npy"
    assert main(["run", "--out", str(out), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists(), "validation must happen before any output is opened"


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("bad.json", "{not json", "bad.json"),
        ("nochunk0.json", '{"entries": [{"chunk": 2, "prompt": "x"}]}', "chunk"),
        (
            "badtr.json",
            '{"entries": [{"chunk": 0, "prompt": "x", "transition": "fade"}]}',
            "transition",
        ),
        (
            "order.toml",
            '[[entries]]\nchunk = 0\nprompt = "a"\n[[entries]]\nchunk = 0\nprompt = "b"\n',
            "entries[1]",
        ),
        ("extra.json", '{"entries": [{"chunk": 0, "prompt": "x", "color": 1}]}', "color"),
    ],
)
def test_malformed_timeline_exits_2(tmp_path: Path, capsys, name: str, text: str, needle: str) -> None:
    tl = tmp_path / name
    tl.write_text(text)
    assert main(["run", "--timeline", str(tl), "--out", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "timeline" in err or name in err


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("digits.json", b'{"entries": [{"chunk": ' + b"9" * 5000 + b', "prompt": "x"}]}', "not valid JSON"),
        ("deep.json", b'{"entries": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
        ("latin1.json", b'{"entries": [{"chunk": 0, "prompt": "caf\xe9"}]}', "not UTF-8"),
        ("huge.json", b'{"entries": [{"chunk": 0, "prompt": "' + b"x" * (1 << 20) + b'"}]}', "over"),
        (
            "far.json",
            b'{"entries": [{"chunk": 0, "prompt": "a"}, {"chunk": ' + b"9" * 40 + b', "prompt": "b"}]}',
            "chunk",
        ),
    ],
    ids=["5000-digit-chunk", "200k-deep", "invalid-utf8", "oversized", "chunk-past-int64"],
)
def test_hostile_timeline_exits_2_without_a_traceback(
    tmp_path: Path, capsys, name: str, data: bytes, needle: str
) -> None:
    tl = tmp_path / name
    tl.write_bytes(data)
    assert main(["run", "--timeline", str(tl), "--out", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert needle in err and name in err, err[-2000:]
    assert "Traceback" not in err and len(err) < 4000  # named, and short


@pytest.mark.parametrize("where", ["directory", "under-a-file", "proc"])
def test_an_unwritable_out_exits_2_before_model_work(tmp_path: Path, where: str) -> None:
    """Found at validation (seconds), not after the model is built (a 14B load)."""
    (tmp_path / "file").write_text("x")
    out = {
        "directory": tmp_path,
        "under-a-file": tmp_path / "file" / "v.mp4",
        "proc": Path("/proc/streamdit-nope/v.mp4"),
    }[where]
    cmd = [sys.executable, "-m", "streamdit", "run", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "[field=out]" in proc.stderr and str(out) in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_unreadable_input_video_exits_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(os.urandom(4096))
    assert main(["run", "--input-video", str(bad), "--out", str(tmp_path / "o.npy")]) == 2
    assert "garbage.mp4" in capsys.readouterr().err


def test_forced_extra_generator_call_fails_the_plan(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("STREAMDIT_TEST_EXTRA_GENERATOR_CALLS", "1")
    rc, out, m = _run(tmp_path, "plan")
    assert rc == 1
    assert "expected_generator_calls" in caplog.text and "chunk_index=0" in caplog.text
    assert read_npy_header_shape(out)[0] == 0  # nothing decoded from a chunk that broke its plan


def test_crash_mid_stream_keeps_decoded_frames(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("STREAMDIT_TEST_CRASH_AT_CHUNK", "2")
    for suffix in ("npy", "mp4"):
        out, metrics = tmp_path / f"crash.{suffix}", tmp_path / f"crash_{suffix}.jsonl"
        caplog.clear()
        assert main(["run", *GEOM, "--chunks", "4", "--out", str(out), "--metrics", str(metrics)]) == 1
        assert "InjectedFault: injected crash at chunk 2" in caplog.text
        n = np.load(out).shape[0] if suffix == "npy" else count_mp4_frames(out)
        assert n == 9 + 12
        summary = read_metrics(metrics).summary
        assert summary is not None
        assert (summary["outcome"], summary["chunks"], summary["frames"]) == ("failed", 2, n)
        assert summary["failure"].startswith("InjectedFault: injected crash at chunk 2")


def test_the_run_summary_closes_the_metrics_and_matches_its_chunks(tmp_path: Path, capsys) -> None:
    summary_file = tmp_path / "deep" / "summary.json"
    rc, out, metrics = _run(tmp_path, "sum", "--summary", str(summary_file), chunks=4)
    assert rc == 0
    read = read_metrics(metrics)
    assert read.summary is not None and json.loads(metrics.read_text().splitlines()[-1]) == read.summary
    summary = {k: v for k, v in read.summary.items() if k != "record"}
    assert json.loads(summary_file.read_text()) == summary
    assert (summary["outcome"], summary["failure"], summary["stopped_early"]) == ("completed", "", "")
    assert summary["chunks"] == len(read.chunks) == 4
    assert summary["frames"] == sum(r["frames"] for r in read.chunks) == np.load(out).shape[0]
    assert summary["out"] == str(out) and summary["topology"] == "single"
    emits = [r["emit_s"] for r in read.chunks]
    assert summary["first_frame_s"] == emits[0] <= summary["seconds"]
    periods = sorted((b - a) * 1e3 for a, b in zip(emits, emits[1:], strict=False))
    assert summary["period_ms_p50"] == pytest.approx(periods[1])
    assert summary["fps"] == pytest.approx(36 / (emits[-1] - emits[0]))
    assert summary["startup_s"] > 0 and summary["wall_s"] == pytest.approx(
        summary["startup_s"] + summary["seconds"]
    )
    assert summary["overlap_score"] is None and summary["dropped_stale"] == 0
    line = capsys.readouterr().out
    assert f"wrote {summary['frames']} frames (4 chunks)" in line and "startup " in line and " FPS" in line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_stream_drains_to_a_valid_video(tmp_path: Path, sig: signal.Signals) -> None:
    out, metrics = tmp_path / "int.mp4", tmp_path / "int.jsonl"
    env = {**os.environ, "STREAMDIT_TEST_SLOW_CHUNK_MS": "400", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "streamdit",
        "run",
        *GEOM,
        "--chunks",
        "50",
        "--out",
        str(out),
        "--metrics",
        str(metrics),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not metrics.exists() or len(read_metrics(metrics).chunks) < 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == (0 if sig == signal.SIGTERM else 130), err  # SIGTERM: a requested stop
    assert f"interrupted ({sig.name})" in err
    read = read_metrics(metrics)
    rows = read.chunks
    assert 2 <= len(rows) < 50
    assert count_mp4_frames(out) == sum(r["frames"] for r in rows)
    assert read.summary is not None
    # the first SIGINT drains like SIGTERM (only the exit code says it was an interruption)
    summary = read.summary
    assert (summary["outcome"], summary["stopped_early"], summary["chunks"]) == (
        "drained",
        sig.name,
        len(rows),
    )


def _tiny_dit_checkpoint(path: Path, *, drop: str | None = None, reshape: str | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    from streamdit.model.dit import CausalWanDiT
    from streamdit.model.presets import get_dit_config

    model = CausalWanDiT(get_dit_config("tiny"), device="cpu")
    model.init_weights(0)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if k != drop}
    if reshape:
        state[f"model.{reshape}"] = torch.zeros(3, 3)
    save_file(state, str(path))


def test_checkpoint_loads_with_self_forcing_prefix(tmp_path: Path) -> None:
    ckpt = tmp_path / "dit.safetensors"
    _tiny_dit_checkpoint(ckpt)
    # same weights as seed 0's init → the loaded run must be bit-identical to the seeded one
    rc1, out1, _ = _run(tmp_path, "seeded", "--seed", "0", chunks=2)
    rc2, out2, _ = _run(tmp_path, "loaded", "--seed", "0", "--checkpoint", str(ckpt), chunks=2)
    assert rc1 == rc2 == 0
    assert np.array_equal(np.load(out1), np.load(out2))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"drop": "blocks.1.ffn.2.weight"}, "blocks.1.ffn.2.weight"),
        ({"reshape": "blocks.0.self_attn.q.weight"}, "blocks.0.self_attn.q.weight"),
    ],
)
def test_bad_checkpoint_exits_2_naming_file_and_key(
    tmp_path: Path, capsys, kwargs: dict, needle: str
) -> None:
    ckpt = tmp_path / "bad.safetensors"
    _tiny_dit_checkpoint(ckpt, **kwargs)
    out = tmp_path / "o.npy"
    assert main(["run", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "bad.safetensors" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "field", "needs"),
    [
        (["--nproc", "2"], "nproc", "--topology tp or pp"),
        (["--npr", "2"], "nproc", "--topology tp or pp"),  # an abbreviation is a given flag too
        (["--queue-depth", "3", "--topology", "tp", "--nproc", "2"], "queue_depth", "--topology pp"),
        (["--prompt", "a fox", "--timeline", "TL"], "prompt", "no --timeline"),
        (["--compile-mode", "max-autotune"], "compile_mode", "--compile"),
        (["--graph-break-budget", "3"], "graph_break_budget", "--compile"),
        (["--use-ema"], "use_ema", "--checkpoint"),
    ],
    ids=[
        "nproc-single",
        "nproc-abbrev",
        "queue-depth-tp",
        "prompt-timeline",
        "compile-mode",
        "budget",
        "ema",
    ],
)
def test_a_flag_without_effect_exits_2_naming_it(
    tmp_path: Path, capsys, extra: list[str], field: str, needs: str
) -> None:
    tl = tmp_path / "tl.json"
    tl.write_text('{"entries": [{"chunk": 0, "prompt": "a harbour"}]}')
    extra = [str(tl) if x == "TL" else x for x in extra]
    assert main(["run", *GEOM, "--out", str(tmp_path / "o.npy"), *extra]) == 2
    err = capsys.readouterr().err
    flag = "--" + field.replace("_", "-")
    assert f"{flag} has no effect here: it needs {needs}" in err and f"[field={field}]" in err, err
    assert not (tmp_path / "o.npy").exists()  # refused before any model work


def test_serve_refuses_chunks_and_a_run_refuses_timeline_entries_it_never_reaches(
    tmp_path: Path, capsys
) -> None:
    assert main(["serve", "--chunks", "3", "--port", "0"]) == 2
    assert "--chunks has no effect here: it needs run" in capsys.readouterr().err
    tl = tmp_path / "tl.json"
    tl.write_text('{"entries": [{"chunk": 0, "prompt": "a"}, {"chunk": 4, "prompt": "b"}]}')
    assert main(["run", "--chunks", "4", "--timeline", str(tl), "--out", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert "entries at chunks [4]" in err and "--chunks 4 never reaches" in err and "[field=timeline]" in err


def test_a_yaml_timeline_is_refused_by_its_suffix(tmp_path: Path, capsys) -> None:
    tl = tmp_path / "tl.yaml"
    tl.write_text("entries:\n  - chunk: 0\n    prompt: a fox\n")
    assert main(["run", "--timeline", str(tl), "--out", str(tmp_path / "o.npy")]) == 2
    assert ".yaml is not a timeline format (write it as .toml or .json)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["serve", "--port", "99999"], "invalid port: 99999 is not a TCP port"),
        (["run", "--log-level", "verbose"], "--log-level: invalid choice: 'VERBOSE'"),
        (
            ["run", "--preset", "huge"],
            "--preset: invalid choice: 'huge' (choose from 'tiny', 'wan-1.3b', 'wan-14b')",
        ),
        (["run", "--attn-backend", "sage"], "--attn-backend: invalid choice: 'sage'"),
    ],
)
def test_a_bad_port_preset_or_log_level_is_a_usage_error(capsys, argv: list[str], needle: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage error
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_help_shows_every_default(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exc.value.code == 0
    for shown in ("(default: streamdit)", "(default: 128)", "(default: 192)", "(default: WARNING)"):
        assert shown in out, shown
    assert "(default: None)" not in out and "(default: False)" not in out
