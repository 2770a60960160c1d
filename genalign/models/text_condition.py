"""Caption -> one condition vector ``[Dc]`` for the motion denoiser, from a local ``transformers`` text encoder.

Two kinds of folder are understood:

* a sentence encoder (any ``AutoModel``; by default the packaged all-MiniLM-L6-v2): the L2-normalised,
  attention-mask-weighted mean of the token states (Reimers & Gurevych 2019), through
  :class:`genalign.data.text_encoder.SentenceEncoder`; ``Dc = 384`` for MiniLM;
* a CLIP text model (``model_type`` ``clip`` or ``clip_text_model``): ``CLIPTextModel``'s pooled output, the final
  hidden state at the end-of-text token (Radford et al. 2021), as MDM conditions on CLIP; ``Dc = 512`` for ViT-B/32.

Encodings are cached in memory per caption, so a dataset's captions are encoded once per run.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoConfig, CLIPTextModel, CLIPTokenizer

from genalign.data.text_encoder import SentenceEncoder

CLIP_MODEL_TYPES = ("clip", "clip_text_model")


class CachedCaptionEncoder(abc.ABC):
    """``captions -> [N, dim]`` float32 on CPU, each caption encoded once per run: an in-memory cache around
    ``_encode_uncached``, which sees the new captions in chunks of ``batch_size``."""

    dim: int

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        captions = list(captions)
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"captions[{i}] is {type(caption).__name__}, expected a caption string")
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with torch.no_grad():
                self._cache.update(zip(chunk, self._encode_uncached(chunk).float().cpu()))
        return torch.stack([self._cache[c] for c in captions]) if captions else torch.zeros(0, self.dim)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[N, dim]`` of ``captions`` (the same as calling the encoder)."""
        return self(captions)

    @abc.abstractmethod
    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        """``[len(captions), dim]`` features of captions not yet in the cache."""


class TextCondition(CachedCaptionEncoder):
    """``encode(captions) -> [N, Dc]`` float32 on CPU; see the module docstring.

    ``path`` is a local model folder (default: the packaged MiniLM); ``max_length`` bounds the caption length in
    tokens (MiniLM default 64; CLIP is capped at its 77 positions).
    """

    def __init__(self, path: str | Path | None = None, *, max_length: int = 64, batch_size: int = 256) -> None:
        self.path = None if path is None else str(path)
        if self.path is not None and not Path(self.path).is_dir():
            raise FileNotFoundError(f"text encoder folder {self.path} does not exist; pass a local model folder")
        model_type = None if self.path is None else AutoConfig.from_pretrained(self.path, local_files_only=True).model_type
        self.kind = "clip" if model_type in CLIP_MODEL_TYPES else "sentence"
        super().__init__(batch_size)
        if self.kind == "clip":
            self.tokenizer = CLIPTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = CLIPTextModel.from_pretrained(self.path, local_files_only=True).eval()
            self.max_length = min(max_length, self.model.config.max_position_embeddings)
            self.dim = self.model.config.hidden_size
        else:
            self.sentence = SentenceEncoder(self.path, max_length=max_length, batch_size=batch_size)
            self.max_length = max_length
            self.dim = self.sentence.dim

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        if self.kind == "sentence":
            return self.sentence.encode(captions).pooled
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return self.model(**enc).pooler_output
