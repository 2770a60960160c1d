"""HumanML3D and KIT-ML text-motion data in the layout of Guo et al. 2022 ("Generating Diverse and Natural 3D
Human Motions from Text"), with the length rules of its text-to-motion protocol.

Folder layout::

    root/new_joint_vecs/<id>.npy   [T, 263] features (KIT-ML: [T, 251]), see ``genalign.data.motion_repr``
    root/texts/<id>.txt            one caption a line: ``caption#word/POS word/POS ...#start#end``
    root/Mean.npy, root/Std.npy    [D] feature statistics used for normalisation
    root/train.txt, val.txt, test.txt   one id a line

A caption with ``start == end == 0`` describes the whole motion; otherwise it describes the sub-clip of frames
``[int(start*fps), int(end*fps))`` (seconds; 20 fps for HumanML3D, 12.5 for KIT-ML, where the reference code
multiplies by 20 for both) and becomes its own clip. Protocol: a motion
file is kept when ``min_length <= T < max_frames`` (40 and 200; KIT-ML 24 and 200); a sub-clip obeys the same
rule; each draw crops to a multiple of ``unit_length`` = 4 frames (one unit shorter with probability 1/3, as the
protocol does), normalises with Mean/Std and pads with zeros to ``max_length`` = 196 frames. Everything the rules
drop is counted in :attr:`HumanML3DDataset.dropped` and logged.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from genalign.data.motion_repr import SkeletonLayout, get_layout

log = logging.getLogger(__name__)

MAX_FRAMES = 200  # motions must be strictly shorter
MAX_LENGTH = 196  # padded length
UNIT_LENGTH = 4


@dataclass(frozen=True)
class Caption:
    """One annotation line: the sentence, its ``word/POS`` tokens and the span in seconds (0, 0 = whole clip)."""

    text: str
    tokens: tuple[str, ...]
    start: float
    end: float

    @property
    def whole(self) -> bool:
        return self.start == 0.0 and self.end == 0.0


@dataclass(frozen=True)
class MotionClip:
    """Frames ``[start, end)`` of motion file ``id`` with the captions that describe them."""

    id: str
    start: int
    end: int
    captions: tuple[Caption, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def read_captions(path: str | Path) -> list[Caption]:
    """Parse a ``texts/<id>.txt`` file; a malformed line raises naming the file and line."""
    captions = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split("#")
        if len(fields) != 4:
            raise ValueError(
                f"{path}:{number}: expected 'caption#word/POS ...#start#end' (4 '#'-separated fields), got {line!r}"
            )
        text, tokens, start, end = fields
        try:
            span = [float(start), float(end)]
        except ValueError:
            raise ValueError(f"{path}:{number}: start/end must be numbers of seconds, got {start!r} and {end!r}") from None
        start_s, end_s = (0.0 if math.isnan(v) else v for v in span)  # the protocol reads NaN as 0
        if start_s < 0 or end_s < 0:
            raise ValueError(f"{path}:{number}: start/end are seconds from the clip start, got {start_s} and {end_s}")
        captions.append(Caption(text, tuple(tokens.split(" ")), start_s, end_s))
    return captions


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected {what}")
    return path


def _load_stat(path: Path, dim: int, name: str) -> np.ndarray:
    value = np.load(_require(path, f"the feature {name} ({dim} values)")).astype(np.float32)
    if value.shape != (dim,):
        raise ValueError(f"{path}: expected the feature {name} of shape ({dim},), got {value.shape}")
    return value


class HumanML3DDataset(Dataset):
    """Text-motion clips of one split; items are ``dict(motion, length, caption, tokens, id, clip)``.

    ``motion`` is ``[max_length, D]`` float32, normalised, zero-padded after ``length`` frames; ``clip`` is the
    ``(start, end)`` frame range taken from the motion file. With ``random_crop`` (training and the evaluation
    protocol) each access draws a caption, the crop length rule and the crop offset from torch's RNG (DataLoader
    workers seed it per worker; ``torch.manual_seed`` makes runs repeatable); without it, the first caption and
    the first ``unit_length``-multiple of frames are taken. ``mean``/``std`` override ``Mean.npy``/``Std.npy``
    (e.g. an evaluator's own statistics). Motions are read lazily; only the headers are read at construction.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        layout: str | SkeletonLayout = "humanml3d",
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        min_length: int | None = None,
        max_frames: int = MAX_FRAMES,
        max_length: int = MAX_LENGTH,
        unit_length: int = UNIT_LENGTH,
        random_crop: bool = True,
    ):
        self.root = Path(root)
        self.split = split
        self.layout = get_layout(layout)
        self.dim = self.layout.feature_dim
        self.min_length = self.layout.min_length if min_length is None else min_length
        self.max_frames, self.max_length, self.unit_length = max_frames, max_length, unit_length
        self.random_crop = random_crop
        if (max_frames - 1) // unit_length * unit_length > max_length or self.min_length < unit_length:
            raise ValueError(
                f"inconsistent lengths: clips of up to {max_frames - 1} frames must crop to at most "
                f"max_length={max_length} frames in units of {unit_length}, and min_length={self.min_length} "
                f"must be at least one unit"
            )
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.root} is not a folder: expected the {self.layout.name} root holding new_joint_vecs/, texts/, "
                f"Mean.npy, Std.npy and {split}.txt"
            )
        self.motion_dir = _require(self.root / "new_joint_vecs", f"a folder of <id>.npy feature files [T, {self.dim}]")
        self.text_dir = _require(self.root / "texts", "a folder of <id>.txt caption files")
        self.mean = _load_stat(self.root / "Mean.npy", self.dim, "mean") if mean is None else np.asarray(mean, np.float32)
        self.std = _load_stat(self.root / "Std.npy", self.dim, "std") if std is None else np.asarray(std, np.float32)
        for name, value in (("mean", self.mean), ("std", self.std)):
            if value.shape != (self.dim,):
                raise ValueError(f"{name} must have shape ({self.dim},), got {value.shape}")
        if (self.std <= 0).any():
            raise ValueError(f"std has non-positive entries at channels {np.flatnonzero(self.std <= 0).tolist()}")
        self.dropped: Counter[str] = Counter()
        self.clips = self._index(self.read_split())
        if self.dropped:
            log.warning(
                "%s %s: kept %d clips; dropped by the length rules (%d <= T < %d frames): %s",
                self.layout.name, split, len(self.clips), self.min_length, self.max_frames, dict(self.dropped),
            )

    # ------------------------------------------------------------------------------------------------- indexing
    def read_split(self) -> list[str]:
        """The ids listed in ``<root>/<split>.txt``."""
        path = self.root / f"{self.split}.txt"
        if not path.exists():
            found = sorted(p.name for p in self.root.glob("*.txt"))
            raise FileNotFoundError(f"{path} not found: expected one motion id a line (split files here: {found}); the "
                                    f"HumanML3D release has train.txt, val.txt and test.txt in its root: copy them "
                                    f"into {self.root}")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _frames(self, motion_id: str) -> int:
        path = _require(self.motion_dir / f"{motion_id}.npy", f"the features of motion {motion_id!r}")
        shape = np.load(path, mmap_mode="r").shape
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"{path}: expected features of shape [T, {self.dim}] ({self.layout.name}), got {shape}; "
                             f"new_joint_vecs/ must hold the features of the HumanML3D repository's motion "
                             f"representation (263 values a frame for HumanML3D, 251 for KIT-ML with layout='kit'): "
                             f"re-export this motion or remove {motion_id!r} from {self.split}.txt")
        return shape[0]

    def _fits(self, frames: int, kind: str) -> bool:
        if frames < self.min_length:
            self.dropped[f"{kind}_too_short"] += 1
        elif frames >= self.max_frames:
            self.dropped[f"{kind}_too_long"] += 1
        else:
            return True
        return False

    def _index(self, ids: Sequence[str]) -> list[MotionClip]:
        clips = []
        for motion_id in ids:
            frames = self._frames(motion_id)
            captions = read_captions(_require(self.text_dir / f"{motion_id}.txt", f"the captions of motion {motion_id!r}"))
            if not captions:
                self.dropped["no_caption"] += 1
                continue
            if not self._fits(frames, "motion"):
                continue
            whole = tuple(c for c in captions if c.whole)
            if whole:
                clips.append(MotionClip(motion_id, 0, frames, whole))
            for caption in captions:
                if caption.whole:
                    continue
                start = int(caption.start * self.layout.fps)
                end = min(int(caption.end * self.layout.fps), frames)
                if self._fits(max(end - start, 0), "clip"):
                    clips.append(MotionClip(motion_id, start, end, (caption,)))
        return clips

    # -------------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.clips)

    def normalize(self, motion: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``(x - Mean) / Std``."""
        mean, std = (torch.as_tensor(v).to(motion) if torch.is_tensor(motion) else v for v in (self.mean, self.std))
        return (motion - mean) / std

    def denormalize(self, motion: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``x * Std + Mean`` (what ``features_to_joints`` expects)."""
        mean, std = (torch.as_tensor(v).to(motion) if torch.is_tensor(motion) else v for v in (self.mean, self.std))
        return motion * std + mean

    def _randint(self, high: int) -> int:
        """Uniform in ``[0, high)`` from torch's RNG."""
        return int(torch.randint(high, ()).item())

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.clips[index]
        caption = clip.captions[self._randint(len(clip.captions)) if self.random_crop else 0]
        units = clip.length // self.unit_length
        if self.random_crop and self._randint(3) == 2 and units > 1:  # the protocol's 'double' coin: a unit less
            units -= 1
        length = units * self.unit_length
        offset = clip.start + (self._randint(clip.length - length + 1) if self.random_crop else 0)
        motion = np.load(self.motion_dir / f"{clip.id}.npy", mmap_mode="r")[offset : offset + length]
        padded = np.zeros((self.max_length, self.dim), dtype=np.float32)
        padded[:length] = self.normalize(np.asarray(motion, dtype=np.float32))
        return {
            "motion": torch.from_numpy(padded),
            "length": length,
            "caption": caption.text,
            "tokens": list(caption.tokens),
            "id": clip.id,
            "clip": (offset, offset + length),
        }


def collate_motions(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: ``motion [B, T, D]``, ``length [B]`` long; captions, tokens, ids, clips as lists."""
    return {
        "motion": torch.stack([item["motion"] for item in items]),
        "length": torch.tensor([item["length"] for item in items], dtype=torch.long),
        **{key: [item[key] for item in items] for key in ("caption", "tokens", "id", "clip")},
    }
