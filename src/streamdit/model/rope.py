"""3-D rotary position embedding (time / height / width bands), Wan2.1 layout.

Owns: the band split of head_dim, the rotation angles for a chunk's absolute positions, and
applying the rotation to `[B, L, H, D]` queries/keys.

Layout (must match Wan2.1 checkpoints): head_dim d is viewed as d/2 adjacent channel pairs
(x[2i], x[2i+1]), i.e. one complex number each. The first pairs rotate with the time position,
then `d//6` pairs with the height position, then `d//6` pairs with the width position (time gets
the rest: d - 4*(d//6) channels). Within a band of b channels, pair j rotates at frequency
theta^(-2j/b), theta = 10000. Time positions are ABSOLUTE latent frame indices
(`start_frame + i`), so a key keeps its rotation while it sits in the KV cache.

Angles are computed for the requested positions only, never from a fixed-length table, so a
long stream cannot run off the end of one. They are formed in float64 because the time position
grows without bound in a stream (float32 angle error at frame 1e5 is ~1e-2 rad); the rotation
itself is float32 and the result is cast back to the input dtype.
Imports torch only.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def rope_bands(head_dim: int) -> tuple[int, int, int]:
    """Channels of head_dim given to (time, height, width), as in Wan2.1."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, band: int, theta: float) -> torch.Tensor:
    """`[P, band/2]` float64 angles for integer-valued `positions` `[P]`."""
    exponents = torch.arange(0, band, 2, dtype=torch.float64, device=positions.device) / band
    inv_freq = theta**-exponents
    return torch.outer(positions.to(torch.float64), inv_freq)


def rope_angles(
    head_dim: int,
    frame_positions: torch.Tensor,
    height: int,
    width: int,
    *,
    theta: float = ROPE_THETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each `[F*height*width, head_dim/2]` float32, for a token grid.

    `frame_positions` `[F]` holds absolute latent frame indices; height/width positions are the
    patch-grid coordinates `0..height-1`, `0..width-1`. Token order is (frame, row, column), the
    order of `patch_embedding(x).flatten(2)`.
    """
    t_band, h_band, w_band = rope_bands(head_dim)
    device = frame_positions.device
    num_frames = frame_positions.shape[0]
    t = _axis_angles(frame_positions, t_band, theta)
    h = _axis_angles(torch.arange(height, device=device), h_band, theta)
    w = _axis_angles(torch.arange(width, device=device), w_band, theta)
    grid = torch.cat(
        [
            t[:, None, None, :].expand(num_frames, height, width, -1),
            h[None, :, None, :].expand(num_frames, height, width, -1),
            w[None, None, :, :].expand(num_frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(num_frames * height * width, head_dim // 2)
    return grid.cos().to(torch.float32), grid.sin().to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, L, H, D]` by per-token angles (`cos`, `sin` `[L, D/2]`); same dtype out.

    Real form of Wan's complex product (x0 + i*x1) * (cos + i*sin).
    """
    b, length, heads, d = x.shape
    pairs = x.to(torch.float32).reshape(b, length, heads, d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.reshape(b, length, heads, d).to(x.dtype)
