"""Several DDPM grids stepped together (genalign.adapters.multi_grid_ddpm): given the same noise, every sample follows
bit for bit the trajectory diffusers' DDPMScheduler gives it alone on its grid (each prediction type, clipping,
dynamic thresholding, both fixed variances); the noise is one [N, ...] draw per step, so a sample's noise is its row
whatever the grouping, and the sampler loop takes this path for DDPM on several grids."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from diffusers.utils.torch_utils import randn_tensor

from genalign.adapters import multi_grid_ddpm
from genalign.adapters.diffusion_sampling import row_wise_grids, run_sampler, sampler_groups
from genalign.distributed import Shard


def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A row-wise stand-in for a network: depends on each sample's own state and timestep only."""
    return torch.tanh(0.7 * x + t.view(-1, 1, 1, 1).float() / 1000) - 0.1 * x


def grids(steps: int, n: int) -> torch.Tensor:
    """Offset grids t_k = k·r + o; offset 0 for some samples, so their last step adds no noise."""
    ratio = 1000 // steps
    offsets = torch.tensor([0, 3, 3, 17, 0, 41, 5])[:n].unsqueeze(1)
    return torch.arange(steps - 1, -1, -1).unsqueeze(0) * ratio + offsets


@pytest.mark.parametrize("settings", [
    {"prediction_type": "epsilon"},
    {"prediction_type": "epsilon", "clip_sample": False, "variance_type": "fixed_large"},
    {"prediction_type": "v_prediction", "clip_sample": False},
    {"prediction_type": "sample"},
    {"prediction_type": "epsilon", "thresholding": True, "beta_schedule": "squaredcos_cap_v2"},
])
def test_every_sample_follows_its_own_schedulers_trajectory_bit_for_bit(settings, monkeypatch):
    n, steps = 7, 5
    config = DDPMScheduler(num_train_timesteps=1000, **settings).config
    timesteps = grids(steps, n)
    groups = sampler_groups("ddpm", config, n, torch.device("cpu"), steps, timesteps)
    assert len(groups) > 1 and multi_grid_ddpm.supported([s for s, _ in groups])
    start = torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    together, _ = run_sampler(groups, start.clone(), predict, torch.Generator().manual_seed(3))

    replay = torch.Generator().manual_seed(3)  # the noise the grouped run drew: one [N, ...] tensor per step
    noise = [randn_tensor(start.shape, generator=replay, dtype=torch.float32) for _ in range(steps)]
    for i in range(n):
        sched = DDPMScheduler.from_config(config)
        sched.set_timesteps(timesteps=timesteps[i].tolist())
        x = start[i : i + 1]
        for k, t in enumerate(sched.timesteps):
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, _k=k, **kw: noise[_k][i : i + 1])
            x = sched.step(predict(x, t.view(1)), t, x).prev_sample
        assert torch.equal(together[i : i + 1], x), i


def test_noise_is_one_row_wise_draw_per_step():
    """Each half of the samples, drawn under its process's ``Shard.draws``, gets the whole run's trajectories."""
    n, steps = 6, 4
    config = DDPMScheduler(num_train_timesteps=1000).config
    timesteps = grids(steps, n)
    start = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    whole, _ = run_sampler(sampler_groups("ddpm", config, n, torch.device("cpu"), steps, timesteps), start.clone(),
                           predict, torch.Generator().manual_seed(5))
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 6))):
        generator = torch.Generator().manual_seed(5)
        groups = sampler_groups("ddpm", config, 3, torch.device("cpu"), steps, timesteps[rows])
        with Shard(rank, 2).draws(generator):
            part, _ = run_sampler(groups, start[rows].clone(), predict, generator)
        assert len(groups) > 1 and torch.equal(part, whole[rows]), rank
    assert row_wise_grids("ddpm", config, timesteps) and row_wise_grids("dpmsolver++", config, timesteps)
    assert not row_wise_grids("ddpm", DDPMScheduler(variance_type="learned").config, timesteps)
