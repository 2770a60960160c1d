"""SELM: DPO plus an optimism term on the reference's samples (Zhang et al. 2024, "Self-Exploring Language Models:
Active Preference Elicitation for Online Alignment").

Per row: a preference pair — the dataset's offline (chosen, rejected), or, with a ``judge``, two policy samples
labelled online as in OAIF — and one response y_ref ~ ref(·|x) drawn now::

    loss = dpo(y_w, y_l; β) + α·β·(log π(y_ref) − log ref(y_ref))        (``genalign.objectives.selm_optimism``)

Minimising the second term lowers the policy's likelihood of what the reference already says, which biases the
policy toward responses with potentially high, not yet observed reward (the paper's optimism bonus).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.online import draws, global_batch
from genalign.online.judges import bind, build_judge
from genalign.online.oaif import judged_pairs, kept_pairs_loss
from genalign.steps import PairwiseStep, Step, StepContext


class SELMStep(Step):
    """DPO on offline (or, with ``judge``, online-judged) pairs + the SELM optimism term on reference samples.

    Args:
        beta: DPO's β (also scales the optimism term).
        alpha: α of the optimism term (the paper's default 0.001).
        judge: optional; when given, pairs are two policy samples per prompt labelled by it (OAIF-style).
        truncated: the unfinished-response rule for judged pairs (``"lose"`` or ``"drop"``).
        sample: keyword arguments of ``adapter.sample``.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.001, *, judge: Any = None, truncated: str = "lose",
                 sample: dict[str, Any] | None = None):
        objectives.selm_optimism(torch.zeros(1), torch.zeros(1), alpha=alpha, beta=beta)  # checks alpha, beta
        self.beta, self.alpha = float(beta), float(alpha)
        self.judge = None if judge is None else build_judge(judge)
        self.pairwise = PairwiseStep("dpo", beta=beta)
        self.truncated, self.sample = truncated, dict(sample or {})

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        if self.judge is None:
            loss, metrics = self.pairwise(adapter, rows, ctx)
        else:
            pairs, keep, counts = judged_pairs(adapter, rows, ctx, bind(self.judge, adapter),
                                               truncated=self.truncated, sample=self.sample)
            loss, metrics = kept_pairs_loss(self.pairwise, adapter, pairs, keep, ctx)
            metrics.update(counts)
        reference_samples = global_batch.draw(adapter, draws.prompts(rows), 1, ctx, use_reference=True, **self.sample)
        scores = adapter.score(reference_samples, groups=torch.arange(len(rows)), generator=ctx.generator)
        optimism = objectives.selm_optimism(scores.policy, scores.reference, alpha=self.alpha, beta=self.beta)
        metrics["selm/reference_sample_log_ratio"] = (scores.policy - scores.reference).detach().mean()
        return loss + optimism, metrics
