"""A small CNN digit classifier: the reward model and FID feature network of the embedded digits task.

``forward(x)`` gives logits over 0..9 for ``[N, 1, R, R]`` images in [-1, 1]; ``features(x)`` is the penultimate
layer (the feature space FID is measured in, in place of InceptionV3 for this domain); ``prompt_reward(x, d)`` =
softmax(logits)[d], the probability that image i shows the prompted digit ``d[i]``. Images at another size are
resized (bilinear, antialiased) to the classifier's resolution first. The trained weights ship in
``assets/digit-classifier/`` (``scripts/train_digit_classifier.py`` writes them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from genalign.data.digits import parse_digit

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "assets" / "digit-classifier"
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


class DigitClassifier(nn.Module):
    """conv(3x3) -> ReLU -> maxpool, twice, then an MLP; ``num_features`` is the width of ``features``."""

    def __init__(self, resolution: int = 16, channels: tuple[int, int] = (16, 32), num_features: int = 64) -> None:
        super().__init__()
        if resolution % 4:
            raise ValueError(f"resolution must be a multiple of 4 (two 2x poolings), got {resolution}")
        self.config = {"resolution": resolution, "channels": list(channels), "num_features": num_features}
        self.resolution, self.num_features = resolution, num_features
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.hidden = nn.Linear(c2 * (resolution // 4) ** 2, num_features)
        self.head = nn.Linear(num_features, 10)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected grey images [N, 1, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        images = images.to(self.head.weight.dtype)
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, num_features]``."""
        return F.relu(self.hidden(self.conv(self._prepare(images)).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]``."""
        return self.head(self.features(images))

    def prompt_reward(self, images: torch.Tensor, digits: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``p(digit_i | image_i)`` under the classifier, shape ``[N]``."""
        digits = torch.as_tensor(digits, device=images.device).long()
        if digits.shape != images.shape[:1]:
            raise ValueError(f"need one digit per image: {len(images)} images, digits of shape {tuple(digits.shape)}")
        return self(images).softmax(-1).gather(1, digits[:, None]).squeeze(1)

    def save(self, directory: str | Path, training: dict | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` (architecture, plus ``training`` facts if given)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))
        config = {**self.config, "training": training} if training else self.config
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


class DigitPromptReward:
    """A :class:`genalign.eval.image.RewardScorer`: reads the digit from each prompt and returns ``prompt_reward``."""

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.classifier.prompt_reward(images, [parse_digit(p) for p in prompts])


def load_digit_classifier(path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load a saved :class:`DigitClassifier` (``config.json`` + ``model.safetensors``) in eval mode."""
    path = Path(path)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"digit classifier folder {path} lacks {missing}; run scripts/train_digit_classifier.py to create it"
        )
    config = json.loads((path / CONFIG_NAME).read_text())
    model = DigitClassifier(config["resolution"], tuple(config["channels"]), config["num_features"])
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return model.to(device).eval().requires_grad_(False)
