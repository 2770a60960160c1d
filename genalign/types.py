"""Batch and score containers shared by every adapter, objective and the trainer.

A *sample batch* is whatever an adapter needs to score N samples under their conditions (token ids and masks
for text, clean latents and text embeddings for diffusion, context/action indices for the tabular adapter). It
is opaque to the trainer and the objectives: only the adapter that built it reads it. The containers below say
how samples relate to each other (pairs, labels, demonstrations, rankings); :class:`Scores` is what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

SampleBatch = Any  # adapter-specific payload for N samples; see each adapter's ``collate``


@dataclass
class Scores:
    """Per-sample log-likelihood scores, shape ``[N]``.

    ``policy`` carries gradients; ``reference`` never does. ``lengths`` counts the scored units (completion
    tokens, or 1 for diffusion) so objectives can use per-token means (IPO's ``length_normalize``, SimPO).
    """

    policy: torch.Tensor
    reference: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    def split(self, sizes: list[int]) -> list["Scores"]:
        parts = [t.split(sizes) if t is not None else [None] * len(sizes) for t in (self.policy, self.reference, self.lengths)]
        return [Scores(p, r, n) for p, r, n in zip(*parts)]

    @property
    def mean_policy(self) -> torch.Tensor:
        return self.policy if self.lengths is None else self.policy / self.lengths.clamp(min=1)

    @property
    def mean_reference(self) -> torch.Tensor | None:
        if self.reference is None or self.lengths is None:
            return self.reference
        return self.reference / self.lengths.clamp(min=1)


@dataclass
class Batch:
    """Base class: moves every tensor field (and nested sample batches) to a device."""

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class PairwiseBatch(Batch):
    """B preference pairs: ``chosen[i]`` is preferred to ``rejected[i]`` under the same condition.

    ``strength`` is an optional preference probability p in [0, 1] per pair (soft preferences); cached
    reference scores, when the run precomputed them, ride along so the reference model is not run again.
    """

    chosen: SampleBatch
    rejected: SampleBatch
    size: int
    strength: torch.Tensor | None = None
    reference_chosen: torch.Tensor | None = None
    reference_rejected: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.size


@dataclass
class LabelledBatch(Batch):
    """N unpaired samples with a binary label (thumbs up/down) and/or a scalar reward (single trajectory)."""

    samples: SampleBatch
    size: int
    desirable: torch.Tensor | None = None  # bool [N]
    reward: torch.Tensor | None = None  # float [N]
    reference: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.size


@dataclass
class DemonstrationBatch(Batch):
    """N expert demonstrations; the policy's own negatives are drawn online by the method (Diffusion-DRO, SoPo)."""

    demonstrations: SampleBatch
    size: int
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.size


@dataclass
class RankedBatch(Batch):
    """B prompts with K ranked samples each, laid out prompt-major (``samples`` holds B*K entries).

    ``scores[b, k]`` is the ranking signal (higher is better) for sample k of prompt b.
    """

    samples: SampleBatch
    scores: torch.Tensor  # [B, K]
    index: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.scores.shape[0]


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Batch):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return type(value)(_move(v, device) for v in value)
    return value
