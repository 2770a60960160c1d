"""Online steps under several processes: draws, loss weights and logged statistics of the *global* batch, so that a
run on W processes equals the one-process run with the same global batch (:mod:`genalign.distributed`).

* **Draws.** A sampler whose draws are row-wise (:meth:`Adapter.row_wise_draws`: language models, with one seed
  per sequence; tabular inverse-CDF draws; the diffusion samplers, motions with their noise drawn at max_frames)
  samples only this process's rows: under :meth:`Shard.draws` each of its draws is the one-process run's draw for
  the global batch, sliced to these rows, so the samples are the one-process run's (to the float32 rounding of a
  smaller batch through the network) at 1/W of the sampling work. Other samplers (motions padded to each batch's
  longest without ``row_wise_noise``, DDPM settings :mod:`~genalign.adapters.multi_grid_ddpm` does not reproduce on
  per-sample grids) are not row-wise: :func:`draw` gathers every process's prompts, draws for
  all of them exactly as the one-process run does (the shared generator unsliced, :meth:`Shard.remap`) and keeps
  this process's slice: exact, at the cost of every process sampling the whole global batch.
* **Rows left out** (judge ties, NaN verdicts, tied rewards) differ in number between processes. Every row is still
  scored (so diffusion scoring draws stay aligned and every process runs a forward pass, which DDP needs) and
  :func:`kept_mean_weights` weights the per-row losses so that the trainer's mean, averaged over processes, is the
  mean over the kept rows of the global batch.
* **Logged statistics**: :func:`global_sums` for counts, :func:`global_kept_means` for means over kept rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from genalign.adapters.base import Adapter
from genalign.online import draws
from genalign.steps import StepContext


def draw(adapter: Adapter, prompts: Sequence[Any], num_samples: int, ctx: StepContext, **kwargs: Any) -> dict:
    """:func:`draws.draw` (same keywords) for this process's ``prompts``: the samples the one-process run draws for
    them within the global batch (prompt-major, ``num_samples`` each)."""
    if ctx.shard.count == 1 or adapter.row_wise_draws(**draws.options(adapter, kwargs)):
        return draws.draw(adapter, prompts, num_samples, ctx.generator, **kwargs)
    shares = ctx.shard.gather([list(prompts)])
    start = sum(len(share) for share in shares[: ctx.shard.index])
    with ctx.shard.remap(None):
        batch = draws.draw(adapter, [p for share in shares for p in share], num_samples, ctx.generator, **kwargs)
    return draws.take(batch, range(start * num_samples, (start + len(prompts)) * num_samples))


def kept_mean_weights(keep: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """``[n]`` weights keep / (global fraction kept): the trainer's mean of weight · loss over this process's n rows,
    averaged over the processes' equal shares, is the mean of the loss over every process's kept rows (all zero
    when no row is kept anywhere)."""
    keep = keep.float()
    fraction = ctx.global_mean(keep).to(keep.device)
    return keep / fraction if fraction > 0 else torch.zeros_like(keep)


def global_sums(counts: Mapping[str, float], ctx: StepContext) -> dict[str, torch.Tensor]:
    """Per-process counts summed over the processes (the trainer logs the mean over processes of what a step
    returns, so every process returns the global sum)."""
    return {k: ctx.global_mean(torch.tensor(float(v))) * ctx.shard.count for k, v in counts.items()}


def global_kept_means(means: Mapping[str, Any], kept: int, ctx: StepContext) -> dict[str, torch.Tensor]:
    """Means over this process's ``kept`` rows turned into means over every process's kept rows (NaN when none)."""
    n = torch.tensor(float(kept))
    total = ctx.global_mean(n)
    sums = {k: torch.as_tensor(v).detach().float().cpu() * n if kept else torch.tensor(0.0) for k, v in means.items()}
    return {k: ctx.global_mean(v) / total for k, v in sums.items()}
