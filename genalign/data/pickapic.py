"""Pick-a-Pic v2 (Kirstain et al. 2023) preference pairs from local parquet shards.

Each row holds a caption, two JPEG-encoded images ``jpg_0``/``jpg_1`` and labels ``label_0``/``label_1``:
(1, 0) or (0, 1) for a preference, (0.5, 0.5) for a tie. As in Diffusion-DPO (Wallace et al. 2023), ties are
dropped (and counted in ``num_ties``); for the rest the two images are swapped jointly so ``chosen`` is the
preferred one. Items are pair records as described in :mod:`genalign.data.image_pairs`.

**What is read when.** Opening the set reads only the caption and label columns, one row group at a time, and keeps
five integers per pair (a million pairs: 40 MB); captions and images are read per parquet row group when an item is
asked for (a few row groups stay cached), so shards larger than memory work. Images are decoded only in
``__getitem__``: checking every JPEG at open would decode the whole set.

**Bad rows.** A missing column, an empty or non-string caption or labels that are not a preference or a tie are found
at open; an image that is not bytes or does not decode is found when its row is read. Either is a ``ValueError``
naming the file, row group, row (counted from the start of the file) and column. ``skip_bad_rows=True``
(:class:`genalign.data.image_pairs.SkipsBadRows`) leaves the rows bad at open out (a file missing a column: all its
rows), counted and logged, and replaces a row whose image does not decode by the next readable pair, the same in
every process and worker, so the rows a training step sees stay a pure function of the step.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from genalign.data.image_pairs import BadRow, SkipsBadRows, open_image, prepare_image

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
#: Pick-a-Pic v2's splits; its shards are named ``<split>-NNNNN-of-NNNNN-<hash>.parquet``
#: (e.g. ``data/train-00000-of-00645-….parquet`` on the Hugging Face hub)
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
_VALID_LABELS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}


def parquet_files(paths: str | Path | Sequence[str | Path], split: str | None = None) -> list[Path]:
    """Expand files and folders into parquet files. A folder gives its ``*.parquet`` files, sorted, or those of its
    ``data/`` subfolder (the Hugging Face dataset layout) when it has none. ``split`` keeps the shards of one
    Pick-a-Pic v2 split (file names starting ``<split>-``; ``validation`` does not take ``validation_unique``)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r} is not a Pick-a-Pic v2 split; choose one of {list(SPLITS)}")
    prefix = f"{split}-" if split is not None else ""
    files: list[Path] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*.parquet")) or sorted((path / "data").glob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"folder {path} holds no *.parquet files (nor does {path / 'data'})")
            kept = [f for f in found if f.name.startswith(prefix)]
            if not kept:
                raise FileNotFoundError(f"folder {path} holds no {split!r} shards ({prefix}*.parquet); its files "
                                        f"start {sorted({f.name.split('-')[0] for f in found})}")
            files.extend(kept)
        elif path.is_file():
            if not path.name.startswith(prefix):
                raise ValueError(f"{path} is not a {split!r} shard (its name does not start {prefix!r}); pass the "
                                 "shards of that split or leave split unset")
            files.append(path)
        else:
            raise FileNotFoundError(f"Pick-a-Pic parquet path {path} does not exist")
    return files


class PickAPicDataset(SkipsBadRows, Dataset):
    """Non-tied Pick-a-Pic pairs, ``chosen`` = the preferred image. ``num_rows``, ``num_ties`` and ``num_skipped``
    count the input (see the module docstring for ``skip_bad_rows`` and ``split``)."""

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        resolution: int | None = None,
        split: str | None = None,
        skip_bad_rows: bool = False,
        cache_row_groups: int = 4,
    ) -> None:
        self.files = parquet_files(paths, split)
        self.resolution, self.cache_row_groups = resolution, cache_row_groups
        self._init_skipping(skip_bad_rows)
        self.num_rows = self.num_ties = 0
        # per kept pair: (file index, row group, row in group, row in file, preferred image 0 or 1)
        pairs = [self._scan(index, path) for index, path in enumerate(self.files)]
        self.pairs = np.concatenate(pairs) if pairs else np.zeros((0, 5), dtype=np.int64)
        self._log_skipped("Pick-a-Pic", self.num_rows)
        if len(self.pairs) == 0:
            raise ValueError(f"no usable pairs in {[str(f) for f in self.files]} ({self.num_rows} rows, "
                             f"{self.num_ties} ties, {self.num_skipped} bad)")
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    # ------------------------------------------------------------------ open: captions and labels
    def _scan(self, index: int, path: Path) -> np.ndarray:
        shard = pq.ParquetFile(path)
        kept: list[tuple[int, int, int, int, int]] = []
        missing = [c for c in COLUMNS if c not in shard.schema_arrow.names]
        if missing:
            self.num_rows += shard.metadata.num_rows
            problem = f"{path}: missing column(s) {missing}; Pick-a-Pic v2 shards have {list(COLUMNS)}"
            self._bad_at_open(_bad(problem), shard.metadata.num_rows)
            return np.zeros((0, 5), dtype=np.int64)
        row = 0
        for group in range(shard.num_row_groups):
            meta = shard.read_row_group(group, columns=["caption", "label_0", "label_1"]).to_pydict()
            for offset, (caption, *labels) in enumerate(zip(meta["caption"], meta["label_0"], meta["label_1"])):
                problem = _caption_problem(caption) or _label_problem(labels)
                if problem:
                    self._bad_at_open(_bad(f"{path} row group {group} row {row}, {problem}"))
                elif labels == [0.5, 0.5]:
                    self.num_ties += 1
                else:
                    kept.append((index, group, offset, row, 0 if labels[0] == 1.0 else 1))
                row += 1
        self.num_rows += row
        return np.array(kept, dtype=np.int64).reshape(-1, 5)

    # ------------------------------------------------------------------ items: images
    def _row_group(self, index: int, group: int) -> pa.Table:
        key = (index, group)
        if key not in self._cache:
            shard = pq.ParquetFile(self.files[index])
            self._cache[key] = shard.read_row_group(group, columns=["caption", "jpg_0", "jpg_1"])
            if len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"PickAPicDataset({[str(f) for f in self.files]})"

    def _read(self, i: int) -> dict[str, Any]:
        index, group, offset, row, preferred = (int(v) for v in self.pairs[i])
        table = self._row_group(index, group)
        prompt = table.column("caption")[offset].as_py()
        where = f"{self.files[index]} row group {group} row {row}"
        record: dict[str, Any] = {"prompt": prompt, "source": where}
        for role, column in (("chosen", f"jpg_{preferred}"), ("rejected", f"jpg_{1 - preferred}")):
            data, field = table.column(column)[offset].as_py(), f"{where}, column {column!r}"
            if not isinstance(data, bytes):
                raise BadRow(f"{field}: must hold encoded image bytes, got {type(data).__name__}")
            record[role] = prepare_image(open_image(data, field), prompt, self.resolution)
        return record

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with an empty row-group cache
        return {**self.__dict__, "_cache": OrderedDict()}


def _bad(message: str) -> BadRow:
    return BadRow(f"{message} (data.skip_bad_rows=true skips and counts such rows)")


def _caption_problem(caption: Any) -> str | None:
    if not isinstance(caption, str) or not caption.strip():
        return f"column 'caption': must be a non-empty string, got {caption!r}"
    return None


def _label_problem(labels: list[Any]) -> str | None:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels)
    if not numbers or (float(labels[0]), float(labels[1])) not in _VALID_LABELS:
        return f"columns 'label_0', 'label_1': are {labels}; expected (1, 0), (0, 1) or a tie (0.5, 0.5)"
    return None
