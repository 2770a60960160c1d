"""Evaluation for language models: reward-model win rate, implicit-reward accuracy on preference pairs and the
arithmetic task.

Win rate of a model against a base on the same prompts: ``mean_i [r(x_i, y_i) > r(x_i, b_i)] + 1/2 [r(x_i, y_i) =
r(x_i, b_i)]`` for a reward model ``r`` (ties count one half, so a model against itself scores exactly 0.5), with
a 95 % normal half-width ``1.96 * std / sqrt(n)`` of the per-prompt outcomes.

The DPO implicit reward of a completion is ``r(x, y) = beta * (log pi(y|x) - log ref(y|x))`` (Rafailov et al.
2023); a pair is ranked right when ``r(chosen) > r(rejected)``, i.e. ``Delta = (pi_w - ref_w) - (pi_l - ref_l) > 0``.
Ties (Delta == 0, e.g. at step 0 when the policy is the reference) count one half. Without a reference model
(SimPO) the reward is SimPO's length-normalised ``beta * mean log pi(y|x)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from genalign.adapters.text import TextAdapter, eval_mode
from genalign.data import arithmetic
from genalign.data.batching import pairwise_batch


def win_rate(model_rewards: Sequence[float] | torch.Tensor, base_rewards: Sequence[float] | torch.Tensor) -> dict[str, float]:
    """``win_rate`` (ties 1/2), ``win_rate_ci95``, ``wins`` / ``ties`` / ``losses`` counts and the mean rewards of
    per-prompt rewards of the model and the base (same prompts, same order)."""
    model, base = (torch.as_tensor(r, dtype=torch.float64).reshape(-1) for r in (model_rewards, base_rewards))
    if model.numel() != base.numel():
        raise ValueError(f"win_rate needs one base reward per model reward, got {model.numel()} and {base.numel()}")
    if model.numel() == 0:
        raise ValueError("win_rate got no rewards")
    for name, rewards in (("model", model), ("base", base)):
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"win_rate: the {name} rewards of prompts {bad[:10]} are not finite")
    outcome = (model > base).double() + 0.5 * (model == base).double()
    n = outcome.numel()
    half_width = 1.96 * outcome.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"win_rate": outcome.mean().item(), "win_rate_ci95": half_width, "wins": int((model > base).sum()),
            "ties": int((model == base).sum()), "losses": int((model < base).sum()), "n_prompts": n,
            "mean_reward": model.mean().item(), "mean_reward_base": base.mean().item()}


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
