"""Test-side reference loops of each recipe, written from docs/recipes.md step by step.

An independent, plain implementation over the model API only (`CausalWanDiT` with its
`KVCache` / `CrossAttnCache`, `CausalVideoVAE` with a `StreamingDecoder`): no runtime code,
no plan, no Stage 0, no protocol. Weights come from the safetensors files the test wrote,
loaded with plain `load_state_dict`; prompt embeddings from a plain dict. The noise follows the
documented seed contract (docs/recipes.md, "Noise"): every tensor drawn on the CPU in float32
from `torch.Generator().manual_seed(seed)`, seeds mixed with blake2b over little-endian int64s.

`run_reference(name, ...)` returns, per chunk, the generator's x0 latents and the uint8 frames
shown, for a timeline given as `[(chunk, prompt, transition, blend_chunks or None), ...]`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file

from streamdit.model.dit import CausalWanDiT
from streamdit.model.kv_cache import CrossAttnCache, KVCache
from streamdit.model.presets import get_dit_config
from streamdit.model.vae import CausalVideoVAE, StreamingDecoder, VAEConfig, get_vae_config

SHIFT = 5.0
CTX = 3  # recompute context frames: anchor + 2 most recent
FPC = 3  # latent frames per chunk


@dataclass(frozen=True)
class Loop:
    """What docs/recipes.md says each reference does (one row per recipe)."""

    policy: str  # "recompute" | "append"
    steps: tuple[int, ...]
    window: int
    warp: bool = True
    recompute_text: str = "current"
    bias: str = "soft"  # soft | always | never
    spare_anchor: bool = False
    vae: str = "wan2.1"
    drop: int = 0
    blend: str = "alpha"  # alpha: (j+1)/N from the previous prompt; lerp: j/(N-1) from current
    blend_chunks: int = 2
    reseed: bool = False


LOOPS = {
    "streamdit": Loop(policy="recompute", steps=(1000, 750, 500, 250), window=6),
    "self-forcing": Loop(policy="append", steps=(1000, 750, 500, 250), window=21),
    "krea-realtime": Loop(
        policy="recompute",
        steps=(1000, 750, 500, 250, 0),  # trunc(linspace(1000, 0, 5)): the last at t = 0
        window=6,
        recompute_text="previous",
        bias="never",
        vae="krea",
        drop=3,
        blend="lerp",
        blend_chunks=4,
        reseed=True,
    ),
    "scope-krea": Loop(
        policy="recompute",
        steps=(1000, 750, 500, 250),
        window=6,
        warp=False,
        bias="always",
        spare_anchor=True,
        blend="lerp",
        blend_chunks=4,
        reseed=True,
    ),
}
BIAS = 0.3


def mix(*parts: int) -> int:
    blob = b"".join(struct.pack("<q", int(p)) for p in parts)
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def normal(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def sigma_of(t: float) -> float:
    s = max(t, 1.0) / 1000  # the 1000-entry table has no s = 0: t = 0 reads its floor
    return SHIFT * s / (1 + (SHIFT - 1) * s)


def table_sigma(fed: float) -> float:
    """The entry of the 1000-entry table whose timestep (1000 sigma) is nearest `fed`."""
    return min((sigma_of(1000 - i) for i in range(1000)), key=lambda sig: abs(1000 * sig - fed))


def schedule(loop: Loop) -> list[tuple[float, float]]:
    """(timestep fed to the model, sigma) per step."""
    if loop.warp:
        return [(0.0 if t == 0 else 1000 * sigma_of(t), sigma_of(t)) for t in loop.steps]
    return [(float(t), table_sigma(float(t))) for t in loop.steps]


@dataclass
class Epoch:
    start_chunk: int
    cache: KVCache
    cross: CrossAttnCache
    decoder: StreamingDecoder
    latents: list[torch.Tensor] = field(default_factory=list)  # x0 of each block
    pixels: list[torch.Tensor] = field(default_factory=list)  # decoded [1, 3, t, H, W]


def build_models(dit_path: str, vae_path: str, vae_rule: str) -> tuple[CausalWanDiT, CausalVideoVAE]:
    dit = CausalWanDiT(get_dit_config("tiny"), device="cpu", dtype=torch.float32, attn_backend="math")
    dit.load_state_dict(load_file(dit_path))
    tiny = get_vae_config("tiny")
    cfg = VAEConfig(**{**{f: getattr(tiny, f) for f in tiny.__dataclass_fields__}, "latent_norm": "wan2.1"})
    vae = CausalVideoVAE(cfg)
    vae.load_state_dict(load_file(vae_path))
    del vae_rule
    return dit.eval(), vae.eval()


@torch.no_grad()
def run_reference(
    name: str,
    *,
    dit_path: str,
    vae_path: str,
    embeds: dict[str, torch.Tensor],
    timeline: list[tuple[int, str, str, int | None]],
    chunks: int,
    height: int,
    width: int,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    loop = LOOPS[name]
    dit, vae = build_models(dit_path, vae_path, loop.vae)
    text_len = dit.cfg.text_len
    tpf = (height // 16) * (width // 16)
    padded = {
        p: torch.cat([e, e.new_zeros(text_len - e.shape[0], e.shape[1])])[None] for p, e in embeds.items()
    }
    steps = schedule(loop)
    out_latents: list[np.ndarray] = []
    out_frames: list[np.ndarray] = []
    epoch: Epoch | None = None
    used: torch.Tensor | None = None  # the conditioning of the previous chunk
    blend_from: torch.Tensor | None = None
    epoch_index = -1

    def call(x: torch.Tensor, t: float, text: torch.Tensor, start: int, bias: float = 1.0, spare: int = 0):
        assert epoch is not None
        ts = torch.full((1,), t, dtype=torch.float32)
        return dit(
            x, ts, text, kv_cache=epoch.cache, cross_cache=epoch.cross, start_frame=start,
            kv_bias=bias, kv_bias_spare_frames=spare,
        )  # fmt: skip

    for k in range(chunks):
        entry_i = max(i for i, e in enumerate(timeline) if e[0] <= k)
        e_chunk, prompt, transition, n_given = timeline[entry_i]
        cut = k == 0 or (e_chunk == k and transition in ("hard", "cut"))
        n = n_given or loop.blend_chunks
        j = k - e_chunk
        soft = transition == "soft" and entry_i > 0 and j < n
        # ---- the chunk's conditioning
        if soft and j < n - 1:
            previous = timeline[entry_i - 1][1]
            if loop.blend == "alpha":
                text = torch.lerp(padded[previous], padded[prompt], (j + 1) / n)
            else:
                if j == 0 or blend_from is None:
                    blend_from = used if used is not None else padded[previous]
                text = torch.lerp(blend_from, padded[prompt], j / (n - 1))
        else:
            text = padded[prompt]
        # ---- a new epoch: every cache zeroed, positions from 0
        if cut:
            epoch_index += 1
            epoch = Epoch(
                start_chunk=k,
                cache=KVCache(
                    num_layers=len(dit.blocks),
                    batch=1,
                    heads=dit.cfg.num_heads,
                    head_dim=dit.cfg.head_dim,
                    tokens_per_frame=tpf,
                    capacity_frames=loop.window,
                    dtype=torch.float32,
                    device=torch.device("cpu"),
                ),  # fmt: skip
                cross=CrossAttnCache(len(dit.blocks)),
                decoder=StreamingDecoder(vae, upsample_history=loop.vae),
            )
            used = blend_from = None
        assert epoch is not None
        b = k - epoch.start_chunk  # block index within the epoch
        start = FPC * b
        text_changed = used is None or not torch.equal(text, used)
        # ---- recompute (blocks after the first): rebuild from anchor + 2 most recent latents
        if loop.policy == "recompute" and b > 0:
            recent = torch.cat(epoch.latents, dim=1)[:, -(CTX - 1) :]
            if b == 1:
                anchor = epoch.latents[0][:, :1]
            else:
                window = torch.cat(epoch.pixels, dim=2)[:, :, -(1 + 4 * (CTX - 1)) :]
                anchor = vae.encode(window[:, :, :1])
            if loop.recompute_text == "current" and text_changed:
                epoch.cross.reset()
            epoch.cache.reset()
            ctx_text = used if loop.recompute_text == "previous" else text
            call(torch.cat([anchor, recent], dim=1), 0.0, ctx_text, start - CTX)
        if text_changed:
            epoch.cross.reset()
        # ---- denoise
        chunk_seed = mix(seed, 0, b) if loop.reseed else mix(seed, epoch_index, k)
        x = normal(mix(chunk_seed, 0), (1, FPC, 16, height // 8, width // 8))
        biased = b > 0 and (loop.bias == "always" or (loop.bias == "soft" and soft))
        bias = BIAS if biased else 1.0
        spare = 1 if loop.spare_anchor and b > 0 else 0
        renoise = mix(chunk_seed, 1)
        x0 = x
        for i, (fed, sig) in enumerate(steps):
            v = call(x, fed, text, start, bias, spare)
            x0 = x - sig * v
            if i + 1 < len(steps):
                x = (1 - steps[i + 1][1]) * x0 + steps[i + 1][1] * normal(mix(renoise, i), tuple(x.shape))
        if loop.policy == "append":  # the block's clean K/V at its own positions
            call(x0, 0.0, text, start)
        used = text
        epoch.latents.append(x0)
        # ---- decode; a stream's first frames are kept for the anchor but not shown
        pixels = epoch.decoder.decode_chunk(x0)
        epoch.pixels.append(pixels)
        shown = pixels[:, :, loop.drop :] if b == 0 else pixels
        frames = ((shown[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        out_latents.append(x0.numpy())
        out_frames.append(frames)
    return out_latents, out_frames


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) if a.size else 0.0


__all__ = ["LOOPS", "math", "rel_err", "run_reference"]
