"""Tiny random Stable Diffusion 1.5 / SDXL pipelines in the exact diffusers folder layout (tokenizers made here, no
downloads), shared by the image adapter, experiment and evaluation tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

T = 100  # num_train_timesteps of the tiny schedulers


def tiny_unet(in_channels: int, cross_dim: int, sdxl_pooled_dim: int | None = None, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    extra = {}
    if sdxl_pooled_dim is not None:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=6 * 4 + sdxl_pooled_dim)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4, cross_attention_dim=cross_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **extra,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16)


def tiny_tokenizer(tmp_path) -> CLIPTokenizer:
    vocab = {}
    for c in string.ascii_lowercase + string.digits + " .,!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=12)


def tiny_clip(tokenizer: CLIPTokenizer, projection: bool = False, seed: int = 2):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=12, projection_dim=16,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def write_sd15(root: Path) -> Path:
    """A tiny SD 1.5-layout pipeline folder ``root/model`` (latent space, CLIP text encoder)."""
    tokenizer = tiny_tokenizer(root)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_clip(tokenizer), tokenizer=tokenizer,
                                   unet=tiny_unet(4, 16), scheduler=DDPMScheduler(num_train_timesteps=T, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "model")
    return root / "model"


def write_sdxl(root: Path) -> Path:
    """A tiny SDXL-layout pipeline folder ``root/model`` (two CLIP encoders, text_time added conditions)."""
    tokenizer = tiny_tokenizer(root)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(tokenizer), text_encoder_2=tiny_clip(tokenizer, projection=True, seed=3),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=tiny_unet(4, 32, sdxl_pooled_dim=16),
        scheduler=DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction"),
    )
    pipe.save_pretrained(root / "model")
    return root / "model"
