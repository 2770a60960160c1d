"""Image preference pairs from a folder: ``pairs.jsonl`` lines ``{"prompt", "chosen", "rejected"}`` with image
paths relative to the folder; plus the image preparation every image-pair reader shares.

A pair record is ``{"prompt", "chosen": sample, "rejected": sample, "source"}``; each sample is a self-contained
record for the image adapter: ``{"prompt", "image": [3, H, W] float in [-1, 1], "original_size": (h, w),
"crop_top_left": (top, left)}``. The last two are SDXL's micro-conditioning ids (Podell et al. 2023): the size
of the decoded file and the top-left corner of the crop taken after resizing ((0, 0) when nothing is cropped).

Both readers (this folder reader and :class:`genalign.data.pickapic.PickAPicDataset`) take ``skip_bad_rows``
(:class:`SkipsBadRows`): by default a bad row is an error naming where it is; with ``skip_bad_rows=True`` rows found
bad at open are left out, counted and logged, and a row whose image does not decode is replaced by a fixed substitute.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from genalign.data.loader import SKIPPED_ROWS

log = logging.getLogger(__name__)
_LOGGED_SOURCES = 5


class BadRow(ValueError):
    """A row that cannot be used; the message names where it is (file, row or line, column or field)."""


class SkipsBadRows:
    """``skip_bad_rows`` for a map-style reader whose ``_read(i)`` raises :class:`BadRow` for a row it cannot read.

    * At open the reader calls :meth:`_bad_at_open` for each bad row: raised, or with skipping counted in
      ``num_skipped`` (the first few messages kept in ``skipped_sources``) and left out; :meth:`_log_skipped` then
      logs the count, before any index is handed out.
    * ``__getitem__``: with skipping, a row that fails to read is replaced by the next readable row (``i + 1``,
      ``i + 2``, … modulo the length), a choice that depends on the files only, so the rows a training step sees stay
      a pure function of the step (exact resume, any number of DataLoader workers or processes). The substitute
      lists the rows it stands for under ``skipped_rows`` (:data:`genalign.data.loader.SKIPPED_ROWS`), so the trainer
      counts and logs them even when a DataLoader worker met them (``data/bad_rows_skipped`` in ``log.jsonl``);
      ``num_skipped`` counts them too, in the process that met them.
    """

    def _init_skipping(self, skip_bad_rows: bool) -> None:
        self.skip_bad_rows, self.num_skipped = skip_bad_rows, 0
        self.skipped_sources: list[str] = []  # the first few bad rows (all of them are counted)
        self._bad: dict[int, str] = {}  # rows whose images failed to read in this process

    def _bad_at_open(self, error: Exception, rows: int = 1) -> None:
        if not self.skip_bad_rows:
            raise error
        self.num_skipped += rows
        if len(self.skipped_sources) < _LOGGED_SOURCES:
            self.skipped_sources.append(str(error))

    def _log_skipped(self, what: str, total: int) -> None:
        if self.num_skipped:
            log.warning("%s: skipped %d bad row(s) of %d at open (skip_bad_rows=True), first: %s", what,
                        self.num_skipped, total, "; ".join(self.skipped_sources))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not self.skip_bad_rows:
            return self._read(i)
        skipped: list[str] = []
        for k in range(len(self)):
            j = (i + k) % len(self)
            if j not in self._bad:
                try:
                    record = self._read(j)
                except BadRow as error:
                    self._bad[j] = str(error)
                    self.num_skipped += 1
                else:
                    if skipped:
                        record[SKIPPED_ROWS] = skipped
                    return record
            skipped.append(self._bad[j])
        raise ValueError(f"none of the {len(self)} pairs of {self} has images that can be read")


def open_image(source: bytes | Path, where: str) -> Image.Image:
    """Decode an image file or encoded bytes to RGB; ``where`` names the file/row/field in the error
    (a :class:`BadRow`)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:  # PIL raises UnidentifiedImageError (an OSError) for bad data
        # PIL names the buffer by its address: dropped, so one bad row gives one message in every process
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(error))
        raise BadRow(f"{where}: cannot decode the image ({reason})") from error


def prepare_image(image: Image.Image, prompt: str, resolution: int | None = None) -> dict[str, Any]:
    """A sample record: the image as a [-1, 1] tensor, resized so its short side is ``resolution`` (bilinear,
    antialiased) and centre-cropped to a square, with SDXL's ``original_size`` and ``crop_top_left`` ids."""
    original_size = (image.height, image.width)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
    top = left = 0
    if resolution is not None:
        h, w = original_size
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        pixels = pixels[:, top : top + resolution, left : left + resolution].clamp(-1, 1)
    return {"prompt": prompt, "image": pixels.contiguous(), "original_size": original_size, "crop_top_left": (top, left)}


class ImagePairFolder(SkipsBadRows, Dataset):
    """Pairs listed in ``folder/index`` (JSON lines). Every line and image path is checked when the set is opened
    (images are decoded when read); errors name the line number and field, or the missing file. Fields other than
    the three are ignored. ``skip_bad_rows``: see :class:`SkipsBadRows`."""

    FIELDS = ("prompt", "chosen", "rejected")

    def __init__(self, folder: str | Path, index: str = "pairs.jsonl", *, resolution: int | None = None,
                 skip_bad_rows: bool = False) -> None:
        self.folder, self.resolution = Path(folder), resolution
        self.index = self.folder / index
        self._init_skipping(skip_bad_rows)
        if not self.index.is_file():
            raise FileNotFoundError(f"pair index {self.index} not found; write one JSON object per line with {self.FIELDS}")
        self.pairs: list[tuple[str, Path, Path, int]] = []
        lines = 0
        for number, line in enumerate(self.index.read_text().splitlines(), start=1):
            if line.strip():
                lines += 1
                try:
                    self.pairs.append(self._parse(line, number))
                except (ValueError, FileNotFoundError) as error:
                    self._bad_at_open(error)
        self._log_skipped(str(self.index), lines)
        if not self.pairs:
            raise ValueError(f"{self.index} lists no usable pairs ({lines} lines, {self.num_skipped} bad)")

    def _parse(self, line: str, number: int) -> tuple[str, Path, Path, int]:
        where = f"{self.index} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with fields {self.FIELDS}")
        for name in self.FIELDS:
            if not isinstance(record.get(name), str) or not record[name]:
                raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {record.get(name)!r}")
        paths = []
        for name in ("chosen", "rejected"):
            path = self.folder / record[name]
            if not path.is_file():
                raise FileNotFoundError(f"{where}: field {name!r} points to {path}, which does not exist")
            paths.append(path)
        return record["prompt"], paths[0], paths[1], number

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"ImagePairFolder({str(self.index)!r})"

    def _read(self, i: int) -> dict[str, Any]:
        prompt, chosen, rejected, number = self.pairs[i]
        where = f"{self.index} line {number}"
        record: dict[str, Any] = {"prompt": prompt, "source": where}
        for role, path in (("chosen", chosen), ("rejected", rejected)):
            record[role] = prepare_image(open_image(path, f"{where} field {role!r} ({path})"), prompt, self.resolution)
        return record
