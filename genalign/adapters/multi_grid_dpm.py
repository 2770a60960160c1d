"""DPM-Solver++ for samples on different timestep grids, stepped together (Diffusion-DRO's offset grids).

diffusers' ``DPMSolverMultistepScheduler`` takes one timestep per ``step``, so samples on G grids cost G scheduler
steps per sampler step, each some forty small tensor operations: on Diffusion-DRO's ~30 offset grids that
overhead is a sixth of its sampling on the CPU. Its update (DPM-Solver++(2M), midpoint; Lu et al. 2022,
arXiv:2211.01095) is linear in the state and the data predictions, with scalars that depend on the grid only::

    x0_k    = (x_k − σ_k·ε̂_k) / α_k                           (ε-prediction; x0 or v alike)
    x_{k+1} = (σ_{k+1}/σ_k)·x_k − B_k·x0_k − (B_k/2)·(x0_k − x0_{k−1})·(h_k / h_{k−1}),
    B_k = α_{k+1}·(e^{−h_k} − 1),   h_k = λ_{k+1} − λ_k,   λ = log α − log σ,

first order (the last term dropped) at the first step and at the last; with dynamic thresholding, x0_k is clipped
per sample first. :func:`grid_coefficients` computes these
scalars for one grid from the scheduler's own ``sigmas`` with the scheduler's own operations, in its order, and
caches them; :class:`MultiGridDPMSolver` applies every sample's scalars at once, so each sample follows exactly
(bit for bit) the trajectory its grid's scheduler gives it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import DPMSolverMultistepScheduler


class StepCoefficients(NamedTuple):
    """One sampler step of one grid: x0 = (x − to_x0_noise·out) / to_x0_scale (ε), x_next = keep·x − data·x0
    − half_data·ratio·(x0 − x0_prev) (second order)."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    keep: torch.Tensor
    data: torch.Tensor
    half_data: torch.Tensor
    ratio: torch.Tensor


def supported(schedulers: list) -> bool:
    """Whether every scheduler is the DPM-Solver++(2M) this module reproduces, on grids of one length."""
    first = schedulers[0]
    if not isinstance(first, DPMSolverMultistepScheduler):
        return False
    config = first.config
    return (config.algorithm_type == "dpmsolver++" and config.solver_order == 2 and config.solver_type == "midpoint"
            and not config.use_flow_sigmas
            and config.variance_type not in ("learned", "learned_range")
            and config.prediction_type in ("epsilon", "sample", "v_prediction")
            and all(isinstance(s, DPMSolverMultistepScheduler) and s.config == config
                    and len(s.timesteps) == len(first.timesteps) for s in schedulers))


def second_order_steps(scheduler: DPMSolverMultistepScheduler) -> list[bool]:
    """Per step, whether the scheduler takes its second-order update (as its ``step`` decides)."""
    config, n = scheduler.config, len(scheduler.timesteps)
    final_first_order = config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
    return [0 < k and not (k == n - 1 and final_first_order) for k in range(n)]


def grid_coefficients(scheduler: DPMSolverMultistepScheduler) -> list[StepCoefficients]:
    """Every step's scalars of a scheduler whose timesteps are set (cached by its config and grid)."""
    key = (repr(sorted(scheduler.config.items())), tuple(scheduler.timesteps.tolist()))
    return _cached(key, scheduler.sigmas.clone())


#: grid → its steps' scalars (Diffusion-DRO draws from ⌊T/S⌋ offsets, so a run meets a few hundred grids at most)
_CACHE: dict = {}


def _cached(key, sigmas: torch.Tensor) -> list[StepCoefficients]:
    if key not in _CACHE:
        if len(_CACHE) >= 4096:
            _CACHE.clear()
        _CACHE[key] = _coefficients(sigmas)
    return _CACHE[key]


def _coefficients(sigmas: torch.Tensor) -> list[StepCoefficients]:
    """The scalars of :meth:`DPMSolverMultistepScheduler.convert_model_output` and of its first/second order
    updates, computed as they compute them (0-dim float32 tensors, same operations, same order)."""
    def alpha_sigma(sigma):  # DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t without flow sigmas
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    out = []
    for k in range(len(sigmas) - 1):
        alpha_s, sigma_s = alpha_sigma(sigmas[k])
        alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
        lambda_t, lambda_s = torch.log(alpha_t) - torch.log(sigma_t), torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s
        ratio = torch.tensor(float("nan"))
        if k > 0:
            alpha_p, sigma_p = alpha_sigma(sigmas[k - 1])
            r0 = (lambda_s - (torch.log(alpha_p) - torch.log(sigma_p))) / h
            ratio = 1.0 / r0
        data = alpha_t * (torch.exp(-h) - 1.0)
        out.append(StepCoefficients(alpha_s, sigma_s, sigma_t / sigma_s, data, 0.5 * (alpha_t * (torch.exp(-h) - 1.0)),
                                    ratio))
    return out


class MultiGridDPMSolver:
    """Steps samples on several grids at once: ``groups`` as :func:`~genalign.adapters.diffusion_sampling.
    sampler_groups` returns them (schedulers with their timesteps set, and the indices of their samples)."""

    def __init__(self, groups: list[tuple[DPMSolverMultistepScheduler, torch.Tensor]], n: int, device: torch.device):
        schedulers = [sched for sched, _ in groups]
        self.prediction_type = schedulers[0].config.prediction_type
        # dynamic thresholding (Imagen) clips each sample's x0 by its own quantile: the scheduler's own function,
        # applied to the whole batch, is its per-grid result row by row
        self.threshold = schedulers[0]._threshold_sample if schedulers[0].config.thresholding else None
        self.second_order = second_order_steps(schedulers[0])
        self.timesteps = torch.empty(len(schedulers[0].timesteps), n, dtype=torch.long, device=device)
        fields = {name: torch.empty(len(self.second_order), n) for name in StepCoefficients._fields}
        for sched, idx in groups:
            self.timesteps[:, idx] = sched.timesteps.to(device).unsqueeze(1)
            for k, step in enumerate(grid_coefficients(sched)):
                for name, value in step._asdict().items():
                    fields[name][k, idx.cpu()] = value
        self.coefficients = {name: value.to(device) for name, value in fields.items()}
        self.previous: torch.Tensor | None = None

    def _scalar(self, name: str, k: int, like: torch.Tensor) -> torch.Tensor:
        return self.coefficients[name][k].view(-1, *([1] * (like.ndim - 1)))

    def step(self, k: int, model_output: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None):
        """x_{k+1} from the state x_k and the network's output at step k (float32); draws nothing."""
        sample = x.to(torch.float32)
        alpha, sigma = self._scalar("alpha", k, x), self._scalar("sigma", k, x)
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = model_output
        if self.threshold is not None:
            x0 = self.threshold(x0)
        keep, data = self._scalar("keep", k, x), self._scalar("data", k, x)
        if self.second_order[k]:
            d1 = self._scalar("ratio", k, x) * (x0 - self.previous)
            nxt = keep * sample - data * x0 - self._scalar("half_data", k, x) * d1
        else:
            nxt = keep * sample - data * x0
        self.previous = x0
        return nxt.to(model_output.dtype)
