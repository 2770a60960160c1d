"""Nash-MD: learning the regularised Nash equilibrium of a preference model by mirror descent on self-play
(Munos et al. 2023, "Nash Learning from Human Feedback", Nash-MD-PG, §7).

Per prompt x: y ~ π_θ(·|x) and an opponent y' ~ π_c ∝ π_θ^(1−c)·ref^c, the geometric mixture of the policy and the
reference (:func:`genalign.online.draws.draw`); a preference model gives P(y ≻ y'). The policy-gradient step
ascends E[P(y ≻ y')] − β·KL(π‖ref) with ½ as control variate::

    loss = −sg[(P(y ≻ y') − ½) − β·(log π(y) − log ref(y))] · log π(y)

whose gradient is the REINFORCE estimate −E[((P − ½) − β·log(π/ref)(y)) ∇log π(y)]. The regularised Nash
equilibrium π* solves π*(y) ∝ ref(y)·exp(P(y ≻ π*)/β): no Bradley–Terry reward has to exist (e.g. cyclic
preferences without a Condorcet winner). For diffusion the score (negative denoising error) stands in for log π.
Ties (P = ½) are valid verdicts here (zero advantage); NaN verdicts are left out (weight 0) and counted; the loss is
the mean over the kept rows of the global batch (:mod:`genalign.online.global_batch`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign.adapters.base import Adapter
from genalign.objectives._checks import as_scores, positive, probabilities
from genalign.online import draws, global_batch
from genalign.online.judges import bind, build_judge, judge_pairs
from genalign.steps import Step, StepContext


def nash_md(policy: torch.Tensor, reference: torch.Tensor, preference: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """Per-sample Nash-MD policy-gradient surrogate −sg[(P − ½) − β(π − ref)]·π on the policy's samples."""
    positive("beta", beta)
    pi, ref = as_scores(policy=policy, reference=reference)
    p = probabilities("preference", preference, pi.shape[0], pi)
    advantage = (p - 0.5) - beta * (pi - ref).detach()
    return -advantage.detach() * pi


class NashMDStep(Step):
    """Nash-MD-PG with a judge (preference model) on the policy's samples against mixture samples.

    Args:
        judge: ``(prompts, responses_a, responses_b) -> [N]`` P(a ≻ b), or a hydra spec of one.
        beta: β, the KL(π‖ref) regularisation.
        mixture: c of the opponent's geometric mixture π^(1−c)·ref^c.
        truncated: an unfinished response ``"lose"``s or its pair is ``"drop"``ped.
        sample: keyword arguments of ``adapter.sample``.
    """

    def __init__(self, judge: Any, *, beta: float = 0.1, mixture: float = 0.125, truncated: str = "lose",
                 sample: dict[str, Any] | None = None):
        self.judge, self.beta = build_judge(judge), positive("beta", beta)
        self.mixture, self.truncated, self.sample = draws.check_mixture(mixture), truncated, dict(sample or {})

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        prompts = draws.prompts(rows)
        own = global_batch.draw(adapter, prompts, 1, ctx, **self.sample)
        opponent = global_batch.draw(adapter, prompts, 1, ctx, mixture=self.mixture, **self.sample)
        verdict = judge_pairs(bind(self.judge, adapter), prompts, draws.responses(own), draws.responses(opponent),
                              ended_a=draws.ended(adapter, own), ended_b=draws.ended(adapter, opponent),
                              truncated=self.truncated, ties_valid=True)
        scores = adapter.score(own, groups=torch.arange(len(rows)), generator=ctx.generator)
        keep = verdict.valid.to(scores.policy.device)
        preference = torch.where(keep, verdict.prob.to(scores.policy.device), 0.5)  # left-out rows: weight 0
        loss = nash_md(scores.policy, scores.reference, preference, beta=self.beta)
        loss = loss * global_batch.kept_mean_weights(keep, ctx)
        means = {"nash_md/preference": preference[keep].mean(),
                 "nash_md/kl": (scores.policy - scores.reference).detach()[keep].mean()}
        metrics = {**global_batch.global_sums(verdict.counts, ctx),
                   **global_batch.global_kept_means(means, int(keep.sum()), ctx)}
        return loss, metrics
