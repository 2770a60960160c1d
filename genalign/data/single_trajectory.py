"""Single-trajectory feedback rows ``{prompt, completion, reward[, label]}``: one response per prompt with a scalar
reward (e.g. thumbs up = 1, down = 0), as DRO (Richemond et al. 2024) and PMPO (accepted/rejected) learn from.

A reward outside the declared range ``[low, high]`` is an error naming the row: a mis-scaled reward silently
changes what DRO's KL-regularised optimum ``π* ∝ ref·exp(R/τ)`` is.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

from genalign.data import arithmetic
from genalign.data.text import read_unpaired

KEEP = ("both", "accepted", "rejected")


def read_rewards(path: str | Path, low: float | None = None, high: float | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file ``{"prompt", "completion", "reward"[, "label"]}`` (checked line by line), with the
    rewards checked against ``[low, high]``; ``None`` leaves that side open."""
    rows = read_unpaired(path)
    missing = [r["source"] for r in rows if "reward" not in r]
    if missing:
        raise ValueError(f"{missing[0]}: missing field 'reward' (a number); single-trajectory rows need a scalar "
                         f"reward on every line ({len(missing)} lines lack it)")
    return check_reward_range(rows, low, high)


def check_reward_range(rows: Sequence[dict[str, Any]], low: float | None, high: float | None) -> list[dict[str, Any]]:
    """``rows`` unchanged if every ``reward`` lies in ``[low, high]``; otherwise raise naming the first bad row."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"the reward range is empty: low={low} > high={high}")
    for i, r in enumerate(rows):
        value = r.get("reward")
        if value is None:
            raise ValueError(f"{_where(r, i)}: missing field 'reward'")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{_where(r, i)}: reward {value} is outside the declared range [{low}, {high}]; "
                             "fix the row or declare the range the rewards really have")
    return list(rows)


def feedback_split(rows: Sequence[dict[str, Any]], keep: str) -> list[dict[str, Any]]:
    """Only the accepted (``label`` true), only the rejected, or ``both`` (PMPO learns from any of the three)."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if keep == "both":
        return list(rows)
    want = keep == "accepted"
    out = [r for r in rows if r["label"] is want]
    if not out:
        raise ValueError(f"no {keep} rows in the data; PMPO needs at least one")
    return out


def arithmetic_feedback(split: str = "train", *, n: int | None = None, seed: int = 0, keep: str = "both",
                        samples_per_problem: int = 1) -> list[dict[str, Any]]:
    """Arithmetic thumbs-up/down rows: each problem answered ``samples_per_problem`` times, correct or a plausible
    wrong answer with equal probability; ``label`` = correct and ``reward`` = 1.0 / 0.0."""
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
    rng = random.Random(seed)
    rows = []
    for a, b in arithmetic.problems(split)[:n]:
        for _ in range(samples_per_problem):
            good = rng.random() < 0.5
            answer = a + b if good else arithmetic.wrong_answer(a, b, rng)
            rows.append({"prompt": arithmetic.prompt(a, b), "completion": str(answer), "label": good,
                         "reward": float(good), "row": len(rows)})
    return feedback_split(rows, keep)


def _where(row: dict[str, Any], index: int) -> str:
    return row.get("source") or f"row {row.get('row', index)}"
