"""Multi-turn trajectories for trajectory-level preferences (multi-turn DPO and KTO).

Format (JSONL, read by :func:`genalign.data.text.read_pairwise` / :func:`~genalign.data.text.read_unpaired`): the
``prompt`` is the opening message list and each response is the rest of the trajectory, a message list in which
the agent's turns have role ``assistant`` and the turns it did not write have any other role (``tool``,
``environment``, ``user``)::

    {"prompt": [{"role": "user", "content": "12+34="}],
     "chosen":   [{"role": "assistant", "content": "46"}, {"role": "tool", "content": "7+8="},
                  {"role": "assistant", "content": "15"}],
     "rejected": [{"role": "assistant", "content": "36"}, {"role": "tool", "content": "7+8="},
                  {"role": "assistant", "content": "15"}]}

Unpaired rows carry one trajectory as ``completion`` with a ``label`` (KTO). The text adapter scores a trajectory
as the summed log-probability of its assistant turns only: tool/environment turns are context, masked out of the
loss (``TextAdapter``'s chat-style masking), so the preference is over the whole trajectory but only the agent's
own tokens are trained.

:func:`arithmetic_trajectories` builds such data for the arithmetic default: the environment poses a new problem
after each answer; the chosen trajectory answers every turn correctly, the rejected one makes a plausible mistake in
one randomly chosen turn. :data:`ARITHMETIC_CHAT_TEMPLATE` renders it for the tiny LM's character vocabulary.
"""

from __future__ import annotations

import random
from typing import Any

from genalign.data import arithmetic
from genalign.data.text import pairwise_row, unpaired_row

#: messages back to back: every assistant turn ends with EOS, other turns are raw text ("<bos>12+34=46<eos>7+8=15<eos>")
ARITHMETIC_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")
KINDS = ("pairs", "labelled")


def arithmetic_trajectories(split: str = "train", *, n: int | None = None, seed: int = 0, turns: int = 2,
                            kind: str = "pairs") -> list[dict[str, Any]]:
    """Multi-turn arithmetic trajectories of ``turns`` problems each (problems of ``split``, taken in order).

    ``kind="pairs"``: ``{prompt, chosen, rejected}`` (chosen all correct; rejected wrong in one turn).
    ``kind="labelled"``: ``{prompt, completion, label}``, one trajectory per row, all-correct (True) or with one
    wrong turn (False) with equal probability.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if int(turns) != turns or turns < 1:
        raise ValueError(f"turns must be a positive integer, got {turns}")
    rng = random.Random(seed)
    problems = arithmetic.problems(split)
    count = len(problems) // turns if n is None else n
    if count * turns > len(problems):
        raise ValueError(f"asked for {count} trajectories of {turns} turns but the {split} split has only "
                         f"{len(problems)} problems")
    rows = []
    for i in range(count):
        chain = problems[i * turns : (i + 1) * turns]
        where = f"arithmetic trajectory {i}"
        good = _trajectory(chain, wrong_turn=None, rng=rng)
        bad = _trajectory(chain, wrong_turn=rng.randrange(turns), rng=rng)
        prompt = [{"role": "user", "content": arithmetic.prompt(*chain[0])}]
        if kind == "pairs":
            row = pairwise_row({"prompt": prompt, "chosen": good, "rejected": bad}, where)
        else:
            label = rng.random() < 0.5
            row = unpaired_row({"prompt": prompt, "completion": good if label else bad, "label": label}, where)
        rows.append(dict(row, row=i))
    return rows


def _trajectory(chain: list[tuple[int, int]], wrong_turn: int | None, rng: random.Random) -> list[dict[str, str]]:
    """Assistant answers to each problem, the environment posing the next problem in between."""
    messages = []
    for t, (a, b) in enumerate(chain):
        if t:
            messages.append({"role": "tool", "content": arithmetic.prompt(a, b)})
        answer = arithmetic.wrong_answer(a, b, rng) if t == wrong_turn else a + b
        messages.append({"role": "assistant", "content": str(answer)})
    return messages
