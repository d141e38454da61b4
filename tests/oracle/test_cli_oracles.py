"""The CLI path against independent implementations from PyPI (diffusers, transformers).

Files are written in the oracles' own formats (`save_pretrained`), then used by `streamdit`
exactly as a user would: `--checkpoint DIR`, `--vae-checkpoint DIR`, `--text-encoder DIR`,
`streamdit encode-text`. The oracle side computes the same thing with the library's own model:

- DiT: chunk 0 of `streamdit run` (4 denoising steps, no cache: a chunk attends only to itself)
  against the same four steps run with diffusers' `WanTransformer3DModel` on the same noise
  (the documented seed contract) and text: x0 within rel 1e-5 (float32);
- VAE: the video `streamdit run` wrote against diffusers' `AutoencoderKLWan.decode` of the
  latents the run produced (un-normalized with Wan2.1's statistics, chosen automatically for
  real VAE weights): uint8 frames within 1 level;
- text: `streamdit encode-text --text-encoder DIR` against transformers' `UMT5EncoderModel` and
  tokenizer run directly (rel 1e-5, rows past the prompt exactly 0); a run with `--text-encoder`
  and one with `--text-embeddings` of that file produce the same latents.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from recipe_loops import mix, normal, sigma_of
from streamdit.cli import main
from streamdit.model.presets import get_dit_config
from streamdit.model.text_embeddings import save_text_embeddings
from streamdit.model.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD
from word_tokenizer import word_tokenizer

pytestmark = pytest.mark.timeout(300)
H, W, SEED, PROMPT = 32, 48, 3, "a red fox runs through fresh snow"
DIT = get_dit_config("tiny")
STEPS = (1000, 750, 500, 250)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter seeded-random (diffusers zero-inits some), outputs of order one."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("scale_shift_table"):
            p.copy_(noise * p.shape[-1] ** -0.5)
        elif name.endswith("gamma") or p.dim() < 2 and not name.endswith("bias"):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.05 * noise)
        else:
            p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))


def _tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer((PROMPT + " a harbour at dawn in the rain").split())


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("oracles")
    dit = WanTransformer3DModel(
        patch_size=DIT.patch_size, num_attention_heads=DIT.num_heads, attention_head_dim=DIT.head_dim,
        in_channels=16, out_channels=16, text_dim=DIT.text_dim, freq_dim=DIT.freq_dim, ffn_dim=DIT.ffn_dim,
        num_layers=DIT.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=DIT.eps,
    ).eval()  # fmt: skip
    _randomize(dit, 0)
    dit.save_pretrained(root / "pipe" / "transformer")
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()  # fmt: skip
    _randomize(vae, 1)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)  # pixels mostly inside [-1, 1]
    vae.save_pretrained(root / "pipe" / "vae")
    torch.manual_seed(2)
    te = UMT5EncoderModel(
        UMT5Config(d_model=DIT.text_dim, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=64,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                   relative_attention_max_distance=16)
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in te.parameters():
            p.add_(0.1 * torch.randn_like(p))
    te.save_pretrained(root / "pipe" / "text_encoder")
    _tokenizer().save_pretrained(root / "pipe" / "tokenizer")
    return {"root": root, "pipe": root / "pipe", "dit": dit, "vae": vae, "te": te}


def _run(tmp: Path, *args: str) -> tuple[list[np.ndarray], np.ndarray]:
    out = tmp / "v.npy"
    argv = ["run", "--height", str(H), "--width", str(W), "--seed", str(SEED), "--out", str(out), *args]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMDIT_TEST_DUMP_LATENTS", str(tmp / "lat"))
        assert main(argv) == 0
    return [np.load(p) for p in sorted((tmp / "lat").glob("chunk*.npy"))], np.load(out)


def _text(folders: dict, prompt: str) -> torch.Tensor:
    """The oracle's conditioning: transformers' tokenizer + encoder, zero past the prompt."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(folders["pipe"] / "tokenizer"))
    batch = tok([prompt], padding="max_length", truncation=True, max_length=DIT.text_len, return_tensors="pt")
    with torch.no_grad():
        hidden = folders["te"](batch.input_ids, batch.attention_mask).last_hidden_state
    hidden[:, int(batch.attention_mask.sum()) :] = 0.0
    return hidden


def _rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_encode_text_matches_transformers(folders: dict, tmp_path: Path) -> None:
    out = tmp_path / "emb.safetensors"
    prompts = [PROMPT, "a harbour at dawn"]
    argv = ["encode-text", "--text-encoder", str(folders["pipe"]), "--out", str(out)]
    assert main([*argv, *(a for p in prompts for a in ("--prompt", p))]) == 0
    table = load_file(str(out))
    for i, prompt in enumerate(prompts):
        got, want = table[f"embeds.{i}"], _text(folders, prompt)[0]
        assert got.shape == (DIT.text_len, DIT.text_dim)
        assert _rel(got, want) <= 1e-5
        n = len(prompt.split()) + 1  # words + </s>
        assert got[n:].abs().max() == 0 and got[:n].abs().sum(dim=1).min() > 0  # zero past the prompt


def test_dit_and_vae_of_diffusers_through_the_cli(folders: dict, tmp_path: Path) -> None:
    emb = tmp_path / "emb.safetensors"
    text = _text(folders, PROMPT)
    save_text_embeddings(emb, {PROMPT: text[0]})
    lat, video = _run(
        tmp_path, "--chunks", "1", "--prompt", PROMPT, "--checkpoint", str(folders["pipe"]),
        "--vae-checkpoint", str(folders["pipe"]), "--text-embeddings", str(emb),
    )  # fmt: skip
    # the oracle's chunk 0: four steps of diffusers' transformer on the same noise
    base = mix(SEED, 0, 0)
    x = normal(mix(base, 0), (1, 3, 16, H // 8, W // 8))
    renoise = mix(base, 1)
    with torch.no_grad():
        for i, t in enumerate(STEPS):
            sig = sigma_of(t)
            v = folders["dit"](x.transpose(1, 2), torch.tensor([1000 * sig]), text, return_dict=False)[0]
            x0 = x - sig * v.transpose(1, 2)
            if i + 1 < len(STEPS):
                nxt = sigma_of(STEPS[i + 1])
                x = (1 - nxt) * x0 + nxt * normal(mix(renoise, i), tuple(x.shape))
    assert _rel(lat[0], x0) <= 1e-5, _rel(lat[0], x0)
    # the decode: real VAE weights → Wan2.1's latent statistics, undone before diffusers' decoder
    z = torch.from_numpy(lat[0]).transpose(1, 2)
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        pixels = folders["vae"].decode(z * std + mean, return_dict=False)[0]
    frames = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert video.shape == frames.shape == (9, H, W, 3)
    diff = np.abs(video.astype(int) - frames.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_text_encoder_and_its_precomputed_embeddings_give_the_same_stream(
    folders: dict, tmp_path: Path
) -> None:
    emb = tmp_path / "emb.safetensors"
    assert (
        main(["encode-text", "--text-encoder", str(folders["pipe"]), "--prompt", PROMPT, "--out", str(emb)])
        == 0
    )
    common = ("--chunks", "2", "--prompt", PROMPT, "--checkpoint", str(folders["pipe"]))
    live, _ = _run(tmp_path / "live", *common, "--text-encoder", str(folders["pipe"]))
    pre, _ = _run(tmp_path / "pre", *common, "--text-embeddings", str(emb))
    assert len(live) == len(pre) == 2
    for a, b in zip(live, pre, strict=True):
        assert np.array_equal(a, b)


def test_a_text_encoder_of_the_wrong_width_exits_2_before_model_work(folders: dict, tmp_path, capsys) -> None:
    out = tmp_path / "never.npy"
    argv = ["run", "--preset", "wan-1.3b", "--text-encoder", str(folders["pipe"]), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "d_model=64, need 4096" in err and "field=text_encoder" in err
    assert not out.exists()
