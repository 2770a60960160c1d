"""Claims of the online-methods papers reproduced on the exact tabular adapter (HyPO, Nash-MD).

Every expected number is computed here, independently of genalign: closed forms with numpy, optima with scipy,
the regularised Nash equilibrium by a fixed-point iteration whose fixed point is, by construction, each player's
best response to the other.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, logit

from genalign.adapters.tabular import TabularAdapter
from genalign.online.judges import PreferenceMatrixJudge
from genalign.steps import StepContext, build_step


def train(adapter, step, rows, steps, lr0, decay):
    """Plain SGD on the step's mean loss with lr_k = lr0 / (1 + k / decay); returns π as numpy."""
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=lr0)
    ctx = StepContext(generator=torch.Generator().manual_seed(0))
    for k in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr0 / (1 + k / decay)
        loss, _ = step(adapter, rows, ctx)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return adapter.probs().detach().double().numpy()[0]


# ------------------------------------------------------------------------------------------ HyPO
MU = np.array([0.5, 0.02, 0.24, 0.24])  # actions 0, 1 covered by the offline pairs; 2, 3 never seen
BETA, P_1_OVER_0, LAM = 0.5, 0.8, 1.0


def hypo_rows():
    """40 offline pairs over the covered actions only: 32 say 1 ≻ 0 and 8 say 0 ≻ 1 (P(1 ≻ 0) = 0.8)."""
    n_1 = round(40 * P_1_OVER_0)
    return ([{"prompt": 0, "chosen": 1, "rejected": 0, "row": i} for i in range(n_1)]
            + [{"prompt": 0, "chosen": 0, "rejected": 1, "row": n_1 + i} for i in range(40 - n_1)])


def dpo_limit():
    """Offline DPO from the reference, in closed form. The DPO gradient w.r.t. the logits is along e_1 − e_0, so
    z_0 + z_1 and the unseen logits never move, and the loss is minimal at β·Δ = logit(p), Δ = log(π1/μ1) −
    log(π0/μ0): z_1 = log μ1 + d/2, z_0 = log μ0 − d/2 with d = logit(p)/β."""
    d = logit(P_1_OVER_0) / BETA
    z = np.log(MU)
    z[0] -= d / 2
    z[1] += d / 2
    return np.exp(z) / np.exp(z).sum()


def hypo_optimum():
    """argmin over logits of E_data[DPO] + λ·KL(π‖μ) with the exact KL (scipy BFGS)."""
    def objective(z):
        log_pi = z - np.log(np.exp(z).sum())
        delta = (log_pi[1] - np.log(MU[1])) - (log_pi[0] - np.log(MU[0]))
        dpo = -P_1_OVER_0 * np.log(expit(BETA * delta)) - (1 - P_1_OVER_0) * np.log(expit(-BETA * delta))
        return dpo + LAM * np.sum(np.exp(log_pi) * (log_pi - np.log(MU)))

    z = minimize(objective, np.log(MU), method="BFGS", options={"gtol": 1e-10}).x
    return np.exp(z) / np.exp(z).sum()


def test_hypo_partial_coverage_online_kl_keeps_unseen_actions_at_the_reference():
    """Song et al. 2024, "The Importance of Online Data: Understanding Preference Fine-tuning via Coverage":
    with offline pairs that cover only part of the responses (partial coverage), offline DPO is free to move
    probability onto responses it never saw (its loss does not constrain them), while HyPO's online KL(π‖ref),
    estimated on the policy's own samples, keeps them near the reference.

    Here the pairs cover actions {0, 1} only. DPO converges to its closed-form limit, which puts 0.701 of the mass
    on the unseen actions {2, 3} (the reference puts 0.48 there: ratio 1.46 on never-seen actions); HyPO converges
    to the optimum of DPO + λ·KL computed by scipy, with unseen mass 0.497 ≈ 0.48.
    """
    rows = hypo_rows()
    unseen = slice(2, None)
    dpo_expected, hypo_expected = dpo_limit(), hypo_optimum()
    assert dpo_expected[unseen].sum() == pytest.approx(0.7007, abs=1e-4)  # the closed form itself

    dpo_pi = train(TabularAdapter(1, 4, reference_probs=torch.tensor(MU[None]).float()),
                   build_step("dpo", beta=BETA), rows, steps=300, lr0=3.0, decay=50)
    np.testing.assert_allclose(dpo_pi, dpo_expected, atol=2e-3)

    hypo_pi = train(TabularAdapter(1, 4, reference_probs=torch.tensor(MU[None]).float()),
                    build_step("hypo", beta=BETA, lam=LAM), rows, steps=400, lr0=3.0, decay=50)
    np.testing.assert_allclose(hypo_pi, hypo_expected, atol=1e-2)

    assert dpo_pi[unseen].sum() - MU[unseen].sum() > 0.2  # DPO: +0.23 on actions no pair mentions
    assert abs(hypo_pi[unseen].sum() - MU[unseen].sum()) < 0.04  # HyPO: stays at the reference's 0.48
    kl = lambda pi: float(np.sum(pi * np.log(pi / MU)))  # noqa: E731
    assert kl(hypo_pi) < 0.5 * kl(dpo_pi)


# ------------------------------------------------------------------------------------------ Nash-MD
# P[a, b] = P(a ≻ b): 0 beats 1, 1 beats 2, 2 beats 0 — a cycle, so no Condorcet winner
PREFERENCE = np.array([[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]])
REFERENCE = np.array([0.6, 0.3, 0.1])
TAU = 0.2


def regularised_nash():
    """π* with π*(y) ∝ μ(y)·exp(P(y ≻ π*)/τ): the best response to π* in max_π P(π ≻ π*) − τ·KL(π‖μ) is π*
    itself, so (π*, π*) is the regularised game's Nash equilibrium. Damped fixed-point iteration."""
    pi = REFERENCE.copy()
    for _ in range(5000):
        response = REFERENCE * np.exp(PREFERENCE @ pi / TAU)
        pi = 0.9 * pi + 0.1 * response / response.sum()
    return pi


def bradley_terry_policy():
    """What a reward model cannot avoid: the maximum-likelihood BT reward of P, then the KL-regularised optimum
    μ·exp(r/τ) (the RLHF / DPO target)."""
    def nll(r):
        return -np.sum(PREFERENCE * np.log(expit(r[:, None] - r[None, :])))

    r = minimize(nll, np.zeros(3)).x
    pi = REFERENCE * np.exp(r / TAU)
    return pi / pi.sum()


def test_nash_md_last_iterate_reaches_the_regularised_nash_equilibrium_of_a_cyclic_preference():
    """Munos et al. 2023, "Nash Learning from Human Feedback": Nash-MD's last iterate converges to the
    regularised Nash equilibrium π* of the preference model, also when no Bradley–Terry reward represents the
    preference (here P is cyclic: 0 ≻ 1 ≻ 2 ≻ 0, no Condorcet winner).

    π* = (0.614, 0.131, 0.255) solves π* ∝ μ·exp(P(·≻π*)/τ); the BT route lands at (0.811, 0.053, 0.135), TV 0.20
    away. Nash-MD (REINFORCE with the ½ control variate, opponent from the mixture π^(1−c)·μ^c with small c) ends
    within TV 0.02 of π*: the mixture shifts the stationary point by O(c) (TV 0.005 at c = 0.05).
    """
    star = regularised_nash()
    np.testing.assert_allclose(star, REFERENCE * np.exp(PREFERENCE @ star / TAU)
                               / np.sum(REFERENCE * np.exp(PREFERENCE @ star / TAU)), atol=1e-10)
    bt = bradley_terry_policy()
    tv = lambda a, b: 0.5 * float(np.abs(a - b).sum())  # noqa: E731
    assert tv(star, bt) > 0.15

    adapter = TabularAdapter(1, 3, reference_probs=torch.tensor(REFERENCE[None]).float())
    step = build_step("nash_md", judge=PreferenceMatrixJudge(PREFERENCE), beta=TAU, mixture=0.05)
    pi = train(adapter, step, [{"prompt": 0, "row": i} for i in range(512)], steps=400, lr0=2.0, decay=100)
    assert tv(pi, star) < 0.02
    assert tv(pi, bt) > 0.15
    assert tv(REFERENCE, star) > 0.1  # it really moved
