"""Input checks shared by the objectives: score shapes, dtypes and hyper-parameter ranges.

Scores are promoted to at least float32 so that large β (Diffusion-DPO uses β·Δ in the thousands) stays finite
when the model ran in fp16/bf16; float64 inputs stay float64.
"""

from __future__ import annotations

import math

import torch


def as_scores(**named: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Check that every named tensor is a floating ``[B]`` vector of one common length; return them promoted."""
    out: list[torch.Tensor] = []
    first_name, first_shape = None, None
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(value).__name__}")
        if value.ndim != 1:
            raise ValueError(f"{name} must have shape [B] (one score per example), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}; convert it with .float()")
        if first_shape is None:
            first_name, first_shape = name, value.shape
        elif value.shape != first_shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but {first_name} has {tuple(first_shape)}; "
                "every input needs exactly one entry per example"
            )
        out.append(value.to(torch.promote_types(value.dtype, torch.float32)))
    return tuple(out)


def as_mask(name: str, value: torch.Tensor, size: int) -> torch.Tensor:
    """Check a boolean ``[size]`` label vector."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a bool tensor of shape [N], got {got}; build it with `labels.bool()`")
    if value.shape != (size,):
        raise ValueError(f"{name} must have shape [{size}] (one label per example), got {tuple(value.shape)}")
    return value


def per_unit(score: torch.Tensor, lengths: torch.Tensor | None, name: str) -> torch.Tensor:
    """``score / lengths`` (per-token mean) when lengths are given, else the score itself."""
    if lengths is None:
        return score
    if not isinstance(lengths, torch.Tensor) or lengths.shape != score.shape:
        got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(score.shape)} (one length per example), got {got}")
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} must be positive (number of scored tokens), got {lengths.tolist()}")
    return score / lengths.to(score.dtype)


def paired_lengths(chosen: torch.Tensor | None, rejected: torch.Tensor | None) -> None:
    """Length normalisation needs both sides or neither."""
    if (chosen is None) != (rejected is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")


def in_range(name: str, value: float, low: float = -math.inf, high: float = math.inf, *,
             low_open: bool = False, high_open: bool = False) -> float:
    """Raise a ValueError naming the hyper-parameter unless ``low (<|<=) value (<|<=) high``."""
    value = float(value)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):  # NaN fails both comparisons
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value}")
    return value


def positive(name: str, value: float) -> float:
    """Raise unless ``value > 0``."""
    return in_range(name, value, 0.0, low_open=True)


def as_estimate(name: str, value: torch.Tensor | float, size: int, like: torch.Tensor) -> torch.Tensor:
    """A float, scalar tensor or ``[size]`` tensor, typed like ``like`` (gradients kept)."""
    if isinstance(value, torch.Tensor):
        out = value.to(device=like.device, dtype=torch.promote_types(value.dtype, like.dtype))
    else:
        out = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if out.ndim not in (0, 1) or (out.ndim == 1 and out.shape[0] != size):
        raise ValueError(f"{name} must be a float or a tensor of shape [] or [{size}], got shape {tuple(out.shape)}")
    return out


def probabilities(name: str, value: torch.Tensor | float, size: int, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[size]`` tensor of constants in [0, 1] (detached), typed like ``like``."""
    p = as_estimate(name, value, size, like).detach()
    if bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise ValueError(f"{name} must lie in [0, 1], got {p.tolist()}")
    return p
