"""Implicit-reward metrics for pairwise batches (what DPO-style trainers log)."""

from __future__ import annotations

import torch

from genalign.objectives._checks import as_scores, positive


@torch.no_grad()
def pairwise_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                     reference_rejected: torch.Tensor, *, beta: float) -> dict[str, torch.Tensor]:
    """Batch means of the implicit reward β(π − ref), as detached scalar tensors.

    ``rewards/chosen`` and ``rewards/rejected`` per side, ``rewards/margin`` = mean βΔ, ``rewards/accuracy`` =
    fraction of pairs with Δ > 0 (ties count as wrong).
    """
    positive("beta", beta)
    pc, pr, rc, rr = as_scores(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                               reference_chosen=reference_chosen, reference_rejected=reference_rejected)
    chosen, rejected = pc - rc, pr - rr
    delta = chosen - rejected
    return {
        "rewards/chosen": beta * chosen.mean(),
        "rewards/rejected": beta * rejected.mean(),
        "rewards/margin": beta * delta.mean(),
        "rewards/accuracy": (delta > 0).to(delta.dtype).mean(),
    }
