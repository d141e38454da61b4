"""Every checkpoint format users have loads through `streamdit run --checkpoint` (the CLI path),
and a wrong file still exits 2 naming the key, before any model work.

The test writes the same tiny DiT weights in each format (single safetensors with Krea's
`model.` prefixes, a sharded folder, its index.json, a flat `.pt`, a Self-Forcing-style `.pt`
holding `generator` and `generator_ema`) and the tiny VAE as a Wan2.1-style `.pth`; each run
must write the same video as the run on the plain file (EMA: the EMA weights' video).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streamdit.cli import main
from streamdit.model.dit import CausalWanDiT
from streamdit.model.presets import get_dit_config
from streamdit.model.vae import CausalVideoVAE, get_vae_config

GEOM = ["--height", "32", "--width", "48", "--chunks", "2"]


def _dit_state(seed: int) -> dict[str, torch.Tensor]:
    dit = CausalWanDiT(get_dit_config("tiny"), device="cpu")
    dit.init_weights(seed)
    return {k: v.contiguous() for k, v in dit.state_dict().items()}


def _sharded(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    state, ema = _dit_state(21), _dit_state(22)
    save_file(state, root / "plain.safetensors")
    save_file(ema, root / "ema.safetensors")
    save_file({f"model.{k}": v for k, v in state.items()}, root / "krea.safetensors")  # Krea's prefix
    index = _sharded(root / "sharded", state)
    torch.save(state, root / "flat.pt")
    sf = {"generator": {f"model.{k}": v for k, v in state.items()}, "generator_ema": ema}
    torch.save(
        {k: ({f"model.{n}": t for n, t in v.items()}) for k, v in sf.items()}, root / "self_forcing.pt"
    )
    vae = CausalVideoVAE(get_vae_config("tiny"))
    vae.init_weights(5)
    vae_state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(vae_state, root / "vae.safetensors")
    torch.save(vae_state, root / "Wan2.1_VAE.pth")
    broken = dict(state)
    broken.pop("blocks.1.ffn.2.weight")
    save_file(broken, root / "missing.safetensors")
    bad = dict(state)
    bad["head.head.weight"] = torch.zeros(3, 3)
    save_file(bad, root / "misshaped.safetensors")
    return {"root": root, "index": index, **{p.stem: p for p in root.iterdir() if p.is_file()}}


def _video(tmp: Path, name: str, *args: str) -> np.ndarray:
    out = tmp / f"{name}.npy"
    assert main(["run", *GEOM, "--out", str(out), *args]) == 0
    return np.load(out)


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> dict[str, np.ndarray]:
    tmp = files["root"]
    return {
        "plain": _video(tmp, "ref", "--checkpoint", str(files["plain"])),
        "ema": _video(tmp, "ref_ema", "--checkpoint", str(files["ema"])),
        "vae": _video(
            tmp, "ref_vae", "--checkpoint", str(files["plain"]), "--vae-checkpoint", str(files["vae"])
        ),
    }


@pytest.mark.parametrize(
    ("name", "flags", "expect"),
    [
        ("krea", [], "plain"),
        ("sharded-folder", [], "plain"),
        ("sharded-index", [], "plain"),
        ("flat", [], "plain"),
        ("self_forcing", [], "plain"),  # generator by default ...
        ("self_forcing", ["--use-ema"], "ema"),  # ... its EMA weights on request
        ("self_forcing", ["--checkpoint-select", "generator_ema"], "ema"),
    ],
)
def test_each_dit_format_loads_through_the_cli(name, flags, expect, files, reference, tmp_path) -> None:
    path = {"sharded-folder": files["root"] / "sharded", "sharded-index": files["index"]}.get(name)
    video = _video(tmp_path, name, "--checkpoint", str(path or files[name]), *flags)
    assert np.array_equal(video, reference[expect])


def test_the_wan_vae_pth_loads_with_wan_statistics(files, reference, tmp_path, caplog) -> None:
    caplog.set_level("INFO", logger="streamdit.runtime.build")
    video = _video(
        tmp_path, "pth", "--checkpoint", str(files["plain"]), "--vae-checkpoint", str(files["Wan2.1_VAE"])
    )
    assert np.array_equal(video, reference["vae"])
    assert "VAE latent statistics: wan2.1" in caplog.text  # real VAE weights: Wan2.1's statistics
    assert "loaded" in caplog.text and "torch" in caplog.text and "float32=" in caplog.text  # the report
    identity = _video(
        tmp_path, "identity", "--checkpoint", str(files["plain"]), "--vae-checkpoint", str(files["vae"]),
        "--latent-norm", "identity",
    )  # fmt: skip
    assert not np.array_equal(identity, reference["vae"])


@pytest.mark.parametrize(
    ("name", "flags", "needles"),
    [
        ("missing", [], ["missing", "blocks.1.ffn.2.weight"]),
        ("misshaped", [], ["mis-shaped", "head.head.weight"]),
        ("self_forcing", ["--checkpoint-select", "critic"], ["critic", "generator"]),
        ("plain", ["--use-ema", "--checkpoint-select", "generator"], ["use_ema"]),
    ],
)
def test_a_wrong_checkpoint_exits_2_naming_the_key(name, flags, needles, files, tmp_path, capsys) -> None:
    out = tmp_path / "never.npy"
    assert main(["run", *GEOM, "--out", str(out), "--checkpoint", str(files[name]), *flags]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # rejected before any model work or output
