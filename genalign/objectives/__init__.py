"""Functional objectives: pure functions from per-sample scores to per-example losses (no reduction).

Scores are log-likelihoods (higher = more likely): summed completion log-probs for language models, the negative
denoising error for diffusion. Like ``torch.nn.functional``, nothing here owns a model or does I/O.
"""

from genalign.objectives.metrics import pairwise_metrics
from genalign.objectives.pairwise import (
    GPO_LOSSES,
    diffusion_dro,
    dpo,
    gpo,
    ipo,
    robust_dpo,
    simpo,
    slic,
    soft_preference,
    sopo,
)
from genalign.objectives.registry import OBJECTIVES, ObjectiveSpec, get_objective
from genalign.objectives.trl_losses import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    chosen_nll,
    discopop,
    exo_pair,
    nca_pair,
    sppo_hard,
    wpo_weights,
)
from genalign.objectives.unpaired import direct_reward, kto, pmpo, selm_optimism

__all__ = [
    "GPO_LOSSES", "OBJECTIVES", "ObjectiveSpec", "get_objective", "pairwise_metrics",
    "dpo", "robust_dpo", "ipo", "slic", "gpo", "simpo", "soft_preference", "diffusion_dro", "sopo",
    "kto", "direct_reward", "pmpo", "selm_optimism",
    "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
    "chosen_nll", "wpo_weights",
]
