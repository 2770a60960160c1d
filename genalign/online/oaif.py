"""OAIF and IPO-MD: pairwise objectives on pairs of the policy's own samples labelled online by a judge.

* **OAIF** (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): each step, for every prompt
  of the batch draw two responses y¹, y² ~ π_θ(·|x) (no gradients), let a judge (reward model, classifier or an LLM
  shown both responses, :mod:`genalign.online.judges`) say which is preferred, and apply any pairwise objective of
  :mod:`genalign.objectives` (DPO by default) to (chosen, rejected).
* **IPO-MD** (Calandriello et al. 2024, "Human Alignment of Large Language Models through Online Preference
  Optimisation"): the same with both responses drawn from the geometric mixture π_θ^(1−c)·ref^c
  (:func:`genalign.online.draws.draw`) and the IPO loss (Δ − 1/(2β))².

Pairs whose verdict is a tie or NaN carry no preference and are left out of the loss (counted in the metrics); a
response that hit the length limit loses (``truncated="lose"``) or its pair is left out (``"drop"``). When every pair
of a batch is left out, the loss is a zero that still backpropagates (no update). With the ``soft_preference``
objective the judge's probability is the preference strength. Randomness comes from ``ctx.generator`` only, so a
resumed run draws the same samples; the steps keep no other state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign.adapters.base import Adapter
from genalign.online import draws
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
        pairs, metrics = judged_pairs(adapter, rows, ctx, bind(self.judge, adapter), mixture=self.mixture,
                                      truncated=self.truncated, sample=self.sample,
                                      soft=self.pairwise.name == "soft_preference")
        if not pairs:
            return torch.zeros(len(rows), device=draws.device(adapter), requires_grad=True), metrics
        loss, pair_metrics = self.pairwise(draws.Collated(adapter), pairs, ctx)
        return loss, {**metrics, **pair_metrics}


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
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Two samples per row's prompt, judged; pairwise rows ``{"prompt", "chosen", "rejected", "row"[, "strength"]}``
    whose sides are one-sample sample batches (score them through :class:`draws.Collated`), and the judge counts."""
    prompts = draws.prompts(rows)
    samples = draws.draw(adapter, prompts, 2, ctx.generator, mixture=mixture, **(sample or {}))
    said = draws.responses(samples)
    finished = draws.ended(adapter, samples)
    verdict = judge_pairs(judge, prompts, said[0::2], said[1::2], ended_a=finished[0::2], ended_b=finished[1::2],
                          truncated=truncated)
    pairs = []
    for i in verdict.valid.nonzero().flatten().tolist():
        p = float(verdict.prob[i])
        first_wins = p > 0.5
        pair = {"prompt": prompts[i], "row": rows[i].get("row", i),
                "chosen": draws.take(samples, [2 * i + (0 if first_wins else 1)]),
                "rejected": draws.take(samples, [2 * i + (1 if first_wins else 0)])}
        if soft:
            pair["strength"] = max(p, 1 - p)
        pairs.append(pair)
    return pairs, verdict.counts
