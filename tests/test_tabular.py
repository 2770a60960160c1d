"""The exact tabular adapter, and the ΨPO paper's DPO-vs-IPO claim checked on it.

Every expected value here is computed independently of the adapter (numpy formulas and closed forms).
"""

import math

import numpy as np
import pytest
import torch

from genalign.adapters.tabular import TabularAdapter, TabularPolicy
from genalign.objectives import dpo, ipo
from genalign.types import PairwiseBatch

REFERENCE = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.55, 0.05, 0.25, 0.15]])


def random_adapter(seed=0):
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    with torch.no_grad():
        adapter.policy.logits.copy_(torch.randn(2, 4, generator=torch.Generator().manual_seed(seed)))
    return adapter


def pair_batch(adapter, pairs, context=0):
    """A PairwiseBatch of (chosen action, rejected action) pairs under one context."""
    chosen = adapter.collate([{"prompt": context, "response": w} for w, _ in pairs])
    rejected = adapter.collate([{"prompt": context, "response": l} for _, l in pairs])
    return PairwiseBatch(chosen=chosen, rejected=rejected, size=len(pairs))


def np_kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def chi_square_pvalue(counts, expected):
    """Pearson's goodness-of-fit p-value: P[χ²_{k−1} ≥ Σ (O − E)²/E] = Q((k−1)/2, stat/2)."""
    stat = float(np.sum((counts - expected) ** 2 / expected))
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2), torch.tensor(stat / 2)).item()


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------ 1. exact scores, sampling
def test_scores_are_log_softmax_of_the_tables():
    adapter = random_adapter()
    records = [{"prompt": c, "response": a} for c in range(2) for a in (3, 0, 2)]
    samples = adapter.collate(records)
    scores = adapter.score(samples)
    expected_policy = np_log_softmax(adapter.policy.logits.detach().numpy())
    expected_reference = np.log(REFERENCE.numpy())
    for i, r in enumerate(records):
        assert scores.policy[i].item() == pytest.approx(expected_policy[r["prompt"], r["response"]], abs=1e-6)
        assert scores.reference[i].item() == pytest.approx(expected_reference[r["prompt"], r["response"]], abs=1e-6)
    assert scores.policy.requires_grad and not scores.reference.requires_grad
    assert scores.lengths.tolist() == [1] * len(records)
    assert adapter.score(samples, with_reference=False).reference is None
    both = adapter.concat([samples, adapter.collate(records[:2])])
    assert both["context"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0] and both["action"].tolist() == [3, 0, 2, 3, 0, 2, 3, 0]
    # score_pairs: one concatenated forward, split back into chosen (context 0) and rejected (context 1)
    pairs = PairwiseBatch(chosen=adapter.collate(records[:3]), rejected=adapter.collate(records[3:]), size=3)
    chosen, rejected = adapter.score_pairs(pairs)
    torch.testing.assert_close(chosen.policy, scores.policy[:3])
    torch.testing.assert_close(rejected.reference, scores.reference[3:])


def test_exact_divergences_match_numpy():
    adapter = random_adapter(seed=1)
    pi = np.exp(np_log_softmax(adapter.policy.logits.detach().numpy()))
    ref = REFERENCE.numpy().astype(np.float64)
    np.testing.assert_allclose(adapter.probs().detach().numpy(), pi, atol=1e-6)
    np.testing.assert_allclose(adapter.reference_probs().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(adapter.kl_to_reference().detach().numpy(), [np_kl(pi[c], ref[c]) for c in range(2)], atol=1e-5)
    np.testing.assert_allclose(adapter.reverse_kl().detach().numpy(), [np_kl(ref[c], pi[c]) for c in range(2)], atol=1e-5)
    assert TabularAdapter(2, 4, REFERENCE).kl_to_reference().abs().max() < 1e-6  # init="reference"
    torch.testing.assert_close(TabularAdapter(2, 4, REFERENCE, init="uniform").probs(), torch.full((2, 4), 0.25))


@pytest.mark.parametrize("use_reference", [False, True])
def test_sampling_frequencies_match_probabilities(use_reference):
    adapter = random_adapter(seed=2)
    n = 20_000
    conditions = torch.tensor([1, 0])
    out = adapter.sample(conditions, n, generator=torch.Generator().manual_seed(7), use_reference=use_reference)
    assert out["context"].tolist() == [1] * n + [0] * n  # condition-major
    probs = (adapter.reference_probs() if use_reference else adapter.probs()).detach().numpy().astype(np.float64)
    for j, c in enumerate(conditions.tolist()):
        counts = np.bincount(out["action"][j * n:(j + 1) * n].numpy(), minlength=4)
        expected = probs[c] / probs[c].sum() * n
        assert chi_square_pvalue(counts, expected) > 1e-3
        np.testing.assert_allclose(counts / n, probs[c], atol=0.015)


def test_bad_records_and_tables_are_named():
    adapter = TabularAdapter(2, 4)
    with pytest.raises(ValueError, match=r"record 1: field 'response' = 4 is out of range \[0, 4\)"):
        adapter.collate([{"prompt": 0, "response": 1}, {"prompt": 1, "response": 4}])
    with pytest.raises(ValueError, match=r"record 0: missing field 'prompt'"):
        adapter.collate([{"response": 1}])
    with pytest.raises(ValueError, match=r"record 0: field 'prompt' must be an integer index, got 0.5"):
        adapter.collate([{"prompt": 0.5, "response": 1}])
    with pytest.raises(ValueError, match=r"row 1 sums to 0\.9"):
        TabularAdapter(2, 2, torch.tensor([[0.5, 0.5], [0.4, 0.5]]))
    with pytest.raises(ValueError, match="strictly positive"):
        TabularAdapter(1, 2, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        TabularAdapter(2, 4, torch.full((4,), 0.25))
    with pytest.raises(ValueError, match=r"context indices in \[0, 2\)"):
        adapter.sample(torch.tensor([2]), 3)


def test_save_and_load_round_trip(tmp_path):
    adapter = random_adapter(seed=3)
    adapter.save(str(tmp_path))
    loaded = TabularAdapter.load(str(tmp_path))
    torch.testing.assert_close(loaded.probs(), adapter.probs(), atol=0, rtol=0)
    torch.testing.assert_close(loaded.reference_probs(), adapter.reference_probs(), atol=1e-7, rtol=0)
    assert isinstance(loaded.policy, TabularPolicy) and loaded.trainable_parameters() == [loaded.policy.logits]


# ------------------------------------------------------------------------------------------ 2. the ΨPO paper's claim
BETAS = (0.05, 0.1, 0.5, 1.0, 5.0)
STEPS = 200


def optimise(objective, beta, pairs):
    """Minimise the expected loss over the (uniform) pair distribution exactly: full batch, Adam, float64.

    Returns the adapter and π(rejected action of the first pair) after every step.
    """
    adapter = TabularAdapter(1, 3)  # uniform reference, policy initialised at the reference
    adapter.policy.double()
    batch = pair_batch(adapter, pairs)
    optimiser = torch.optim.Adam(adapter.policy.parameters(), lr=1.0)
    trajectory = []
    for _ in range(STEPS):
        chosen, rejected = adapter.score_pairs(batch)
        loss = objective(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=beta).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        trajectory.append(adapter.policy.log_probs()[0, pairs[0][1]].exp().item())
    return adapter, trajectory


def log_ratio_gap(adapter, w, l):
    """Δ = log(π_w/ref_w) − log(π_l/ref_l) for context 0."""
    r = (adapter.unwrapped_policy.log_probs() - adapter.reference.log_probs()).detach()[0]
    return (r[w] - r[l]).item()


def test_psipo_claim_dpo_overfits_deterministic_preferences_ipo_stays_regularised():
    """Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences" (ΨPO).

    Claim (the weak-regularisation analysis of DPO in Sec. 4, illustrated on a bandit in Sec. 5): with
    deterministic preferences (y_w ≻ y_l with probability 1) DPO's KL regularisation is ineffective: the optimum
    sets π(y_l) = 0 whatever the regularisation strength, because −log σ(βΔ) keeps decreasing as Δ → ∞. IPO
    regresses Δ onto a finite target, so its optimum stays regularised towards the reference.

    Setting: one context, three actions, uniform reference, the data is the single pair (y0 ≻ y1) observed with
    preference probability 1; the expected loss is minimised exactly (full batch, no sampling noise).

    Parametrisation: the paper's IPO loss is (h_π(y_w, y_l) − τ⁻¹/2)² with τ the KL weight in
    max_π E[p(y ≻ μ)] − τ·KL(π‖ref); here ``ipo(..., beta)`` = (Δ − 1/(2β))², so β = τ, and DPO's −log σ(βΔ) uses
    the same β = τ. Larger β is *stronger* regularisation. Hence, in this parametrisation, IPO's optimum moves
    towards the reference as β *grows* (the target gap 1/(2β) → 0) and away from it as β shrinks; "close to the
    reference as β shrinks" would hold only for an inverse-temperature convention, not this one.

    Closed form: IPO's minimiser has Δ* = 1/(2β). The softmax normaliser cancels in Δ and the gradients on
    y0's and y1's logits are opposite, so from the reference z0 = −z1 shift symmetrically and y2's logit (never in
    the data) does not move: π* ∝ ref · (e^{1/(4β)}, e^{−1/(4β)}, 1).
    """
    ipo_kls, ipo_rejected = [], []
    for beta in BETAS:
        target = 1 / (2 * beta)
        # IPO: finite optimum, gap exactly 1/(2β), policy equal to the closed form
        adapter, _ = optimise(ipo, beta, [(0, 1)])
        assert log_ratio_gap(adapter, 0, 1) == pytest.approx(target, abs=1e-3)
        closed = np.exp([target / 2, -target / 2, 0.0]) / np.exp([target / 2, -target / 2, 0.0]).sum()
        np.testing.assert_allclose(adapter.probs().detach().numpy()[0], closed, atol=1e-4)
        kl = adapter.kl_to_reference().item()
        assert kl == pytest.approx(float(np.sum(closed * np.log(closed * 3))), abs=1e-4)
        ipo_kls.append(kl)
        ipo_rejected.append(adapter.probs()[0, 1].item())

        # DPO, same β: π(y_l) falls at every step, ends near 0, the gradient still pushes it down (no optimum)
        adapter, trajectory = optimise(dpo, beta, [(0, 1)])
        assert all(b < a for a, b in zip(trajectory, trajectory[1:]))
        assert trajectory[-1] < 1e-3 and trajectory[-1] < 1e-2 * closed[1]
        assert log_ratio_gap(adapter, 0, 1) > 2 * target  # overshoots IPO's finite gap; unbounded in the limit
        adapter.policy.zero_grad()
        chosen, rejected = adapter.score_pairs(pair_batch(adapter, [(0, 1)]))
        dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=beta).sum().backward()
        grad = adapter.policy.logits.grad[0]
        assert grad[1] > 0 > grad[0]  # descent keeps lowering the rejected logit: no stationary point
        assert adapter.kl_to_reference().item() > 0.9 * math.log(3)  # near a deterministic policy, whatever β

    # IPO's KL to the reference shrinks monotonically as the regularisation β grows, towards 0
    assert all(b < a for a, b in zip(ipo_kls, ipo_kls[1:]))
    assert ipo_kls[-1] < 1e-3
    assert all(b > a for a, b in zip(ipo_rejected, ipo_rejected[1:]))  # and π(y_l) returns towards ref = 1/3


def test_psipo_total_order_ipo_keeps_finite_gaps():
    """Same paper and bandit, a deterministic total order: pairs (y0 ≻ y1), (y1 ≻ y2), (y0 ≻ y2), uniformly.

    IPO minimises (u − t)² + (v − t)² + (u + v − t)² with u = Δ(y0, y1), v = Δ(y1, y2), t = 1/(2β), so
    u* = v* = 2t/3 (and Δ(y0, y2) = 4t/3): the order is kept with finite, β-controlled gaps. DPO sends both the
    middle and the worst action to probability 0.
    """
    pairs = [(0, 1), (1, 2), (0, 2)]
    for beta in (0.1, 1.0):
        t = 1 / (2 * beta)
        adapter, _ = optimise(ipo, beta, pairs)
        assert log_ratio_gap(adapter, 0, 1) == pytest.approx(2 * t / 3, abs=1e-3)
        assert log_ratio_gap(adapter, 1, 2) == pytest.approx(2 * t / 3, abs=1e-3)
        adapter, _ = optimise(dpo, beta, pairs)
        probs = adapter.probs()[0]
        assert probs[1] < 1e-2 and probs[2] < 1e-3 and probs[0] > 0.99


# ------------------------------------------------------------------------------------------ 3. gradient direction
@pytest.mark.parametrize("objective, beta", [(dpo, 0.5), (ipo, 0.05)])
def test_one_step_raises_chosen_and_lowers_rejected(objective, beta):
    adapter = random_adapter(seed=4)
    batch = PairwiseBatch(
        chosen=adapter.collate([{"prompt": 0, "response": 2}, {"prompt": 1, "response": 1}]),
        rejected=adapter.collate([{"prompt": 0, "response": 0}, {"prompt": 1, "response": 3}]),
        size=2,
    )
    z = adapter.policy.logits.detach().double()
    delta = [(z[c, w] - z[c, l]) - math.log(REFERENCE[c, w] / REFERENCE[c, l]) for c, w, l in ((0, 2, 0), (1, 1, 3))]
    if objective is ipo:  # IPO moves towards the chosen action only while Δ < 1/(2β)
        assert all(d < 1 / (2 * beta) for d in delta)
    before = adapter.unwrapped_policy.log_probs().detach().clone()
    chosen, rejected = adapter.score_pairs(batch)
    loss = objective(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=beta).sum()
    loss.backward()
    if objective is dpo:  # ∂/∂z[c, w] = −β σ(−βΔ) = −∂/∂z[c, l]; the normaliser cancels in Δ, other logits get 0
        expected = torch.zeros(2, 4, dtype=torch.float64)
        for (c, w, l), d in zip(((0, 2, 0), (1, 1, 3)), delta):
            g = beta * torch.sigmoid(-beta * d)
            expected[c, w], expected[c, l] = -g, g
        torch.testing.assert_close(adapter.policy.logits.grad.double(), expected, atol=1e-6, rtol=1e-5)
    torch.optim.SGD(adapter.policy.parameters(), lr=0.1).step()
    after = adapter.unwrapped_policy.log_probs().detach()
    assert after[0, 2] > before[0, 2] and after[1, 1] > before[1, 1]  # chosen up
    assert after[0, 0] < before[0, 0] and after[1, 3] < before[1, 3]  # rejected down
