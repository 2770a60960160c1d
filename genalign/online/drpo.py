"""DR-PO: dataset reset policy optimisation (Chang et al. 2024, "Dataset Reset Policy Optimization for RLHF").

Online rollouts do not all start from the prompt: they start from states of the offline *preferred* responses.
For text a state is a prefix: with y_w = (y_1 … y_T) tokenised, a reset point h ~ U{0, …, T−1} is drawn per row
and K continuations are sampled from the policy given x ⊕ y_w[:h]. A reward model scores each full response
y_w[:h] ⊕ continuation; the best and the worst continuation form a pair, trained with DPO on the continuation
tokens (the reset prefix is context). h = 0 is an ordinary rollout from the prompt; later resets let the policy
practise finishing good responses it would rarely reach from scratch.

Rows whose K rewards all tie are skipped and counted; a rollout that hits the length limit without an end token
gets the lowest reward of its group minus one (it loses to every finished one) and is counted.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.text import TextAdapter
from genalign.objectives._checks import positive
from genalign.online import draws
from genalign.online.judges import RewardJudge
from genalign.online.self_pairs import best_worst, grouped, pick, zero_loss
from genalign.steps import Step, StepContext


class DRPOStep(Step):
    """DR-PO on rows ``{"prompt": str, "chosen": str, ...}`` (pairwise) or ``{"prompt", "response"}`` (demonstrations).

    Args:
        reward: ``reward(prompts, responses) -> [N]`` (higher is better), a callable, an import path
            ("module.function") or a hydra spec.
        num_samples: K continuations per reset state (>= 2).
        beta: β of DPO.
        reward_range: ``[low, high]``; a reward outside raises naming the prompt.
        sample_kwargs: extra keyword arguments of ``adapter.sample`` (e.g. ``max_new_tokens``).
    """

    def __init__(self, reward: Any, num_samples: int = 2, beta: float = 0.1, *,
                 reward_range: Sequence[float] | None = None, sample_kwargs: dict[str, Any] | None = None):
        if int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2 (continuations to compare), got {num_samples}")
        self.reward = RewardJudge(_callable(reward), reward_range=reward_range)
        self.num_samples, self.beta = int(num_samples), positive("beta", beta)
        self.sample_kwargs = dict(sample_kwargs or {})

    def __call__(self, adapter: TextAdapter, rows: Sequence[dict], ctx: StepContext):
        if not isinstance(adapter, TextAdapter):
            raise TypeError(f"DR-PO resets rollouts at prefixes of preferred text responses; it needs a TextAdapter, "
                            f"got {type(adapter).__name__}")
        prompts, prefixes = self.reset_states(adapter, rows, ctx.generator)
        n, k = len(rows), self.num_samples
        starts = [p + h for p, h in zip(prompts, prefixes)]
        samples = draws.draw(adapter, starts, k, ctx.generator, **self.sample_kwargs)
        full = [prefixes[q // k] + text for q, text in enumerate(draws.responses(samples))]
        reward = self.reward.rewards([p for p in prompts for _ in range(k)], full).float().view(n, k)
        ended = draws.ended(adapter, samples).view(n, k)
        reward = torch.where(ended, reward, reward.min() - 1.0)
        flat = adapter.score(samples, groups=torch.arange(n * k), generator=ctx.generator)
        rows_, best, worst, ties = best_worst(reward)
        metrics = {"drpo/reward": reward[ended].mean() if ended.any() else torch.tensor(float("nan")),
                   "drpo/reset_fraction": torch.tensor([len(h) > 0 for h in prefixes]).float().mean(),
                   "drpo/ties": float(ties), "drpo/unfinished": float((~ended).sum())}
        if rows_.numel() == 0:
            return zero_loss(flat), metrics
        scores = grouped(flat, n, k)
        w, l = pick(scores, rows_, best), pick(scores, rows_, worst)
        loss = objectives.dpo(w.policy, l.policy, w.reference, l.reference, beta=self.beta)
        metrics.update(objectives.pairwise_metrics(w.policy, l.policy, w.reference, l.reference, beta=self.beta))
        return loss, metrics

    def reset_states(self, adapter: TextAdapter, rows: Sequence[dict], generator: torch.Generator):
        """Per row the prompt and a prefix y_w[:h] of its preferred response, h ~ U{0, …, T−1} over its tokens."""
        prompts, prefixes = draws.prompts(rows), []
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            preferred = row.get("chosen", row.get("response"))
            where = row.get("source") or f"row {row.get('row', i)}"
            if not isinstance(prompt, str) or not isinstance(preferred, str) or not preferred:
                raise ValueError(f"{where}: DR-PO needs a string 'prompt' and a non-empty string preferred response "
                                 "('chosen' or 'response') to reset from; chat-message rows are not supported")
            ids = adapter.tokenizer(preferred, add_special_tokens=False)["input_ids"]
            h = int(torch.randint(len(ids), (1,), generator=generator))
            prefixes.append(adapter.tokenizer.decode(ids[:h]))
        return prompts, prefixes


def _callable(spec: Any):
    """A reward function from a callable, an import path or a hydra spec."""
    if callable(spec):
        return spec
    from hydra.utils import get_object, instantiate

    if isinstance(spec, str):
        return get_object(spec)
    if isinstance(spec, dict) and "_target_" in spec:
        return instantiate(spec)
    raise ValueError(f"reward must be a callable (prompts, responses) -> [N], an import path or a config with "
                     f"_target_, got {spec!r}")
