"""TRL 1.16's DPO loss types in genalign: each loss against its formula computed independently in float64, values at
policy = reference, gradient directions, and the step options (RPO's NLL term, reference-free, WPO weights, BCO's
running reward shift: its checkpoint and its global mean under two processes).

Tolerances: the objectives get float32 scores and compute in float32; the expected values are computed in float64
numpy from the same float32 numbers. Every loss here is a handful of elementwise operations (no reductions across
the batch, no BLAS), so the float32 result is within a few tens of ulps (float32 ulp ≈ 1.2e-7 relative) of the exact
value on any x86 CPU: rtol 1e-5 with atol 1e-6 for values near 0 leaves a margin of about 10x.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from test_cli import CONFIG_DIR
from test_train import pair_rows
from two_processes import run_two_processes

import genalign.objectives as O
from genalign.adapters.tabular import TabularAdapter
from genalign.adapters.text import TextAdapter
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2
from genalign.steps import BCOPairStep, PairwiseStep, StepContext, build_step
from genalign.train import Trainer, TrainConfig

LN2 = math.log(2.0)
BETA = 0.7
RTOL, ATOL = 1e-5, 1e-6


def random_scores(n=64, seed=0):
    """float32 summed log-probs: references near the policy, so β·r is O(1) with both signs."""
    g = torch.Generator().manual_seed(seed)
    pc, pr = -5 + 2 * torch.randn(n, generator=g), -5 + 2 * torch.randn(n, generator=g)
    rc, rr = pc + torch.randn(n, generator=g), pr + torch.randn(n, generator=g)
    return pc, pr, rc, rr


def f64(*tensors):
    return [t.detach().double().numpy() for t in tensors]


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def expected(name, pc, pr, rc, rr, beta, **kw):
    """Each loss written out from its paper / TRL 1.16's dpo_trainer.py, in float64 numpy."""
    rw, rl = pc - rc, pr - rr
    x = beta * (rw - rl)
    if name == "exo_pair":
        eps = kw["label_smoothing"]
        return sig(x) * (np.log(sig(x)) - np.log(1 - eps)) + sig(-x) * (np.log(sig(-x)) - np.log(eps))
    if name == "nca_pair":
        return -logsig(beta * rw) - 0.5 * logsig(-beta * rw) - 0.5 * logsig(-beta * rl)
    if name == "bco_pair":
        d = kw.get("delta", 0.0)
        return -logsig(beta * rw - d) - logsig(-(beta * rl - d))
    if name == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if name in ("aot", "aot_unpaired"):
        eps = kw.get("label_smoothing", 0.0)
        u, v = ((pc - pr), (rc - rr)) if name == "aot" else (rw, rl)
        m = beta * (np.sort(u) - np.sort(v))
        return -(1 - eps) * logsig(m) - eps * logsig(-m)
    if name == "apo_zero":
        return (1 - sig(beta * rw)) + sig(beta * rl)
    if name == "apo_down":
        return sig(beta * rw) + (1 - sig(x))
    if name == "discopop":
        m = sig(x / kw.get("tau", 0.05))
        return (1 - m) * -logsig(x) + m * np.exp(-x)
    raise KeyError(name)


CASES = {  # name: keyword arguments
    "exo_pair": {"label_smoothing": 1e-3},
    "exo_pair_eps0.2": {"label_smoothing": 0.2},
    "nca_pair": {},
    "bco_pair": {},
    "bco_pair_shifted": {"delta": 0.3},
    "sppo_hard": {},
    "aot": {},
    "aot_smoothed": {"label_smoothing": 0.1},
    "aot_unpaired": {},
    "aot_unpaired_smoothed": {"label_smoothing": 0.1},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {},
    "discopop_tau0.5": {"tau": 0.5},
}


def fn_name(case):
    return case.split("_smoothed")[0].split("_shifted")[0].split("_eps")[0].split("_tau")[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_matches_its_formula_on_random_scores(case):
    name, kw = fn_name(case), CASES[case]
    scores = random_scores(seed=len(case))
    loss = getattr(O, name)(*scores, beta=BETA, **kw)
    assert loss.shape == (64,) and loss.dtype == torch.float32
    np.testing.assert_allclose(loss.numpy(), expected(name, *f64(*scores), BETA, **kw), rtol=RTOL, atol=ATOL)


def test_aot_sorts_over_the_batch_and_is_permutation_invariant():
    """AOT compares ranks, not pairs: permuting the pairs leaves the sorted loss entries as they are, while a
    per-pair loss (DPO) is permuted with them."""
    pc, pr, rc, rr = random_scores(n=16, seed=3)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for name in ("aot", "aot_unpaired"):
        fn = getattr(O, name)
        torch.testing.assert_close(fn(pc[perm], pr[perm], rc[perm], rr[perm], beta=BETA), fn(pc, pr, rc, rr, beta=BETA))
    # sorting matters: the unsorted (pairwise) form is DPO, a different value
    assert not torch.allclose(O.aot(pc, pr, rc, rr, beta=BETA).mean(), O.dpo(pc, pr, rc, rr, beta=BETA).mean())


def test_chosen_nll_and_wpo_weights_match_their_formulas():
    pc, pr, _, _ = random_scores(n=8, seed=5)
    lengths = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_allclose(O.chosen_nll(pc, lengths).numpy(), -pc.double().numpy() / np.arange(1, 9), rtol=RTOL)
    np.testing.assert_allclose(O.chosen_nll(pc).numpy(), -pc.double().numpy(), rtol=RTOL)
    a_w, a_l = (0.1 * pc).requires_grad_(), (0.1 * pr).requires_grad_()
    w = O.wpo_weights(a_w, a_l)
    assert not w.requires_grad  # weights are constants: no gradient flows through them
    np.testing.assert_allclose(w.numpy(), np.exp(0.1 * pc.double().numpy() + 0.1 * pr.double().numpy()), rtol=RTOL)


# ---------------------------------------------------------------- invariants at policy = reference

AT_INIT = {  # name: (keyword arguments, value when π = ref)
    "aot": ({}, LN2),
    "aot_unpaired": ({}, LN2),
    "nca_pair": ({}, 2 * LN2),  # −log σ(0) − ½ log σ(0) − ½ log σ(0)
    "bco_pair": ({}, 2 * LN2),
    "exo_pair": ({"label_smoothing": 1e-3}, -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),
    "apo_zero": ({}, 1.0),
    "apo_down": ({}, 1.0),
    "sppo_hard": ({}, 2 * (1 / (2 * BETA)) ** 2),
    "discopop": ({}, 0.5 * LN2 + 0.5),  # m = σ(0) = ½
}


@pytest.mark.parametrize("name", sorted(AT_INIT))
def test_value_at_policy_equal_reference(name):
    kw, value = AT_INIT[name]
    pc, pr, _, _ = random_scores(n=8, seed=7)
    loss = getattr(O, name)(pc, pr, pc.clone(), pr.clone(), beta=5000.0 if name != "sppo_hard" else BETA, **kw)
    torch.testing.assert_close(loss, torch.full((8,), value), rtol=1e-6, atol=1e-6)


def test_sigmoid_norm_is_ln2_at_init_and_uses_per_token_means():
    pc, pr, rc, rr = random_scores(n=8, seed=8)
    lw, ll = torch.arange(1, 9), torch.arange(8, 0, -1)
    torch.testing.assert_close(O.dpo(pc, pr, pc.clone(), pr.clone(), beta=BETA, chosen_lengths=lw, rejected_lengths=ll),
                               torch.full((8,), LN2))
    pc64, pr64, rc64, rr64 = f64(pc, pr, rc, rr)
    x = BETA * ((pc64 - rc64) / lw.numpy() - (pr64 - rr64) / ll.numpy())
    np.testing.assert_allclose(O.dpo(pc, pr, rc, rr, beta=BETA, chosen_lengths=lw, rejected_lengths=ll).numpy(),
                               -logsig(x), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- gradient directions


def grads(name, pc, pr, rc, rr, **kw):
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    rc, rr = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    getattr(O, name)(pc, pr, rc, rr, beta=BETA, **kw).sum().backward()
    assert rc.grad is None and rr.grad is None  # reference scores are constants
    return pc.grad, pr.grad


@pytest.mark.parametrize("name", ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero"])
def test_gradient_raises_chosen_and_lowers_rejected_at_init(name):
    pc, pr, _, _ = random_scores(n=8, seed=9)
    g_w, g_l = grads(name, pc, pr, pc.clone(), pr.clone(), **AT_INIT[name][0])
    assert (g_w < 0).all() and (g_l > 0).all()


def test_apo_down_gradients_lower_both_sides_the_rejected_more():
    """∂/∂π_w = β[σ'(βr_w) − σ'(βΔ)], ∂/∂π_l = βσ'(βΔ) > 0: the rejected is always pushed down; the chosen is pushed
    down too (positive gradient) whenever |r_w| < |Δ|, e.g. r_w = 0.5 > 0 > r_l = −1 (at init its gradient is 0)."""
    pc, pr, rc, rr = random_scores(n=64, seed=10)
    g_w, g_l = grads("apo_down", pc, pr, rc, rr)
    rw, rl = f64(pc - rc, pr - rr)
    dsig = lambda z: sig(z) * (1 - sig(z))  # noqa: E731
    np.testing.assert_allclose(g_w.numpy(), BETA * (dsig(BETA * rw) - dsig(BETA * (rw - rl))), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_l.numpy(), BETA * dsig(BETA * (rw - rl)), rtol=1e-4, atol=1e-6)
    assert (g_l > 0).all()
    g_w, _ = grads("apo_down", torch.tensor([0.5]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1))
    assert g_w.item() > 0


def test_discopop_gradient_direction_away_from_its_nonconvex_zone():
    """Away from |βΔ| < 0.12 DiscoPOP raises the chosen and lowers the rejected like DPO; at Δ = 0 exactly its
    gradient points the other way (local maximum at βΔ ≈ 0.07, documented)."""
    base = torch.tensor([-3.0, -1.0, -2.0, -4.0])
    for margin in (-2.0, -0.5, 0.5, 2.0):  # βΔ = 0.7·margin
        g_w, g_l = grads("discopop", base + margin, base, base, base)
        assert (g_w < 0).all() and (g_l > 0).all(), margin
    g_w, g_l = grads("discopop", base, base, base, base)
    assert (g_w > 0).all() and (g_l < 0).all()


# ---------------------------------------------------------------- the step options on a tiny LM

CHARS = "0123456789+= abcdefghijklmnopqrstuvwxyz"
PAIRS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "11", "row": 0},
    {"prompt": "20+5=", "chosen": "25", "rejected": "52 x", "row": 1},
    {"prompt": "what", "chosen": "yes it is", "rejected": "no", "row": 2},
]


def text_adapter(reference_seed=1):
    """A tiny GPT-2 whose embeddings are scaled up so its next-token distributions are far from uniform (WPO weights
    then differ from 1); the reference is a different random model."""
    tokenizer = char_tokenizer(CHARS)
    policy = tiny_gpt2(tokenizer, n_positions=32, seed=0)
    with torch.no_grad():
        policy.transformer.wte.weight.mul_(30.0)  # tied with the LM head
    adapter = TextAdapter(policy, tokenizer, reference="copy", max_length=30, max_prompt_length=20)
    adapter.reference_model = tiny_gpt2(tokenizer, n_positions=32, seed=reference_seed).eval().requires_grad_(False)
    return adapter


def ctx():
    return StepContext(torch.Generator().manual_seed(0))


def scores_of(adapter):
    from genalign.data.batching import pairwise_batch

    return adapter.score_pairs(pairwise_batch(adapter, PAIRS))


def test_rpo_alpha_adds_alpha_times_the_chosen_nll_per_token():
    adapter = text_adapter()
    chosen, rejected = scores_of(adapter)
    pc, lengths = chosen.policy.detach().double(), chosen.lengths.double()
    assert len(set(lengths.tolist())) == 3  # three different chosen lengths: the two means differ
    plain, _ = build_step("dpo", beta=BETA)(adapter, PAIRS, ctx())
    per_sequence, metrics = build_step("dpo", beta=BETA, rpo_alpha=0.4)(adapter, PAIRS, ctx())
    pooled, _ = build_step("dpo", beta=BETA, rpo_alpha=0.4, rpo_mean="tokens")(adapter, PAIRS, ctx())
    torch.testing.assert_close((per_sequence - plain).double(), 0.4 * -pc / lengths, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((pooled - plain).double(), 0.4 * -pc / lengths.mean(), rtol=1e-5, atol=1e-6)
    # TRL's pooled form: its batch mean is α·Σ(−π_w)/Σ|y_w|
    assert (pooled - plain).double().mean().item() == pytest.approx(0.4 * (-pc.sum() / lengths.sum()).item(), rel=1e-5)
    assert metrics["rpo/nll"].item() == pytest.approx((-pc / lengths).mean().item(), rel=1e-5)


def test_reference_free_ignores_the_reference():
    losses = []
    for seed in (1, 2):  # two different reference models
        adapter = text_adapter(reference_seed=seed)
        chosen, rejected = scores_of(adapter)
        loss, metrics = build_step("dpo", beta=BETA, reference_free=True)(adapter, PAIRS, ctx())
        zero = torch.zeros(3)
        torch.testing.assert_close(loss, O.dpo(chosen.policy, rejected.policy, zero, zero, beta=BETA))
        assert metrics["rewards/chosen"].item() == pytest.approx(BETA * chosen.policy.mean().item(), rel=1e-6)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    with_reference = [build_step("dpo", beta=BETA)(text_adapter(reference_seed=s), PAIRS, ctx())[0] for s in (1, 2)]
    assert not torch.allclose(with_reference[0], with_reference[1])  # the reference does matter without the option
    # a reference-free adapter (no reference model) trains too
    adapter = text_adapter()
    adapter.reference_mode, adapter.reference_model = "none", None
    torch.testing.assert_close(build_step("dpo", beta=BETA, reference_free=True)(adapter, PAIRS, ctx())[0], losses[0])
    with pytest.raises(ValueError, match="reference_free=true"):
        build_step("dpo", beta=BETA)(adapter, PAIRS, ctx())


def independent_wpo_log_weights(model, batch):
    """TRL's use_weighting quantity, written as a loop: mean over scored positions of log p(y_t) − log Σ_v p_v²."""
    out = []
    with torch.no_grad():
        for ids, attention, mask in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
            n = int(attention.sum())
            logp = torch.log_softmax(model(ids[None, :n]).logits[0].double(), dim=-1)
            terms = [logp[t - 1, ids[t]] - torch.log((logp[t - 1].exp() ** 2).sum()) for t in range(1, n) if mask[t]]
            out.append(torch.stack(terms).mean())
    return torch.stack(out)


def test_wpo_weights_equal_trls_formula_and_are_detached():
    adapter = text_adapter()
    from genalign.data.batching import pairwise_batch

    batch = pairwise_batch(adapter, PAIRS)
    a_w = independent_wpo_log_weights(adapter.policy, batch.chosen)
    a_l = independent_wpo_log_weights(adapter.policy, batch.rejected)
    weights = torch.exp(a_w + a_l)
    assert (weights - 1).abs().min() > 0.05  # the peaked model gives weights clearly away from 1
    plain, _ = build_step("dpo", beta=BETA, rpo_alpha=0.5)(adapter, PAIRS, ctx())
    weighted, metrics = build_step("dpo", beta=BETA, rpo_alpha=0.5, use_weighting=True)(adapter, PAIRS, ctx())
    # a's float32 rounding (logsumexp over 43 tokens, ~10 positions) is ~1e-6 absolute, so weights agree to ~1e-5
    torch.testing.assert_close((weighted / plain).detach().double(), weights, rtol=1e-4, atol=0)
    assert metrics["wpo/weight"].item() == pytest.approx(weights.mean().item(), rel=1e-4)
    # detached: the gradient of the weighted loss is the weights times the gradient of each pair's plain loss
    params = [p for p in adapter.policy.parameters() if p.requires_grad]
    got = torch.autograd.grad(weighted.sum(), params)
    plain, _ = build_step("dpo", beta=BETA, rpo_alpha=0.5)(adapter, PAIRS, ctx())
    want = torch.autograd.grad((plain * weights.float()).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_option_errors_are_clear():
    with pytest.raises(ValueError, match="needs the policy's per-token probabilities"):
        build_step("dpo", use_weighting=True)(TabularAdapter(3, 4), pair_rows(4), ctx())
    with pytest.raises(ValueError, match="use_weighting does not apply to 'aot'"):
        build_step("aot", use_weighting=True)
    with pytest.raises(ValueError, match="length_normalize is not an option of 'nca_pair'"):
        build_step("nca_pair", length_normalize=True)
    with pytest.raises(ValueError, match="'simpo' uses no reference"):
        build_step("simpo", reference_free=True)
    with pytest.raises(ValueError, match="rpo_mean must be one of"):
        build_step("dpo", rpo_alpha=1.0, rpo_mean="batch")
    with pytest.raises(ValueError, match="reward_shift must be one of"):
        build_step("bco_pair", reward_shift="ema")
    with pytest.raises(ValueError, match="delta is the running reward mean"):
        build_step("bco_pair", delta=0.5)
    with pytest.raises(ValueError, match=r"does not take \['discopop_tau'\]"):
        build_step("discopop", discopop_tau=0.05)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        O.exo_pair(*random_scores(4), label_smoothing=0.0)


# ---------------------------------------------------------------- BCO's running reward shift


def test_bco_shift_is_the_running_mean_of_batch_mean_rewards():
    adapter = TabularAdapter(3, 4)
    step = build_step("bco_pair", beta=BETA)
    assert isinstance(step, BCOPairStep)
    rows, seen = pair_rows(12), []
    for k in range(3):
        with torch.no_grad():  # move the policy so every batch has other rewards
            adapter.policy.logits.add_(torch.randn(3, 4, generator=torch.Generator().manual_seed(k)))
        batch = rows[4 * k: 4 * k + 4]
        pc, pr = (adapter.policy(torch.tensor([r["prompt"] for r in batch]), torch.tensor([r[s] for r in batch]))
                  for s in ("chosen", "rejected"))
        rc, rr = (adapter.reference(torch.tensor([r["prompt"] for r in batch]), torch.tensor([r[s] for r in batch]))
                  for s in ("chosen", "rejected"))
        pc, pr, rc, rr = f64(pc, pr, rc, rr)
        seen.append(np.concatenate([BETA * (pc - rc), BETA * (pr - rr)]).mean())
        loss, metrics = step(adapter, batch, ctx())
        delta = float(np.mean(seen))  # the current batch included, as TRL did
        assert metrics["bco/delta"].item() == pytest.approx(delta, rel=1e-6, abs=1e-7)
        np.testing.assert_allclose(loss.detach().numpy(), expected("bco_pair", pc, pr, rc, rr, BETA, delta=delta),
                                   rtol=RTOL, atol=ATOL)
    unshifted, metrics = build_step("bco_pair", beta=BETA, reward_shift="none")(adapter, batch, ctx())
    np.testing.assert_allclose(unshifted.detach().numpy(), expected("bco_pair", pc, pr, rc, rr, BETA), rtol=RTOL, atol=ATOL)


def bco_trainer(tmp_path, name, max_steps):
    cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=max_steps, batch_size=4, gradient_accumulation_steps=2,
                      learning_rate=0.05, log_every=1, seed=3)
    return Trainer(TabularAdapter(3, 4), build_step("bco_pair", beta=0.5), pair_rows(), cfg)


def test_bco_resume_is_exact_because_the_shift_is_checkpointed(tmp_path):
    straight = bco_trainer(tmp_path, "straight", 6)
    history = straight.train()["history"]
    bco_trainer(tmp_path, "split", 3).train()
    resumed = bco_trainer(tmp_path, "split", 6)
    resumed_history = resumed.train()["history"]
    assert resumed.step_fn.running.state_dict() == pytest.approx(straight.step_fn.running.state_dict(), abs=1e-12)
    assert resumed.step_fn.running.count == 12  # one update per micro-batch: 6 steps × 2 micro-batches
    for a, b in zip(history, resumed_history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["bco/delta"] == pytest.approx(b["bco/delta"], abs=1e-7)
    assert history[-1]["bco/delta"] != 0.0  # the shift is active, so losing it on resume would change the losses


def _bco_two_process_worker(rank, rows, out):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    step = build_step("bco_pair", beta=BETA)
    adapter = TabularAdapter(3, 4)
    results = []
    for k in range(2):
        with torch.no_grad():
            adapter.policy.logits.add_(torch.randn(3, 4, generator=torch.Generator().manual_seed(k)))
        batch = rows[8 * k: 8 * k + 8][4 * rank: 4 * rank + 4]  # this process's half of the global batch
        context = StepContext(torch.Generator().manual_seed(0), global_mean=lambda t: acc.gather(t.reshape(-1)).mean())
        loss, metrics = step(adapter, batch, context)
        results.append({"loss": loss.tolist(), "delta": step.running.mean})
    (out / f"rank{rank}.json").write_text(json.dumps(results))


def test_bco_shift_is_the_global_batch_mean_under_two_processes(tmp_path):
    rows = pair_rows(16)
    run_two_processes(_bco_two_process_worker, rows, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    step, adapter = build_step("bco_pair", beta=BETA), TabularAdapter(3, 4)
    for k in range(2):
        with torch.no_grad():
            adapter.policy.logits.add_(torch.randn(3, 4, generator=torch.Generator().manual_seed(k)))
        loss, _ = step(adapter, rows[8 * k: 8 * k + 8], ctx())
        for r in (0, 1):
            assert ranks[r][k]["delta"] == pytest.approx(step.running.mean, abs=1e-7)
            np.testing.assert_allclose(ranks[r][k]["loss"], loss[4 * r: 4 * r + 4].tolist(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- trainable through the step


@pytest.mark.parametrize("name", ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                  "apo_down", "sigmoid_norm", "rpo", "reference_free_dpo"])
def test_config_trains_the_policy_towards_the_chosen(name):
    """Each objective config's step, optimised with Adam on the exact tabular policy (the trainer's loop without its
    I/O), turns every tied pair at the start into a won pair with a clear implicit reward margin."""
    params = yaml.safe_load((CONFIG_DIR / "objective" / f"{name}.yaml").read_text())
    step, adapter, rows = build_step(**{**params, "beta": 0.5}), TabularAdapter(3, 4), pair_rows(24)
    optimizer = torch.optim.Adam(adapter.trainable_parameters(), lr=0.1)
    for i in range(20):
        loss, metrics = step(adapter, rows[8 * (i % 3): 8 * (i % 3) + 8], ctx())
        if i == 0:
            assert metrics["rewards/accuracy"].item() == 0.0  # policy = reference: every pair tied
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    _, metrics = step(adapter, rows, ctx())
    assert metrics["rewards/accuracy"].item() == 1.0 and metrics["rewards/margin"].item() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["exo_pair", "nca_pair", "bco_pair", "aot", "aot_unpaired", "apo_zero", "apo_down",
                                  "discopop"])
def test_finite_at_beta_2500_in_half_precision(name, dtype):
    """Diffusion-sized β: losses and gradients stay finite (computed in float32 through logsigmoid / sigmoid)."""
    pc = torch.tensor([10.0, 0.0, 5.0, -3.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([0.0, 10.0, -5.0, 3.0], dtype=dtype, requires_grad=True)
    zero = torch.zeros(4, dtype=dtype)
    loss = getattr(O, name)(pc, pr, zero, zero, beta=2500.0)  # βΔ up to ±25000
    loss.sum().backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
