"""Prompt encoders for Stable Diffusion pipelines: CLIP text models + tokenizers from a diffusers folder.

A prompt encoder is any callable ``encode(prompts: list[str]) -> (hidden_states [N, L, D], pooled [N, D] | None)``.
This one reproduces what the pipelines feed their UNet: SD 1.x/2.x use the last hidden state of one CLIP text
model; SDXL concatenates the *penultimate* hidden states of its two encoders along the feature axis and uses the
projected pooled embedding of the second (``CLIPTextModelWithProjection.text_embeds``) for the added conditions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection


class CLIPPromptEncoder:
    """Frozen CLIP text encoder(s) with their tokenizers; prompts are padded/truncated to each tokenizer's
    ``model_max_length``.

    ``penultimate=True`` (SDXL) takes ``hidden_states[-2]`` of every encoder, else the final hidden state.
    ``pooled`` is the projected embedding of the last encoder when it has a projection head, else ``None``.
    """

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], penultimate: bool = False):
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError(f"need one tokenizer per text encoder, got {len(tokenizers)} and {len(text_encoders)}")
        self.tokenizers = list(tokenizers)
        self.text_encoders = [m.requires_grad_(False).eval() for m in text_encoders]
        self.penultimate = penultimate

    @classmethod
    def from_pretrained(cls, path: str | Path, sdxl: bool = False) -> "CLIPPromptEncoder":
        """Load ``text_encoder/`` + ``tokenizer/`` (and ``text_encoder_2/`` + ``tokenizer_2/`` for SDXL)."""
        path = Path(path)
        names = [("tokenizer", "text_encoder", CLIPTextModel)]
        if sdxl:
            names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
        for tokenizer_dir, encoder_dir, _ in names:
            for sub in (tokenizer_dir, encoder_dir):
                if not (path / sub).is_dir():
                    raise FileNotFoundError(f"{path} has no {sub}/ subfolder (needed for the prompt encoder); "
                                            "add it or pass prompt_encoder=")
        tokenizers = [AutoTokenizer.from_pretrained(str(path), subfolder=t) for t, _, _ in names]
        encoders = [cls_.from_pretrained(str(path), subfolder=e) for _, e, cls_ in names]
        return cls(tokenizers, encoders, penultimate=sdxl)

    def to(self, device: torch.device | str) -> "CLIPPromptEncoder":
        self.text_encoders = [m.to(device) for m in self.text_encoders]
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            device = next(encoder.parameters()).device
            mask = tokens.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
            out = encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
            states.append(out.hidden_states[-2] if self.penultimate else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, dim=-1), pooled
