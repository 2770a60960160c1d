"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP-H fine-tuned on Pick-a-Pic preferences.

score(x, c) = exp(logit_scale) · cos(E_image(x), E_text(c)), from a local ``transformers`` CLIPModel + CLIPProcessor
folder in the layout of ``yuvalkirstain/PickScore_v1`` (its official example takes the processor from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: pass that folder as ``processor_path`` when the model folder lacks one).
On Pick-a-Pic v2 test prompts SD 1.5 scores about 20.7 (Diffusion-DRO, Wu et al. 2025: 20.68 → 21.76).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from genalign.rewards.clip_model import LocalCLIP, check_pairs


class PickScorer:
    """``scorer(images [N, C, H, W] in [-1, 1], prompts) -> [N]`` PickScores (a :class:`RewardScorer`)."""

    def __init__(self, path: str | Path, *, processor_path: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        self.clip = LocalCLIP(path, "PickScore", processor_path=processor_path, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_pairs(images, prompts)
        cosine = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return (self.clip.model.logit_scale.exp() * cosine).float().cpu()
