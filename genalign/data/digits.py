"""The embedded handwritten-digits demo set: scikit-learn's bundled 8x8 digits as a tiny text-to-image task.

scikit-learn ships 1,797 grey 8x8 digits (UCI optical recognition set, pixel counts 0..16) inside its wheel, so
this set needs no download. Images are upsampled to ``resolution`` (bilinear, antialiased), scaled to [-1, 1] and
kept single-channel; each image gets a caption naming its digit through one of a few paraphrase templates. The
train / held-out split is stratified by digit and fixed by a seed, so the digit classifier (the reward model and
FID feature network) and the diffusion runs see the same held-out images.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: caption paraphrases; ``{word}`` is the digit's name, ``{numeral}`` its numeral
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "a drawing of the number {numeral}",
    "the numeral {numeral}, written by hand",
    "a hand-drawn {word}",
    "a scanned image of the digit {word}",
)

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
_PIXEL_MAX = 16.0  # sklearn's digits count pixels on 0..16


def caption(digit: int, template: int = 0) -> str:
    """The caption for ``digit`` under ``CAPTION_TEMPLATES[template]``."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if not 0 <= template < len(CAPTION_TEMPLATES):
        raise ValueError(f"template must be in 0..{len(CAPTION_TEMPLATES) - 1}, got {template}")
    return CAPTION_TEMPLATES[template].format(word=DIGIT_WORDS[int(digit)], numeral=int(digit))


_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for: the single digit word or numeral it contains (case-insensitive).

    Raises when the prompt names no digit or several different ones, quoting the prompt.
    """
    found = {m if m.isdigit() else str(DIGIT_WORDS.index(m)) for m in _DIGIT_PATTERN.findall(prompt.lower())}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(f"prompt {prompt!r} names {what}; a digit prompt must name exactly one of 0..9")
    return int(found.pop())


@lru_cache(maxsize=4)
def _load(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / _PIXEL_MAX  # [N, 1, 8, 8] in [0, 1]
    if resolution != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    images = (pixels.clamp(0, 1) * 2 - 1).contiguous()
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def load_digit_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``images [N, 1, resolution, resolution]`` in [-1, 1] and ``labels [N]`` (int64)."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least the native 8 pixels, got {resolution}")
    images, labels = _load(int(resolution))
    return images.clone(), labels.clone()


def split_indices(
    labels: torch.Tensor, held_out_fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint ``(train, held_out)`` index tensors, stratified by digit and fixed by ``seed`` (sorted)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    index = np.arange(len(labels))
    train, held_out = train_test_split(
        index, test_size=held_out_fraction, random_state=seed, stratify=np.asarray(labels)
    )
    return torch.as_tensor(np.sort(train)), torch.as_tensor(np.sort(held_out))


class DigitsDataset(Dataset):
    """One split of the digits set; item ``i`` is ``{"image": [1, R, R], "digit": int, "prompt": str}``.

    Every image gets a fixed caption template drawn from ``seed`` (so epochs see the same prompts); pass
    ``template`` to caption every image with one template instead.
    """

    def __init__(
        self,
        split: str = "train",
        resolution: int = 16,
        *,
        held_out_fraction: float = HELD_OUT_FRACTION,
        seed: int = SPLIT_SEED,
        template: int | None = None,
    ) -> None:
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        images, labels = load_digit_images(resolution)
        train, held_out = split_indices(labels, held_out_fraction, seed)
        index = train if split == "train" else held_out
        self.images, self.digits = images[index], labels[index]
        if template is None:
            generator = torch.Generator().manual_seed(seed)
            self.templates = torch.randint(len(CAPTION_TEMPLATES), (len(index),), generator=generator)
        else:
            caption(0, template)  # validates the template index
            self.templates = torch.full((len(index),), template)
        self.prompts = [caption(int(d), int(t)) for d, t in zip(self.digits, self.templates)]

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "digit": int(self.digits[i]), "prompt": self.prompts[i]}
