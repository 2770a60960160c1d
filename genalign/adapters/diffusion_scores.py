"""Denoising scores shared by the diffusion adapters (image, motion).

A diffusion model's per-sample score is the negative denoising error at a timestep ``t`` and noise ``eps``::

    x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·eps                       (the scheduler's ``add_noise``)
    s(x0) = −mean_dims ‖f_θ(x_t, t, c) − target‖²,  target ∈ {eps, v = sqrt(ᾱ_t)·eps − sqrt(1 − ᾱ_t)·x0, x0}

This is the ELBO surrogate of Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct
Preference Optimization"): with it, Diffusion-DPO is DPO on these scores. Samples with the same group id share
``(t, eps)`` so a pair's chosen and rejected are compared at the same noise, and the reference is evaluated on the
very same ``x_t``.
"""

from __future__ import annotations

import copy

from typing import NamedTuple

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseDraw(NamedTuple):
    """One random draw per sample, identical within a group: timestep ``t [N]``, noise ``eps [N, ...]`` and
    ``drop [N]`` (True = score this sample with the empty prompt; classifier-free-guidance training)."""

    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor


class TrajectoryState(NamedTuple):
    """A sampler state: the noisy sample ``x_t [N, ...]``, its timestep ``t [N]`` and the model's
    epsilon-equivalent prediction ``eps_hat [N, ...]`` at that state (what Diffusion-DRO trains against)."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps_hat: torch.Tensor


def check_prediction_type(scheduler: SchedulerMixin) -> str:
    """The scheduler config's ``prediction_type``; raises when it is not one this module can score."""
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    return prediction_type


def draw_noise(
    groups: torch.Tensor,
    sample_shape: tuple[int, ...],
    timestep_range: tuple[int, int],
    generator: torch.Generator | None,
    drop_probability: float = 0.0,
) -> NoiseDraw:
    """Draw ``(t, eps, drop)`` once per distinct group id and give every member of a group its group's draw.

    Draw order (fixed, so runs are reproducible from the generator state): ``t ~ U{lo, …, hi−1}`` for the G
    groups (sorted by id), then ``eps ~ N(0, I)`` of shape ``[G, *sample_shape]``, then, only when
    ``drop_probability > 0``, ``u ~ U[0, 1)`` per group with ``drop = u < drop_probability``.
    Tensors are created on the generator's device (CPU without a generator).
    """
    lo, hi = timestep_range
    unique, inverse = torch.unique(groups.cpu(), return_inverse=True)
    device = generator.device if generator is not None else torch.device("cpu")
    count = len(unique)
    t = torch.randint(lo, hi, (count,), generator=generator, device=device)
    eps = torch.randn((count, *sample_shape), generator=generator, device=device)
    if drop_probability > 0:
        drop = torch.rand(count, generator=generator, device=device) < drop_probability
    else:
        drop = torch.zeros(count, dtype=torch.bool, device=device)
    inverse = inverse.to(device)
    return NoiseDraw(t[inverse], eps[inverse], drop[inverse])


def denoising_target(
    scheduler: SchedulerMixin, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network should output at ``x_t``: ``eps``, ``v`` (the scheduler's ``get_velocity``) or ``x0``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, eps, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")


def epsilon_from_prediction(
    scheduler: SchedulerMixin, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a model output to the noise it implies at ``x_t = α·x0 + σ·eps`` (α = sqrt(ᾱ_t), σ = sqrt(1 − ᾱ_t)).

    epsilon: itself; v: ``eps = α·v + σ·x_t``; sample: ``eps = (x_t − α·x0_hat) / σ``.
    """
    if prediction_type == "epsilon":
        return prediction
    alphas_cumprod = scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32)[t.to(x_t.device).long()]
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    alpha, sigma = alphas_cumprod.sqrt().view(shape), (1 - alphas_cumprod).sqrt().view(shape)
    if prediction_type == "v_prediction":
        return (alpha * prediction + sigma * x_t).to(prediction.dtype)
    if prediction_type == "sample":
        return ((x_t - alpha * prediction) / sigma).to(prediction.dtype)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")


def denoising_score(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``−mean_dims (prediction − target)²`` per sample, ``[N]``, in float32.

    ``mask`` (broadcastable to the prediction, 1 = valid) restricts the mean to valid entries, e.g. the frames
    of a padded motion.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"model output shape {tuple(prediction.shape)} differs from the target's {tuple(target.shape)}; "
                         "does the network's out_channels match its in_channels?")
    err = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, err.ndim))
    if mask is None:
        return -err.mean(dims)
    mask = mask.to(err.dtype).expand_as(err)
    return -(err * mask).sum(dims) / mask.sum(dims).clamp(min=1)


SAMPLERS = ("dpmsolver++", "ddim", "ddpm")


def sampling_scheduler(name: str, train_config) -> SchedulerMixin:
    """An inference scheduler built from the training (DDPM) scheduler's config: DPM-Solver++ (multistep), DDIM
    (η = 0) or ancestral DDPM. A fresh copy of one instance per sampler and config: building one walks its
    1000-step tables (~1 ms), and Diffusion-DRO needs one per offset grid at every draw."""
    key = (name, repr(sorted(dict(train_config).items())))
    if key not in _PROTOTYPES:
        _PROTOTYPES[key] = _build_scheduler(name, train_config)
    return copy.deepcopy(_PROTOTYPES[key])


_PROTOTYPES: dict[tuple[str, str], SchedulerMixin] = {}


def _build_scheduler(name: str, train_config) -> SchedulerMixin:
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(train_config)
    if name == "ddpm":
        return DDPMScheduler.from_config(train_config)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
