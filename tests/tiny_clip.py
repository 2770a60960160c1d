"""A tiny random CLIP folder (text + vision towers, BPE tokenizer, image processor) in the exact ``transformers``
layout of a saved CLIPModel + CLIPProcessor (as PickScore_v1 / openai CLIP folders are), and the CLIP embeddings
computed by hand from the model's towers, for the scorer tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def write_tiny_clip(folder: Path, *, logit_scale: float = math.log(1 / 0.07), seed: int = 0):
    """Save a random 32×32-input CLIP with projection_dim 16 in ``folder``; returns (folder, model, tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({s: i + 2 for i, s in enumerate(list(symbols) + [c + "</w>" for c in symbols])})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
        logit_scale_init_value=logit_scale,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model, tokenizer


@torch.no_grad()
def clip_embeddings_by_hand(model, tokenizer, images: torch.Tensor, prompts=None):
    """Unit-norm image (and text) embeddings of 32×32 images in [-1, 1]: 8-bit quantisation, CLIP mean/std,
    tower + projection. No resize or crop: the tiny processor's size equals the images'."""
    pixels = ((images.expand(-1, 3, -1, -1) + 1) * 127.5).round() / 255
    vision = model.visual_projection(model.vision_model(pixel_values=(pixels - CLIP_MEAN) / CLIP_STD).pooler_output)
    if prompts is None:
        return F.normalize(vision, dim=-1)
    tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
    text = model.text_projection(model.text_model(**tokens).pooler_output)
    return F.normalize(vision, dim=-1), F.normalize(text, dim=-1)
