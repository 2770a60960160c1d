"""A small scalar network over any prompt (or prompt + response): hashed character n-grams -> mean embedding -> MLP.

Used as DRO's value function V(x) and as the re-fitted reward model of inverse alignment. It needs nothing from the
modality: a prompt is rendered to a string (``str`` as is, anything else as JSON, tensors as their values), so it
works for text prompts, chat message lists, tabular context indices and image captions alike.

Features of a string s: one bucket for the whole string (a free parameter per distinct input: exact, tabular
values for inputs seen in training) plus one bucket per character n-gram (sharing across similar inputs). Buckets
are ``crc32`` hashes (stable across processes, unlike Python's ``hash``).
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Sequence

import torch
from torch import nn


def render(value: Any) -> str:
    """A stable string for a prompt or response of any modality."""
    if isinstance(value, str):
        return value
    if isinstance(value, torch.Tensor):
        return json.dumps(value.detach().cpu().tolist())
    return json.dumps(value, sort_keys=True, default=str)


class HashedTextNet(nn.Module):
    """``f(s) = MLP(mean_{g ∈ features(s)} E[g])`` (``hidden = 0``: a linear model, ``f(s) = mean_g w_g + b``).

    The mean, not the sum, keeps one optimizer step's change of f independent of the input's length (a long caption
    has hundreds of n-grams; with a sum Adam would move its value hundreds of times further than a short prompt's).
    """

    def __init__(self, buckets: int = 2**14, ngrams: Sequence[int] = (1, 2, 3), hidden: int = 0):
        super().__init__()
        if buckets < 2 or hidden < 0 or not ngrams or min(ngrams) < 1:
            raise ValueError(f"HashedTextNet needs buckets >= 2, hidden >= 0 and n-gram sizes >= 1, got "
                             f"buckets={buckets}, hidden={hidden}, ngrams={list(ngrams)}")
        self.buckets, self.ngrams = int(buckets), tuple(int(n) for n in ngrams)
        width = hidden or 1
        self.embed = nn.EmbeddingBag(self.buckets, width, mode="mean")
        nn.init.zeros_(self.embed.weight)
        if hidden:
            nn.init.normal_(self.embed.weight, std=0.1)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 1)) if hidden else None
        self.bias = nn.Parameter(torch.zeros(()))

    def features(self, text: str) -> list[int]:
        grams = [f"#{text}"] + [f"{n}:{text[i:i + n]}" for n in self.ngrams for i in range(len(text) - n + 1)]
        return [zlib.crc32(g.encode("utf-8")) % self.buckets for g in grams]

    def forward(self, inputs: Sequence[Any]) -> torch.Tensor:
        """One scalar per input, ``[N]`` on the network's device."""
        ids = [self.features(render(x)) for x in inputs]
        device = self.bias.device
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=device)
        offsets = torch.tensor([0] + [len(row) for row in ids[:-1]], dtype=torch.long, device=device).cumsum(0)
        out = self.embed(flat, offsets)
        if self.head is not None:
            out = self.head(out)
        return out.squeeze(-1) + self.bias
