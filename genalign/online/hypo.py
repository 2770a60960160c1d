"""HyPO: offline DPO + an online KL penalty (Song et al. 2024, "The Importance of Online Data: Understanding
Preference Fine-tuning via Coverage").

Per row: an offline pair (x, y_w, y_l) of the dataset and one response y ~ π_θ(·|x) drawn now, without gradients::

    loss = dpo(y_w, y_l; β) + λ · kl_surrogate(y),   kl_surrogate(y) = sg[log π(y) − log ref(y)] · log π(y)

E_{y~π}[log π(y) − log ref(y)] is KL(π‖ref) and, since y is drawn from π, its gradient is the score-function
estimate E[(log π − log ref)(y) ∇log π(y)] (the E[∇log π] term is zero): the surrogate has exactly that gradient.
The offline pairs only say something about the responses they cover; the online KL keeps the policy near the
reference everywhere else (the paper's partial-coverage argument). For diffusion, scores (negative denoising errors
at a random timestep) stand in for log-likelihoods, as in Diffusion-DPO.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign.adapters.base import Adapter
from genalign.objectives._checks import as_scores, in_range
from genalign.online import draws, global_batch
from genalign.steps import PairwiseStep, Step, StepContext


def kl_surrogate(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sg[π − ref]·π per sample (scores of samples drawn from the policy): its value averages to KL(π‖ref)·π-scale,
    its gradient is the unbiased score-function gradient of KL(π‖ref)."""
    pi, ref = as_scores(policy=policy, reference=reference)
    return (pi - ref).detach() * pi


class HyPOStep(Step):
    """DPO on the rows' offline pairs + ``lam`` · KL(π‖ref) estimated on one policy sample per row.

    Args:
        beta, label_smoothing: DPO's.
        lam: λ, the weight of the online KL term.
        sample: keyword arguments of ``adapter.sample`` for the online responses.
    """

    def __init__(self, beta: float = 0.1, lam: float = 0.1, *, label_smoothing: float = 0.0,
                 sample: dict[str, Any] | None = None):
        self.lam = in_range("lam", lam, 0.0)
        self.pairwise = PairwiseStep("dpo", beta=beta, label_smoothing=label_smoothing)
        self.sample = dict(sample or {})

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        dpo_loss, metrics = self.pairwise(adapter, rows, ctx)
        own = global_batch.draw(adapter, draws.prompts(rows), 1, ctx, **self.sample)
        scores = adapter.score(own, groups=torch.arange(len(rows)), generator=ctx.generator)
        kl = kl_surrogate(scores.policy, scores.reference)
        unfinished = global_batch.global_sums({"hypo/unfinished": (~draws.ended(adapter, own)).sum()}, ctx)
        metrics = {**metrics, "hypo/kl": (scores.policy - scores.reference).detach().mean(), **unfinished}
        return dpo_loss + self.lam * kl, metrics
