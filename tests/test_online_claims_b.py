"""Paper claims reproduced exactly on the tabular adapter (issue 5): PMPO with rejected-only data, DRO's optimum.

Each expected answer is a closed form computed here in numpy, independently of the steps under test.
"""

import numpy as np
import torch

from genalign.adapters.tabular import TabularAdapter
from genalign.online.dro import DROStep
from genalign.online.pmpo import PMPOStep
from genalign.steps import StepContext

REFERENCE = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.55, 0.05, 0.25, 0.15]], dtype=torch.float64).float()


def train(adapter, step, rows, steps, lr):
    """Full-batch Adam on the policy, calling the step's optimizer hook like the trainer does."""
    optimizer = torch.optim.Adam(adapter.policy.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    ctx = StepContext(generator=torch.Generator().manual_seed(0))
    for k in range(steps):
        loss, _ = step(adapter, rows, ctx)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        step.on_optimizer_step(adapter, k + 1)
        schedule.step()
    return adapter.probs().detach().double().numpy()


def test_pmpo_rejected_only_moves_mass_away_without_collapse():
    """Abdolmaleki et al. 2024 (PMPO), "Preference Optimization as Probabilistic Inference": PMPO can learn from
    rejected samples alone; the KL(ref‖π) term keeps the solution from collapsing.

    Closed form: with only rejected samples (frequencies w over actions) the loss is
    (1−α)·Σ_a w_a log π_a + β·KL(ref‖π), minimised on the simplex at π_a = (β·ref_a − (1−α)·w_a) / (β − (1−α))
    (Lagrange condition, valid when β·ref_a > (1−α)·w_a). Without the KL term the rejected mass goes to zero.
    """
    ref = REFERENCE[0].double().numpy()
    rejected = [3, 3, 2]  # action 3 twice, action 2 once
    rows = [{"prompt": 0, "response": a, "desirable": False} for a in rejected]
    alpha, beta = 0.5, 2.0
    w = np.bincount(rejected, minlength=4) / len(rejected)
    c = 1 - alpha
    expected = (beta * ref - c * w) / (beta - c)

    adapter = TabularAdapter(1, 4, reference_probs=REFERENCE[:1])
    got = train(adapter, PMPOStep(alpha=alpha, beta=beta, kl="exact"), rows, steps=300, lr=0.1)[0]
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert got[2] < ref[2] and got[3] < ref[3]  # mass moved away from both rejected actions
    assert got[0] > ref[0] and got[1] > ref[1]
    assert got.min() > 0.1  # nothing collapses: every action keeps a sizeable share

    free = TabularAdapter(1, 4, reference_probs=REFERENCE[:1])
    collapsed = train(free, PMPOStep(alpha=alpha, beta=0.0, kl="exact"), rows, steps=300, lr=0.1)[0]
    assert collapsed[2] + collapsed[3] < 0.02  # without the KL term the rejected actions are driven to ~0


def test_dro_recovers_the_kl_regularised_optimum_from_single_trajectory_rewards():
    """Richemond et al. 2024 (DRO), "Offline Regularised Reinforcement Learning for Large Language Models
    Alignment": minimising ½(R − V(x) − τ log π(y|x)/ref(y|x))² over single-trajectory data (x, y, R) with a jointly
    learned value recovers π*(y|x) ∝ ref(y|x)·exp(R̄(x, y)/τ) and V*(x) = τ·log Σ_y ref(y|x)·exp(R̄(x, y)/τ).

    The data are thumbs-up/down (Bernoulli) rewards, several per (context, action); R̄ is their empirical mean.
    """
    rng = np.random.default_rng(0)
    tau = 0.5
    p_up = rng.uniform(0.1, 0.9, size=(2, 4))
    rows, totals = [], np.zeros((2, 4))
    for c in range(2):
        for a in range(4):
            for _ in range(5):
                r = float(rng.random() < p_up[c, a])
                totals[c, a] += r
                rows.append({"prompt": c, "response": a, "reward": r})
    mean_reward = totals / 5
    ref = REFERENCE.double().numpy()
    unnormalised = ref * np.exp(mean_reward / tau)
    expected = unnormalised / unnormalised.sum(1, keepdims=True)
    expected_value = tau * np.log(unnormalised.sum(1))

    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    step = DROStep(tau=tau, value_lr=0.1, reward_range=[0.0, 1.0])
    got = train(adapter, step, rows, steps=500, lr=0.1)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    value = step.value([0, 1]).detach().double().numpy()
    np.testing.assert_allclose(value, expected_value, atol=5e-3)
    assert not np.allclose(expected, ref, atol=0.05)  # the optimum really differs from the reference
