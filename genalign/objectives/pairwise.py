"""Pairwise preference objectives: per-pair losses from chosen/rejected scores under the policy and the reference.

Scores are log-likelihoods (higher = more likely): summed completion log-probs for a language model, the negative
denoising error for diffusion. With r = π − ref per side, Δ = r_w − r_l is the implicit reward margin. Every
function returns a per-example loss ``[B]`` (no reduction) in at least float32; reference scores are treated as
constants (detached).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from genalign.objectives._checks import as_scores, in_range, paired_lengths, per_unit, positive, probabilities

Tensor = torch.Tensor


def _log_ratios(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                reference_rejected: Tensor, chosen_lengths: Tensor | None = None,
                rejected_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(r_w, r_l) with r = π − ref, optionally divided by the scored length of each side."""
    pc, pr, rc, rr = as_scores(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                               reference_chosen=reference_chosen, reference_rejected=reference_rejected)
    paired_lengths(chosen_lengths, rejected_lengths)
    return (per_unit(pc - rc.detach(), chosen_lengths, "chosen_lengths"),
            per_unit(pr - rr.detach(), rejected_lengths, "rejected_lengths"))


def _binary_logistic(logits: Tensor, p: Tensor | float) -> Tensor:
    """Binary cross-entropy with target p on logits: −[p log σ(x) + (1−p) log σ(−x)], stable for huge |x|."""
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


def dpo(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
        *, beta: float = 0.1, label_smoothing: float = 0.0, chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None) -> Tensor:
    """DPO: −(1−ε) log σ(βΔ) − ε log σ(−βΔ).

    ε = 0 is DPO (Rafailov et al. 2023, "Direct Preference Optimization"); ε > 0 is conservative DPO (cDPO,
    labels flipped with probability ε). On diffusion scores this is Diffusion-DPO (Wallace et al. 2023). With
    ``chosen_lengths``/``rejected_lengths`` each side's r is divided by its token count first (TRL's
    ``sigmoid_norm``).
    """
    positive("beta", beta)
    eps = in_range("label_smoothing", label_smoothing, 0.0, 0.5)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                           chosen_lengths, rejected_lengths)
    return _binary_logistic(beta * (r_w - r_l), 1.0 - eps)


def robust_dpo(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
               reference_rejected: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.1) -> Tensor:
    """Robust DPO: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε), unbiased under label-flip rate ε < 0.5.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback".
    """
    positive("beta", beta)
    eps = in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    x = beta * (r_w - r_l)
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def ipo(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
        *, beta: float = 0.1, chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None) -> Tensor:
    """IPO: (Δ − 1/(2β))², regressing the margin onto 1/(2β).

    With ``chosen_lengths``/``rejected_lengths`` each side's scores are divided by its token count first
    (per-token means, as TRL does). Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences" (ΨPO with identity Ψ).
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                           chosen_lengths, rejected_lengths)
    return (r_w - r_l - 1 / (2 * beta)) ** 2


def slic(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
         *, beta: float = 1.0, delta: float = 1.0) -> Tensor:
    """SLiC calibration hinge: max(0, δ − βΔ). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration"."""
    positive("beta", beta)
    in_range("delta", delta, 0.0)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return F.relu(delta - beta * (r_w - r_l))


GPO_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "logistic": lambda x: -F.logsigmoid(x),  # log(1 + e^{−x}): DPO
    "hinge": lambda x: F.relu(1 - x),  # SLiC
    "squared": lambda x: (x - 1) ** 2,  # IPO-like
    "exponential": lambda x: torch.exp(-x),
    "truncated_quadratic": lambda x: F.relu(1 - x) ** 2,
    "savage": lambda x: torch.sigmoid(-x) ** 2,  # 1 / (1 + e^{x})²
}


def gpo(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
        *, beta: float = 0.1, loss: str = "logistic") -> Tensor:
    """GPO: f(βΔ) for a convex (or Savage) classification loss f, see ``GPO_LOSSES``.

    Tang et al. 2024, "Generalized Preference Optimization: A Unified Approach to Offline Alignment".
    The exponential loss grows as e^{−βΔ} and is the only one that can overflow for very negative margins.
    """
    positive("beta", beta)
    if loss not in GPO_LOSSES:
        raise ValueError(f"unknown GPO loss {loss!r}; valid: {', '.join(GPO_LOSSES)}")
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return GPO_LOSSES[loss](beta * (r_w - r_l))


def simpo(policy_chosen: Tensor, policy_rejected: Tensor, *, beta: float = 2.0, gamma: float = 1.0,
          chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> Tensor:
    """SimPO: −log σ(β(avg_w − avg_l) − γ), avg = score / length (the score itself without lengths); no reference.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward".
    """
    positive("beta", beta)
    in_range("gamma", gamma, 0.0)
    pc, pr = as_scores(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    paired_lengths(chosen_lengths, rejected_lengths)
    margin = per_unit(pc, chosen_lengths, "chosen_lengths") - per_unit(pr, rejected_lengths, "rejected_lengths")
    return -F.logsigmoid(beta * margin - gamma)


def soft_preference(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                    reference_rejected: Tensor, *, beta: float = 0.1, strength: Tensor | float) -> Tensor:
    """Soft-label DPO: −[p log σ(βΔ) + (1−p) log σ(−βΔ)], p ∈ [0, 1] the probability that chosen is preferred.

    p = 1 is DPO, p = 0.5 pulls the margin to zero. Zhai et al. 2024 (OSP, soft preference strengths).
    """
    positive("beta", beta)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    p = probabilities("strength", strength, r_w.shape[0], like=r_w)
    return _binary_logistic(beta * (r_w - r_l), p)


def diffusion_dro(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                  reference_rejected: Tensor, *, margin: float = 1e-3) -> Tensor:
    """Diffusion-DRO: relu(m − Δ), chosen = expert demonstration, rejected = the policy's own sample.

    In denoising errors L = −s this is relu([(Le_θ − Le_ref) − (Lp_θ − Lp_ref)] + m). Wu et al. 2025
    (Diffusion-DRO, NeurIPS 2025).
    """
    in_range("margin", margin, 0.0)
    r_w, r_l = _log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return F.relu(margin - (r_w - r_l))


def sopo(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
         *, rejected_reward: Tensor, similarity: Tensor, beta: float = 1.0, threshold: float = 0.45,
         c: float = 2.0) -> Tensor:
    """SoPo: −log σ(β_w·r_w − mask·β·r_l), β_w = β(c − S), mask = [reward(x_l) < threshold].

    Chosen is the offline ground truth, rejected the lowest-reward of the policy's own samples; S ∈ [0, 1] is
    their similarity, so a near-duplicate pair gets a smaller chosen weight, and a rejected sample that already
    scores well (reward ≥ threshold) is not pushed down. ``rejected_reward`` and ``similarity`` are constants.
    Tan et al. 2025, "SoPo: Text-to-Motion Generation Using Semi-Online Preference Optimization".
    """
    positive("beta", beta)
    in_range("c", c, 1.0)
    *scores, reward, sim = as_scores(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                                     reference_chosen=reference_chosen, reference_rejected=reference_rejected,
                                     rejected_reward=rejected_reward, similarity=similarity)
    r_w, r_l = _log_ratios(*scores)
    sim = probabilities("similarity", sim, sim.shape[0], like=sim)
    mask = (reward.detach() < threshold).to(r_l.dtype)
    return -F.logsigmoid(beta * (c - sim) * r_w - mask * beta * r_l)
