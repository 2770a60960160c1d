"""DRO and PMPO steps: losses against independent numpy computations, gradient directions, exact resume, the
single-trajectory reader and bad input."""

import json

import numpy as np
import pytest
import torch

from genalign.adapters.tabular import TabularAdapter
from genalign.data.single_trajectory import arithmetic_feedback, feedback_split, read_rewards
from genalign.online.dro import DROStep
from genalign.online.pmpo import PMPOStep
from genalign.steps import StepContext, build_step
from genalign.train import Trainer, TrainConfig

REFERENCE = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.55, 0.05, 0.25, 0.15]])
ROWS = [{"prompt": 0, "response": 1, "reward": 0.9, "row": 0}, {"prompt": 1, "response": 3, "reward": 0.1, "row": 1},
        {"prompt": 0, "response": 2, "reward": 0.4, "row": 2}]


def adapter_with_logits(seed=0):
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    with torch.no_grad():
        adapter.policy.logits.copy_(torch.randn(2, 4, generator=torch.Generator().manual_seed(seed)))
    return adapter


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ctx():
    return StepContext(generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ DRO
def test_dro_loss_matches_the_formula_with_the_value_network():
    adapter = adapter_with_logits()
    step = DROStep(tau=0.7)
    with torch.no_grad():
        step.value.bias.fill_(0.25)
    loss, metrics = step(adapter, ROWS, ctx())
    log_pi = np_log_softmax(adapter.policy.logits.detach().numpy())
    log_ref = np.log(REFERENCE.double().numpy())
    expected = [0.5 * (r["reward"] - 0.25 - 0.7 * (log_pi[r["prompt"], r["response"]] - log_ref[r["prompt"], r["response"]])) ** 2
                for r in ROWS]
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)
    assert metrics["dro/value"].item() == pytest.approx(0.25)


def test_dro_gradient_raises_an_under_valued_response_and_the_value():
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)  # π = ref, V = 0: residual = R > 0
    step = DROStep(tau=1.0, value_lr=0.1)
    rows = [{"prompt": 0, "response": 1, "reward": 1.0}]
    loss, _ = step(adapter, rows, ctx())
    loss.mean().backward()
    grad = adapter.policy.logits.grad[0]
    assert grad[1] < 0 and (grad[[0, 2, 3]] > 0).all()  # descent raises log π(1|0), lowers the others
    step.on_optimizer_step(adapter, 1)
    assert step.value([0]).item() > 0  # the value moves towards the reward
    assert all(p.grad is None for p in step.value.parameters())  # applied and cleared


def test_dro_resume_is_exact(tmp_path):
    rows = [{"prompt": c, "response": a, "reward": float((c + a) % 2)} for c in range(2) for a in range(4)]

    def run(out, steps, **kw):
        adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
        step = DROStep(tau=0.5, value_lr=0.05)
        cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=4, learning_rate=0.05, save_every=2,
                          log_every=1, **kw)
        Trainer(adapter, step, rows, cfg).train()
        return adapter.policy.logits.detach().clone(), step.value.embed.weight.detach().clone()

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert torch.equal(straight[0], resumed[0]) and torch.equal(straight[1], resumed[1])
    assert not torch.equal(straight[1], torch.zeros_like(straight[1]))  # the value really trained


def test_dro_rejects_rows_without_reward_and_rewards_out_of_range():
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    with pytest.raises(ValueError, match="reward"):
        DROStep()(adapter, [{"prompt": 0, "response": 1, "desirable": True}], ctx())
    with pytest.raises(ValueError, match=r"row 7: reward 3.0 is outside the declared range \[0.0, 1.0\]"):
        DROStep(reward_range=[0, 1])(adapter, [{"prompt": 0, "response": 1, "reward": 3.0, "row": 7}], ctx())
    with pytest.raises(ValueError, match="tau"):
        build_step("dro", tau=0.0)
    with pytest.raises(ValueError, match="does not take"):
        build_step("dro", beta=0.1)


def test_reward_reader_checks_the_range_naming_the_line(tmp_path):
    path = tmp_path / "feedback.jsonl"
    lines = [{"prompt": "1+1=", "completion": "2", "reward": 1.0}, {"prompt": "2+2=", "completion": "5", "reward": -2}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = read_rewards(path, low=-5, high=5)
    assert [r["reward"] for r in rows] == [1.0, -2.0] and rows[1]["source"].endswith("feedback.jsonl:2")
    with pytest.raises(ValueError, match=r"feedback.jsonl:2: reward -2.0 is outside the declared range \[0, 1\]"):
        read_rewards(path, low=0, high=1)
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2", "label": True}) + "\n")
    with pytest.raises(ValueError, match=r"feedback.jsonl:1: missing field 'reward'"):
        read_rewards(path)


def test_arithmetic_feedback_rows_and_splits():
    rows = arithmetic_feedback("train", n=40, seed=3)
    for r in rows:
        a, b = (int(x) for x in r["prompt"][:-1].split("+"))
        assert r["label"] == (int(r["completion"]) == a + b) and r["reward"] == float(r["label"])
    rejected = arithmetic_feedback("train", n=40, seed=3, keep="rejected")
    assert rejected == [r for r in rows if not r["label"]] and len(rejected) > 5
    with pytest.raises(ValueError, match="keep must be one of"):
        feedback_split(rows, "maybe")


# ------------------------------------------------------------------------------------------------ PMPO
def test_pmpo_exact_loss_matches_the_formula():
    adapter = adapter_with_logits(1)
    rows = [{"prompt": 0, "response": 1, "desirable": True}, {"prompt": 1, "response": 0, "desirable": False},
            {"prompt": 1, "response": 2, "desirable": False}]
    loss, _ = PMPOStep(alpha=0.3, beta=0.2, kl="exact")(adapter, rows, ctx())
    log_pi = np_log_softmax(adapter.policy.logits.detach().numpy())
    ref = REFERENCE.double().numpy()
    kl = (ref * (np.log(ref) - log_pi)).sum(1)
    expected_mean = -0.3 * log_pi[0, 1] + 0.7 * (log_pi[1, 0] + log_pi[1, 2]) / 2 + 0.2 * (kl[0] + 2 * kl[1]) / 3
    assert loss.mean().item() == pytest.approx(expected_mean, rel=1e-5)


def test_pmpo_sampled_kl_is_an_unbiased_estimate_with_the_right_gradient():
    adapter = adapter_with_logits(2)
    step = PMPOStep(kl="samples", kl_samples=20000)
    kl = step.kl_estimate(adapter, [{"prompt": 0}, {"prompt": 1}], torch.Generator().manual_seed(1))
    exact = adapter.reverse_kl()
    np.testing.assert_allclose(kl.detach().numpy(), exact.detach().numpy(), atol=0.03)
    kl.sum().backward()
    sampled_grad = adapter.policy.logits.grad.clone()
    adapter.policy.logits.grad = None
    exact.sum().backward()
    np.testing.assert_allclose(sampled_grad.numpy(), adapter.policy.logits.grad.numpy(), atol=0.02)


def test_pmpo_gradient_lowers_rejected_and_raises_accepted():
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    rows = [{"prompt": 0, "response": 3, "desirable": False}, {"prompt": 1, "response": 1, "desirable": True}]
    loss, _ = PMPOStep(beta=0.1, kl="exact")(adapter, rows, ctx())
    loss.mean().backward()
    grad = adapter.policy.logits.grad
    assert grad[0, 3] > 0 and grad[1, 1] < 0  # descent lowers the rejected, raises the accepted


def test_pmpo_bad_input():
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    with pytest.raises(ValueError, match="desirable"):
        PMPOStep(kl="exact")(adapter, [{"prompt": 0, "response": 1, "reward": 1.0}], ctx())
    with pytest.raises(ValueError, match="kl must be one of"):
        PMPOStep(kl="guess")
    with pytest.raises(ValueError, match="alpha"):
        build_step("pmpo", alpha=1.5)
