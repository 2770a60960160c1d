"""Text-to-motion metrics of Guo et al. 2022 ("Generating Diverse and Natural 3D Human Motions from Text"), the
HumanML3D / KIT-ML protocol, computed on text and motion embeddings from an evaluator network.

* R-precision top-k: texts and motions are cut into batches of 32; each text ranks the 32 motions of its
  batch (1 matching + 31 mismatched) by Euclidean distance; top-k is the fraction whose own motion is among
  the k nearest.
* MM-Dist (the protocol's "matching score"): mean Euclidean distance between a text and its motion.
* FID: Frechet distance between Gaussian fits of real and generated motion embeddings,
  ``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2})``.
* Diversity: mean distance between 300 random pairs of generated motions.
* MultiModality: mean distance between 10 random pairs of generations of the same text (100 texts x 30).
* Each metric is repeated (20 times) and reported as mean +- 1.96 std / sqrt(n) (std with ddof=0, as the
  protocol does).

Random draws use ``numpy.random.Generator``; every ``generator`` argument takes a seed, a Generator or None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from scipy.linalg import sqrtm
from scipy.spatial.distance import cdist
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Seed = int | np.random.Generator | None


def _embeddings(x: np.ndarray | torch.Tensor, name: str, ndim: int = 2) -> np.ndarray:
    """As a float64 array of ``ndim`` dims with finite values."""
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim != ndim:
        layout = "[N, D]" if ndim == 2 else "[num_texts, num_generations, D]"
        raise ValueError(f"{name} must be {layout}, got shape {array.shape}")
    if not np.isfinite(array).all():
        rows = np.flatnonzero(~np.isfinite(array.reshape(array.shape[0], -1)).all(-1))
        raise ValueError(f"{name} has NaN or inf in rows {rows[:10].tolist()}")
    return array


def _paired(text_emb, motion_emb) -> tuple[np.ndarray, np.ndarray]:
    text, motion = _embeddings(text_emb, "text_emb"), _embeddings(motion_emb, "motion_emb")
    if text.shape != motion.shape:
        raise ValueError(f"text_emb {text.shape} and motion_emb {motion.shape} must pair row by row")
    return text, motion


def batch_indices(num: int, batch_size: int = 32, generator: Seed = None) -> np.ndarray:
    """Rows of the protocol's batches ``[num // batch_size, batch_size]``: shuffled by ``rng.permutation(num)``
    when ``generator`` is given (the protocol's loader shuffles), the incomplete last batch dropped (logged)."""
    if num < batch_size:
        raise ValueError(f"R-precision needs at least batch_size={batch_size} samples, got {num}")
    order = np.arange(num) if generator is None else np.random.default_rng(generator).permutation(num)
    kept = num // batch_size * batch_size
    if kept < num:
        log.warning("R-precision: %d samples do not fill a batch of %d and are left out", num - kept, batch_size)
    return order[:kept].reshape(-1, batch_size)


def r_precision(
    text_emb: np.ndarray | torch.Tensor,
    motion_emb: np.ndarray | torch.Tensor,
    top_k: int = 3,
    batch_size: int = 32,
    *,
    generator: Seed = None,
) -> np.ndarray:
    """Top-1..top-k retrieval accuracy ``[top_k]`` of texts among the motions of their batch (see the module doc).

    The rank of a text's motion is its position in a stable sort of the batch's distances.
    """
    text, motion = _paired(text_emb, motion_emb)
    if not 1 <= top_k <= batch_size:
        raise ValueError(f"top_k must be in [1, batch_size={batch_size}], got {top_k}")
    hits = np.zeros(top_k)
    batches = batch_indices(len(text), batch_size, generator)
    for rows in batches:
        order = np.argsort(cdist(text[rows], motion[rows]), axis=1, kind="stable")
        rank = np.argmax(order == np.arange(batch_size)[:, None], axis=1)
        hits += (rank[:, None] < np.arange(1, top_k + 1)).sum(0)
    return hits / batches.size


def mm_dist(text_emb: np.ndarray | torch.Tensor, motion_emb: np.ndarray | torch.Tensor) -> float:
    """MM-Dist: ``mean_i |t_i - m_i|``."""
    text, motion = _paired(text_emb, motion_emb)
    return float(np.linalg.norm(text - motion, axis=1).mean())


def gaussian_frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` with ``scipy.linalg.sqrtm``.

    A non-finite square root (singular product) is retried with ``eps`` added to both diagonals; a complex
    root is accepted when its diagonal's imaginary part is below 1e-3 (numerical residue) and its real part
    is used; otherwise it raises.
    """
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        residue = np.abs(np.diagonal(covmean).imag).max()
        if residue > 1e-3:
            raise ValueError(f"FID: the covariance square root has an imaginary part of {residue:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(real_emb: np.ndarray | torch.Tensor, gen_emb: np.ndarray | torch.Tensor) -> float:
    """FID between Gaussian fits (mean, unbiased covariance) of two embedding sets ``[N, D]``."""
    fits = []
    for name, x in (("real_emb", real_emb), ("gen_emb", gen_emb)):
        array = _embeddings(x, name)
        if len(array) < 2:
            raise ValueError(f"FID needs at least 2 rows in {name}, got {len(array)}")
        fits.append((array.mean(0), np.atleast_2d(np.cov(array, rowvar=False))))
    if fits[0][0].shape != fits[1][0].shape:
        raise ValueError(f"real_emb and gen_emb dimensions differ: {fits[0][0].shape[0]} vs {fits[1][0].shape[0]}")
    return gaussian_frechet_distance(*fits[0], *fits[1])


def _pair_draws(num: int, num_pairs: int, generator: Seed, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Two independent draws of ``num_pairs`` distinct indices from ``range(num)`` (so a pair may repeat an index)."""
    if num < num_pairs:
        raise ValueError(f"{what} needs at least num_pairs={num_pairs} samples to draw from, got {num}")
    rng = np.random.default_rng(generator)
    return rng.choice(num, num_pairs, replace=False), rng.choice(num, num_pairs, replace=False)


def diversity(emb: np.ndarray | torch.Tensor, num_pairs: int = 300, generator: Seed = None) -> float:
    """Diversity: ``mean_p |x_{a_p} - x_{b_p}|`` over two draws a, b of ``num_pairs`` distinct rows each."""
    x = _embeddings(emb, "emb")
    first, second = _pair_draws(len(x), num_pairs, generator, "diversity")
    return float(np.linalg.norm(x[first] - x[second], axis=1).mean())


def multimodality(emb: np.ndarray | torch.Tensor, num_pairs: int = 10, generator: Seed = None) -> float:
    """MultiModality of ``emb [num_texts, num_generations, D]``: the mean distance between generations
    ``a_p`` and ``b_p`` of the same text, over all texts and ``num_pairs`` index pairs shared by all texts."""
    x = _embeddings(emb, "emb", ndim=3)
    first, second = _pair_draws(x.shape[1], num_pairs, generator, "multimodality")
    return float(np.linalg.norm(x[:, first] - x[:, second], axis=2).mean())


def evaluate_embeddings(
    text_emb: np.ndarray | torch.Tensor,
    motion_emb: np.ndarray | torch.Tensor,
    real_motion_emb: np.ndarray | torch.Tensor,
    *,
    mm_emb: np.ndarray | torch.Tensor | None = None,
    generator: Seed = None,
    batch_size: int = 32,
    diversity_pairs: int = 300,
    mm_pairs: int = 10,
) -> dict[str, float]:
    """One replication of the protocol: ``top1..top3`` and ``mm_dist`` on the same batched rows, ``fid`` of
    ``motion_emb`` against ``real_motion_emb``, ``diversity`` of ``motion_emb`` and, with ``mm_emb``,
    ``multimodality``. Pass the real motions as ``motion_emb`` for the ground-truth row of a results table."""
    rng = np.random.default_rng(generator)
    text, motion = _paired(text_emb, motion_emb)
    rows = batch_indices(len(text), batch_size, rng).ravel()
    results = {f"top{k}": float(v) for k, v in enumerate(r_precision(text[rows], motion[rows], 3, batch_size), 1)}
    results["mm_dist"] = mm_dist(text[rows], motion[rows])
    results["fid"] = fid(real_motion_emb, motion)
    results["diversity"] = diversity(motion, diversity_pairs, rng)
    if mm_emb is not None:
        results["multimodality"] = multimodality(mm_emb, mm_pairs, rng)
    return results


@dataclass(frozen=True)
class Interval:
    """A replicated metric: ``mean +- half_width`` with ``half_width = 1.96 std / sqrt(n)`` (95%)."""

    mean: float
    half_width: float
    values: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


def confidence_interval(values) -> Interval:
    """Mean and 95% half-width ``1.96 std / sqrt(n)`` (population std, ddof=0, as the protocol reports)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"need a non-empty 1-D sequence of replicated values, got shape {array.shape}")
    return Interval(float(array.mean()), float(1.96 * array.std() / np.sqrt(len(array))), tuple(array.tolist()))


#: protocol metric -> the name reports use (MultiModality keeps its own name)
METRIC_NAMES = {"top1": "r_precision_top1", "top2": "r_precision_top2", "top3": "r_precision_top3",
                "mm_dist": "mm_dist", "fid": "fid", "diversity": "diversity"}


def flatten(results: Mapping[str, Interval]) -> dict[str, float]:
    """``{name: mean, name_ci95: half-width}``."""
    out: dict[str, float] = {}
    for name, interval in results.items():
        out[name], out[f"{name}_ci95"] = interval.mean, interval.half_width
    return out


def report_names(results: Mapping[str, Interval]) -> dict[str, Interval]:
    """``results`` keyed by :data:`METRIC_NAMES`."""
    return {METRIC_NAMES.get(name, name): value for name, value in results.items()}


class MotionMetrics:
    """Collects one ``{metric: value}`` dict per replication and summarises each metric as an :class:`Interval`."""

    def __init__(self) -> None:
        self.runs: list[dict[str, float]] = []

    def update(self, values: Mapping[str, float]) -> None:
        if self.runs and set(values) != set(self.runs[0]):
            raise ValueError(f"replication {len(self.runs)} reports {sorted(values)}, the first reported {sorted(self.runs[0])}")
        self.runs.append({name: float(value) for name, value in values.items()})

    def compute(self) -> dict[str, Interval]:
        if not self.runs:
            raise ValueError("no replications recorded; call update() first")
        return {name: confidence_interval([run[name] for run in self.runs]) for name in self.runs[0]}


def replicate(fn: Callable[[int], Mapping[str, float]], n: int = 20) -> dict[str, Interval]:
    """Run ``fn(i)`` for ``i = 0..n-1`` (one protocol replication each, e.g. seeded by i) and summarise."""
    metrics = MotionMetrics()
    for i in tqdm(range(n), desc="replications", unit="replication", disable=n < 2):
        metrics.update(fn(i))
    return metrics.compute()
