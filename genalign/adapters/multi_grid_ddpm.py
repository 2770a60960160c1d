"""Ancestral DDPM for samples on different timestep grids, stepped together, with row-wise noise.

diffusers' ``DDPMScheduler.step`` takes one timestep per call and draws its noise for the samples it steps, so
samples on G grids cost G scheduler steps per sampler step and their noise depends on how they are grouped: a process
sampling its share of the rows would draw other numbers than the one-process run. Here every sampler step draws one
noise tensor ``[N, ...]`` for all samples (row-wise: a sample's noise is its row of the draw) and applies each
sample's scalars of the DDPM posterior (Ho et al. 2020, eq. 6-7)::

    x0_k    = (x_k − √(1−ᾱ_t)·ε̂) / √ᾱ_t                        (ε-prediction; x0 or v alike; clipped or thresholded)
    x_{k+1} = c0·x0_k + c1·x_k + σ·z,   c0 = √ᾱ_s·β_t / (1−ᾱ_t),   c1 = √α_t·(1−ᾱ_s) / (1−ᾱ_t),
    σ² = (1−ᾱ_s)/(1−ᾱ_t)·β_t (fixed_small) or β_t (fixed_large),  σ = 0 at t = 0,

t and s the sample's current and next timestep, α_t = ᾱ_t/ᾱ_s, β_t = 1 − α_t. The scalars are the scheduler's own
(computed from its ``alphas_cumprod`` with its operations, in its order), so given the same noise each sample
follows exactly the trajectory its grid's scheduler gives it (``tests/test_multi_grid_ddpm.py``).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

#: the variance types this module reproduces
VARIANCES = ("fixed_small", "fixed_large")


def supported(schedulers: list) -> bool:
    """Whether every scheduler is a DDPM this module reproduces, with one config, on grids of one length."""
    first = schedulers[0]
    return (isinstance(first, DDPMScheduler) and first.config.variance_type in VARIANCES
            and first.config.prediction_type in ("epsilon", "sample", "v_prediction")
            and all(isinstance(s, DDPMScheduler) and s.config == first.config
                    and len(s.timesteps) == len(first.timesteps) for s in schedulers))


def _step_scalars(scheduler: DDPMScheduler, k: int) -> tuple[torch.Tensor, ...]:
    """(√ᾱ_t, √(1−ᾱ_t), c0, c1, σ) of step k, as ``DDPMScheduler.step`` and ``_get_variance`` compute them."""
    t = int(scheduler.timesteps[k])
    prev_t = int(scheduler.timesteps[k + 1]) if k + 1 < len(scheduler.timesteps) else -1
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    c0 = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    c1 = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    if scheduler.config.variance_type == "fixed_large":
        variance = current_beta_t
    sigma = variance ** 0.5 if t > 0 else torch.zeros(())
    return alpha_prod_t ** (0.5), beta_prod_t ** (0.5), c0, c1, sigma


class MultiGridDDPM:
    """Steps samples on several grids at once: ``groups`` as :func:`~genalign.adapters.diffusion_sampling.
    sampler_groups` returns them (schedulers with their timesteps set, and the indices of their samples)."""

    def __init__(self, groups: list[tuple[DDPMScheduler, torch.Tensor]], n: int, device: torch.device):
        first = groups[0][0]
        self.config = first.config
        self.threshold = first._threshold_sample if first.config.thresholding else None
        steps = len(first.timesteps)
        self.timesteps = torch.empty(steps, n, dtype=torch.long, device=device)
        table = torch.empty(steps, 5, n)
        for sched, idx in groups:
            self.timesteps[:, idx] = sched.timesteps.to(device).unsqueeze(1)
            table[:, :, idx.cpu()] = torch.stack([torch.stack(_step_scalars(sched, k)) for k in range(steps)]).unsqueeze(-1)
        self.table = table.to(device)

    def step(self, k: int, model_output: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None):
        """x_{k+1} from the state x_k and the network's output at step k; draws ``[N, ...]`` noise at every step."""
        shape = (-1, *([1] * (x.ndim - 1)))
        sqrt_alpha, sqrt_beta, c0, c1, sigma = (row.view(shape) for row in self.table[k])
        if self.config.prediction_type == "epsilon":
            x0 = (x - sqrt_beta * model_output) / sqrt_alpha
        elif self.config.prediction_type == "v_prediction":
            x0 = sqrt_alpha * x - sqrt_beta * model_output
        else:
            x0 = model_output
        if self.threshold is not None:
            x0 = self.threshold(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean = c0 * x0 + c1 * x
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        return mean + sigma * noise
