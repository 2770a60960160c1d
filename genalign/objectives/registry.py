"""Name → objective lookup, so configs can pick an objective by string."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from genalign.objectives import pairwise, trl_losses, unpaired

Kind = Literal["pairwise", "unpaired", "reward", "auxiliary"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective function and the kind of batch it consumes.

    ``pairwise``: (policy_chosen, policy_rejected, reference_chosen, reference_rejected) scores; ``unpaired``:
    labelled samples; ``reward``: samples with a scalar reward and a value estimate; ``auxiliary``: a term added
    to another objective.
    """

    fn: Callable[..., torch.Tensor]
    kind: Kind


OBJECTIVES: dict[str, ObjectiveSpec] = {
    **{fn.__name__: ObjectiveSpec(fn, "pairwise") for fn in (
        pairwise.dpo, pairwise.robust_dpo, pairwise.ipo, pairwise.slic, pairwise.gpo, pairwise.simpo,
        pairwise.soft_preference, pairwise.diffusion_dro, pairwise.sopo, trl_losses.exo_pair, trl_losses.nca_pair,
        trl_losses.bco_pair, trl_losses.sppo_hard, trl_losses.aot, trl_losses.aot_unpaired, trl_losses.apo_zero,
        trl_losses.apo_down, trl_losses.discopop)},
    "kto": ObjectiveSpec(unpaired.kto, "unpaired"),
    "pmpo": ObjectiveSpec(unpaired.pmpo, "unpaired"),
    "direct_reward": ObjectiveSpec(unpaired.direct_reward, "reward"),
    "selm_optimism": ObjectiveSpec(unpaired.selm_optimism, "auxiliary"),
    "chosen_nll": ObjectiveSpec(trl_losses.chosen_nll, "auxiliary"),
}


def get_objective(name: str) -> ObjectiveSpec:
    """The spec registered under ``name``; unknown names raise a ValueError listing the valid ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}") from None
