"""Image preference pairs from a folder: ``pairs.jsonl`` lines ``{"prompt", "chosen", "rejected"}`` with image
paths relative to the folder; plus the image preparation every image-pair reader shares.

A pair record is ``{"prompt", "chosen": sample, "rejected": sample, "source"}``; each sample is a self-contained
record for the image adapter: ``{"prompt", "image": [3, H, W] float in [-1, 1], "original_size": (h, w),
"crop_top_left": (top, left)}``. The last two are SDXL's micro-conditioning ids (Podell et al. 2023): the size
of the decoded file and the top-left corner of the crop taken after resizing ((0, 0) when nothing is cropped).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset


def open_image(source: bytes | Path, where: str) -> Image.Image:
    """Decode an image file or encoded bytes to RGB; ``where`` names the file/row/field in the error."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:  # PIL raises UnidentifiedImageError (an OSError) for bad data
        # PIL names the buffer by its address: dropped, so one bad row gives one message in every process
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(error))
        raise ValueError(f"{where}: cannot decode the image ({reason})") from error


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


class ImagePairFolder(Dataset):
    """Pairs listed in ``folder/index`` (JSON lines). Every line and image path is checked when the set is opened;
    errors name the line number and field, or the missing file. Fields other than the three are ignored."""

    FIELDS = ("prompt", "chosen", "rejected")

    def __init__(self, folder: str | Path, index: str = "pairs.jsonl", *, resolution: int | None = None) -> None:
        self.folder, self.resolution = Path(folder), resolution
        self.index = self.folder / index
        if not self.index.is_file():
            raise FileNotFoundError(f"pair index {self.index} not found; write one JSON object per line with {self.FIELDS}")
        self.pairs: list[tuple[str, Path, Path, int]] = []
        for number, line in enumerate(self.index.read_text().splitlines(), start=1):
            if line.strip():
                self.pairs.append(self._parse(line, number))
        if not self.pairs:
            raise ValueError(f"{self.index} lists no pairs")

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

    def __getitem__(self, i: int) -> dict[str, Any]:
        prompt, chosen, rejected, number = self.pairs[i]
        where = f"{self.index} line {number}"
        record: dict[str, Any] = {"prompt": prompt, "source": where}
        for role, path in (("chosen", chosen), ("rejected", rejected)):
            record[role] = prepare_image(open_image(path, f"{where} field {role!r} ({path})"), prompt, self.resolution)
        return record
