"""Cache of training rows sampled from a base model (the digits and motion rows builders share it), and the key
and atomic write it is made of (the digits evaluator caches its samples with them).

Rows built from the base model's own samples are expensive on a CPU; :func:`cached_rows` stores them with a key made
of every setting and a digest of the base weights, so a rerun or resumed run loads them, and a changed setting or a
different base model samples again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from genalign.adapters.base import Adapter

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]


def cached_rows(cache_file: str | Path | None, settings: dict[str, Any], adapter: Adapter,
                build: Callable[[], Rows]) -> Rows:
    """``build()``, or the rows stored in ``cache_file`` under the same settings and base weights."""
    if cache_file is None:
        return build()
    key = cache_key(settings, adapter)
    path = Path(cache_file)
    if path.exists():
        stored = torch.load(path, weights_only=True)
        if stored.get("key") == key:
            log.info("loaded %d cached rows from %s", len(stored["rows"]), path)
            return stored["rows"]
        log.warning("%s was built with other settings or another base model; sampling the rows again", path)
    rows = build()
    save_atomic({"key": key, "settings": settings, "rows": rows}, path)
    return rows


def cache_key(settings: dict[str, Any], adapter: Adapter) -> str:
    """sha256 of the JSON ``settings`` and of the policy's weights."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + weights_digest(adapter).encode()).hexdigest()


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def weights_digest(adapter: Adapter) -> str:
    """sha256 of the policy's weights (names and values): the base model the samples came from."""
    digest = hashlib.sha256()
    for name, tensor in adapter.unwrapped_policy.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
