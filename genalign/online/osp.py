"""OSP: online self-preferring optimisation (Zhai et al. 2024, "Online Self-Preferring Language Models").

Each step draws K responses per prompt from the current policy, ranks them by the model's *own* judgement, pairs
every higher-ranked response with every lower-ranked one and trains with the soft-preference loss, where the
preference strength of a pair grows with the judged gap::

    s_1 ≥ s_2 ≥ … ≥ s_K (own judgement),  pairs (i, j), i < j, s_i > s_j,  p_ij = σ((s_i − s_j) / T)
    loss = −[p log σ(βΔ) + (1 − p) log σ(−βΔ)]                        (genalign.objectives.soft_preference)

Judges (``judge``): "likelihood" — the policy's mean per-token log-likelihood of the response (how sure the model
is of it; for diffusion the score itself); "implicit" — the DPO implicit reward β(log π − log ref); or a pairwise
judge of :mod:`genalign.online.judges` (e.g. an ``LLMJudge`` without a model, bound to the policy being trained,
which is OSP's self-judgement through a prompt), turned into per-response scores by each response's mean
probability of beating the other K − 1 (a Borda score). Pairs with equal judgement carry no preference: they are
left out and counted. A text response that hit the length limit without an end token ranks below every finished
one (the pairwise judges apply :func:`~genalign.online.judges.judge_pairs`' rule); their number is logged.

The model's judgement is learned from the offline preference data (OSP's self-preferring model is trained on the
preference dataset and then judges its own samples; it needs no separate reward model): with ``offline_weight`` λ > 0
the rows' own pairs ``{prompt, chosen, rejected}`` add λ × DPO per row, which teaches the likelihood and implicit-reward
judges which answers are preferred. With λ = 0 (rows need only a ``prompt``) the judgement is the model's as it is,
and a likelihood judge then mostly sharpens the model's current mode.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.data.batching import pairwise_batch
from genalign.objectives._checks import in_range, positive
from genalign.online import draws, global_batch
from genalign.online.judges import bind, build_judge, judge_pairs
from genalign.online.self_pairs import global_share, grouped, pick
from genalign.steps import Step, StepContext
from genalign.types import Scores

OWN_JUDGES = ("likelihood", "implicit")


class OSPStep(Step):
    """OSP on rows with a ``prompt`` (any other field is ignored).

    Args:
        num_samples: K responses per prompt (>= 2).
        beta: β of the soft-preference loss and of the implicit-reward judge.
        judge: "likelihood", "implicit", or a pairwise judge (callable or hydra spec).
        temperature: T of the preference strength.
        offline_weight: λ of the DPO loss on the rows' offline pairs (0: rows need only a prompt).
        sample_kwargs: extra keyword arguments of ``adapter.sample`` (e.g. ``max_new_tokens``, ``temperature``).
    """

    def __init__(self, num_samples: int = 4, beta: float = 0.1, *, judge: Any = "likelihood", temperature: float = 1.0,
                 offline_weight: float = 0.0, sample_kwargs: dict[str, Any] | None = None):
        if int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2 (responses to rank), got {num_samples}")
        self.num_samples, self.beta = int(num_samples), positive("beta", beta)
        self.temperature = positive("temperature", temperature)
        self.offline_weight = in_range("offline_weight", offline_weight, 0.0)
        self.judge = judge if judge in OWN_JUDGES else build_judge(judge)
        self.sample_kwargs = dict(sample_kwargs or {})

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        prompts = draws.prompts(rows)
        n, k = len(prompts), self.num_samples
        samples = global_batch.draw(adapter, prompts, k, ctx, **self.sample_kwargs)
        flat = adapter.score(samples, groups=torch.arange(n * k), generator=ctx.generator)
        scores = grouped(flat, n, k)
        judged = self.judgement(adapter, prompts, samples, scores)
        b, i, j = ranked_pairs(judged)
        metrics = {"osp/pairs": float(b.numel()), "osp/tied_pairs": float(n * k * (k - 1) / 2 - b.numel()),
                   "osp/unfinished": float((~draws.ended(adapter, samples)).sum())}
        losses = [flat.policy[:0].float()]
        if b.numel():
            strength = torch.sigmoid((judged[b, i] - judged[b, j]) / self.temperature)
            w, l = pick(scores, b, i), pick(scores, b, j)
            losses.append(objectives.soft_preference(w.policy, l.policy, w.reference, l.reference, beta=self.beta,
                                                     strength=strength.to(w.policy.device)))
            metrics.update(objectives.pairwise_metrics(w.policy, l.policy, w.reference, l.reference, beta=self.beta))
            metrics["osp/strength"] = strength.mean()
        if self.offline_weight:
            batch = pairwise_batch(adapter, rows).to(draws.device(adapter))
            chosen, rejected = adapter.score_pairs(batch, generator=ctx.generator)
            offline = objectives.dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference,
                                     beta=self.beta)
            losses.append(self.offline_weight * offline.float())
            metrics["osp/offline_loss"] = offline.detach().mean()
        return global_share(torch.cat(losses), ctx.shard), metrics

    @torch.no_grad()
    def judgement(self, adapter: Adapter, prompts: list[Any], samples: dict, scores: Scores) -> torch.Tensor:
        """The model's own scores of its K responses per prompt, ``[B, K]`` on the CPU (higher = better)."""
        n, k = scores.policy.shape
        ended = draws.ended(adapter, samples).view(n, k)
        if self.judge in OWN_JUDGES:
            if self.judge == "likelihood":
                own = scores.policy / scores.lengths.clamp(min=1) if scores.lengths is not None else scores.policy
            else:
                own = self.beta * (scores.policy - scores.reference)
            own = own.detach().float().cpu()
            return torch.where(ended, own, own.min() - 1.0)  # unfinished responses rank below every finished one
        a, b = torch.triu_indices(k, k, offset=1)
        responses = draws.responses(samples)
        flat_a, flat_b = (torch.arange(n)[:, None] * k + a).flatten(), (torch.arange(n)[:, None] * k + b).flatten()
        verdict = judge_pairs(bind(self.judge, adapter), [prompts[q // k] for q in flat_a.tolist()],
                              [responses[q] for q in flat_a.tolist()], [responses[q] for q in flat_b.tolist()],
                              ended_a=ended.flatten()[flat_a], ended_b=ended.flatten()[flat_b], ties_valid=True)
        prob = torch.nan_to_num(verdict.prob.view(n, -1).double(), nan=0.5)
        wins = torch.zeros(n, k, dtype=torch.float64)
        wins.index_add_(1, a, prob).index_add_(1, b, 1 - prob)
        return (wins / (k - 1)).float()


def ranked_pairs(judged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt, better, worse)`` index triples of every pair of a prompt's K responses with different judgement,
    the better one first (ranked pairing)."""
    k = judged.shape[1]
    a, b = torch.triu_indices(k, k, offset=1)
    gap = judged[:, a] - judged[:, b]
    prompt, which = (gap != 0).nonzero(as_tuple=True)
    first, second = a[which], b[which]
    forward = gap[prompt, which] > 0
    return prompt, torch.where(forward, first, second), torch.where(forward, second, first)
