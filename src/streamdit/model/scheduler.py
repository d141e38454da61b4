"""Few-step flow-matching schedule: step list, shifted sigmas, x0 / re-noise math.

Owns: validation of `denoising_step_list`, the shifted flow schedule sigma(t), the timestep the
generator is conditioned on, and the two per-step updates of model.md ("Denoising one chunk"):

    v  = G(x, timesteps[i], ...)
    x0 = x - sigma_i * v
    x  = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * eps_i        (if not the last step)

The generator's timestep input is `timesteps(step_list)` = 1000 * sigma(t_i), not the raw step
value: this is Self-Forcing's `warp_denoising_step`, where 1000 -> 1000, 750 -> 937.5,
500 -> 833.3, 250 -> 625. The KV recompute call uses timestep 0.
Imports torch and `streamdit.errors` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamdit.errors import ConfigError

DEFAULT_STEP_LIST: tuple[int, ...] = (1000, 750, 500, 250)


def validate_step_list(
    steps: Sequence[int] | torch.Tensor, num_train_timesteps: int = 1000
) -> tuple[int, ...]:
    """Check a step list (non-empty, strictly decreasing ints in (0, T]); return it as ints."""
    if isinstance(steps, torch.Tensor):
        if steps.dtype != torch.int64 or steps.dim() != 1:
            raise ConfigError(
                f"denoising_step_list: need a 1-D int64 tensor, got {steps.dtype} {tuple(steps.shape)}"
            )
        values = tuple(int(s) for s in steps.tolist())
    else:
        if any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
            raise ConfigError(f"denoising_step_list: need ints, got {list(steps)}")
        values = tuple(steps)
    if not values:
        raise ConfigError("denoising_step_list: must not be empty")
    if any(not 0 < s <= num_train_timesteps for s in values):
        raise ConfigError(
            f"denoising_step_list: every step must be in (0, {num_train_timesteps}], got {values}"
        )
    if any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ConfigError(f"denoising_step_list: must be strictly decreasing, got {values}")
    return values


class FlowMatchScheduler:
    """Shifted flow-matching schedule: sigma(t) = shift*s / (1 + (shift-1)*s), s = t/T."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        if not shift > 0:
            raise ConfigError(f"shift: must be > 0, got {shift}")
        if num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps: must be >= 1, got {num_train_timesteps}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """Noise level of timestep t (tensor or float; same kind out); sigma(T)=1, sigma(0)=0."""
        s = t / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, step_list: torch.Tensor) -> torch.Tensor:
        """float32 sigmas of a validated int64 step list, on the step list's device."""
        validate_step_list(step_list, self.num_train_timesteps)
        # float64 for the division so the table does not depend on float32 rounding order.
        return self.sigma(step_list.to(torch.float64)).to(torch.float32)

    def timesteps(self, step_list: torch.Tensor) -> torch.Tensor:
        """float32 timesteps the generator is conditioned on: T * sigma(t_i) (warped steps)."""
        return self.sigmas(step_list) * self.num_train_timesteps

    @staticmethod
    def x0_from_flow(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Clean estimate x0 = x - sigma*v, computed in float32, returned in x's dtype."""
        return (x.to(torch.float32) - sigma * v.to(torch.float32)).to(x.dtype)

    @staticmethod
    def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Noised sample at level sigma: (1 - sigma)*x0 + sigma*eps, in float32, x0's dtype out."""
        out = (1 - sigma) * x0.to(torch.float32) + sigma * eps.to(torch.float32)
        return out.to(x0.dtype)
