"""Objectives on unpaired samples: binary labels (KTO, PMPO), scalar rewards (DRO) and exploration terms (SELM).

Inputs are per-sample scores ``[N]`` (higher = more likely), as in :mod:`genalign.objectives.pairwise`; outputs
are per-example losses ``[N]`` in at least float32. Reference scores are treated as constants (detached).
"""

from __future__ import annotations

import torch

from genalign.objectives._checks import as_estimate, as_mask, as_scores, in_range, positive

Tensor = torch.Tensor


def kto(policy: Tensor, reference: Tensor, desirable: Tensor, *, beta: float = 0.1,
        kl: Tensor | float | None = None, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> Tensor:
    """KTO: λ_D(1 − σ(β(r − z))) for desirable samples, λ_U(1 − σ(β(z − r))) for undesirable ones.

    r = π − ref; z = clamp(kl, min=0), detached, the reference point. ``kl`` defaults to mean(π − ref) over this
    batch (Diffusion-KTO's estimate); pass a gathered or mismatched-pair estimate (scalar or ``[N]``) instead
    when you have one. Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization";
    Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility" (Diffusion-KTO).
    """
    positive("beta", beta)
    in_range("desirable_weight", desirable_weight, 0.0)
    in_range("undesirable_weight", undesirable_weight, 0.0)
    pi, ref = as_scores(policy=policy, reference=reference)
    desirable = as_mask("desirable", desirable, pi.shape[0])
    r = pi - ref.detach()
    z = (r.mean() if kl is None else as_estimate("kl", kl, r.shape[0], like=r)).clamp(min=0).detach()
    sign = torch.where(desirable, r.new_tensor(1.0), r.new_tensor(-1.0))
    weight = torch.where(desirable, r.new_tensor(desirable_weight), r.new_tensor(undesirable_weight))
    return weight * torch.sigmoid(-beta * sign * (r - z))  # 1 − σ(x) = σ(−x), exact in the tails


def direct_reward(policy: Tensor, reference: Tensor, reward: Tensor, value: Tensor, *, tau: float = 1.0) -> Tensor:
    """DRO: ½(R − V − τ(π − ref))² on single-trajectory data (x, y, R), with a learned value V(x).

    Gradients reach both the policy score and the value; the reward is a constant target. Richemond et al.
    2024, "Offline Regularised Reinforcement Learning for Large Language Models Alignment".
    """
    positive("tau", tau)
    pi, ref, r, v = as_scores(policy=policy, reference=reference, reward=reward, value=value)
    return 0.5 * (r.detach() - v - tau * (pi - ref.detach())) ** 2


def pmpo(policy: Tensor, accepted: Tensor, *, kl: Tensor | float, alpha: float = 0.5, beta: float = 0.1) -> Tensor:
    """Preference EM (PMPO): batch mean = −α·mean_acc(π) + (1−α)·mean_rej(π) + β·mean(kl).

    Per example: accepted rows −α·π·N/n_acc, rejected rows (1−α)·π·N/n_rej, plus β·kl, so the batch mean is
    the formula above and a batch with only accepted or only rejected samples still works. ``kl`` is the
    caller's KL(ref‖π) estimate, scalar or ``[N]`` (exact for tabular policies, log ref − log π on reference
    samples otherwise); it keeps its gradient. Abdolmaleki et al. 2024, "Preference Optimization as
    Probabilistic Inference".
    """
    in_range("alpha", alpha, 0.0, 1.0)
    in_range("beta", beta, 0.0)
    (pi,) = as_scores(policy=policy)
    accepted = as_mask("accepted", accepted, pi.shape[0])
    n = pi.shape[0]
    n_acc = accepted.sum().to(pi.dtype)
    n_rej = n - n_acc
    weight = torch.where(accepted, -alpha * n / n_acc.clamp(min=1), (1 - alpha) * n / n_rej.clamp(min=1))
    return weight * pi + beta * as_estimate("kl", kl, n, like=pi)


def selm_optimism(policy: Tensor, reference: Tensor, *, alpha: float = 0.001, beta: float = 0.1) -> Tensor:
    """SELM optimism term α·β·(π − ref) on samples drawn from the reference; add it to the DPO loss.

    Minimising it lowers the policy's likelihood of what the reference already produces, steering exploration
    toward responses it has not seen. Zhang et al. 2024, "Self-Exploring Language Models: Active Preference
    Elicitation for Online Alignment".
    """
    positive("alpha", alpha)
    positive("beta", beta)
    pi, ref = as_scores(policy=policy, reference=reference)
    return alpha * beta * (pi - ref.detach())
