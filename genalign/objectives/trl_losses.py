"""The pairwise losses of TRL's ``DPOTrainer`` that the DPO family in :mod:`genalign.objectives.pairwise` lacks.

Conventions as in :mod:`genalign.objectives.pairwise`: scores ``[B]`` (higher = more likely), r = π − ref per side,
Δ = r_w − r_l, per-example losses in at least float32, reference scores detached.

Every ``loss_type`` of TRL 1.16 (``trl/trainer/dpo_trainer.py``) and where it lives in genalign
(``objective=<config>``; the options are keys of any pairwise objective config, see :class:`genalign.steps.PairwiseStep`):

=================  ===========================================================================================
TRL 1.16           genalign
=================  ===========================================================================================
``sigmoid``        :func:`~genalign.objectives.pairwise.dpo` (``objective=dpo``; ``label_smoothing`` = cDPO)
``sigmoid_norm``   ``dpo`` on per-token means (``objective=sigmoid_norm``: ``dpo`` + ``length_normalize: true``)
``hinge``          :func:`~genalign.objectives.pairwise.slic` with ``delta=1`` (``objective=slic``)
``ipo``            :func:`~genalign.objectives.pairwise.ipo`; TRL always divides by the token counts:
                   ``objective=ipo objective.length_normalize=true``
``robust``         :func:`~genalign.objectives.pairwise.robust_dpo`
``exo_pair``       :func:`exo_pair`
``nca_pair``       :func:`nca_pair`
``bco_pair``       :func:`bco_pair` (the step keeps the running reward mean δ; ``reward_shift: none`` is TRL 1.16)
``sppo_hard``      :func:`sppo_hard`
``aot``            :func:`aot`
``aot_unpaired``   :func:`aot_unpaired` (named ``aot_pair`` in TRL < 1.0)
``apo_zero``       :func:`apo_zero`
``apo_down``       :func:`apo_down`
``discopop``       :func:`discopop` (TRL's ``discopop_tau`` is ``tau``)
``sft``            :func:`chosen_nll`; as an added term: option ``rpo_alpha`` (RPO, TRL < 1.0's ``rpo_alpha``;
                   ``rpo_mean: tokens`` pools the tokens of the batch as TRL does)
=================  ===========================================================================================

TRL options: ``use_weighting`` (WPO) is the option ``use_weighting`` with :func:`wpo_weights`; TRL < 1.0's
``reference_free`` is the option ``reference_free`` (reference scores taken as 0). Not provided: ``ld_alpha``
(LD-DPO), ``f_divergence_type`` and combining several losses with ``loss_weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genalign.objectives._checks import as_scores, in_range, per_unit, positive
from genalign.objectives.pairwise import _binary_logistic, _log_ratios

Tensor = torch.Tensor


def exo_pair(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             *, beta: float = 0.1, label_smoothing: float = 1e-3) -> Tensor:
    """EXO-pref: KL(q_θ ‖ p) over {chosen, rejected}, q_θ = (σ(βΔ), σ(−βΔ)), target p = (1 − ε, ε):

    σ(βΔ)·[log σ(βΔ) − log(1 − ε)] + σ(−βΔ)·[log σ(−βΔ) − log ε], with ε ∈ (0, 1) (the paper uses 1e-3). Ji et al.
    2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16 with K = 2.
    """
    positive("beta", beta)
    eps = in_range("label_smoothing", label_smoothing, 0.0, 1.0, low_open=True, high_open=True)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    x = beta * (r_w - r_l)
    log_q_w, log_q_l = F.logsigmoid(x), F.logsigmoid(-x)
    return log_q_w.exp() * (log_q_w - torch.log1p(x.new_tensor(-eps))) + log_q_l.exp() * (log_q_l - x.new_tensor(eps).log())


def nca_pair(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             *, beta: float = 0.1) -> Tensor:
    """NCA (pairwise): −log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l).

    Each side's own reward is scored, so the chosen likelihood is pushed up in absolute terms, not only relative to
    the rejected one. Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards".
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)


def bco_pair(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             *, beta: float = 0.1, delta: Tensor | float = 0.0) -> Tensor:
    """BCO (pairwise): −log σ(βr_w − δ) − log σ(−(βr_l − δ)), a binary classifier of chosen vs rejected rewards.

    δ is the reward shift, a constant: the running mean of the rewards β·r over both sides of every batch so far
    (:class:`genalign.steps.BCOPairStep` keeps it); δ = 0 is TRL 1.16's ``bco_pair``. Jung et al. 2024, "Binary
    Classifier Optimization for Large Language Model Alignment".
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    shift = torch.as_tensor(delta, dtype=r_w.dtype, device=r_w.device).detach()
    if shift.ndim != 0:
        raise ValueError(f"delta must be a float or a scalar tensor (one shift for the batch), got shape {tuple(shift.shape)}")
    return -F.logsigmoid(beta * r_w - shift) - F.logsigmoid(-(beta * r_l - shift))


def sppo_hard(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
              reference_rejected: Tensor, *, beta: float = 0.1) -> Tensor:
    """SPPO with hard win probabilities (P = 1 for the chosen, 0 for the rejected): (r_w − 1/(2β))² + (r_l + 1/(2β))².

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", eq. 4.7 with η = 1/β.
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2


def _sorted_logistic(policy_side: Tensor, reference_side: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """cDPO's logistic loss on ``sort(policy_side) − sort(reference_side)`` (sorted over the batch)."""
    eps = in_range("label_smoothing", label_smoothing, 0.0, 0.5)
    margin = torch.sort(policy_side).values - torch.sort(reference_side).values
    return _binary_logistic(beta * margin, 1.0 - eps)


def aot(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
        *, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """AOT (paired): with u = π_w − π_l and v = ref_w − ref_l, both sorted over the batch,
    loss_k = −(1 − ε) log σ(β(u₍ₖ₎ − v₍ₖ₎)) − ε log σ(−β(u₍ₖ₎ − v₍ₖ₎)).

    A one-dimensional optimal-transport (first-order stochastic dominance) version of DPO: the distribution of the
    policy's margins is pushed above the reference's. Entry k belongs to rank k of the batch, not to pair k; the mean
    is the loss (so per-pair weights do not apply). Melnyk et al. 2024, "Distributional Preference Alignment of LLMs
    via Optimal Transport".
    """
    positive("beta", beta)
    pc, pr, rc, rr = as_scores(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                               reference_chosen=reference_chosen, reference_rejected=reference_rejected)
    return _sorted_logistic(pc - pr, (rc - rr).detach(), beta, label_smoothing)


def aot_unpaired(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                 reference_rejected: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """AOT (unpaired): the logistic loss of :func:`aot` on sort(r_w) − sort(r_l), chosen and rejected rewards sorted
    separately, so the chosen reward distribution is pushed above the rejected one without using the pairing.

    Entry k belongs to rank k. Melnyk et al. 2024 (as :func:`aot`); TRL < 1.0 called it ``aot_pair``.
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return _sorted_logistic(r_w, r_l, beta, label_smoothing)


def apo_zero(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, *, beta: float = 0.1) -> Tensor:
    """APO-zero: (1 − σ(βr_w)) + σ(βr_l): raise the chosen, lower the rejected likelihood (chosen outputs are better
    than the model's own). D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", eq. 7.
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return torch.sigmoid(-beta * r_w) + torch.sigmoid(beta * r_l)  # 1 − σ(x) = σ(−x), exact in the tails


def apo_down(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, *, beta: float = 0.1) -> Tensor:
    """APO-down: σ(βr_w) + (1 − σ(βΔ)): lower both likelihoods, the rejected one more (chosen outputs are worse
    than the model's own). D'Oosterlinck et al. 2024, eq. 8.
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return torch.sigmoid(beta * r_w) + torch.sigmoid(-beta * (r_w - r_l))


def discopop(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, *, beta: float = 0.1, tau: float = 0.05) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): with x = βΔ and m = σ(x/τ), (1 − m)·(−log σ(x)) + m·e^{−x}.

    A blend of the logistic (DPO) and exponential losses gated by the margin's sign; m·e^{−x} is computed as
    exp(log σ(x/τ) − x), finite for any x when τ ≤ 1. Non-convex: for τ = 0.05 it has a local minimum at
    βΔ ≈ −0.12 and a local maximum at βΔ ≈ 0.07, so a pair starting at Δ = 0 is first pushed the wrong way (its
    gradient w.r.t. the chosen score is positive there). Chris Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", eq. 5 (τ = 0.05).
    """
    positive("beta", beta)
    positive("tau", tau)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    x = beta * (r_w - r_l)
    return -torch.sigmoid(-x / tau) * F.logsigmoid(x) + torch.exp(F.logsigmoid(x / tau) - x)


def chosen_nll(policy_chosen: Tensor, chosen_lengths: Tensor | None = None) -> Tensor:
    """Negative log-likelihood of the chosen response per scored token: −π_w / |y_w| (−π_w without lengths).

    RPO adds α times this to DPO. Pang et al. 2024, "Iterative Reasoning Preference Optimization" (RPO); TRL's
    ``loss_type="sft"`` is the same term with the tokens of the whole batch pooled (Σ −π_w / Σ|y_w|).
    """
    (pc,) = as_scores(policy_chosen=policy_chosen)
    return -per_unit(pc, chosen_lengths, "chosen_lengths")


@torch.no_grad()
def wpo_weights(chosen_aligned: Tensor, rejected_aligned: Tensor) -> Tensor:
    """WPO pair weights exp(a_w + a_l), detached: a = mean over the response's tokens of
    log π(y_t | x, y_<t) − log Σ_v π(v | x, y_<t)², the policy's length-normalised probability of the response
    aligned to its own sampling (``TextAdapter.wpo_logps``); multiply a pair's loss by it.

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", eq. 2; TRL 1.16's
    ``use_weighting`` (no clamp; TRL < 1.0 clamped the weight at 1).
    """
    a_w, a_l = as_scores(chosen_aligned=chosen_aligned, rejected_aligned=rejected_aligned)
    return torch.exp(a_w + a_l)
