"""`--vae tiny` through the CLI: its weights file loads end to end, a bad one exits 2 naming the
key before any model work, and `--tiny-vae-checkpoint` without `--vae tiny` is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamdit.model.taehv import TinyVAEConfig, TinyVideoDecoder
from streamdit.runtime.build import VAE_SEED_OFFSET

pytestmark = pytest.mark.timeout(120)
GEOM = ["--height", "32", "--width", "48", "--chunks", "2"]


def _run(tmp_path: Path, name: str, *flags: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"{name}.npy"
    cmd = [sys.executable, "-m", "streamdit", "run", *GEOM, "--out", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=100), out


def _published(path: Path, seed: int, *, drop: str | None = None) -> None:
    """A state dict in taew2_1.pth's layout (encoder keys beside the decoder's) via torch.save."""
    model = TinyVideoDecoder(TinyVAEConfig(), device="cpu", dtype=torch.float32)
    model.init_weights(seed)
    state = {k: v for k, v in model.state_dict().items() if k != drop}
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, path)


def test_tiny_decoder_weights_file_loads_end_to_end(tmp_path: Path) -> None:
    seeded, out_seeded = _run(tmp_path, "seeded", "--vae", "tiny")
    assert seeded.returncode == 0, seeded.stderr
    # the file holds exactly the weights the seeded run used: the videos must be equal
    _published(tmp_path / "taew2_1.pth", seed=0 + VAE_SEED_OFFSET)
    loaded, out_loaded = _run(
        tmp_path, "loaded", "--vae", "tiny", "--tiny-vae-checkpoint", str(tmp_path / "taew2_1.pth")
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "tiny decoder weights:" in loaded.stderr
    np.testing.assert_array_equal(np.load(out_loaded), np.load(out_seeded))
    _published(tmp_path / "other.pth", seed=7)  # other weights, another video: the file is read
    other, out_other = _run(
        tmp_path, "other", "--vae", "tiny", "--tiny-vae-checkpoint", str(tmp_path / "other.pth")
    )
    assert other.returncode == 0 and not np.array_equal(np.load(out_other), np.load(out_seeded))


def test_a_bad_tiny_decoder_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    _published(tmp_path / "bad.pth", seed=1, drop="decoder.8.weight")
    proc, out = _run(tmp_path, "bad", "--vae", "tiny", "--tiny-vae-checkpoint", str(tmp_path / "bad.pth"))
    assert proc.returncode == 2, proc.stderr
    assert "missing keys ['decoder.8.weight']" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # refused before any model work or output


def test_tiny_checkpoint_without_vae_tiny_exits_2_naming_the_flag(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, "x", "--tiny-vae-checkpoint", str(tmp_path / "taew2_1.pth"))
    assert proc.returncode == 2
    assert "--tiny-vae-checkpoint has no effect without --vae tiny" in proc.stderr
