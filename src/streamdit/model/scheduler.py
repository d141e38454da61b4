"""Few-step flow-matching schedule: step list, shifted sigmas, x0 / re-noise math.

Owns: validation of `denoising_step_list`, the shifted flow schedule sigma(t), the timestep the
generator is conditioned on, and the two per-step updates of docs/model.md ("Denoising one chunk"):

    v  = G(x, timesteps[i], ...)
    x0 = x - sigma_i * v
    x  = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * eps_i        (if not the last step)

The generator's timestep input is `timesteps(step_list)` = 1000 * sigma(t_i), not the raw step
value: this is Self-Forcing's `warp_denoising_step`, where 1000 -> 1000, 750 -> 937.5,
500 -> 833.3, 250 -> 625. The KV recompute call uses timestep 0. With `warp=False` (Scope's
port) the generator is fed t itself and sigma is read from the schedule table at the entry whose
timestep is nearest t (the reference's argmin lookup).

The reference schedule is a table of 1000 entries, s = 1, 0.999, ..., 0.001 (sigma_min 0, one
extra step dropped): it has no entry at s = 0. A step t = 0 (Krea's final step) is fed timestep
0, but its sigma is the table's floor sigma(1/1000) = 0.004980 (shift 5), not 0: both the x0
estimate of the last call and the re-noise to that step use it.
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
    """Check a step list (non-empty, strictly decreasing ints in [0, T], 0 only as the last
    step); return it as ints."""
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
    if any(not 0 <= s <= num_train_timesteps for s in values) or 0 in values[:-1]:
        raise ConfigError(
            f"denoising_step_list: every step must be in [0, {num_train_timesteps}] (0 only last), "
            f"got {values}"
        )
    if any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ConfigError(f"denoising_step_list: must be strictly decreasing, got {values}")
    return values


class FlowMatchScheduler:
    """Shifted flow-matching schedule: sigma(t) = shift*s / (1 + (shift-1)*s), s = t/T."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000, *, warp: bool = True) -> None:
        if not shift > 0:
            raise ConfigError(f"shift: must be > 0, got {shift}")
        if num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps: must be >= 1, got {num_train_timesteps}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.warp = warp

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """Noise level of timestep t > 0 (tensor or float; same kind out); sigma(T) = 1."""
        s = t / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    def table(self) -> torch.Tensor:
        """The reference's float64 sigma table, entry i at t = T - i (i = 0..T-1; no t = 0)."""
        t = torch.arange(self.num_train_timesteps, 0, -1, dtype=torch.float64)
        return self.sigma(t)  # type: ignore[return-value]

    def sigmas(self, step_list: torch.Tensor) -> torch.Tensor:
        """float32 sigmas of a validated int64 step list, on the step list's device."""
        validate_step_list(step_list, self.num_train_timesteps)
        steps = step_list.to(torch.float64)
        if self.warp:
            # float64 for the division so the table does not depend on float32 rounding order;
            # t = 0 reads the table's floor (see the module docstring)
            sig = self.sigma(steps.clamp(min=1.0))
        else:
            table = self.table().to(steps.device)
            nearest = (table.unsqueeze(0) * self.num_train_timesteps - steps.unsqueeze(1)).abs().argmin(dim=1)
            sig = table[nearest]
        return sig.to(torch.float32)  # type: ignore[union-attr]

    def timesteps(self, step_list: torch.Tensor) -> torch.Tensor:
        """float32 timesteps the generator is conditioned on: T * sigma(t_i) (warped; t = 0 stays
        0), or t itself without warp."""
        if not self.warp:
            validate_step_list(step_list, self.num_train_timesteps)
            return step_list.to(torch.float32)
        fed = self.sigmas(step_list) * self.num_train_timesteps
        return torch.where(step_list.to(fed.device) == 0, torch.zeros_like(fed), fed)

    @staticmethod
    def x0_from_flow(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Clean estimate x0 = x - sigma*v, computed in float32, returned in x's dtype."""
        return (x.to(torch.float32) - sigma * v.to(torch.float32)).to(x.dtype)

    @staticmethod
    def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Noised sample at level sigma: (1 - sigma)*x0 + sigma*eps, in float32, x0's dtype out."""
        out = (1 - sigma) * x0.to(torch.float32) + sigma * eps.to(torch.float32)
        return out.to(x0.dtype)
