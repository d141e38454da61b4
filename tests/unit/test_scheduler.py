"""Few-step flow matching: shifted sigma, warped generator timesteps, x0 / re-noise algebra and
`denoising_step_list` validation."""

from __future__ import annotations

import pytest
import torch

from streamdit.errors import ConfigError
from streamdit.model.scheduler import DEFAULT_STEP_LIST, FlowMatchScheduler, validate_step_list


def test_sigma_endpoints_shift_and_monotonicity() -> None:
    sched = FlowMatchScheduler()
    assert sched.sigma(1000.0) == pytest.approx(1.0) and sched.sigma(0.0) == 0.0
    grid = sched.sigma(torch.linspace(0, 1000, 101, dtype=torch.float64))
    assert (grid.diff() > 0).all()
    # shift > 1 pushes every interior step towards more noise than the linear schedule.
    linear = FlowMatchScheduler(shift=1.0).sigma(torch.linspace(0, 1000, 101, dtype=torch.float64))
    torch.testing.assert_close(linear, torch.linspace(0, 1, 101, dtype=torch.float64))
    assert (grid[1:-1] > linear[1:-1]).all()


def test_sigmas_and_timesteps_of_the_default_list() -> None:
    sched = FlowMatchScheduler(shift=5.0)
    steps = torch.tensor(DEFAULT_STEP_LIST, dtype=torch.int64)
    sig = sched.sigmas(steps)
    assert sig.dtype == torch.float32 and sig.shape == (len(DEFAULT_STEP_LIST),)
    for t, s in zip(DEFAULT_STEP_LIST, sig.tolist(), strict=True):
        u = t / 1000
        assert s == pytest.approx(5 * u / (1 + 4 * u), rel=1e-6)
    torch.testing.assert_close(sched.timesteps(steps), sig * 1000)
    assert (sig.diff() < 0).all() and sig[0] == 1.0


def test_x0_from_flow_inverts_renoise() -> None:
    """With the flow target v = eps - x0, x0_from_flow(renoise(x0, eps, s), v, s) == x0."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 16, 4, 4, generator=gen), torch.randn(2, 3, 16, 4, 4, generator=gen)
    for sigma in (1.0, 0.9375, 0.25, torch.tensor(0.6)):
        xt = FlowMatchScheduler.renoise(x0, eps, sigma)
        torch.testing.assert_close(FlowMatchScheduler.x0_from_flow(xt, eps - x0, sigma), x0)
    assert torch.equal(FlowMatchScheduler.renoise(x0, eps, 1.0), eps)
    assert FlowMatchScheduler.x0_from_flow(x0.bfloat16(), eps.bfloat16(), 0.5).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "steps",
    [
        [],
        [1000, 1000, 500],
        [250, 500],
        [1001, 500],
        [1000, 0, -1],
        [1000, -250],
        [1000.0, 500.0],
        [True],
        torch.tensor([1000, 500], dtype=torch.int32),
        torch.tensor([[1000, 500]]),
    ],
    ids=repr,
)
def test_bad_step_lists_name_the_field(steps: object) -> None:
    with pytest.raises(ConfigError, match="denoising_step_list"):
        if isinstance(steps, torch.Tensor):
            FlowMatchScheduler().sigmas(steps)
        else:
            validate_step_list(steps)


def test_good_step_lists() -> None:
    assert validate_step_list(DEFAULT_STEP_LIST) == DEFAULT_STEP_LIST
    assert validate_step_list(torch.tensor([999, 1])) == (999, 1)
    assert validate_step_list([1000]) == (1000,)


@pytest.mark.parametrize("kwargs", [{"shift": 0.0}, {"shift": -1.0}, {"num_train_timesteps": 0}])
def test_bad_scheduler_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FlowMatchScheduler(**kwargs)


def _reference_table(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference schedule as Self-Forcing / Krea / Scope build it (float32 throughout):
    sigma_min 0 with one extra step dropped, i.e. linspace(1, 0, 1001)[:-1], then the shift."""
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas, sigmas * 1000


def test_krea_zero_step_reads_the_table_floor() -> None:
    """Krea's final step t = 0: fed 0, its sigma the table's last entry (0.004980), not 0."""
    sched = FlowMatchScheduler(shift=5.0)
    steps = torch.tensor([1000, 750, 500, 250, 0])
    sigmas, table_t = _reference_table(5.0)
    zero_padded = torch.cat([table_t, torch.zeros(1)])
    want_fed = zero_padded[1000 - steps]  # Krea's get_denoising_schedule
    assert torch.allclose(sched.timesteps(steps), want_fed, rtol=1e-6, atol=1e-4)
    ids = (table_t.unsqueeze(0) - want_fed.unsqueeze(1)).abs().argmin(dim=1)  # the wrapper's lookup
    assert torch.allclose(sched.sigmas(steps), sigmas[ids], rtol=1e-6)
    assert abs(float(sched.sigmas(steps)[-1]) - 0.004980) < 1e-6


def test_unwarped_steps_are_fed_raw_with_the_nearest_table_sigma() -> None:
    """Scope's port: t fed as is, sigma by argmin over the table's timesteps."""
    sched = FlowMatchScheduler(shift=5.0, warp=False)
    steps = torch.tensor([1000, 750, 500, 250])
    sigmas, table_t = _reference_table(5.0)
    ids = (table_t.unsqueeze(0) - steps.float().unsqueeze(1)).abs().argmin(dim=1)
    assert torch.equal(sched.timesteps(steps), steps.float())
    assert torch.allclose(sched.sigmas(steps), sigmas[ids], rtol=1e-6)
    assert not torch.allclose(sched.sigmas(steps), FlowMatchScheduler(shift=5.0).sigmas(steps))
