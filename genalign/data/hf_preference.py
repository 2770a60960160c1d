"""Hugging Face preference sets from local files: parquet and/or JSONL shards in the common public layouts.

``read_preferences(path, format, split)`` reads a file or a folder of shards (``*.parquet``, ``*.jsonl``,
``*.jsonl.gz``; e.g. a dataset snapshot with ``data/train_prefs-00000-of-00001.parquet``) and returns the rows of
:mod:`genalign.data.text`: pairwise ``{prompt, chosen, rejected, row, source}`` or unpaired
``{prompt, completion, label | reward, row, source}``, checked by its ``pairwise_row`` / ``unpaired_row``.

Formats (``format="auto"`` tells them apart by each file's first row; a name forces one):

* ``ultrafeedback`` -- conversational ``chosen`` / ``rejected`` message lists: HuggingFaceH4/ultrafeedback_binarized
  (``prompt`` string, ``prompt_id``, ``chosen``, ``rejected``, ``messages``, ``score_chosen``, ``score_rejected``)
  and TRL's conversational preference layouts. Without a ``prompt`` message list the shared leading messages of
  chosen and rejected are the prompt (a ``prompt`` string must then be one of its user turns). ``prompt_id`` and
  the scores are kept on the row; ``score_chosen < score_rejected`` is an error (swapped columns). ``messages``
  (the chosen conversation, for SFT) is not used.
* ``hh`` -- Anthropic HH-RLHF: ``chosen`` / ``rejected`` transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``,
  turned into user / assistant messages (the one space after ``Human:`` / ``Assistant:`` is the separator, the rest
  of a turn is kept as written, blank lines included); the shared leading messages are the prompt, the rest (the
  last assistant turn) the completion.
* ``tldr`` -- ``prompt`` / ``chosen`` / ``rejected`` strings (trl-lib/tldr-preference).
* ``kto`` -- unpaired ``prompt`` / ``completion`` / ``label`` (trl-lib/kto-mix-14k; strings or message lists).

A pair whose chosen equals its rejected carries no preference: it is skipped, counted and logged (as Pick-a-Pic's
ties are). Any other bad row raises ``ValueError`` naming the file, row and field; ``skip_invalid=True`` skips such
rows instead, counting them and logging the first errors.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from genalign.data.text import jsonl_records, pairwise_row, unpaired_row

log = logging.getLogger(__name__)

FORMATS = ("ultrafeedback", "hh", "tldr", "kto")
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")
#: fields each format needs (the error for a missing one lists them)
REQUIRED = {"ultrafeedback": ("chosen", "rejected"), "hh": ("chosen", "rejected"),
            "tldr": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion")}
_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}(-[0-9a-f]+)?$")  # train-00000-of-00004[-<hash>]
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_LOGGED_ERRORS = 5


def read_preferences(
    path: str | Path, format: str = "auto", split: str | None = None, skip_invalid: bool = False
) -> list[dict[str, Any]]:
    """Rows of every shard of ``split`` under ``path`` (see the module docstring); ``row`` counts over all shards."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown preference format {format!r}; choose auto or one of {list(FORMATS)}")
    rows: list[dict[str, Any]] = []
    ties, errors, seen = 0, [], 0
    detected: tuple[str, Path] | None = None
    for file in preference_files(path, split):
        file_format = None if format == "auto" else format
        for where, obj in records(file):
            seen += 1
            if file_format is None:
                file_format = detect_format(obj, where)
                if detected is not None and detected[0] != file_format:
                    raise ValueError(f"{file} holds {file_format!r} rows but {detected[1]} holds {detected[0]!r} rows;"
                                     " point data.path at shards of one dataset or force data.format")
                detected = (file_format, file)
            try:
                row = convert(obj, where, file_format)
            except ValueError as error:
                if not skip_invalid:
                    raise
                errors.append(str(error))
                continue
            if row is None:
                ties += 1
                continue
            rows.append(dict(row, row=len(rows), source=where))
    if ties or errors:
        first = "".join(f"\n  {e}" for e in errors[:_LOGGED_ERRORS]) + ("\n  ..." if len(errors) > _LOGGED_ERRORS else "")
        log.warning("%s: kept %d of %d rows; skipped %d pairs whose chosen equals rejected and %d invalid rows%s",
                    path, len(rows), seen, ties, len(errors), first)
    if not rows:
        raise ValueError(f"{path}: no usable preference rows ({seen} read, {ties} with chosen equal to rejected, "
                         f"{len(errors)} invalid)")
    return rows


# ------------------------------------------------------------------------------------------------ files
def preference_files(path: str | Path, split: str | None = None) -> list[Path]:
    """The data files of ``path``: the file itself, or the files of ``split`` in a folder (sorted, hidden folders
    such as ``.cache`` left out). ``split=None`` takes a folder whole when it holds one split only."""
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise ValueError(f"{path}: not a preference data file; expected one of {list(SUFFIXES)}")
        if split is not None and split_of(path) != split:
            raise ValueError(f"{path} is split {split_of(path)!r} by its name, not data.split={split!r}; pass "
                             "data.split=null to read this file, or point data.path at its folder")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no preference file or folder at {str(path)!r}")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise FileNotFoundError(f"folder {path} holds no {' / '.join(SUFFIXES)} file")
    splits = sorted({split_of(p) for p in found})
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"folder {path} holds the splits {splits}; choose one with data.split=NAME")
        return found
    picked = [p for p in found if split_of(p) == split]
    if not picked:
        raise ValueError(f"folder {path} has no file of split {split!r}; its splits are {splits}")
    return picked


def split_of(file: Path) -> str:
    """The split a file belongs to by the Hugging Face naming: ``train_prefs-00000-of-00001.parquet`` and
    ``train.jsonl.gz`` -> the name before the shard counter; ``train/0000.parquet`` -> its folder."""
    stem = next(file.name[: -len(s)] for s in SUFFIXES if file.name.endswith(s))
    stem = _SHARD_SUFFIX.sub("", stem)
    return file.parent.name if stem.isdigit() else stem


def records(file: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row object)`` of a parquet file (``"file row N"``, 0-based, read in record batches) or a JSONL
    file (``"file:line"``)."""
    if not file.name.endswith(".parquet"):
        yield from jsonl_records(file)
        return
    number = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield f"{file} row {number}", obj
            number += 1


# ------------------------------------------------------------------------------------------------ rows
def detect_format(obj: Any, where: str) -> str:
    """The format of one row by its fields (see the module docstring)."""
    fields = sorted(obj) if isinstance(obj, dict) else []
    if {"completion", "label"} <= set(fields):
        return "kto"
    if {"chosen", "rejected"} <= set(fields):
        chosen = obj["chosen"]
        if isinstance(chosen, list):
            return "ultrafeedback"
        if isinstance(chosen, str) and "prompt" in obj:
            return "tldr"
        if isinstance(chosen, str) and chosen.lstrip().startswith("Human:"):
            return "hh"
    raise ValueError(f"{where}: cannot tell the preference format from the fields {fields}; expected ultrafeedback "
                     "(chosen/rejected message lists), hh (chosen/rejected '\\n\\nHuman:' transcripts), tldr "
                     "(prompt/chosen/rejected strings) or kto (prompt/completion/label); pass data.format=NAME to "
                     "force one")


def convert(obj: Any, where: str, format: str) -> dict[str, Any] | None:
    """One row of ``format`` as a genalign row; ``None`` for a pair whose chosen equals its rejected."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a row must be an object, got {type(obj).__name__}")
    missing = [name for name in REQUIRED[format] if name not in obj]
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}; the {format} format needs {list(REQUIRED[format])} "
                         f"(fields present: {sorted(obj)})")
    if format == "kto":
        return unpaired_row(obj, where)
    if format == "hh":
        pair = {side: hh_messages(obj[side], where, side) for side in ("chosen", "rejected")}
    elif format == "tldr":
        for name in ("prompt", "chosen", "rejected"):
            if not isinstance(obj[name], str):
                raise ValueError(f"{where}: field {name!r} must be a string in the tldr format, got "
                                 f"{type(obj[name]).__name__}; message lists are format=ultrafeedback")
        pair = {name: obj[name] for name in ("prompt", "chosen", "rejected")}
    else:
        pair = _conversational(obj, where)
    if pair["chosen"] == pair["rejected"]:
        return None
    row = pairwise_row(pair, where)
    if format == "hh":
        for side in ("chosen", "rejected"):
            if row[side][0]["role"] != "assistant":
                raise ValueError(f"{where}: field {side!r} departs from the other side at a Human turn; HH pairs share "
                                 "the transcript up to the Assistant reply they compare")
    if format == "ultrafeedback":
        _check_prompt_string(obj, row, where)
        row.update(_ultrafeedback_extras(obj, where))
    return row


def hh_messages(text: Any, where: str, field: str) -> list[dict[str, str]]:
    """An Anthropic HH transcript ``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` as user / assistant messages; paragraphs
    inside a turn stay in it (only ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` start a turn)."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} must be an HH transcript string, got {type(text).__name__}")
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    if parts[0] or len(parts) < 3:
        raise ValueError(f"{where}: field {field!r} is not an HH transcript (it must start with 'Human:' turns "
                         f"separated by blank lines): {text[:60]!r}")
    return [{"role": _HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def _conversational(obj: dict[str, Any], where: str) -> dict[str, Any]:
    for side in ("chosen", "rejected"):
        if not isinstance(obj[side], list):
            raise ValueError(f"{where}: field {side!r} must be a list of messages in the ultrafeedback format, got "
                             f"{type(obj[side]).__name__}; strings are format=tldr or format=hh")
    pair = {"chosen": obj["chosen"], "rejected": obj["rejected"]}
    if isinstance(obj.get("prompt"), list):  # TRL's explicit-prompt conversational layout
        pair["prompt"] = obj["prompt"]
    return pair


def _check_prompt_string(obj: dict[str, Any], row: dict[str, Any], where: str) -> None:
    """UltraFeedback's ``prompt`` string must be a user turn of the prompt taken from the conversations."""
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        return
    turns = [m["content"].strip() for m in row["prompt"] if m["role"] == "user"]
    if prompt.strip() not in turns:
        raise ValueError(f"{where}: field 'prompt' ({prompt[:60]!r}) is no user turn of the messages chosen and "
                         "rejected share, so the columns disagree; fix the row or drop its 'prompt' column")


def _ultrafeedback_extras(obj: dict[str, Any], where: str) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if obj.get("prompt_id") is not None:
        extras["prompt_id"] = str(obj["prompt_id"])
    for name in ("score_chosen", "score_rejected"):
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: field {name!r} must be a finite number, got {value!r}")
        extras[name] = float(value)
    if extras.get("score_chosen", math.inf) < extras.get("score_rejected", -math.inf):
        raise ValueError(f"{where}: field 'score_chosen' ({extras['score_chosen']}) is below 'score_rejected' "
                         f"({extras['score_rejected']}); chosen must be the preferred response (swapped columns?)")
    return extras
