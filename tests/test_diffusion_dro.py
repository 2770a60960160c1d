"""Diffusion-DRO step: the margin at init, buffer states on the snapshot's offset trajectories, re-sync every M,
the loss against an independent computation and its gradient direction, exact resume through the Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from tiny_pixel import byte_prompts, expert_rows, pixel_adapter

from genalign.adapters.tabular import TabularAdapter
from genalign.online.diffusion_dro import DiffusionDROStep, own_target
from genalign.steps import StepContext, build_step
from genalign.train import Trainer, TrainConfig

MARGIN = 1e-3
STEPS = 5  # sampler steps in the tests (the grid spacing is then 100 // 5 = 20)


def ctx(seed: int) -> StepContext:
    return StepContext(generator=torch.Generator().manual_seed(seed))


def raw_prediction(unet, x_t, t, cond) -> torch.Tensor:
    with torch.no_grad():
        return unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]


def alpha_sigma(adapter, t):
    ab = adapter.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def snapshot_epsilon(adapter, unet, buffer, n):
    """The network's epsilon at trajectory n's recorded states, computed here from its raw output."""
    x_t, t = buffer.tensors["x_t"][n], buffer.tensors["t"][n]
    raw = raw_prediction(unet.eval(), x_t, t, buffer.tensors["cond"][n].expand(len(t), -1, -1))
    if adapter.prediction_type == "epsilon":
        return raw, raw
    alpha, sigma = alpha_sigma(adapter, t)
    return alpha * raw + sigma * x_t, raw  # eps from v


def sgd_step(adapter, loss, lr=0.05):
    loss.mean().backward()
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p -= lr * p.grad
            p.grad = None


@pytest.mark.parametrize("options", [{}, {"lora": {"r": 2, "lora_alpha": 4}}, {"prediction_type": "v_prediction"}],
                         ids=["full", "lora", "v_prediction"])
def test_loss_at_init_is_exactly_the_margin(options):
    adapter = pixel_adapter(**{"prompt_dropout": 0.5, **options})  # dropped rows use the empty prompt on both sides
    loss, metrics = DiffusionDROStep(num_inference_steps=STEPS)(adapter, expert_rows(6), ctx(0))
    assert torch.equal(loss, torch.full((6,), MARGIN))  # policy == snapshot == reference: relu(m - 0)
    assert metrics["dro/active_fraction"] == 1.0
    assert metrics["dro/expert_gap"] == 0.0 and metrics["dro/sample_gap"] == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_buffer_states_are_the_snapshots_own_offset_trajectory(prediction_type):
    adapter = pixel_adapter(prediction_type)
    step = DiffusionDROStep(num_inference_steps=20, trajectories_per_prompt=3)
    step(adapter, expert_rows(4), ctx(0))
    buffer = step.buffer
    assert len(buffer) == 12 and sorted(set(buffer.prompts)) == ["a cat", "a dog", "a fox", "an owl"]
    t = buffer.tensors["t"]
    offsets = t[:, -1]
    assert ((offsets >= 0) & (offsets < 5)).all() and len(offsets.unique()) > 1
    assert torch.equal(t, torch.arange(19, -1, -1) * 5 + offsets[:, None])  # grid 5k + one offset per trajectory
    assert len(t.unique()) > 20  # more timesteps than the 20 grid points are visited

    sched_config = adapter.noise_scheduler.config
    for n in range(len(buffer)):
        eps, raw = snapshot_epsilon(adapter, adapter.unwrapped_policy, buffer, n)
        torch.testing.assert_close(buffer.tensors["eps_hat"][n], eps, atol=1e-5, rtol=1e-5)
        state = {k: buffer.tensors[k][n] for k in ("x_t", "t", "eps_hat")}
        torch.testing.assert_close(own_target(adapter, state), raw, atol=1e-4, rtol=1e-4)  # back to the raw output
        # each recorded state is the DPM-Solver++ update of the previous one on this trajectory's own grid
        sched = DPMSolverMultistepScheduler.from_config(sched_config, algorithm_type="dpmsolver++")
        sched.set_timesteps(timesteps=t[n].tolist())
        x = buffer.tensors["x_t"][n]
        for k in range(19):
            nxt = sched.step(raw[k : k + 1], t[n, k], x[k : k + 1], return_dict=False)[0]
            torch.testing.assert_close(nxt[0], x[k + 1], atol=1e-4, rtol=1e-4)


def test_resync_every_step_samples_with_the_updated_policy():
    adapter = pixel_adapter()
    initial = copy.deepcopy(adapter.unwrapped_policy)
    step, rows = DiffusionDROStep(num_inference_steps=STEPS), expert_rows(4)
    for global_step in (1, 2):
        loss, _ = step(adapter, rows, ctx(global_step))
        sgd_step(adapter, loss)
        step.on_optimizer_step(adapter, global_step)
        assert len(step.buffer) == 0 and step.snapshot.tensors is None  # M = 1: the snapshot is the live policy
        step.fill(adapter, [r["prompt"] for r in rows], torch.Generator().manual_seed(9))
        for n in range(len(step.buffer)):
            eps_hat = step.buffer.tensors["eps_hat"][n]
            torch.testing.assert_close(eps_hat, snapshot_epsilon(adapter, adapter.unwrapped_policy, step.buffer, n)[0],
                                       atol=1e-5, rtol=1e-5)
            assert (eps_hat - snapshot_epsilon(adapter, initial, step.buffer, n)[0]).abs().max() > 1e-3
        adapter.unwrapped_policy.train()


def test_resync_every_three_steps_lags_and_reuses_the_buffer():
    adapter = pixel_adapter()
    initial = copy.deepcopy(adapter.unwrapped_policy)
    step, rows = DiffusionDROStep(resync_every=3, num_inference_steps=STEPS), expert_rows(4)

    loss, _ = step(adapter, rows[:2], ctx(1))  # samples "a cat", "a dog"
    first = {k: v.clone() for k, v in step.buffer.tensors.items()}
    sgd_step(adapter, loss)
    step.on_optimizer_step(adapter, 1)
    loss, metrics = step(adapter, rows, ctx(2))  # reuses cat/dog, samples fox/owl with the lagging snapshot
    assert step.buffer.prompts == ["a cat", "a dog", "a fox", "an owl"] and metrics["dro/buffer_trajectories"] == 4
    for key, value in first.items():
        assert torch.equal(step.buffer.tensors[key][:2], value)
    for n in (2, 3):
        eps_hat = step.buffer.tensors["eps_hat"][n]
        torch.testing.assert_close(eps_hat, snapshot_epsilon(adapter, initial, step.buffer, n)[0], atol=1e-5, rtol=1e-5)
        current = snapshot_epsilon(adapter, adapter.unwrapped_policy, step.buffer, n)[0]
        assert (eps_hat - current).abs().max() > 1e-3
    adapter.unwrapped_policy.train()
    initial_weights = dict(initial.named_parameters())
    for name, tensor in step.snapshot.tensors.items():
        assert torch.equal(tensor, initial_weights[name])
    sgd_step(adapter, loss)
    step.on_optimizer_step(adapter, 2)
    assert len(step.buffer) == 4  # still reused
    loss, _ = step(adapter, rows, ctx(3))
    sgd_step(adapter, loss)
    step.on_optimizer_step(adapter, 3)
    assert len(step.buffer) == 0
    current = dict(adapter.unwrapped_policy.named_parameters())
    for name, tensor in step.snapshot.tensors.items():
        assert torch.equal(tensor, current[name]) and tensor.data_ptr() != current[name].data_ptr()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_matches_independent_computation_and_one_step_favours_experts(prediction_type):
    adapter = pixel_adapter(prediction_type)
    step, rows = DiffusionDROStep(num_inference_steps=STEPS), expert_rows(4)
    prompts = [r["prompt"] for r in rows]
    step.fill(adapter, prompts, torch.Generator().manual_seed(1))
    loss0, metrics0 = step(adapter, rows, ctx(7))
    assert torch.equal(loss0, torch.full((4,), MARGIN))
    sgd_step(adapter, loss0, lr=1e-5)  # small enough to keep every hinge active (so the check below sees it)
    loss1, metrics1 = step(adapter, rows, ctx(7))  # the very same states and expert noise
    assert (loss1 > 0).all() and loss1.mean() < MARGIN  # m + (Le_θ − Le_ref) − (Lp_θ − Lp_ref) went down
    assert metrics1["dro/expert_gap"] < metrics1["dro/sample_gap"]

    # the draws documented in TrajectoryBuffer.draw, then the expert noise
    g = torch.Generator().manual_seed(7)
    torch.rand(4, generator=g)  # trajectory choice: one trajectory per prompt here
    k = torch.randint(0, STEPS, (4,), generator=g)
    eps = torch.randn(4, 1, 8, 8, generator=g)
    j = torch.tensor([step.buffer.prompts.index(p) for p in prompts])
    buf = step.buffer.tensors
    x_own, t, eps_hat = buf["x_t"][j, k], buf["t"][j, k], buf["eps_hat"][j, k]
    alpha, sigma = alpha_sigma(adapter, t)
    x0 = torch.stack([r["response"] for r in rows])
    x_expert = alpha * x0 + sigma * eps
    cond = byte_prompts(prompts)[0]
    target_expert, target_own = eps, eps_hat
    x0_own = (x_own - sigma * eps_hat) / alpha  # the own sample's x0 implied by eps_hat at x_t
    if prediction_type == "v_prediction":  # v = α·eps − σ·x0
        target_expert, target_own = alpha * eps - sigma * x0, alpha * eps_hat - sigma * x0_own
    elif prediction_type == "sample":
        target_expert, target_own = x0, x0_own

    def errors(unet):
        pe = raw_prediction(unet, x_expert, t, cond)
        pp = raw_prediction(unet, x_own, t, cond)
        return ((pe - target_expert) ** 2).mean((1, 2, 3)), ((pp - target_own) ** 2).mean((1, 2, 3))

    (le, lp), (le_ref, lp_ref) = errors(adapter.unwrapped_policy), errors(adapter.reference)
    expected = torch.relu((le - le_ref) - (lp - lp_ref) + MARGIN)
    torch.testing.assert_close(loss1.detach(), expected, atol=1e-7, rtol=1e-5)


def make_trainer(tmp_path, name, max_steps, resync_every):
    adapter = pixel_adapter(prompt_dropout=0.25)
    cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=max_steps, batch_size=2, learning_rate=1e-2,
                      save_every=2, log_every=1, seed=0)
    step = build_step("diffusion_dro", resync_every=resync_every, num_inference_steps=4, trajectories_per_prompt=2)
    return Trainer(adapter, step, expert_rows(4), cfg)


@pytest.mark.parametrize("resync_every", [1, 3])
def test_resume_through_trainer_matches_uninterrupted_run(tmp_path, resync_every):
    straight_trainer = make_trainer(tmp_path, "straight", 5, resync_every)
    straight = straight_trainer.train()["history"]
    make_trainer(tmp_path, "split", 2, resync_every).train()  # checkpoint at step 2 (mid-window for M = 3)
    resumed_trainer = make_trainer(tmp_path, "split", 5, resync_every)
    resumed = resumed_trainer.train()["history"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5]
    assert any(h["loss"] != pytest.approx(MARGIN, abs=1e-6) for h in straight)  # training moved the loss
    for a, b in zip(straight, resumed):
        for key in ("loss", "dro/expert_gap", "dro/sample_gap", "dro/buffer_trajectories"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    resumed_weights = dict(resumed_trainer.adapter.unwrapped_policy.named_parameters())
    for name, p in straight_trainer.adapter.unwrapped_policy.named_parameters():
        torch.testing.assert_close(resumed_weights[name], p, atol=1e-6, rtol=0)


def test_bad_inputs_are_named():
    adapter, step = pixel_adapter(), DiffusionDROStep(num_inference_steps=STEPS)
    pair = {"prompt": "a cat", "chosen": torch.zeros(1, 8, 8), "rejected": torch.zeros(1, 8, 8), "row": 5}
    with pytest.raises(ValueError, match="row 5.*expert demonstrations"):
        step(adapter, [pair], ctx(0))
    with pytest.raises(ValueError, match="row 3.*'response'"):
        step(adapter, [{"prompt": "a cat", "row": 3}], ctx(0))
    with pytest.raises(TypeError, match="ImageDiffusionAdapter"):
        step(TabularAdapter(2, 2), [{"prompt": 0, "response": 1}], ctx(0))
    with pytest.raises(ValueError, match="ddim"):
        DiffusionDROStep(scheduler="ddim")
    with pytest.raises(ValueError, match="resync_every"):
        build_step("diffusion_dro", resync_every=0)


def test_adapter_sampling_on_custom_grids():
    adapter = pixel_adapter()
    draw = lambda **kw: adapter.sample(["a cat", "a dog"], generator=torch.Generator().manual_seed(0),  # noqa: E731
                                       guidance_scale=1.0, **kw)
    shared = draw(timesteps=torch.tensor([90, 60, 30, 0]))
    per_sample = draw(timesteps=torch.tensor([[90, 60, 30, 0], [90, 60, 30, 0]]), decode=False)
    assert "images" in shared and "images" not in per_sample
    torch.testing.assert_close(shared["x0"], per_sample["x0"], atol=0, rtol=0)
    grids = torch.tensor([[90, 60, 30, 0], [99, 50, 10, 5]])
    mixed = draw(timesteps=grids, return_trajectory=True)
    assert torch.equal(torch.stack([s.t for s in mixed["trajectory"]], 1), grids)
    torch.testing.assert_close(mixed["x0"][0], shared["x0"][0])  # a sample's path depends only on its own grid
    with pytest.raises(ValueError, match="strictly descending"):
        draw(timesteps=torch.tensor([0, 30, 60]))
    with pytest.raises(ValueError, match="one grid per returned sample"):
        draw(timesteps=torch.tensor([[90, 60], [90, 60], [90, 60]]))
    with pytest.raises(ValueError, match="'ddim' does not take custom timesteps"):
        draw(timesteps=torch.tensor([90, 60]), scheduler="ddim")
