"""A tiny pixel-space text-to-image adapter for the online-method tests: 1-channel 8×8 UNet2DConditionModel with
a deterministic byte-embedding prompt encoder (no downloads)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from genalign.adapters.image import ImageDiffusionAdapter

T = 100  # num_train_timesteps


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=4, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def byte_prompts(prompts: list[str]):
    """Byte embeddings padded to 6 tokens (fixed table)."""
    table = torch.randn(257, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.full((len(prompts), 6), 256)
    for i, p in enumerate(prompts):
        raw = list(p.encode()[:6])
        ids[i, : len(raw)] = torch.tensor(raw, dtype=torch.long)
    return table[ids], None


def pixel_adapter(prediction_type: str = "epsilon", seed: int = 0, **options) -> ImageDiffusionAdapter:
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    return ImageDiffusionAdapter(tiny_unet(seed), scheduler, byte_prompts, **{"prompt_dropout": 0.0, **options})


def expert_rows(n: int, seed: int = 0, prompts: tuple[str, ...] = ("a cat", "a dog", "a fox", "an owl")) -> list[dict]:
    """Demonstration rows: smooth random images in [-1, 1] with cycling prompts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        image = torch.tanh(torch.randn(1, 8, 8, generator=g) + torch.linspace(-1, 1, 8))
        rows.append({"prompt": prompts[i % len(prompts)], "response": image, "row": i})
    return rows
