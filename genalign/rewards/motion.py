"""Motion rewards from the T2M evaluator's co-embeddings (``genalign.models.t2m_evaluator``), as SoPo uses them
(Tan et al. 2025): a text-motion reward r in [0, 1] picks and thresholds the unpreferred sample (mask = [r < 0.45])
and a motion-motion similarity in [0, 1] weights the preferred one (S = min_k sim(x_w, x^k), beta_w = beta (C - S)).

Both are the same kernel on Euclidean distances between co-embeddings, the quantity the evaluator is trained on
and the protocol's metrics (R-precision, MM-Dist) measure:

    r(c, x)     = exp(-|e_text(c) - e_motion(x)| / T)
    sim(x, y)   = exp(-|e_motion(x) - e_motion(y)| / T)

Since distances are >= 0, both lie in (0, 1]; they equal 1 exactly at distance 0 (so sim(x, x) = 1, the maximum)
and strictly decrease as the distance grows, i.e. as the match gets worse: ranking K samples by r is ranking them
by the evaluator's matching distance. The default temperature is T = margin / 2 = 5: the evaluator's contrastive
training pushes mismatched pairs beyond ``margin``, so distances are measured in that unit; a pair at the margin
scores e^-2 = 0.14, and a matched pair at the official evaluator's typical ground-truth MM-Dist (about 3) scores
about 0.55, above SoPo's threshold 0.45 (which is reached at d = 4).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from genalign.models.t2m_evaluator import TextMotionEvaluator


class _EmbeddingKernel:
    """``exp(-distance / temperature)`` on the evaluator's co-embeddings; the evaluator is used in eval mode."""

    def __init__(self, evaluator: TextMotionEvaluator, temperature: float | None = None) -> None:
        self.evaluator = evaluator.eval()
        self.temperature = evaluator.config.margin / 2 if temperature is None else float(temperature)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {temperature}")

    def kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise ``exp(-|a_i - b_i| / T)`` for ``[..., D]`` embeddings."""
        return torch.exp(-torch.linalg.vector_norm(a - b, dim=-1) / self.temperature)


class TextMotionRetrievalReward(_EmbeddingKernel):
    """``reward(captions, motions, lengths) -> [N]`` in (0, 1]: ``exp(-|e_text - e_motion| / T)`` per row.

    ``captions`` are raw strings or ``word/POS`` token lists; ``motions [N, T, D]`` are normalised as the evaluator
    expects, ``lengths [N]`` in frames. No gradients flow (a judge, not a loss)."""

    @torch.no_grad()
    def __call__(self, captions: Sequence[str | Sequence[str]], motions: torch.Tensor, lengths) -> torch.Tensor:
        if len(captions) != len(motions):
            raise ValueError(f"need one caption per motion: {len(captions)} captions, {len(motions)} motions")
        return self.kernel(self.evaluator.encode_text(captions), self.evaluator.encode_motion(motions, lengths))


class MotionSimilarity(_EmbeddingKernel):
    """``similarity(a, lengths_a, b, lengths_b) -> [N]`` in (0, 1] between motion ``a_i`` and ``b_i``;
    ``min_similarity`` gives SoPo's ``S = min_k sim(x_w, x^k)``. No gradients flow."""

    @torch.no_grad()
    def __call__(self, motions_a: torch.Tensor, lengths_a, motions_b: torch.Tensor, lengths_b) -> torch.Tensor:
        if len(motions_a) != len(motions_b):
            raise ValueError(f"need paired motions: {len(motions_a)} vs {len(motions_b)}")
        encode = self.evaluator.encode_motion
        return self.kernel(encode(motions_a, lengths_a), encode(motions_b, lengths_b))

    @torch.no_grad()
    def min_similarity(
        self, reference: torch.Tensor, reference_lengths, candidates: torch.Tensor, candidate_lengths
    ) -> torch.Tensor:
        """``min_k sim(reference_i, candidates_{i,k})`` for ``reference [N, T, D]``, ``candidates [N, K, T, D]``
        and ``candidate_lengths [N, K]`` -> ``[N]``."""
        if candidates.dim() != 4 or candidates.shape[0] != reference.shape[0]:
            raise ValueError(
                f"candidates must be [N, K, T, D] with N = {reference.shape[0]} references, got {tuple(candidates.shape)}"
            )
        n, k = candidates.shape[:2]
        candidate_lengths = torch.as_tensor(candidate_lengths)
        if candidate_lengths.shape != (n, k):
            raise ValueError(f"candidate_lengths must be [N, K] = [{n}, {k}], got {tuple(candidate_lengths.shape)}")
        reference_emb = self.evaluator.encode_motion(reference, reference_lengths)
        candidate_emb = self.evaluator.encode_motion(candidates.flatten(0, 1), candidate_lengths.flatten())
        return self.kernel(reference_emb[:, None], candidate_emb.view(n, k, -1)).amin(dim=1)
