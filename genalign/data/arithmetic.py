"""The arithmetic embedded default: "a+b=" -> "a+b", a deterministic synthetic preference task.

Problems are every ``(a, b)`` with ``0 <= a, b < MAX_OPERAND`` (answers <= 98), split into train and held-out
*by problem* with a seeded permutation, so the two splits never share a prompt. A preference pair has the
correct sum as ``chosen`` and a plausible wrong answer as ``rejected``; ``labelled`` gives the same problems as
unpaired thumbs-up/down rows for KTO-style objectives.

The shipped base model (``assets/tiny-arith-lm``, trained by ``scripts/train_tiny_lm.py``) was fine-tuned on
deliberately noisy answers (:func:`noisy_answer`): most often it learned to *confuse the carry*
(:func:`carry_mistake`), so its greedy answers are wrong whenever the ones digits sum to 8 or more.
Preference pairs built from correct vs. wrong answers fix that.
"""

from __future__ import annotations

import random
from pathlib import Path

MAX_OPERAND = 50
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 1234
#: the shipped tiny base model (repository checkout layout)
TINY_LM_PATH = Path(__file__).resolve().parents[2] / "assets" / "tiny-arith-lm"
#: every character the task uses (the tiny model's vocabulary, besides the special tokens)
CHARACTERS = "0123456789+= "


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def parse_prompt(text: str) -> tuple[int, int]:
    """Inverse of :func:`prompt`; raises naming the text when it is not of the form ``"a+b="``."""
    left, sep, rest = text.partition("+")
    if not sep or not rest.endswith("=") or not left.isdigit() or not rest[:-1].isdigit():
        raise ValueError(f"not an arithmetic prompt of the form 'a+b=': {text!r}")
    return int(left), int(rest[:-1])


def problems(split: str = "train", *, seed: int = SPLIT_SEED) -> list[tuple[int, int]]:
    """The ``(a, b)`` problems of a split ("train", "heldout" or "all"), in a fixed seeded order."""
    everything = [(a, b) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    random.Random(seed).shuffle(everything)
    n_heldout = int(round(HELDOUT_FRACTION * len(everything)))
    splits = {"heldout": everything[:n_heldout], "train": everything[n_heldout:], "all": everything}
    if split not in splits:
        raise ValueError(f"unknown arithmetic split {split!r}; use one of {sorted(splits)}")
    return splits[split]


def carry_mistake(a: int, b: int) -> int:
    """The base model's systematic mistake: confusing the carry whenever the ones digits sum to 8 or more.

    A real carry (ones sum >= 10) is dropped, a carry is invented when the ones sum is 8 or 9, and the answer is
    correct otherwise. The ones digits sum to 8 or more on 64 of the 100 digit pairs, so 64% of answers are wrong.
    """
    ones = a % 10 + b % 10
    if ones >= 10:
        return a + b - 10
    if ones >= 8:
        return a + b + 10
    return a + b


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong answer: the carry mistake, off by 1..10, or the two digits swapped (never correct)."""
    correct = a + b
    candidates = {correct + d for d in range(-10, 11) if d != 0 and correct + d >= 0}
    if correct >= 10 and correct % 10 != correct // 10:
        candidates.add(int(str(correct)[::-1]))
    mistake = carry_mistake(a, b)
    if mistake != correct and rng.random() < 0.5:
        return mistake
    return rng.choice(sorted(candidates - {correct}))


def noisy_answer(a: int, b: int, rng: random.Random, *, p_correct: float, p_mistake: float) -> int:
    """The base model's training target: correct with ``p_correct``, :func:`carry_mistake` with ``p_mistake``
    (which is correct when the ones digits sum to less than 8), otherwise a plausible wrong answer."""
    u = rng.random()
    if u < p_correct:
        return a + b
    if u < p_correct + p_mistake:
        return carry_mistake(a, b)
    return wrong_answer(a, b, rng)


def _select(split: str, n: int | None) -> list[tuple[int, int]]:
    chosen = problems(split)
    if n is not None:
        if n > len(chosen):
            raise ValueError(f"asked for n={n} {split} problems but the split has only {len(chosen)}")
        chosen = chosen[:n]
    return chosen


def pairs(split: str = "train", *, n: int | None = None, seed: int = 0) -> list[dict]:
    """Preference rows ``{prompt, chosen, rejected, row}``: chosen is the correct sum, rejected a wrong one."""
    rng = random.Random(seed)
    return [
        {"prompt": prompt(a, b), "chosen": str(a + b), "rejected": str(wrong_answer(a, b, rng)), "row": i}
        for i, (a, b) in enumerate(_select(split, n))
    ]


def labelled(split: str = "train", *, n: int | None = None, seed: int = 0) -> list[dict]:
    """Unpaired rows ``{prompt, completion, label, row}``: each problem once, correct (True) or wrong (False)
    with equal probability."""
    rng = random.Random(seed)
    rows = []
    for i, (a, b) in enumerate(_select(split, n)):
        good = rng.random() < 0.5
        answer = a + b if good else wrong_answer(a, b, rng)
        rows.append({"prompt": prompt(a, b), "completion": str(answer), "label": good, "row": i})
    return rows
