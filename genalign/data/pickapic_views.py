"""Pick-a-Pic v2 (Kirstain et al. 2023) as the rows each image experiment trains on, read lazily from local shards.

The Hugging Face snapshot of ``yuvalkirstain/pickapic_v2`` keeps its shards as
``data/<split>-NNNNN-of-MMMMM-<hash>.parquet`` (``train``: 645 shards, ``validation``, ``test``,
``validation_unique``, ``test_unique``). :func:`split_files` turns a file, a folder (the snapshot root or its
``data/``) or a list of them into the shards of one split; :func:`pickapic_pairs` opens them as a
:class:`~genalign.data.pickapic.PickAPicDataset` (ties dropped and counted, ``chosen`` = the preferred image).

Two map-style views over those pairs, both lazy (an item decodes its pair's images when it is asked for):

* :class:`PickAPicExperts` — Diffusion-DRO's demonstrations ``{"prompt", "response"}``: the preferred image of
  every non-tied pair. The paper takes the top-K images by a reward model instead (top 500 by HPSv2 or
  PickScore, ``basiclab/DiffusionDRO`` ``tools/pickapic.py``); without a reward model locally, the human choice
  is the expert signal. An image preferred in several pairs appears once per pair.
* :class:`PickAPicUnpaired` — Diffusion-KTO's per-image feedback ``{"prompt", "response", "desirable"}``: the
  preferred image of a pair is desirable, the other undesirable (items ``2k`` and ``2k + 1`` come from pair ``k``),
  so the set is balanced. (The official Diffusion-KTO launcher oversamples desirable images to 80 %.)
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from genalign.data.pickapic import PickAPicDataset

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
#: ``<split>-00000-of-00645-<hash>.parquet``, the Hugging Face shard naming
SHARD_NAME = re.compile(r"^(?P<split>[a-z_]+)-\d{5}-of-\d{5}(-[0-9a-f]+)?\.parquet$")


def split_files(paths: str | Path | Sequence[str | Path], split: str = "train") -> list[Path]:
    """The parquet files of ``split``. Files are taken as given. A folder (or its ``data/`` subfolder, the
    snapshot layout) whose files follow the shard naming contributes its ``split`` shards only, sorted; a folder of
    other ``*.parquet`` names contributes all of them (logged)."""
    if split not in SPLITS:
        raise ValueError(f"data.split={split!r} is not a Pick-a-Pic v2 split; use one of {list(SPLITS)}")
    files: list[Path] = []
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths):
        path = Path(path)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_folder_shards(path, split))
        else:
            raise FileNotFoundError(f"Pick-a-Pic path {path} does not exist; data.path=... takes a parquet file, a "
                                    "folder of shards (the pickapic_v2 snapshot or its data/) or a list of them")
    return files


def _folder_shards(folder: Path, split: str) -> list[Path]:
    inner = folder / "data"
    found = sorted(folder.glob("*.parquet")) or (sorted(inner.glob("*.parquet")) if inner.is_dir() else [])
    if not found:
        raise FileNotFoundError(f"folder {folder} holds no *.parquet files (nor does {inner}); point data.path at the "
                                "Pick-a-Pic v2 shards")
    named = {p: SHARD_NAME.match(p.name) for p in found}
    if not any(named.values()):
        log.info("%s: %d parquet files without <split>-NNNNN-of-NNNNN names; reading all of them", folder, len(found))
        return found
    chosen = [p for p, m in named.items() if m and m["split"] == split]
    if not chosen:
        present = sorted({m["split"] for m in named.values() if m})
        raise FileNotFoundError(f"{found[0].parent} holds no {split}-*.parquet shards (splits found: {present}); set "
                                f"data.split to one of them or point data.path at the {split} shards")
    return chosen


def pickapic_pairs(
    path: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    resolution: int | None = 512,
    skip_bad_rows: bool = False,
    cache_row_groups: int = 4,
) -> PickAPicDataset:
    """The non-tied pairs of ``split`` (see the module docstring), images resized and centre-cropped to
    ``resolution``. ``skip_bad_rows`` is handed to :class:`PickAPicDataset` (which then skips and counts rows it
    cannot read); by default a bad row raises, naming its file and row."""
    options: dict[str, Any] = {"resolution": resolution, "cache_row_groups": cache_row_groups}
    if skip_bad_rows:
        if "skip_bad_rows" not in inspect.signature(PickAPicDataset).parameters:
            raise ValueError("data.skip_bad_rows=true needs a PickAPicDataset with skip_bad_rows=...; this one stops at "
                             "the first bad row (naming it): set data.skip_bad_rows=false and remove or fix that row")
        options["skip_bad_rows"] = True
    pairs = PickAPicDataset(split_files(path, split), **options)
    log.info("Pick-a-Pic %s: %d rows, %d ties dropped, %d pairs", split, pairs.num_rows, pairs.num_ties, len(pairs))
    return pairs


class _PairView(Dataset):
    """A map-style view over a :class:`PickAPicDataset`; subclasses say how many items a pair gives."""

    per_pair = 1

    def __init__(self, pairs: PickAPicDataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs) * self.per_pair

    def _pair(self, i: int) -> tuple[dict[str, Any], int]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        pair, side = divmod(i, self.per_pair)
        return self.pairs[pair], side


class PickAPicExperts(_PairView):
    """Demonstrations ``{"prompt", "response": chosen sample, "source", "row"}``, one per non-tied pair."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair, _ = self._pair(i)
        return {"prompt": pair["prompt"], "response": pair["chosen"], "source": pair["source"], "row": i}


class PickAPicUnpaired(_PairView):
    """Labelled samples ``{"prompt", "response", "desirable", "source", "row"}``: item ``2k`` is pair ``k``'s
    preferred image (desirable), item ``2k + 1`` the other one."""

    per_pair = 2

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair, side = self._pair(i)
        role = ("chosen", "rejected")[side]
        return {"prompt": pair["prompt"], "response": pair[role], "desirable": side == 0,
                "source": f"{pair['source']} ({role})", "row": i}


def pickapic_experts(path: str | Path | Sequence[str | Path], **options: Any) -> PickAPicExperts:
    """:class:`PickAPicExperts` over :func:`pickapic_pairs` ``(path, **options)``."""
    return PickAPicExperts(pickapic_pairs(path, **options))


def pickapic_unpaired(path: str | Path | Sequence[str | Path], **options: Any) -> PickAPicUnpaired:
    """:class:`PickAPicUnpaired` over :func:`pickapic_pairs` ``(path, **options)``."""
    return PickAPicUnpaired(pickapic_pairs(path, **options))
