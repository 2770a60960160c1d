"""Text preference sets in JSON Lines: pairwise and unpaired rows, checked row by row.

Pairwise rows: ``{"prompt", "chosen", "rejected"[, "strength"]}``; the prompt is a string or a list of chat
messages ``[{"role", "content"}]``, chosen/rejected are strings or message lists (their assistant turns are the
completion). The TRL / Hugging Face conversational form without a ``prompt`` field is accepted too: ``chosen``
and ``rejected`` are full conversations and their longest common leading messages become the prompt.
``strength`` is the probability p in [0, 1] that chosen is preferred (soft preferences; absent means 1).

Unpaired rows: ``{"prompt", "completion", "label": bool}`` (thumbs up/down, TRL's KTO layout) or
``{"prompt", "completion", "reward": float}``.

Every reader returns a plain list of dicts with ``row`` (0-based position) and ``source`` ("file:line") added,
which the text adapter quotes in its errors. Bad rows raise ``ValueError`` naming the file, line and field.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

from genalign.data.batching import pairs_to_unpaired  # KTO on paired rows: chosen desirable, rejected not

__all__ = [
    "read_pairwise", "read_unpaired", "read_prompts", "pairs_from_lists", "pairs_to_unpaired", "pairwise_row", "unpaired_row",
    "jsonl_records",
]


def read_pairwise(path: str | Path) -> list[dict[str, Any]]:
    """Pairwise preference rows of a JSONL file (see the module docstring for the accepted layouts)."""
    return [dict(pairwise_row(obj, where), row=i, source=where) for i, (where, obj) in enumerate(jsonl_records(path))]


def read_unpaired(path: str | Path) -> list[dict[str, Any]]:
    """Unpaired rows ``{prompt, completion, label | reward}`` of a JSONL file."""
    return [dict(unpaired_row(obj, where), row=i, source=where) for i, (where, obj) in enumerate(jsonl_records(path))]


def read_prompts(path: str | Path) -> list[Any]:
    """The ``prompt`` of every line of a JSONL file (checked as the training readers check it)."""
    prompts = []
    for where, obj in jsonl_records(path):
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise ValueError(f"{where}: a prompt row must be a JSON object with a 'prompt' field")
        prompts.append(_prompt(obj["prompt"], where))
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file has no non-empty line)")
    return prompts


def pairs_from_lists(
    prompts: Sequence[Any],
    chosen: Sequence[Any],
    rejected: Sequence[Any],
    strength: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Pairwise rows from parallel lists; the lists must have the same length."""
    counts = {"prompts": len(prompts), "chosen": len(chosen), "rejected": len(rejected)}
    if strength is not None:
        counts["strength"] = len(strength)
    if len(set(counts.values())) != 1:
        raise ValueError(f"pairs_from_lists needs lists of one length, got {counts}")
    rows = []
    for i in range(len(prompts)):
        obj = {"prompt": prompts[i], "chosen": chosen[i], "rejected": rejected[i]}
        if strength is not None:
            obj["strength"] = strength[i]
        rows.append(dict(pairwise_row(obj, f"pair {i}"), row=i))
    return rows


# ------------------------------------------------------------------------------------------------ validation
def pairwise_row(obj: Any, where: str) -> dict[str, Any]:
    """Check one pairwise row and return ``{prompt, chosen, rejected[, strength]}``."""
    obj = _object(obj, where)
    for name in ("chosen", "rejected"):
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
    if "prompt" in obj:
        prompt, chosen, rejected = obj["prompt"], obj["chosen"], obj["rejected"]
    else:
        prompt, chosen, rejected = _split_implicit_prompt(obj["chosen"], obj["rejected"], where)
    out = {"prompt": _prompt(prompt, where), "chosen": _completion(chosen, where, "chosen"),
           "rejected": _completion(rejected, where, "rejected")}
    if "strength" in obj:
        p = obj["strength"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{where}: field 'strength' must be a number in [0, 1] (the probability that chosen "
                             f"is preferred), got {p!r}")
        out["strength"] = float(p)
    return out


def unpaired_row(obj: Any, where: str) -> dict[str, Any]:
    """Check one unpaired row and return ``{prompt, completion, label and/or reward}``."""
    obj = _object(obj, where)
    for name in ("prompt", "completion"):
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
    if "label" not in obj and "reward" not in obj:
        raise ValueError(f"{where}: missing field 'label' (true/false) or 'reward' (a number); give one of them")
    out = {"prompt": _prompt(obj["prompt"], where), "completion": _completion(obj["completion"], where, "completion")}
    if "label" in obj:
        if not isinstance(obj["label"], bool):
            raise ValueError(f"{where}: field 'label' must be true or false, got {obj['label']!r}")
        out["label"] = obj["label"]
    if "reward" in obj:
        r = obj["reward"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"{where}: field 'reward' must be a finite number, got {r!r}")
        out["reward"] = float(r)
    return out


def jsonl_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", parsed object)`` for every non-blank line of a JSONL file (gzip-compressed if ``*.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {str(path)!r}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from error


def _object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
    return obj


def _messages(value: list, where: str, field: str) -> list[dict[str, str]]:
    if not value:
        raise ValueError(f"{where}: field {field!r} is an empty message list")
    for k, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message) or not (
            isinstance(message["role"], str) and isinstance(message["content"], str)
        ):
            raise ValueError(f"{where}: field {field!r} message {k} must be an object with string 'role' and "
                             f"'content', got {message!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(value: Any, where: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where, "prompt")
    raise ValueError(f"{where}: field 'prompt' must be a string or a list of messages, got {type(value).__name__}")


def _completion(value: Any, where: str, field: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {field!r} is an empty completion")
        return value
    if not isinstance(value, list):
        raise ValueError(f"{where}: field {field!r} must be a string or a list of messages, got {type(value).__name__}")
    messages = _messages(value, where, field)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if not replies:
        raise ValueError(f"{where}: field {field!r} has no assistant message to score")
    if not any(reply.strip() for reply in replies):
        raise ValueError(f"{where}: field {field!r} is an empty completion (every assistant message is empty)")
    return messages


def _split_implicit_prompt(chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    """Conversational rows without a prompt: the longest common leading messages are the prompt."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise ValueError(f"{where}: missing field 'prompt' (only conversational rows, where chosen and rejected are "
                         "message lists sharing their first messages, may leave it out)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError(f"{where}: missing field 'prompt' and chosen/rejected share no leading message to use as one")
    if shared == len(chosen) or shared == len(rejected):
        raise ValueError(f"{where}: chosen and rejected have no differing messages after their shared prompt")
    return chosen[:shared], chosen[shared:], rejected[shared:]
