"""SoPo step (Tan et al. 2025) on a tiny motion denoiser with deterministic judges: the rejected motion is the
lowest-reward policy sample, the threshold mask silences the rejected side, β_w = β(C − S) against an independent
computation, ln 2 at initialisation, samples as long as the preferred motion, sampling in eval mode, the learning
direction of one optimizer step, and exact resume through the Trainer."""

import math

import numpy as np
import pytest
import torch

from genalign.adapters.motion import MotionAdapter
from genalign.models.mdm import MotionDenoiser, MotionDenoiserConfig
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator
from genalign.online.sopo import SoPoStep
from genalign.rewards.motion import MotionSimilarity, TextMotionRetrievalReward
from genalign.steps import StepContext, build_step
from genalign.train import Trainer, TrainConfig

D, COND = 6, 8
CAPTIONS = ["a person walks forward", "a person jumps", "someone waves", "a man kicks"]


class FakeText:
    """Caption -> a fixed random vector seeded by the caption's characters (no text model)."""

    dim = COND

    def __call__(self, captions):
        return torch.stack([torch.randn(COND, generator=torch.Generator().manual_seed(sum(map(ord, c))))
                            for c in captions])


def masked_mean(x, lengths):
    """Mean of ``x [N, T, ...]`` over each row's first ``lengths[i]`` frames (and the trailing dims)."""
    valid = (torch.arange(x.shape[1], device=x.device) < lengths.to(x.device)[:, None]).to(x.dtype)
    per_frame = x.flatten(2).mean(-1) if x.dim() > 2 else x
    return (per_frame * valid).sum(1) / valid.sum(1)


def reward(captions, motions, lengths):
    """A deterministic 'text-motion reward' in (0, 1): sigmoid of the first feature's mean over real frames."""
    assert len(captions) == len(motions) == len(lengths)
    return torch.sigmoid(3 * masked_mean(motions[..., 0], lengths))


def similarity(a, lengths_a, b, lengths_b):
    """exp(−mean |a − b|) over the real frames, in (0, 1]."""
    assert torch.equal(lengths_a, lengths_b)
    return torch.exp(-masked_mean((a - b).abs(), lengths_a))


def high_reward(*args):  # every sample reaches the threshold τ = 0.45: mask = 0
    return 0.5 + 0.5 * reward(*args)


def low_reward(*args):  # every sample is below τ: mask = 1
    return 0.4 * reward(*args)


def denoiser(**overrides):
    torch.manual_seed(0)
    config = dict(feature_dim=D, cond_dim=COND, d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.1,
                  max_frames=32)
    return MotionDenoiser(MotionDenoiserConfig(**{**config, **overrides}))


def motion(frames, seed):
    g = torch.Generator().manual_seed(seed)
    phase, freq = torch.rand(D, generator=g) * 6.28, 0.1 + 0.3 * torch.rand(D, generator=g)
    return torch.sin(torch.arange(frames).unsqueeze(1) * freq + phase)


def rows(lengths=(12, 20)):
    return [{"prompt": CAPTIONS[i], "response": motion(n, i), "row": i} for i, n in enumerate(lengths)]


def make_adapter(**kw):
    return MotionAdapter(denoiser(**kw.pop("model", {})), FakeText(), **kw)


def make_step(judge=reward, **kw):
    return SoPoStep(judge, similarity, **{"num_samples": 3, "num_inference_steps": 3, **kw})


def run(adapter, step, batch_rows, seed=0):
    """One step call, recording what it sampled and what it scored (and the generator state before scoring)."""
    seen = {}
    draw, score_pairs = step.draw, adapter.score_pairs

    def spy_draw(*args, **kw):
        seen["samples"] = draw(*args, **kw)
        return seen["samples"]

    def spy_score_pairs(batch, *, generator=None):
        seen["batch"], seen["state"] = batch, generator.get_state()
        seen["chosen"], seen["rejected"] = score_pairs(batch, generator=generator)
        return seen["chosen"], seen["rejected"]

    step.draw, adapter.score_pairs = spy_draw, spy_score_pairs
    try:
        loss, metrics = step(adapter, batch_rows, StepContext(torch.Generator().manual_seed(seed)))
    finally:
        del step.draw, adapter.score_pairs
    return loss, metrics, seen


def perturb(adapter, scale=0.05):
    """Move the policy away from the reference so that the log-ratios are not zero."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ choice of x_l
def test_rejected_is_the_lowest_reward_sample_of_the_right_length():
    adapter, step = make_adapter(), make_step()
    loss, metrics, seen = run(adapter, step, rows((12, 20)))
    samples, k = seen["samples"], step.num_samples
    assert samples["mask"].sum(1).tolist() == [12] * k + [20] * k  # each sample as long as its preferred motion
    assert samples["prompt"] == [CAPTIONS[0]] * k + [CAPTIONS[1]] * k
    r = reward(samples["prompt"], samples["motion"], samples["mask"].sum(1)).view(2, k)
    assert len(set(r.flatten().tolist())) == 2 * k  # distinct rewards: the argmin is a real choice
    rejected = seen["batch"].rejected
    for i in range(2):
        worst = i * k + int(r[i].argmin())
        assert torch.equal(rejected["motion"][i, :rejected["mask"][i].sum()], samples["motion"][worst][samples["mask"][worst]])
    assert rejected["mask"].sum(1).tolist() == [12, 20] == seen["batch"].chosen["mask"].sum(1).tolist()
    assert rejected["prompt"] == CAPTIONS[:2]
    assert metrics["sopo/rejected_reward"] == pytest.approx(r.min(1).values.mean().item(), abs=1e-6)
    assert metrics["sopo/sample_reward"] == pytest.approx(r.mean().item(), abs=1e-6)
    assert metrics["sopo/mask_rate"] == pytest.approx((r.min(1).values < 0.45).float().mean().item())


def test_ln2_at_initialisation():
    loss, _, _ = run(make_adapter(), make_step(low_reward), rows((12, 20, 9)))
    assert torch.allclose(loss, torch.full((3,), math.log(2.0)), atol=1e-5)


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("judge, mask", [(low_reward, 1.0), (high_reward, 0.0)])
def test_loss_weights_chosen_by_beta_c_minus_s(judge, mask):
    adapter = make_adapter()
    perturb(adapter)
    step = make_step(judge, beta=2.0, c=2.5)
    loss, metrics, seen = run(adapter, step, rows((12, 20)))
    samples, chosen, rejected = seen["samples"], seen["chosen"], seen["rejected"]
    x_w, n_w = seen["batch"].chosen["motion"], seen["batch"].chosen["mask"].sum(1)
    k = step.num_samples
    # S = min_k sim(x_w, x^k), computed here sample by sample
    s = torch.stack([
        min(similarity(x_w[i : i + 1, : n_w[i]], n_w[i : i + 1], samples["motion"][j : j + 1, : n_w[i]], n_w[i : i + 1])
            for j in range(i * k, (i + 1) * k))
        for i in range(2)
    ]).squeeze(1)
    assert metrics["sopo/similarity"] == pytest.approx(s.mean().item(), abs=1e-6)
    assert metrics["sopo/mask_rate"] == mask
    r_w, r_l = chosen.policy - chosen.reference, rejected.policy - rejected.reference
    assert (r_w.abs() > 1e-4).all() and (r_l.abs() > 1e-4).all()
    expected = -torch.nn.functional.logsigmoid(2.0 * (2.5 - s) * r_w - mask * 2.0 * r_l)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, -torch.nn.functional.logsigmoid(2.0 * (r_w - mask * r_l)), atol=1e-4)


@pytest.mark.parametrize("judge, rejected_pushed", [(low_reward, True), (high_reward, False)])
def test_threshold_mask_gates_the_rejected_gradient(judge, rejected_pushed):
    adapter = make_adapter()
    perturb(adapter)
    loss, _, seen = run(adapter, make_step(judge), rows((12, 20)))
    grad_w, grad_l = torch.autograd.grad(loss.sum(), [seen["chosen"].policy, seen["rejected"].policy])
    assert (grad_w < 0).all()  # descending the loss raises the preferred score
    if rejected_pushed:
        assert (grad_l > 0).all()  # ... and lowers the unpreferred one
    else:
        assert torch.equal(grad_l, torch.zeros_like(grad_l))  # the rejected side contributes nothing


@pytest.mark.parametrize("judge", [low_reward, high_reward])
def test_one_optimizer_step_moves_the_right_way(judge):
    """At the step's own draw (t, eps, condition drop): the margin inside the sigmoid grows; with the mask off the
    objective only raises the preferred motion's score above the reference's."""
    adapter, step = make_adapter(), make_step(judge)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1e-2)
    loss, _, seen = run(adapter, step, rows((16,)))
    loss.mean().backward()
    optimizer.step()
    before_w = seen["chosen"].policy - seen["chosen"].reference
    after_w, after_l = (s.policy - s.reference for s in adapter.score_pairs(
        seen["batch"], generator=torch.Generator().set_state(seen["state"])))
    assert before_w.abs().max() < 1e-6  # policy == reference at the start
    mask = 1.0 if judge is low_reward else 0.0
    assert (after_w - mask * after_l).item() > 0
    if judge is high_reward:
        assert after_w.item() > 0


# ------------------------------------------------------------------------------------------------ sampling
def test_samples_come_from_the_policy_in_eval_mode_and_training_mode_is_restored():
    """With dropout kept (disable_dropout=False), every gradient-free policy forward (sampling) runs in eval mode
    and the scoring forward in training mode."""
    adapter = make_adapter(model={"dropout": 0.5}, disable_dropout=False)
    calls = []
    adapter.policy.register_forward_pre_hook(lambda m, _: calls.append((m.training, torch.is_grad_enabled())))
    step = make_step()
    run(adapter, step, rows((12, 20)))
    sampling = [training for training, grad in calls if not grad]
    assert len(sampling) == step.num_inference_steps and not any(sampling)  # one guided forward per sampler step
    assert [training for training, grad in calls if grad] == [True]
    assert adapter.policy.training
    # the same generator state gives the same negatives: dropout does not enter them
    first, _, a = run(adapter, step, rows((12, 20)), seed=4)
    second, _, b = run(adapter, step, rows((12, 20)), seed=4)
    assert torch.equal(a["samples"]["motion"], b["samples"]["motion"])


def test_bad_judges_and_settings_raise():
    adapter = make_adapter()
    with pytest.raises(ValueError, match=r"reward must lie in \[0, 1\]"):
        run(adapter, make_step(lambda *a: 2 * high_reward(*a)), rows())
    with pytest.raises(ValueError, match=r"similarity must return a tensor with one value per sampled motion \(\[6\]\)"):
        run(adapter, SoPoStep(reward, lambda a, la, b, lb: similarity(a, la, b, lb)[:2], num_samples=3,
                              num_inference_steps=2), rows())
    with pytest.raises(ValueError, match="reward= and similarity="):
        SoPoStep(reward)
    with pytest.raises(ValueError, match="num_samples"):
        SoPoStep(reward, similarity, num_samples=0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        SoPoStep(reward, similarity, scheduler="euler")
    with pytest.raises(ValueError, match="row 5: missing field 'response'"):
        run(adapter, make_step(), [{"prompt": "a man runs", "chosen": motion(8, 0), "row": 5}])


class FakeWords:
    """A word table for the T2M evaluator: every word known, vector seeded by its characters."""

    dim = 8

    def lookup(self, words):
        vectors = np.stack([np.random.default_rng(sum(map(ord, w))).normal(size=self.dim) for w in words])
        return vectors.astype(np.float32), np.ones(len(words), dtype=bool)


def test_evaluator_gives_the_retrieval_reward_and_motion_similarity(tmp_path):
    config = EvaluatorConfig(motion_dim=D, word_dim=FakeWords.dim, movement_hidden=16, movement_latent=16,
                             motion_hidden=16, text_hidden=16, embed_dim=8)
    torch.manual_seed(0)
    evaluator = TextMotionEvaluator(config, word_vectors=FakeWords()).eval()
    step = SoPoStep(evaluator=evaluator, num_samples=2, num_inference_steps=2)
    loss, metrics, seen = run(make_adapter(), step, rows((12, 20)))
    samples, lengths = seen["samples"], seen["samples"]["mask"].sum(1)
    r = TextMotionRetrievalReward(evaluator)(samples["prompt"], samples["motion"], lengths).view(2, 2)
    s = MotionSimilarity(evaluator).min_similarity(seen["batch"].chosen["motion"], [12, 20],
                                                   samples["motion"].view(2, 2, *samples["motion"].shape[1:]),
                                                   lengths.view(2, 2))
    assert metrics["sopo/rejected_reward"] == pytest.approx(r.min(1).values.mean().item(), abs=1e-6)
    assert metrics["sopo/similarity"] == pytest.approx(s.mean().item(), abs=1e-6)
    evaluator.save(tmp_path / "evaluator")
    loaded = SoPoStep(evaluator=str(tmp_path / "evaluator"))
    assert isinstance(loaded.reward, TextMotionRetrievalReward) and isinstance(loaded.similarity, MotionSimilarity)
    assert loaded.reward.evaluator.config == config
    with pytest.raises(ValueError, match="not both"):
        SoPoStep(reward, evaluator=evaluator)


# ------------------------------------------------------------------------------------------------ trainer
def trainer(tmp_path, name, max_steps):
    adapter = make_adapter(lora={"r": 4})
    step = build_step("sopo", reward=low_reward, similarity=similarity, num_samples=2, num_inference_steps=2)
    cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=max_steps, batch_size=2, learning_rate=5e-3,
                      log_every=1, seed=1)
    data = [{"prompt": CAPTIONS[i], "response": motion(10 + 3 * i, i), "row": i} for i in range(4)]
    return Trainer(adapter, step, data, cfg)


def test_trainer_runs_sopo_and_resumes_exactly(tmp_path):
    straight = trainer(tmp_path, "straight", 4).train()["history"]
    assert isinstance(build_step("sopo", reward=reward, similarity=similarity), SoPoStep)
    assert straight[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert straight[0]["sopo/mask_rate"] == 1.0
    assert all(0 < h["sopo/similarity"] <= 1 for h in straight)
    trainer(tmp_path, "split", 2).train()
    resumed = trainer(tmp_path, "split", 4).train()["history"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in ("loss", "sopo/rejected_reward", "sopo/similarity"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)
