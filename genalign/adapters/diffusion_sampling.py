"""The sampler loop shared by the diffusion adapters (image, motion) and the interface online methods use.

Sampling runs one inference scheduler per distinct timestep grid (:func:`sampler_groups`): the sampler's own grid,
or custom descending grids ``[S]`` / ``[N, S]`` (Diffusion-DRO's offset grids t_k = k·r + o, DR-PO's tail of the
grid after a dataset reset). :func:`run_sampler` steps every group together, one network call per step, and can
record the trajectory ``(x_t, t, eps_hat)`` of every step, eps_hat being the prediction's epsilon form
(:func:`~genalign.adapters.diffusion_scores.epsilon_from_prediction`).

:class:`DiffusionSampling` is what Diffusion-DRO (Wu et al. 2025) and DR-PO (Chang et al. 2024) need of an adapter
beyond :class:`~genalign.adapters.base.Adapter`: trajectories of the policy, a start state made from data noised
to a timestep, condition dropping, and the key of the clean sample in its sample batches.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from genalign.adapters import multi_grid_ddpm, multi_grid_dpm
from genalign.adapters.diffusion_scores import TrajectoryState, epsilon_from_prediction, sampling_scheduler

#: ``predict(model_in [N, ...], t [N]) -> prediction [N, ...]`` (float32), guidance included
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiffusionSampling(ABC):
    """Sampler-side interface of a diffusion adapter. Implementers also have ``noise_scheduler`` (the DDPM
    training schedule), ``prediction_type`` and ``prompt_dropout`` (the condition-drop probability in training)."""

    #: the key of the clean sample (x0) in the adapter's sample batches
    sample_key: str

    @abstractmethod
    def trajectories(
        self,
        prompts: Sequence[str],
        num_samples: int,
        *,
        generator: torch.Generator | None,
        timesteps: torch.Tensor,
        guidance_scale: float,
        scheduler: str,
    ) -> tuple[dict[str, torch.Tensor], list[TrajectoryState]]:
        """``num_samples`` policy trajectories per prompt (prompt-major) on the grids ``timesteps`` (``[N, S]``).
        The empty prompt ``""`` samples the unconditional model (the condition classifier-free guidance drops).
        Returns the trajectories' conditioning (the sample batch's per-sample tensors except the sample, e.g. the
        prompt encoding; a sample batch again once the sample key is set) and one state per sampler step."""

    @abstractmethod
    def start_state(self, batch: dict[str, Any], noise: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """``sample`` keyword arguments that start the sampler at ``add_noise(batch[sample_key], noise, t)``."""

    @abstractmethod
    def drop_prompts(self, batch: dict[str, Any], drop: torch.Tensor) -> dict[str, Any]:
        """A copy of a sample batch scored with the null condition where ``drop [N]`` is True."""


def sampler_groups(
    name: str, train_config: Any, n: int, device: torch.device, num_inference_steps: int,
    timesteps: torch.Tensor | None = None,
) -> list[tuple[Any, torch.Tensor]]:
    """One inference scheduler per distinct timestep grid with the indices of the ``n`` samples that follow it:
    the sampler's own ``num_inference_steps`` grid, or ``timesteps`` ``[S]`` (all) / ``[n, S]`` (per sample)."""
    if timesteps is None:
        sched = sampling_scheduler(name, train_config)
        sched.set_timesteps(num_inference_steps, device=device)
        return [(sched, torch.arange(n, device=device))]
    grids = torch.as_tensor(timesteps).long().cpu()
    grids = grids.expand(n, -1) if grids.ndim == 1 else grids
    num_train = train_config.num_train_timesteps
    if grids.ndim != 2 or grids.shape[0] != n or grids.shape[1] < 1:
        raise ValueError(f"timesteps must have shape [S] or [{n}, S] (one grid per returned sample), got "
                         f"{tuple(torch.as_tensor(timesteps).shape)}")
    if grids.min() < 0 or grids.max() >= num_train or (grids[:, 1:] >= grids[:, :-1]).any():
        raise ValueError(f"each timestep grid must be strictly descending within [0, {num_train}) "
                         f"(num_train_timesteps), got {grids.tolist()}")
    unique, inverse = torch.unique(grids, dim=0, return_inverse=True)
    groups = []
    for g, grid in enumerate(unique):
        sched = sampling_scheduler(name, train_config)
        if not g and "timesteps" not in inspect.signature(sched.set_timesteps).parameters:
            raise ValueError(f"sampler {name!r} does not take custom timesteps; use 'dpmsolver++' or 'ddpm'")
        sched.set_timesteps(timesteps=grid.tolist(), device=device)
        groups.append((sched, (inverse == g).nonzero().flatten().to(device)))
    return groups


def one_grid(timesteps: torch.Tensor | None) -> bool:
    """Whether every sample runs on the same timestep grid (one scheduler group, whose per-step noise is one
    ``[N, ...]`` draw); per-sample grids group the samples by grid and draw each group's noise together."""
    return timesteps is None or timesteps.ndim == 1 or bool((timesteps == timesteps[:1]).all())


def sampler_start(
    groups: list[tuple[Any, torch.Tensor]], shape: tuple[int, ...], generator: torch.Generator | None,
    device: torch.device, start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The initial state: noise scaled by each group's ``init_noise_sigma``, or a copy of ``start`` (float32)."""
    if start is None:
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        for sched, idx in groups:
            x[idx] = x[idx] * sched.init_noise_sigma
        return x
    if tuple(start.shape) != tuple(shape):
        raise ValueError(f"start must hold one state per returned sample, shape {tuple(shape)}; got {tuple(start.shape)}")
    return start.to(device, torch.float32).clone()


def run_sampler(
    groups: list[tuple[Any, torch.Tensor]],
    x: torch.Tensor,
    predict: Predict,
    generator: torch.Generator | None,
    *,
    record: tuple[Any, str] | None = None,
) -> tuple[torch.Tensor, list[TrajectoryState]]:
    """Run the grouped sampler from ``x``; returns the final sample and, with ``record = (train_scheduler,
    prediction_type)``, every step's :class:`TrajectoryState` (the state, its timesteps and eps_hat). Several
    DPM-Solver++ grids step together (:mod:`~genalign.adapters.multi_grid_dpm`, the same numbers), several DDPM
    grids too, with one row-wise noise draw per step (:mod:`~genalign.adapters.multi_grid_ddpm`)."""
    schedulers = [sched for sched, _ in groups]
    for module in (multi_grid_dpm, multi_grid_ddpm):
        if len(groups) > 1 and module.supported(schedulers):
            solver = (multi_grid_dpm.MultiGridDPMSolver if module is multi_grid_dpm else multi_grid_ddpm.MultiGridDDPM)
            return _run_multi_grid(solver(groups, x.shape[0], x.device), x, predict, generator, record)
    if len(groups) == 1:
        return _run_one_grid(groups[0][0], x, predict, generator, record)
    n, states = x.shape[0], []
    for k in range(len(groups[0][0].timesteps)):
        t_batch = torch.empty(n, dtype=torch.long, device=x.device)
        model_in = torch.empty_like(x)
        for sched, idx in groups:
            t_batch[idx] = sched.timesteps[k].to(x.device)
            model_in[idx] = sched.scale_model_input(x[idx], sched.timesteps[k])
        prediction = predict(model_in, t_batch)
        if record is not None:
            states.append(TrajectoryState(x, t_batch, epsilon_from_prediction(record[0], prediction, x, t_batch, record[1])))
        next_x = torch.empty_like(x)
        for sched, idx in groups:
            next_x[idx] = sched.step(prediction[idx], sched.timesteps[k], x[idx], generator=generator, return_dict=False)[0]
        x = next_x
    return x, states


def _run_multi_grid(solver, x: torch.Tensor, predict: Predict, generator, record) -> tuple[torch.Tensor, list[TrajectoryState]]:
    """:func:`run_sampler` for samples on several grids: one update of every sample per step (DPM-Solver++'s and
    DDPM's ``scale_model_input`` are the identity)."""
    states = []
    for k, t_batch in enumerate(solver.timesteps):
        prediction = predict(x, t_batch)
        if record is not None:
            states.append(TrajectoryState(x, t_batch, epsilon_from_prediction(record[0], prediction, x, t_batch, record[1])))
        x = solver.step(k, prediction, x, generator)
    return x, states


def row_wise_grids(name: str, train_config: Any, timesteps: torch.Tensor | None) -> bool:
    """Whether sampler ``name``'s draws on ``timesteps`` are row-wise (one ``[N, ...]`` tensor per draw): always on
    one grid; on several, DPM-Solver++ draws nothing after the start, and DDPM one noise tensor per step where
    :mod:`~genalign.adapters.multi_grid_ddpm` steps the grids together."""
    if one_grid(timesteps) or name == "dpmsolver++":
        return True
    return name == "ddpm" and multi_grid_ddpm.supported([sampling_scheduler(name, train_config)])


def _run_one_grid(sched, x: torch.Tensor, predict: Predict, generator, record) -> tuple[torch.Tensor, list[TrajectoryState]]:
    """:func:`run_sampler` for one grid: the scheduler steps the whole batch (no per-group gather and scatter)."""
    states = []
    for t in sched.timesteps:
        t_batch = t.to(x.device).repeat(x.shape[0])
        prediction = predict(sched.scale_model_input(x, t), t_batch)
        if record is not None:
            states.append(TrajectoryState(x, t_batch, epsilon_from_prediction(record[0], prediction, x, t_batch, record[1])))
        x = sched.step(prediction, t, x, generator=generator, return_dict=False)[0]
    return x, states
