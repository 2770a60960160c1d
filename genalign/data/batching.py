"""Turn dataset rows into the batch types of :mod:`genalign.types`, and a resumable order over the rows.

Rows are plain dicts. Pairwise rows: ``{"prompt", "chosen", "rejected"[, "strength"]}``. Labelled rows:
``{"prompt", "response", "desirable"[, "reward"]}``. What a prompt or response *is* (text, image, action index)
is the adapter's business: it receives records ``{"prompt", "response", "row"}`` in :meth:`Adapter.collate`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign.adapters.base import Adapter
from genalign.types import LabelledBatch, PairwiseBatch


def _require(row: dict[str, Any], key: str, kind: str) -> Any:
    if key not in row or row[key] is None:
        where = f"row {row.get('row', '?')}"
        raise ValueError(f"{kind} {where} has no field {key!r} (fields present: {sorted(row)}); add it to the dataset")
    return row[key]


def pairwise_batch(adapter: Adapter, rows: Sequence[dict[str, Any]]) -> PairwiseBatch:
    """Collate pairwise rows; cached reference scores and preference strengths are carried when present."""
    chosen = [{"prompt": _require(r, "prompt", "pair"), "response": _require(r, "chosen", "pair"), "row": r.get("row")} for r in rows]
    rejected = [{"prompt": r["prompt"], "response": _require(r, "rejected", "pair"), "row": r.get("row")} for r in rows]
    strength = _optional_float(rows, "strength")
    return PairwiseBatch(
        chosen=adapter.collate(chosen),
        rejected=adapter.collate(rejected),
        size=len(rows),
        strength=strength,
        reference_chosen=_optional_float(rows, "reference_chosen"),
        reference_rejected=_optional_float(rows, "reference_rejected"),
        index=torch.tensor([r.get("row", -1) for r in rows]),
    )


def labelled_batch(adapter: Adapter, rows: Sequence[dict[str, Any]]) -> LabelledBatch:
    """Collate unpaired rows (thumbs up/down and/or a scalar reward).

    TRL's unpaired field names are accepted too: ``completion`` for ``response`` and ``label`` for ``desirable``.
    """
    rows = [_canonical_unpaired(r) for r in rows]
    records = [{"prompt": _require(r, "prompt", "sample"), "response": _require(r, "response", "sample"), "row": r.get("row")} for r in rows]
    desirable = None
    if any("desirable" in r for r in rows):
        desirable = torch.tensor([bool(_require(r, "desirable", "sample")) for r in rows])
    return LabelledBatch(
        samples=adapter.collate(records),
        size=len(rows),
        desirable=desirable,
        reward=_optional_float(rows, "reward"),
        reference=_optional_float(rows, "reference"),
        index=torch.tensor([r.get("row", -1) for r in rows]),
    )


def _canonical_unpaired(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    for alias, key in (("completion", "response"), ("label", "desirable")):
        if alias in row and key not in row:
            row[key] = row.pop(alias)
    return row


def pairs_to_unpaired(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split each pair into a desirable (chosen) and an undesirable (rejected) sample, as KTO on paired data does.

    Cached reference scores follow their side (``reference_chosen`` -> ``reference`` of the desirable sample).
    """
    out = []
    for r in rows:
        for side, desirable in (("chosen", True), ("rejected", False)):
            sample = {"prompt": _require(r, "prompt", "pair"), "response": _require(r, side, "pair"),
                      "desirable": desirable, "row": r.get("row")}
            if f"reference_{side}" in r:
                sample["reference"] = r[f"reference_{side}"]
            out.append(sample)
    return out


def _optional_float(rows: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
    present = [key in r and r[key] is not None for r in rows]
    if not any(present):
        return None
    if not all(present):
        missing = [r.get("row", i) for i, (r, p) in enumerate(zip(rows, present)) if not p]
        raise ValueError(f"field {key!r} is set on some rows but missing on rows {missing[:10]}; set it on all or none")
    return torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)


class RowOrder:
    """A deterministic, resumable order over ``n`` rows: micro-batch ``k`` depends only on ``(seed, k)``.

    Each epoch is a fresh permutation seeded by ``seed + epoch``; a partial last batch is dropped so every
    micro-batch has ``batch_size`` rows (the dropped rows come first in the next epoch's reshuffle anyway).
    Because the order is a pure function of the step, resuming needs only the step counter.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} rows); lower batch_size")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.batches_per_epoch = n // batch_size
        self._epoch: tuple[int, torch.Tensor] | None = None  # the last epoch's permutation (n can be millions)

    def indices(self, micro_step: int) -> list[int]:
        epoch, k = divmod(micro_step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                     if self.shuffle else torch.arange(self.n))
            self._epoch = (epoch, order)
        return self._epoch[1][k * self.batch_size : (k + 1) * self.batch_size].tolist()
