"""Several DPM-Solver++ grids stepped together (genalign.adapters.multi_grid_dpm) give every sample exactly, bit for
bit, the trajectory diffusers' DPMSolverMultistepScheduler gives it alone on its grid, for each prediction type; the
sampler loop takes this path for DPM-Solver++ on several grids and records the same states."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from genalign.adapters import multi_grid_dpm
from genalign.adapters.diffusion_sampling import run_sampler, sampler_groups
from genalign.adapters.diffusion_scores import sampling_scheduler

TRAIN = DDPMScheduler(num_train_timesteps=1000).config


def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A row-wise stand-in for a network: depends on each sample's own state and timestep only."""
    return torch.tanh(0.7 * x + t.view(-1, 1, 1, 1).float() / 1000) - 0.1 * x


def grids(steps: int, n: int, seed: int) -> torch.Tensor:
    """Diffusion-DRO's offset grids t_k = k·r + o with random offsets (some repeated)."""
    ratio = 1000 // steps
    offsets = torch.randint(0, ratio, (n, 1), generator=torch.Generator().manual_seed(seed)) % 7
    return torch.arange(steps - 1, -1, -1).unsqueeze(0) * ratio + offsets


def alone(grid: torch.Tensor, x: torch.Tensor, prediction_type: str, thresholding: bool = False) -> torch.Tensor:
    """One sample on its own scheduler, stepped by diffusers."""
    sched = DPMSolverMultistepScheduler.from_config(TRAIN, algorithm_type="dpmsolver++", prediction_type=prediction_type,
                                                    thresholding=thresholding)
    sched.set_timesteps(timesteps=grid.tolist())
    for t in sched.timesteps:
        x = sched.step(predict(x, t.view(1)), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("prediction_type, thresholding", [("epsilon", False), ("v_prediction", False),
                                                         ("sample", False), ("epsilon", True)])
@pytest.mark.parametrize("steps", [10, 3, 20])
def test_every_sample_follows_its_own_schedulers_trajectory_bit_for_bit(prediction_type, thresholding, steps):
    """Thresholding: the digits model's dynamic thresholding (each x0 clipped by its own 0.995 quantile)."""
    n = 9
    timesteps = grids(steps, n, seed=steps)
    config = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, thresholding=thresholding).config
    groups = sampler_groups("dpmsolver++", config, n, torch.device("cpu"), steps, timesteps)
    assert len(groups) > 1 and multi_grid_dpm.supported([s for s, _ in groups])
    start = torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    together, _ = run_sampler(groups, start.clone(), predict, None)
    for i in range(n):
        assert torch.equal(together[i : i + 1], alone(timesteps[i], start[i : i + 1], prediction_type, thresholding)), i


def test_recorded_states_are_the_states_and_timesteps_of_each_step():
    n, steps = 6, 5
    timesteps = grids(steps, n, seed=1)
    groups = sampler_groups("dpmsolver++", TRAIN, n, torch.device("cpu"), steps, timesteps)
    start = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    final, states = run_sampler(groups, start, predict, None, record=(DDPMScheduler.from_config(TRAIN), "epsilon"))
    assert len(states) == steps and torch.equal(states[0].x_t, start)
    for k, state in enumerate(states):
        assert torch.equal(state.t, timesteps[:, k])
        torch.testing.assert_close(state.eps_hat, predict(state.x_t, state.t), atol=0, rtol=0)  # ε-prediction as is
    assert not torch.equal(final, start)


def test_other_samplers_and_settings_keep_the_per_grid_loop():
    ddpm = sampling_scheduler("ddpm", TRAIN)
    third = DPMSolverMultistepScheduler.from_config(TRAIN, algorithm_type="dpmsolver++", solver_order=3)
    dpm = sampling_scheduler("dpmsolver++", TRAIN)
    for sched in (ddpm, third, dpm):
        sched.set_timesteps(4)
    assert not multi_grid_dpm.supported([ddpm, ddpm]) and not multi_grid_dpm.supported([third, third])
    assert multi_grid_dpm.supported([dpm, dpm])
