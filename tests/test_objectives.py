"""genalign.objectives: values against independently computed formulas, invariants, gradients, stability."""

import math

import numpy as np
import pytest
import torch

import genalign.objectives as O

LN2 = math.log(2.0)

# four hand-made pairs: policy/reference scores for chosen (w) and rejected (l)
PC = np.array([-1.0, -2.5, 0.3, -0.7])
PR = np.array([-1.5, -2.0, -0.4, -0.7])
RC = np.array([-1.2, -2.2, 0.1, -0.5])
RR = np.array([-1.1, -2.6, -0.2, -0.9])
DELTA = (PC - RC) - (PR - RR)  # [0.6, -0.9, 0.4, -0.4]


def t(x, dtype=torch.float64, grad=False):
    return torch.tensor(np.asarray(x, dtype=float), dtype=dtype, requires_grad=grad)


def scores(grad=False):
    return t(PC, grad=grad), t(PR, grad=grad), t(RC), t(RR)


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def check(loss, expected):
    assert loss.shape == (len(expected),)
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- values against the formulas


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_matches_formula(eps):
    x = 0.5 * DELTA
    check(O.dpo(*scores(), beta=0.5, label_smoothing=eps), -(1 - eps) * np_logsig(x) - eps * np_logsig(-x))


def test_robust_dpo_matches_formula_and_reduces_to_dpo():
    x = 0.5 * DELTA
    eps = 0.2
    expected = (-(1 - eps) * np_logsig(x) + eps * np_logsig(-x)) / (1 - 2 * eps)
    check(O.robust_dpo(*scores(), beta=0.5, label_smoothing=eps), expected)
    assert torch.equal(O.robust_dpo(*scores(), beta=0.5, label_smoothing=0.0), O.dpo(*scores(), beta=0.5))
    with pytest.raises(ValueError, match="label_smoothing"):
        O.robust_dpo(*scores(), label_smoothing=0.5)


def test_ipo_matches_formula_with_and_without_lengths():
    beta = 0.25
    check(O.ipo(*scores(), beta=beta), (DELTA - 1 / (2 * beta)) ** 2)
    lw, ll = np.array([2.0, 4.0, 1.0, 5.0]), np.array([3.0, 1.0, 2.0, 2.0])
    per_token = (PC / lw - RC / lw) - (PR / ll - RR / ll)
    loss = O.ipo(*scores(), beta=beta, chosen_lengths=torch.tensor([2, 4, 1, 5]),
                 rejected_lengths=torch.tensor([3, 1, 2, 2]))
    check(loss, (per_token - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        O.ipo(*scores(), chosen_lengths=torch.ones(4))
    with pytest.raises(ValueError, match="chosen_lengths must be positive"):
        O.ipo(*scores(), chosen_lengths=torch.tensor([1, 0, 1, 1]), rejected_lengths=torch.ones(4))


def test_ipo_optimum_at_half_inverse_beta():
    beta = 0.2
    pc = t([0.1 + 1 / (2 * beta)], grad=True)
    loss = O.ipo(pc, t([0.0]), t([0.1]), t([0.0]), beta=beta)
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_slic_matches_formula():
    check(O.slic(*scores(), beta=2.0, delta=0.5), np.maximum(0.0, 0.5 - 2.0 * DELTA))
    assert O.slic(*scores(), beta=2.0, delta=0.5)[0] == 0.0  # 2·0.6 ≥ 0.5: hinge inactive


GPO_NUMPY = {
    "logistic": lambda x: np.log1p(np.exp(-x)),
    "hinge": lambda x: np.maximum(0.0, 1 - x),
    "squared": lambda x: (x - 1) ** 2,
    "exponential": lambda x: np.exp(-x),
    "truncated_quadratic": lambda x: np.maximum(0.0, 1 - x) ** 2,
    "savage": lambda x: 1 / (1 + np.exp(x)) ** 2,
}


@pytest.mark.parametrize("name", sorted(GPO_NUMPY))
def test_gpo_matches_formula(name):
    check(O.gpo(*scores(), beta=1.5, loss=name), GPO_NUMPY[name](1.5 * DELTA))


def test_gpo_logistic_is_dpo_and_unknown_loss_lists_valid():
    assert set(O.GPO_LOSSES) == set(GPO_NUMPY)
    assert torch.equal(O.gpo(*scores(), beta=0.3, loss="logistic"), O.dpo(*scores(), beta=0.3))
    with pytest.raises(ValueError, match="unknown GPO loss 'cubic'.*logistic.*savage"):
        O.gpo(*scores(), loss="cubic")


def test_simpo_matches_formula():
    beta, gamma = 2.0, 0.7
    check(O.simpo(t(PC), t(PR), beta=beta, gamma=gamma), -np_logsig(beta * (PC - PR) - gamma))
    lw, ll = np.array([2.0, 4.0, 1.0, 5.0]), np.array([3.0, 1.0, 2.0, 2.0])
    loss = O.simpo(t(PC), t(PR), beta=beta, gamma=gamma, chosen_lengths=t(lw), rejected_lengths=t(ll))
    check(loss, -np_logsig(beta * (PC / lw - PR / ll) - gamma))


def test_soft_preference_matches_formula_and_reduces_to_dpo():
    p = np.array([1.0, 0.8, 0.5, 0.1])
    x = 0.5 * DELTA
    check(O.soft_preference(*scores(), beta=0.5, strength=t(p)), -(p * np_logsig(x) + (1 - p) * np_logsig(-x)))
    check(O.soft_preference(*scores(), beta=0.5, strength=0.7), -(0.7 * np_logsig(x) + 0.3 * np_logsig(-x)))
    assert torch.equal(O.soft_preference(*scores(), beta=0.5, strength=1.0), O.dpo(*scores(), beta=0.5))
    with pytest.raises(ValueError, match="strength must lie in"):
        O.soft_preference(*scores(), strength=t([0.5, 1.2, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"strength must be a float or a tensor of shape \[\] or \[4\]"):
        O.soft_preference(*scores(), strength=t([0.5, 0.5]))


def test_diffusion_dro_score_and_denoising_error_forms():
    m = 0.05
    check(O.diffusion_dro(*scores(), margin=m), np.maximum(0.0, m - DELTA))
    # the paper's form in denoising errors L = −s: relu([(Le_θ − Le_ref) − (Lp_θ − Lp_ref)] + m)
    le_theta, lp_theta = np.array([0.25, 0.31, 0.12]), np.array([0.25, 0.30, 0.50])
    le_ref, lp_ref = np.array([0.22, 0.30, 0.12]), np.array([0.21, 0.33, 0.41])
    expected = np.maximum(0.0, (le_theta - le_ref) - (lp_theta - lp_ref) + m)
    loss = O.diffusion_dro(t(-le_theta), t(-lp_theta), t(-le_ref), t(-lp_ref), margin=m)
    check(loss, expected)
    assert expected[0] > 0 and expected[2] == 0.0  # one active, one satisfied pair
    # hinge is zero once Δ ≥ m
    assert O.diffusion_dro(t([m]), t([0.0]), t([0.0]), t([0.0]), margin=m).item() == 0.0
    assert O.diffusion_dro(t([2.0]), t([0.0]), t([0.0]), t([0.0]), margin=m).item() == 0.0


def test_sopo_matches_formula():
    beta, c, threshold = 1.5, 2.0, 0.45
    reward = np.array([0.1, 0.9, 0.3, 0.45])
    sim = np.array([0.2, 0.5, 1.0, 0.0])
    mask = (reward < threshold).astype(float)  # [1, 0, 1, 0]
    expected = -np_logsig(beta * (c - sim) * (PC - RC) - mask * beta * (PR - RR))
    check(O.sopo(*scores(), rejected_reward=t(reward), similarity=t(sim), beta=beta, threshold=threshold, c=c),
          expected)


def test_sopo_reduces_to_dpo_when_weights_are_plain():
    # S = c − 1 makes β_w = β, reward below the threshold makes mask = 1
    loss = O.sopo(*scores(), rejected_reward=t([0.0] * 4), similarity=t([1.0] * 4), beta=0.7, c=2.0)
    torch.testing.assert_close(loss, O.dpo(*scores(), beta=0.7), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="similarity must lie in"):
        O.sopo(*scores(), rejected_reward=t([0.0] * 4), similarity=t([1.5] * 4))


def test_sopo_unmasked_rejected_gets_no_gradient():
    pc, pr, rc, rr = scores(grad=True)
    O.sopo(pc, pr, rc, rr, rejected_reward=t([0.1, 0.9, 0.1, 0.9]), similarity=t([0.5] * 4)).sum().backward()
    assert (pr.grad[[1, 3]] == 0).all() and (pr.grad[[0, 2]] > 0).all()
    assert (pc.grad < 0).all()


def test_kto_matches_formula():
    pi, ref = np.array([-1.0, -2.0, 0.5, -0.3, -1.1]), np.array([-1.3, -1.5, 0.2, -0.3, -0.8])
    desirable = np.array([True, False, True, False, True])
    beta, ld, lu = 2.0, 1.1, 1.33
    r = pi - ref
    z = max(r.mean(), 0.0)
    expected = np.where(desirable, ld * (1 - np_sigmoid(beta * (r - z))), lu * (1 - np_sigmoid(beta * (z - r))))
    loss = O.kto(t(pi), t(ref), torch.tensor(desirable), beta=beta, desirable_weight=ld, undesirable_weight=lu)
    check(loss, expected)
    # an explicit estimate replaces the batch mean; negative estimates are clamped to 0
    for kl, z in ((0.4, 0.4), (-0.4, 0.0)):
        expected = np.where(desirable, 1 - np_sigmoid(beta * (r - z)), 1 - np_sigmoid(beta * (z - r)))
        check(O.kto(t(pi), t(ref), torch.tensor(desirable), beta=beta, kl=kl), expected)


def test_kto_reference_point_is_detached():
    pi, ref = np.array([-1.0, -2.0, 0.5]), np.array([-1.3, -2.5, 0.9])
    desirable = np.array([True, False, True])
    beta = 1.5
    policy = t(pi, grad=True)
    O.kto(policy, t(ref), torch.tensor(desirable), beta=beta).sum().backward()
    r = pi - ref
    z = max(r.mean(), 0.0)
    sign = np.where(desirable, 1.0, -1.0)
    s = np_sigmoid(-beta * sign * (r - z))  # each row's loss; z treated as a constant
    np.testing.assert_allclose(policy.grad.numpy(), s * (1 - s) * (-beta * sign), rtol=1e-10)
    assert r.mean() > 0  # z > 0 here, so a gradient through z would change the result


def test_direct_reward_matches_formula_and_gradients():
    pi, ref = np.array([-1.0, -2.0, 0.5]), np.array([-1.3, -1.5, 0.2])
    reward, value = np.array([1.0, 0.0, 0.5]), np.array([0.4, 0.1, 0.2])
    tau = 0.5
    residual = reward - value - tau * (pi - ref)
    policy, v = t(pi, grad=True), t(value, grad=True)
    loss = O.direct_reward(policy, t(ref), t(reward), v, tau=tau)
    check(loss, 0.5 * residual ** 2)
    loss.sum().backward()
    np.testing.assert_allclose(v.grad.numpy(), -residual, rtol=1e-10)
    np.testing.assert_allclose(policy.grad.numpy(), -tau * residual, rtol=1e-10)


@pytest.mark.parametrize("accepted", [[True, False, True, False, False], [True] * 5, [False] * 5])
def test_pmpo_batch_mean_is_the_formula(accepted):
    pi = np.array([-1.0, -2.0, 0.5, -0.3, -1.1])
    kl = np.array([0.1, 0.3, 0.0, 0.2, 0.05])
    acc = np.array(accepted)
    alpha, beta = 0.3, 0.2
    formula = beta * kl.mean()
    if acc.any():
        formula += -alpha * pi[acc].mean()
    if (~acc).any():
        formula += (1 - alpha) * pi[~acc].mean()
    loss = O.pmpo(t(pi), torch.tensor(acc), kl=t(kl), alpha=alpha, beta=beta)
    assert loss.shape == (5,)
    assert loss.mean().item() == pytest.approx(formula, rel=1e-12)
    # scalar estimate, gradient pushes accepted up and rejected down
    policy = t(pi, grad=True)
    O.pmpo(policy, torch.tensor(acc), kl=0.2, alpha=alpha, beta=beta).mean().backward()
    assert (policy.grad[acc] < 0).all() and (policy.grad[~acc] > 0).all()


def test_pmpo_kl_keeps_its_gradient():
    policy = t([-1.0, -2.0], grad=True)
    kl = t([-0.5, -1.0]) - policy  # log ref − log π
    O.pmpo(policy, torch.tensor([True, False]), kl=kl, alpha=0.5, beta=0.4).mean().backward()
    # d/dπ mean: accepted −α·N/n_acc/N − β/N, rejected (1−α)·N/n_rej/N − β/N
    np.testing.assert_allclose(policy.grad.numpy(), [-0.5 - 0.2, 0.5 - 0.2], rtol=1e-12)


def test_selm_optimism_matches_formula():
    pi, ref = np.array([-1.0, -2.0]), np.array([-1.3, -1.5])
    policy = t(pi, grad=True)
    loss = O.selm_optimism(policy, t(ref), alpha=0.01, beta=0.5)
    check(loss, 0.01 * 0.5 * (pi - ref))
    loss.sum().backward()
    assert (policy.grad > 0).all()  # lowers the likelihood of what the reference samples


def test_pairwise_metrics():
    pc, pr, rc, rr = scores(grad=True)
    m = O.pairwise_metrics(pc, pr, rc, rr, beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (PC - RC).mean())
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (PR - RR).mean())
    assert m["rewards/margin"].item() == pytest.approx(0.5 * DELTA.mean())
    assert m["rewards/accuracy"].item() == pytest.approx(0.5)  # Δ = [0.6, -0.9, 0.4, -0.4]
    assert not any(v.requires_grad for v in m.values())
    tie = O.pairwise_metrics(pc, pr, pc.detach(), pr.detach(), beta=0.5)  # Δ = 0 everywhere
    assert tie["rewards/accuracy"].item() == 0.0 and tie["rewards/margin"].item() == pytest.approx(0.0)


# ---------------------------------------------------------------- invariants and gradients

SIGMOID_TYPE = {
    "dpo": (O.dpo, {}),
    "cdpo": (O.dpo, {"label_smoothing": 0.2}),
    "robust_dpo": (O.robust_dpo, {"label_smoothing": 0.2}),
    "gpo_logistic": (O.gpo, {"loss": "logistic"}),
    "soft_preference": (O.soft_preference, {"strength": torch.tensor([1.0, 0.7, 0.5, 0.0])}),
    "sopo": (O.sopo, {"rejected_reward": torch.tensor([0.1, 0.9, 0.1, 0.9]),
                      "similarity": torch.tensor([0.0, 0.3, 1.0, 0.6])}),
}


@pytest.mark.parametrize("name", sorted(SIGMOID_TYPE))
def test_sigmoid_losses_are_ln2_at_initialisation(name):
    fn, kwargs = SIGMOID_TYPE[name]
    pc, pr = torch.randn(4, generator=torch.Generator().manual_seed(0)), torch.randn(4)
    loss = fn(pc, pr, pc.clone(), pr.clone(), beta=5000.0, **kwargs)
    torch.testing.assert_close(loss, torch.full((4,), LN2))


def test_kto_is_half_weight_at_initialisation():
    pi = torch.randn(4, generator=torch.Generator().manual_seed(1))
    loss = O.kto(pi, pi.clone(), torch.tensor([True, False, True, False]), beta=1000.0,
                 desirable_weight=1.0, undesirable_weight=1.33)
    torch.testing.assert_close(loss, torch.tensor([0.5, 0.665, 0.5, 0.665]))


PAIRWISE = {
    **SIGMOID_TYPE,
    "ipo": (O.ipo, {}),
    "slic": (O.slic, {}),
    **{f"gpo_{name}": (O.gpo, {"loss": name}) for name in GPO_NUMPY},
    "diffusion_dro": (lambda *s, beta: O.diffusion_dro(*s), {}),
}


@pytest.mark.parametrize("name", sorted(PAIRWISE))
def test_pairwise_gradient_raises_chosen_and_lowers_rejected(name):
    fn, kwargs = PAIRWISE[name]
    if name == "sopo":  # every rejected sample below the reward threshold so it is pushed down
        kwargs = {**kwargs, "rejected_reward": torch.zeros(4)}
    if name == "soft_preference":  # p > 1/2: chosen is more likely preferred
        kwargs = {"strength": torch.tensor([1.0, 0.9, 0.7, 0.6])}
    base = torch.tensor([-1.0, -0.5, -2.0, 0.3])
    pc, pr = base.clone().requires_grad_(), (base - 0.2).requires_grad_()
    rc, rr = base.clone().requires_grad_(), (base - 0.2).requires_grad_()
    fn(pc, pr, rc, rr, beta=0.5, **kwargs).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert rc.grad is None and rr.grad is None  # reference scores are constants


def test_simpo_gradient_signs():
    pc, pr = torch.tensor([-1.0, -3.0], requires_grad=True), torch.tensor([-1.0, -0.5], requires_grad=True)
    O.simpo(pc, pr, chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([1, 4])).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_kto_gradient_signs():
    pi = torch.tensor([-1.0, -2.0, 0.5, -0.3], requires_grad=True)
    desirable = torch.tensor([True, False, True, False])
    O.kto(pi, torch.tensor([-1.1, -1.9, 0.5, -0.2]), desirable, beta=2.0).sum().backward()
    assert (pi.grad[desirable] < 0).all() and (pi.grad[~desirable] > 0).all()


# ---------------------------------------------------------------- stability at diffusion-sized β

FINITE_AT_LARGE_BETA = {
    **SIGMOID_TYPE,
    "ipo": (O.ipo, {}),
    "slic": (O.slic, {}),
    **{f"gpo_{name}": (O.gpo, {"loss": name}) for name in GPO_NUMPY if name != "exponential"},
}
# |d loss / d score| ≤ β·const here; the squared losses' gradients (≈ 2β²Δ) legitimately exceed fp16's range
UNBOUNDED_GRADIENT = {"gpo_squared", "gpo_truncated_quadratic"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FINITE_AT_LARGE_BETA))
def test_finite_at_beta_2500_in_half_precision(name, dtype):
    fn, kwargs = FINITE_AT_LARGE_BETA[name]
    pc = torch.tensor([10.0, 0.0, 5.0, -3.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([0.0, 10.0, -5.0, 3.0], dtype=dtype, requires_grad=True)
    zero = torch.zeros(4, dtype=dtype)
    loss = fn(pc, pr, zero, zero, beta=2500.0, **kwargs)  # Δ = [10, −10, 10, −6]
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    if name not in UNBOUNDED_GRADIENT:
        loss.sum().backward()
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_dpo_large_beta_values_in_half_precision():
    for dtype in (torch.float16, torch.bfloat16):
        pc = torch.tensor([10.0, 0.0], dtype=dtype)
        pr = torch.tensor([0.0, 10.0], dtype=dtype)
        loss = O.dpo(pc, pr, torch.zeros(2, dtype=dtype), torch.zeros(2, dtype=dtype), beta=2500.0)
        torch.testing.assert_close(loss, torch.tensor([0.0, 25000.0]))  # softplus(−βΔ)


def test_kto_finite_at_large_beta_in_half_precision():
    pi = torch.tensor([10.0, -10.0, 10.0, -10.0], dtype=torch.bfloat16, requires_grad=True)
    loss = O.kto(pi, torch.zeros(4, dtype=torch.bfloat16), torch.tensor([True, True, False, False]), beta=2500.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pi.grad).all()


# ---------------------------------------------------------------- registry and input errors


def test_registry_kinds_and_names():
    kinds = {name: spec.kind for name, spec in O.OBJECTIVES.items()}
    assert kinds == {
        **dict.fromkeys(["dpo", "robust_dpo", "ipo", "slic", "gpo", "simpo", "soft_preference",
                         "diffusion_dro", "sopo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                         "aot_unpaired", "apo_zero", "apo_down", "discopop"], "pairwise"),
        "kto": "unpaired", "pmpo": "unpaired", "direct_reward": "reward", "selm_optimism": "auxiliary",
        "chosen_nll": "auxiliary",
    }
    for name, spec in O.OBJECTIVES.items():
        assert O.get_objective(name) is spec and getattr(O, name) is spec.fn
    with pytest.raises(ValueError, match="unknown objective 'dpoo'; valid: .*direct_reward.*sopo"):
        O.get_objective("dpoo")


def test_bad_inputs_raise_clear_errors():
    pc, pr, rc, rr = scores()
    with pytest.raises(ValueError, match="beta must lie in"):
        O.dpo(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="reference_rejected has shape \\(3,\\) but policy_chosen has \\(4,\\)"):
        O.dpo(pc, pr, rc, rr[:3])
    with pytest.raises(ValueError, match="policy_chosen must have shape \\[B\\]"):
        O.dpo(pc[None], pr, rc, rr)
    with pytest.raises(TypeError, match="policy_rejected must be a floating-point tensor"):
        O.dpo(pc, torch.ones(4, dtype=torch.long), rc, rr)
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        O.kto(pc, rc, torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="accepted must have shape \\[4\\]"):
        O.pmpo(pc, torch.tensor([True, False]), kl=0.0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        O.pmpo(pc, torch.ones(4, dtype=torch.bool), kl=0.0, alpha=1.5)
