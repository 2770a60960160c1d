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
                                            f"copy {sub}/ of the same model into {path}, or pass prompt_encoder=")
        tokenizers = [AutoTokenizer.from_pretrained(str(path), subfolder=t) for t, _, _ in names]
        encoders = [cls_.from_pretrained(str(path), subfolder=e) for _, e, cls_ in names]
        for (tokenizer_dir, encoder_dir, _), tokenizer, encoder in zip(names, tokenizers, encoders):
            check_tokenizer_fits(tokenizer, encoder, path / tokenizer_dir, path / encoder_dir)
        return cls(tokenizers, encoders, penultimate=sdxl)

    @property
    def token_features(self) -> int:
        """Features per token of the hidden states fed to the UNet (the encoders' widths, concatenated)."""
        return sum(int(m.config.hidden_size) for m in self.text_encoders)

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


def check_tokenizer_fits(tokenizer, encoder: torch.nn.Module, tokenizer_dir: Path, encoder_dir: Path) -> None:
    """A tokenizer belongs to its text encoder: every token id must index the embedding table, and the padded
    length (``model_max_length``) must fit the position embeddings. A mismatched pair would otherwise fail deep in
    the first forward pass (an index error) or, worse, silently embed the wrong tokens."""
    vocab, rows = len(tokenizer), int(encoder.config.vocab_size)
    fix = f"copy the tokenizer of the model {encoder_dir.name}/ comes from into {tokenizer_dir}"
    if vocab > rows:
        raise ValueError(f"{tokenizer_dir} has {vocab} tokens but {encoder_dir} embeds only {rows} "
                         f"(config.json vocab_size): the tokenizer does not match the text encoder; {fix}")
    length, positions = int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings)
    if length > positions:
        raise ValueError(f"{tokenizer_dir} pads prompts to {length} tokens (model_max_length) but {encoder_dir} has "
                         f"{positions} position embeddings: the tokenizer does not match the text encoder; {fix}")
