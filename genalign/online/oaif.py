"""OAIF and IPO-MD: pairwise objectives on pairs of the policy's own samples labelled online by a judge.

* **OAIF** (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): each step, for every prompt
  of the batch draw two responses y¹, y² ~ π_θ(·|x) (no gradients), let a judge (reward model, classifier or an LLM
  shown both responses, :mod:`genalign.online.judges`) say which is preferred, and apply any pairwise objective of
  :mod:`genalign.objectives` (DPO by default) to (chosen, rejected).
* **IPO-MD** (Calandriello et al. 2024, "Human Alignment of Large Language Models through Online Preference
  Optimisation"): the same with both responses drawn from the geometric mixture π_θ^(1−c)·ref^c
  (:func:`genalign.online.draws.draw`) and the IPO loss (Δ − 1/(2β))².

Pairs whose verdict is a tie or NaN carry no preference and are left out of the loss (counted in the metrics); a
response that hit the length limit loses (``truncated="lose"``) or its pair is left out (``"drop"``). Left-out pairs
are still scored, with weight 0, and the loss is the mean over the kept pairs of the global batch (all processes,
:mod:`genalign.online.global_batch`); when no pair is kept the loss is 0 (no update). With the ``soft_preference``
objective the judge's probability is the preference strength. Randomness comes from ``ctx.generator`` only, so a
resumed run draws the same samples; the steps keep no other state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.online import draws, global_batch
from genalign.online.judges import bind, build_judge, judge_pairs
from genalign.steps import PairwiseStep, StepContext, Step


class OAIFStep(Step):
    """Online pairs from the policy (or its geometric mixture with the reference) + a pairwise objective.

    Args:
        judge: ``(prompts, responses_a, responses_b) -> [N]`` P(a ≻ b), or a hydra spec of one.
        objective: a pairwise objective of :mod:`genalign.objectives` (dpo, ipo, slic, gpo, simpo, robust_dpo,
            soft_preference) with its ``beta``; ``objective_params`` (label_smoothing, gamma, ...) go to it too.
        mixture: c of the geometric mixture π^(1−c)·ref^c both responses are drawn from (0 = the policy).
        truncated: what an unfinished response gets, ``"lose"`` or ``"drop"`` (see :func:`judge_pairs`).
        sample: keyword arguments of ``adapter.sample`` (``max_new_tokens``, ``temperature``; diffusion:
            ``num_inference_steps``, ``guidance_scale``, ``scheduler``).
    """

    def __init__(self, judge: Any, objective: str = "dpo", *, beta: float = 0.1, mixture: float = 0.0,
                 truncated: str = "lose", sample: dict[str, Any] | None = None, length_normalize: bool = False,
                 objective_params: dict[str, Any] | None = None):
        if objective not in PairwiseStep.names:
            raise ValueError(f"objective {objective!r} is not pairwise; choose one of {PairwiseStep.names}")
        self.judge = build_judge(judge)
        self.pairwise = PairwiseStep(objective, length_normalize=length_normalize, beta=beta, **(objective_params or {}))
        self.mixture, self.truncated, self.sample = float(mixture), truncated, dict(sample or {})
        draws.check_mixture(self.mixture)

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        pairs, keep, counts = judged_pairs(adapter, rows, ctx, bind(self.judge, adapter), mixture=self.mixture,
                                           truncated=self.truncated, sample=self.sample,
                                           soft=self.pairwise.name == "soft_preference")
        loss, metrics = kept_pairs_loss(self.pairwise, adapter, pairs, keep, ctx)
        return loss, {**counts, **metrics}


class IPOMDStep(OAIFStep):
    """IPO-MD: both responses from the geometric mixture π^(1−c)·ref^c (c = ``mixture``), IPO on the judged pairs."""

    def __init__(self, judge: Any, *, mixture: float = 0.125, beta: float = 0.1, truncated: str = "lose",
                 sample: dict[str, Any] | None = None, length_normalize: bool = False):
        super().__init__(judge, "ipo", beta=beta, mixture=mixture, truncated=truncated, sample=sample,
                         length_normalize=length_normalize)


def judged_pairs(
    adapter: Adapter,
    rows: Sequence[dict],
    ctx: StepContext,
    judge: Any,
    *,
    mixture: float = 0.0,
    truncated: str = "lose",
    sample: dict[str, Any] | None = None,
    soft: bool = False,
) -> tuple[list[dict[str, Any]], torch.Tensor, dict[str, torch.Tensor]]:
    """Two samples per row's prompt, judged: one pairwise row ``{"prompt", "chosen", "rejected", "row"[,
    "strength"]}`` per row, whose sides are one-sample sample batches (score them through :class:`draws.Collated`),
    the ``[N]`` bool mask of pairs with a preference (ties, NaN verdicts and dropped pairs are False; their sides are
    in draw order and their strength ½) and the judge's counts summed over the processes."""
    prompts = draws.prompts(rows)
    samples = global_batch.draw(adapter, prompts, 2, ctx, mixture=mixture, **(sample or {}))
    said = draws.responses(samples)
    finished = draws.ended(adapter, samples)
    verdict = judge_pairs(judge, prompts, said[0::2], said[1::2], ended_a=finished[0::2], ended_b=finished[1::2],
                          truncated=truncated)
    pairs = []
    for i, valid in enumerate(verdict.valid.tolist()):
        p = float(verdict.prob[i]) if valid else 0.5
        first = 0 if p >= 0.5 else 1
        pair = {"prompt": prompts[i], "row": rows[i].get("row", i),
                "chosen": draws.take(samples, [2 * i + first]), "rejected": draws.take(samples, [2 * i + 1 - first])}
        if soft:
            pair["strength"] = max(p, 1 - p)
        pairs.append(pair)
    return pairs, verdict.valid, global_batch.global_sums(verdict.counts, ctx)


class _Recorded(draws.Collated):
    """:class:`draws.Collated` that keeps the scores of its last ``score_pairs`` call."""

    def score_pairs(self, batch: Any, **kwargs: Any):
        self.scores = self._adapter.score_pairs(batch, **kwargs)
        return self.scores


def kept_pairs_loss(pairwise: PairwiseStep, adapter: Adapter, pairs: list[dict[str, Any]], keep: torch.Tensor,
                    ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``pairwise``'s per-pair loss on all ``pairs``, weighted to the mean over the kept pairs of the global batch
    (:func:`global_batch.kept_mean_weights`), and its reward metrics over those kept pairs."""
    scored = _Recorded(adapter)
    loss, _ = pairwise(scored, pairs, ctx)
    loss = loss * global_batch.kept_mean_weights(keep.to(loss.device), ctx)
    chosen, rejected = scored.scores
    if chosen.reference is None:
        return loss, {}
    kept = keep.to(chosen.policy.device) if keep.any() else torch.ones_like(keep, device=chosen.policy.device)
    means = objectives.pairwise_metrics(chosen.policy[kept], rejected.policy[kept], chosen.reference[kept],
                                        rejected.reference[kept], beta=pairwise.beta)
    return loss, global_batch.global_kept_means(means, int(keep.sum()), ctx)
