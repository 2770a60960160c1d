"""Pick-a-Pic v2 (Kirstain et al. 2023) preference pairs from local parquet shards.

Each row holds a caption, two JPEG-encoded images ``jpg_0``/``jpg_1`` and labels ``label_0``/``label_1``:
(1, 0) or (0, 1) for a preference, (0.5, 0.5) for a tie. As in Diffusion-DPO (Wallace et al. 2023), ties are
dropped (and counted in ``num_ties``); for the rest the two images are swapped jointly so ``chosen`` is the
preferred one. Captions and labels are read and checked when the set is opened; images are read per parquet
row group when an item is asked for (a few row groups stay cached), so shards larger than memory work.
Items are pair records as described in :mod:`genalign.data.image_pairs`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from genalign.data.image_pairs import open_image, prepare_image

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
_VALID_LABELS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}


def parquet_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (every ``*.parquet`` inside, sorted) into a list of parquet files."""
    files: list[Path] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"folder {path} holds no *.parquet files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"Pick-a-Pic parquet path {path} does not exist")
    return files


class PickAPicDataset(Dataset):
    """Non-tied Pick-a-Pic pairs, ``chosen`` = the preferred image. ``num_rows`` and ``num_ties`` count the input."""

    def __init__(
        self, paths: str | Path | Sequence[str | Path], *, resolution: int | None = None, cache_row_groups: int = 4
    ) -> None:
        self.files = parquet_files(paths)
        self.resolution, self.cache_row_groups = resolution, cache_row_groups
        self.num_rows = self.num_ties = 0
        # per kept pair: (file index, row group, row in group, row in file, preferred image 0 or 1)
        self.pairs: list[tuple[int, int, int, int, int]] = []
        self.prompts: list[str] = []
        for index, path in enumerate(self.files):
            self._scan(index, path)
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def _scan(self, index: int, path: Path) -> None:
        shard = pq.ParquetFile(path)
        missing = [c for c in COLUMNS if c not in shard.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; Pick-a-Pic v2 shards have {list(COLUMNS)}")
        row = 0
        for group in range(shard.num_row_groups):
            meta = shard.read_row_group(group, columns=["caption", "label_0", "label_1"]).to_pydict()
            for offset, (caption, *labels) in enumerate(zip(meta["caption"], meta["label_0"], meta["label_1"])):
                self._check(path, row, caption, labels)
                if labels == [0.5, 0.5]:
                    self.num_ties += 1
                else:
                    self.pairs.append((index, group, offset, row, 0 if labels[0] == 1.0 else 1))
                    self.prompts.append(caption)
                row += 1
        self.num_rows += row

    @staticmethod
    def _check(path: Path, row: int, caption: Any, labels: list[Any]) -> None:
        if not isinstance(caption, str):
            raise ValueError(f"{path} row {row}: field 'caption' must be a string, got {caption!r}")
        if any(v is None for v in labels) or (float(labels[0]), float(labels[1])) not in _VALID_LABELS:
            raise ValueError(
                f"{path} row {row}: fields 'label_0', 'label_1' are {labels}; expected (1, 0), (0, 1) or a tie (0.5, 0.5)"
            )

    def _images(self, index: int, group: int) -> pa.Table:
        key = (index, group)
        if key not in self._cache:
            self._cache[key] = pq.ParquetFile(self.files[index]).read_row_group(group, columns=["jpg_0", "jpg_1"])
            if len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, group, offset, row, preferred = self.pairs[i]
        images, prompt = self._images(index, group), self.prompts[i]
        where = f"{self.files[index]} row {row}"
        record: dict[str, Any] = {"prompt": prompt, "source": where}
        for role, column in (("chosen", f"jpg_{preferred}"), ("rejected", f"jpg_{1 - preferred}")):
            data = images.column(column)[offset].as_py()
            if not isinstance(data, bytes):
                raise ValueError(f"{where}: field {column!r} must hold encoded image bytes, got {type(data).__name__}")
            record[role] = prepare_image(open_image(data, f"{where} field {column!r}"), prompt, self.resolution)
        return record

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with an empty image cache
        return {**self.__dict__, "_cache": OrderedDict()}
