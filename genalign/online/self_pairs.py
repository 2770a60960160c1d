"""Shared pieces of the methods that pair up the policy's own samples (SeRA, OSP, DR-PO, inverse alignment):
``[B*K]`` scores -> ``[B, K]``, best/worst selection and a frozen snapshot θ_s of the policy. Drawing and indexing
samples is :mod:`genalign.online.draws`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.distributed import Shard
from genalign.online import draws
from genalign.types import Scores


def grouped(scores: Scores, groups: int, k: int) -> Scores:
    """Flat prompt-major scores ``[B*K]`` as ``[B, K]`` views (gradients kept)."""
    def view(t):
        return None if t is None else t.view(groups, k)

    return Scores(view(scores.policy), view(scores.reference), view(scores.lengths))


def pick(scores: Scores, rows: torch.Tensor, cols: torch.Tensor) -> Scores:
    """Entries ``[rows[i], cols[i]]`` of ``[B, K]`` scores (see :func:`grouped`), gradients kept."""
    def sel(t):
        return None if t is None else t[rows.to(t.device), cols.to(t.device)]

    return Scores(sel(scores.policy), sel(scores.reference), sel(scores.lengths))


def best_worst(judged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For judge scores ``[B, K]``: ``(rows, best, worst, ties)`` over the prompts whose best and worst differ.

    A prompt whose K samples all score the same carries no preference: it is left out and counted in ``ties``.
    """
    keep = judged.amax(1) > judged.amin(1)
    rows = keep.nonzero().flatten()
    return rows, judged.argmax(1)[rows], judged.argmin(1)[rows], int((~keep).sum())


def best_worst_dpo(adapter: Adapter, samples: dict, judged: torch.Tensor, *, beta: float,
                   generator: torch.Generator | None, prefix: str) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO of the current policy on the (best, worst) of each prompt's K own samples by ``judged`` ``[B, K]``.

    A text sample that hit the length limit without an end token ranks below every finished one; prompts whose K
    samples tie are skipped. A prompt's K samples are scored on one shared draw (t and noise for diffusion), so each
    pair shares it. Returns per-pair losses (one zero still on the policy's graph when no pair is left) and metrics:
    ``{prefix}/pairs``, ``/ties``, ``/unfinished`` and the pairwise reward metrics.
    """
    n, k = judged.shape
    ended = draws.ended(adapter, samples).view(n, k)
    judged = torch.where(ended, judged, judged.min() - 1.0)
    flat = adapter.score(samples, groups=torch.arange(n).repeat_interleave(k), generator=generator)
    rows, best, worst, ties = best_worst(judged)
    metrics = {f"{prefix}/pairs": float(rows.numel()), f"{prefix}/ties": float(ties),
               f"{prefix}/unfinished": float((~ended).sum())}
    if rows.numel() == 0:
        return zero_loss(flat), metrics
    scores = grouped(flat, n, k)
    w, l = pick(scores, rows, best), pick(scores, rows, worst)
    metrics.update(objectives.pairwise_metrics(w.policy, l.policy, w.reference, l.reference, beta=beta))
    return objectives.dpo(w.policy, l.policy, w.reference, l.reference, beta=beta), metrics


def zero_loss(scores: Scores) -> torch.Tensor:
    """A one-element zero loss still attached to the policy's graph (a batch without any usable pair)."""
    return scores.policy.reshape(-1)[:1].float() * 0.0


def global_share(loss: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Per-example losses whose count varies from process to process (skipped ties, selected pairs), rescaled so the
    trainer's mean over processes of each process's mean is the mean over every process's examples, as in the
    one-process run: with n_r examples here and N = Σ_r n_r, each is multiplied by n_r·W / N (1 in a one-process run).
    Without examples (``loss`` empty but on the policy's graph) one zero is returned, whose gradients are zero."""
    total = sum(shard.gather([int(loss.numel())]))
    if loss.numel() == 0:
        return loss.float().sum().reshape(1) * 0.0
    return loss * (loss.numel() * shard.count / total) if shard.count > 1 else loss


@contextlib.contextmanager
def rewound(generator: torch.Generator) -> Iterator[torch.Generator]:
    """Draws made inside the block are undone afterwards: a judgement (e.g. the snapshot's) sees exactly the randomness
    the trained forward then uses (shared t and noise for diffusion). The generator itself is used, so a process's
    sliced draws (:meth:`genalign.distributed.Shard.draws`) stay the one-process run's."""
    state = generator.get_state()
    try:
        yield generator
    finally:
        generator.set_state(state)


class PolicySnapshot:
    """A frozen copy θ_s of the policy's trainable parameters, swapped in by pointer for sampling or judging.

    Only trainable tensors are copied (the LoRA adapters when training with LoRA). ``state_dict`` holds them so a
    resumed run judges with the same snapshot.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None

    def sync(self, adapter: Adapter) -> None:
        """θ_s ← θ."""
        self.tensors = {name: p.detach().clone() for name, p in _trainable(adapter).items()}

    @contextlib.contextmanager
    def swapped(self, adapter: Adapter) -> Iterator[None]:
        """Inside the block the policy computes with θ_s; the live weights come back afterwards."""
        if self.tensors is None:
            raise RuntimeError("the policy snapshot is empty; call sync(adapter) first")
        params = _trainable(adapter)
        if set(params) != set(self.tensors):
            raise ValueError("the policy snapshot does not match the policy's trainable parameters (a checkpoint from "
                             "another model or LoRA setting?)")
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: dict[str, torch.nn.Parameter]) -> None:
        for name, param in params.items():
            live, param.data = param.data, self.tensors[name].to(param.device, param.dtype)
            self.tensors[name] = live

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": None if self.tensors is None else dict(self.tensors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = None if state["tensors"] is None else dict(state["tensors"])


def _trainable(adapter: Adapter) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in adapter.unwrapped_policy.named_parameters() if p.requires_grad}
