"""PMPO: preference optimisation as probabilistic inference (Abdolmaleki et al. 2024), from accepted-only,
rejected-only or both kinds of samples::

    L = −α·mean_acc log π(y|x) + (1−α)·mean_rej log π(y|x) + β·KL(ref ‖ π)      (genalign.objectives.pmpo)

Without the KL term, rejected-only data has no bounded optimum (log π of a rejected response → −∞); with it the
optimum is finite. On one context with rejected frequencies w and α = 0 it is π_a = (β·ref_a − w_a)/(β − 1),
defined when β·ref_a > w_a for every a (tests/test_online_claims_b.py checks it).

KL(ref‖π) is estimated per row as the mean of log ref(y') − log π(y') over ``kl_samples`` responses y' drawn from
the reference for that row's prompt (an unbiased estimate whose gradient is −E_ref ∇log π), or taken exactly
(``kl="exact"``) from adapters that expose ``reverse_kl()`` per context (the tabular adapter).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.data.batching import labelled_batch, pairs_to_unpaired
from genalign.online import draws, global_batch
from genalign.steps import Step, StepContext, _global_masked_mean

KL_MODES = ("samples", "exact")


class PMPOStep(Step):
    """PMPO on labelled rows ``{"prompt", "response", "desirable" | "label"}`` (or pairs, split into both kinds).

    Args:
        alpha, beta: α (weight of the accepted term) and β (KL weight) of the loss.
        kl: "samples" (reference samples, any adapter) or "exact" (adapters with ``reverse_kl()``).
        kl_samples: reference samples per row for the estimate.
        sample_kwargs: extra keyword arguments of ``adapter.sample`` (e.g. ``max_new_tokens``).
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.1, *, kl: str = "samples", kl_samples: int = 1,
                 sample_kwargs: dict[str, Any] | None = None):
        if kl not in KL_MODES:
            raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
        if int(kl_samples) != kl_samples or kl_samples < 1:
            raise ValueError(f"kl_samples must be a positive integer, got {kl_samples}")
        objectives.pmpo(torch.zeros(1), torch.ones(1, dtype=torch.bool), kl=0.0, alpha=alpha, beta=beta)  # checks
        self.alpha, self.beta, self.kl, self.kl_samples = alpha, beta, kl, int(kl_samples)
        self.sample_kwargs = dict(sample_kwargs or {})

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        if rows and "chosen" in rows[0]:
            rows = pairs_to_unpaired(rows)
        batch = labelled_batch(adapter, rows).to(draws.device(adapter))
        if batch.desirable is None:
            raise ValueError("PMPO needs a boolean 'desirable' (or 'label') field on every row: accepted or rejected")
        scores = adapter.score(batch.samples, groups=torch.arange(batch.size), generator=ctx.generator,
                               with_reference=False)
        kl = self.kl_estimate(adapter, rows, ctx.generator, ctx)
        # objectives.pmpo weighs by this batch's accepted fraction a: rescaling π by a / a_global (rejected rows by
        # (1 − a) / (1 − a_global)) makes it the global batch's, so the processes' mean loss is the one-process loss
        accepted = batch.desirable.float()
        local, share = accepted.mean(), ctx.global_mean(accepted).to(accepted.device)
        scale = torch.where(batch.desirable, local / share, (1 - local) / (1 - share))
        loss = objectives.pmpo(scores.policy * scale, batch.desirable, kl=kl, alpha=self.alpha, beta=self.beta)
        logp = scores.policy.detach()
        metrics = {"pmpo/kl": kl.detach().mean(),
                   "pmpo/accepted_logp": _global_masked_mean(logp, batch.desirable, ctx.global_mean),
                   "pmpo/rejected_logp": _global_masked_mean(logp, ~batch.desirable, ctx.global_mean)}
        return loss, metrics

    def kl_estimate(self, adapter: Adapter, rows: Sequence[dict], generator: torch.Generator,
                    ctx: StepContext | None = None) -> torch.Tensor:
        """KL(ref‖π) per row ``[N]``, differentiable in the policy. ``ctx``: the step's context, under which several
        processes draw the reference samples for the global batch (default: one process drawing with ``generator``)."""
        prompts = draws.prompts(rows)
        if self.kl == "exact":
            if not hasattr(adapter, "reverse_kl"):
                raise ValueError(f"kl='exact' needs an adapter with reverse_kl() (tabular); {type(adapter).__name__} "
                                 "has none: use kl='samples'")
            return adapter.reverse_kl()[torch.as_tensor(prompts, dtype=torch.long)]
        ctx = ctx or StepContext(generator)
        samples = global_batch.draw(adapter, prompts, self.kl_samples, ctx, use_reference=True, **self.sample_kwargs)
        n, k = len(prompts), self.kl_samples
        scores = adapter.score(samples, groups=torch.arange(n * k), generator=generator)
        return (scores.reference - scores.policy).view(n, k).mean(1)

