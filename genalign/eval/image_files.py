"""Files of the image evaluation: prompt files, folders of samples named by prompt index, FID reference folders.

A sample folder holds ``PPPPP_SS.png`` (prompt index P, sample S) or ``PPPPP.png`` (one sample per prompt), PNG or
JPEG; every prompt needs the same number of samples. Images are returned as ``[P, N, 3, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from genalign.data.image_pairs import open_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLE_NAME = re.compile(r"^(\d+)(?:_(\d+))?$")
PROMPT_FIELDS = ("prompt", "caption", "text")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file (one per non-empty line) or a JSONL file (``.jsonl``: one object per line with a
    ``prompt``, ``caption`` or ``text`` string field). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; give a text file (one prompt per line) or JSONL")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from error
        field = next((f for f in PROMPT_FIELDS if isinstance(record, dict) and isinstance(record.get(f), str)), None)
        if field is None or not record[field].strip():
            raise ValueError(f"{path} line {number}: needs a non-empty string field, one of {PROMPT_FIELDS}")
        prompts.append(record[field].strip())
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts; give one prompt per line (JSONL: a 'prompt' field)")
    return prompts


def image_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB PIL image → ``[3, H, W]`` in [-1, 1] (u8 / 127.5 − 1, so 8-bit quantised images round-trip exactly)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def image_files(folder: str | Path, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    others = sum(1 for p in folder.iterdir() if p.suffix.lower() not in IMAGE_SUFFIXES)
    if others:
        log.info("%s folder %s: %d files that are not PNG/JPEG skipped", what, folder, others)
    if not files:
        raise ValueError(f"{what} folder {folder} holds no PNG or JPEG images")
    return files


def load_sample_folder(folder: str | Path, num_prompts: int, what: str = "sample") -> torch.Tensor:
    """``[P, N, 3, H, W]`` samples of ``folder`` for ``num_prompts`` prompts (see the module docstring); errors
    call the folder ``what`` (the command-line flag that gave it)."""
    by_prompt: dict[int, dict[int, Path]] = {}
    for path in image_files(folder, what):
        match = SAMPLE_NAME.match(path.stem)
        if match is None:
            raise ValueError(f"{path}: sample images must be named PROMPT.png or PROMPT_SAMPLE.png (prompt index, "
                             "sample index: 00012_03.png); rename or remove it")  # fmt: skip
        prompt, sample = int(match[1]), int(match[2] or 0)
        if prompt >= num_prompts:
            raise ValueError(f"{path}: prompt index {prompt}, but the prompt file has {num_prompts} prompts")
        if sample in by_prompt.setdefault(prompt, {}):
            raise ValueError(f"{path} and {by_prompt[prompt][sample]} are both sample {sample} of prompt {prompt}")
        by_prompt[prompt][sample] = path
    missing = [i for i in range(num_prompts) if i not in by_prompt]
    counts = {len(samples) for samples in by_prompt.values()}
    if missing:
        raise ValueError(f"{what} folder {folder} has no image for prompt index {missing[:10]} of the prompt file's "
                         f"{num_prompts} prompts; name each prompt's images PPPPP.png or PPPPP_SS.png after its line "
                         "index in the prompt file (from 0), or give the prompt file the folder was sampled from")  # fmt: skip
    if len(counts) != 1:
        raise ValueError(f"{what} folder {folder}: every prompt needs the same number of images, found "
                         f"{sorted(counts)} images per prompt; sample each prompt equally often")  # fmt: skip
    rows = [[image_tensor(open_image(by_prompt[i][s], str(by_prompt[i][s]))) for s in sorted(by_prompt[i])]
            for i in range(num_prompts)]  # fmt: skip
    sizes = {tuple(image.shape) for row in rows for image in row}
    if len(sizes) != 1:
        raise ValueError(f"{what} folder {folder}: images of different sizes {sorted(sizes)}; save them at one size")
    return torch.stack([torch.stack(row) for row in rows])


def save_sample_folder(images: torch.Tensor, folder: str | Path) -> None:
    """Write ``[P, N, C, H, W]`` images in [-1, 1] as ``PPPPP_SS.png`` (the layout :func:`load_sample_folder` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.expand(-1, -1, 3, -1, -1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for p, row in enumerate(pixels):
        for s, image in enumerate(row):
            PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{p:05d}_{s:02d}.png")


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 8-bit values a PNG stores (so scores of tensors = scores of saved files)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def reference_images(folder: str | Path) -> list[torch.Tensor]:
    """Every PNG/JPEG of an FID reference folder as ``[3, H, W]`` in [-1, 1] (any sizes)."""
    return [image_tensor(open_image(path, str(path))) for path in image_files(folder, "--real-images")]
