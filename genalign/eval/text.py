"""Evaluation for language models: implicit-reward accuracy on preference pairs and the arithmetic task.

The DPO implicit reward of a completion is ``r(x, y) = beta * (log pi(y|x) - log ref(y|x))`` (Rafailov et al.
2023); a pair is ranked right when ``r(chosen) > r(rejected)``, i.e. ``Delta = (pi_w - ref_w) - (pi_l - ref_l) > 0``.
Ties (Delta == 0, e.g. at step 0 when the policy is the reference) count one half. Without a reference model
(SimPO) the reward is SimPO's length-normalised ``beta * mean log pi(y|x)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign.adapters.text import TextAdapter, eval_mode
from genalign.data import arithmetic
from genalign.data.batching import pairwise_batch


@torch.no_grad()
def implicit_reward_accuracy(
    adapter: TextAdapter, pairs: Sequence[dict[str, Any]], beta: float = 0.1, *, batch_size: int = 64
) -> dict[str, float]:
    """``implicit_reward_accuracy`` (ties count 1/2) and ``mean_margin`` = mean ``beta * Delta`` over ``pairs``."""
    if not pairs:
        raise ValueError("implicit_reward_accuracy got no pairs")
    margins = []
    with eval_mode(adapter.unwrapped_policy):
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = adapter.score_pairs(pairwise_batch(adapter, pairs[start : start + batch_size]))
            if chosen.reference is None:
                margins.append(beta * (chosen.mean_policy - rejected.mean_policy))
            else:
                margins.append(beta * ((chosen.policy - chosen.reference) - (rejected.policy - rejected.reference)))
    margin = torch.cat(margins).float().cpu()
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {"implicit_reward_accuracy": wins.mean().item(), "mean_margin": margin.mean().item()}


class ArithmeticEvaluator:
    """Held-out arithmetic: greedy exact-answer ``accuracy`` and implicit-reward metrics on held-out pairs."""

    def __init__(self, split: str = "heldout", n: int | None = None, *, beta: float = 0.1, batch_size: int = 256,
                 seed: int = 0) -> None:
        self.pairs = arithmetic.pairs(split, n=n, seed=seed)
        self.beta = beta
        self.batch_size = batch_size

    def accuracy(self, adapter: TextAdapter) -> float:
        """Fraction of prompts whose greedy completion is exactly the sum."""
        correct = 0
        for start in range(0, len(self.pairs), self.batch_size):
            rows = self.pairs[start : start + self.batch_size]
            answers = adapter.sample([row["prompt"] for row in rows], do_sample=False, max_new_tokens=4)["texts"]
            correct += sum(answer == row["chosen"] for answer, row in zip(answers, rows))
        return correct / len(self.pairs)

    def __call__(self, adapter: TextAdapter) -> dict[str, float]:
        metrics = {"accuracy": self.accuracy(adapter)}
        metrics.update(implicit_reward_accuracy(adapter, self.pairs, self.beta, batch_size=self.batch_size))
        return metrics
