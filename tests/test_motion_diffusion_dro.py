"""Diffusion-DRO and DR-PO on the motion adapter: buffer states are the snapshot's own x0 predictions on offset
grids, the loss is the DRO hinge on masked errors computed here independently, a gradient step favours the experts,
dropped conditions use the null condition on both sides, and DR-PO's reset rollouts are the sampler run from the
noised preferred motion."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from genalign.adapters.motion import MotionAdapter
from genalign.models.mdm import MotionDenoiser, MotionDenoiserConfig
from genalign.online.diffusion_dro import DiffusionDROStep, own_target
from genalign.online.drpo import DRPOStep
from genalign.steps import StepContext

D, COND, T_TRAIN, STEPS, MARGIN = 6, 8, 100, 5, 1e-3
PROMPTS = ("walk forward", "jump", "wave the right hand", "kick")


class HashText:
    """A deterministic stand-in for the sentence encoder: one fixed random vector per caption."""

    dim = COND

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.stack([torch.randn(COND, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                            for c in captions])


def adapter(prediction_type: str = "sample", cond_drop_prob: float = 0.0, seed: int = 0) -> MotionAdapter:
    torch.manual_seed(seed)
    config = MotionDenoiserConfig(feature_dim=D, cond_dim=COND, d_model=16, num_layers=1, num_heads=2, ff_dim=32,
                                  max_frames=72, prediction_type=prediction_type)  # lengths U{60..72}
    model = MotionDenoiser(config)
    with torch.no_grad():
        model.null_cond.normal_()  # a distinct null condition, so dropping it is visible
    return MotionAdapter(model, HashText(), cond_drop_prob=cond_drop_prob, num_train_timesteps=T_TRAIN)


def expert_rows(lengths=(12, 20, 9, 16)) -> list[dict]:
    rows = []
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(100 + i)
        phase = torch.rand(D, generator=g) * 6.28
        rows.append({"prompt": PROMPTS[i % len(PROMPTS)], "response": torch.sin(0.3 * torch.arange(n)[:, None] + phase),
                     "row": i})
    return rows


def ctx(seed: int) -> StepContext:
    return StepContext(generator=torch.Generator().manual_seed(seed))


def alpha_sigma(a: MotionAdapter, t: torch.Tensor):
    ab = a.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def masked_error(prediction, target, mask):
    err = ((prediction - target) ** 2).sum(-1)  # [N, T]
    return (err * mask).sum(1) / (mask.sum(1) * prediction.shape[-1])


def sgd_step(a: MotionAdapter, loss: torch.Tensor, lr: float) -> None:
    loss.mean().backward()
    with torch.no_grad():
        for p in a.trainable_parameters():
            if p.grad is not None:  # the null condition has none when no row is dropped
                p -= lr * p.grad
                p.grad = None


def test_buffer_holds_the_snapshots_x0_predictions_on_offset_grids():
    a = adapter()
    step = DiffusionDROStep(num_inference_steps=STEPS, trajectories_per_prompt=2)
    step.fill(a, list(PROMPTS[:2]), torch.Generator().manual_seed(3))
    buf = step.buffer.tensors
    assert step.buffer.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    ratio = T_TRAIN // STEPS
    offsets = buf["t"][:, -1:]
    assert torch.equal(buf["t"], torch.arange(STEPS - 1, -1, -1) * ratio + offsets) and (offsets < ratio).all()
    lengths = buf["mask"].sum(1)
    assert (lengths >= 60).all() and (lengths <= 72).all() and (buf["mask"] == (torch.arange(buf["mask"].shape[1]) < lengths[:, None])).all()
    model = a.unwrapped_policy.eval()
    for n in range(4):
        x_t, t, mask = buf["x_t"][n], buf["t"][n], buf["mask"][n].expand(STEPS, -1)
        with torch.no_grad():
            raw = model(x_t, t, buf["cond"][n].expand(STEPS, -1), mask)  # the network's x0 at the recorded states
        alpha, sigma = alpha_sigma(a, t)
        torch.testing.assert_close(buf["eps_hat"][n], (x_t - alpha * raw) / sigma, atol=1e-4, rtol=1e-4)
        state = {"x_t": x_t, "t": t, "eps_hat": buf["eps_hat"][n]}
        real = mask.unsqueeze(-1).expand_as(raw)
        torch.testing.assert_close(own_target(a, state)[real], raw[real], atol=1e-4, rtol=1e-4)
        # consecutive states are real sampler steps: DPM-Solver++ from state k on the same grid reaches state k+1
        solver = DPMSolverMultistepScheduler.from_config(a.noise_scheduler.config, algorithm_type="dpmsolver++")
        solver.set_timesteps(timesteps=t.tolist())
        nxt = solver.step(raw[:1], t[0], x_t[:1], return_dict=False)[0]
        torch.testing.assert_close(nxt, x_t[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_loss_is_the_dro_hinge_and_a_step_favours_the_experts(prediction_type):
    a, rows = adapter(prediction_type), expert_rows()
    step, prompts = DiffusionDROStep(num_inference_steps=STEPS), [r["prompt"] for r in rows]
    step.fill(a, prompts, torch.Generator().manual_seed(1))
    loss0, _ = step(a, rows, ctx(7))
    assert torch.equal(loss0, torch.full((4,), MARGIN))  # policy == snapshot == reference
    sgd_step(a, loss0, lr=1e-4)
    loss1, metrics1 = step(a, rows, ctx(7))  # the very same buffer states and expert noise
    assert (loss1 > 0).all() and loss1.mean() < MARGIN
    assert metrics1["dro/expert_gap"] < metrics1["dro/sample_gap"]  # expert error fell relative to the own sample's

    # the buffer draw (trajectory u, step k), then the expert noise over the padded expert batch
    g = torch.Generator().manual_seed(7)
    torch.rand(4, generator=g)
    k = torch.randint(0, STEPS, (4,), generator=g)
    frames = max(len(r["response"]) for r in rows)
    eps = torch.randn(4, frames, D, generator=g)
    j = torch.tensor([step.buffer.prompts.index(p) for p in prompts])
    buf = step.buffer.tensors
    x_own, t, eps_hat, mask_own = buf["x_t"][j, k], buf["t"][j, k], buf["eps_hat"][j, k], buf["mask"][j]
    x0 = torch.zeros(4, frames, D)
    mask_exp = torch.zeros(4, frames, dtype=torch.bool)
    for i, r in enumerate(rows):
        x0[i, : len(r["response"])], mask_exp[i, : len(r["response"])] = r["response"], True
    alpha, sigma = alpha_sigma(a, t)
    x_exp = alpha * x0 + sigma * eps
    if prediction_type == "sample":
        target_exp, target_own = x0, (x_own - sigma * eps_hat) / alpha
    else:
        target_exp, target_own = eps, eps_hat
    cond = HashText()(prompts)

    def errors(model):
        with torch.no_grad():
            le = masked_error(model(x_exp, t, cond, mask_exp), target_exp, mask_exp)
            lp = masked_error(model(x_own, t, cond, mask_own), target_own, mask_own)
        return le, lp

    (le, lp), (le_ref, lp_ref) = errors(a.unwrapped_policy), errors(a.reference)
    expected = torch.relu((le - le_ref) - (lp - lp_ref) + MARGIN)
    torch.testing.assert_close(loss1.detach(), expected, atol=1e-6, rtol=1e-4)  # errors ~1: float32 cancellation


def test_dropped_conditions_sample_and_score_with_the_null_condition():
    a = adapter(cond_drop_prob=1.0)  # every row dropped: the buffer's only prompt is the empty one
    step = DiffusionDROStep(num_inference_steps=STEPS)
    loss, _ = step(a, expert_rows(), ctx(2))
    assert torch.equal(loss, torch.full((4,), MARGIN))
    assert set(step.buffer.prompts) == {""}
    buf, model = step.buffer.tensors, a.unwrapped_policy.eval()
    x_t, t, mask = buf["x_t"][0], buf["t"][0], buf["mask"][0].expand(STEPS, -1)
    with torch.no_grad():
        null = model(x_t, t, buf["cond"][0].expand(STEPS, -1), mask, torch.ones(STEPS, dtype=torch.bool))
        captioned = model(x_t, t, buf["cond"][0].expand(STEPS, -1), mask)
    predicted = own_target(a, {"x_t": x_t, "t": t, "eps_hat": buf["eps_hat"][0]})
    real = mask.unsqueeze(-1).expand_as(null)
    torch.testing.assert_close(predicted[real], null[real], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(predicted[real], captioned[real], atol=1e-3)


def test_buffer_pads_motions_of_different_lengths():
    a = adapter()
    step = DiffusionDROStep(num_inference_steps=STEPS)
    step.fill(a, [PROMPTS[0]], torch.Generator().manual_seed(0))
    step.fill(a, [PROMPTS[1]], torch.Generator().manual_seed(2))
    buf = step.buffer.tensors
    lengths = buf["mask"].sum(1)
    assert buf["x_t"].shape[2] == buf["mask"].shape[1] == int(lengths.max()) and lengths[0] != lengths[1]
    short = int(lengths.argmin())
    assert not buf["x_t"][short, :, lengths[short]:].any() and not buf["mask"][short, lengths[short]:].any()
    loss, _ = step(a, [dict(r, prompt=PROMPTS[i]) for i, r in enumerate(expert_rows((10, 18)))], ctx(1))
    assert torch.equal(loss, torch.full((2,), MARGIN))


# ------------------------------------------------------------------------------------------------ DR-PO
def test_reset_rollout_is_the_sampler_run_from_the_noised_preferred_motion():
    a, rows = adapter(), expert_rows((12, 20))
    batch = a.collate(rows)
    noise = torch.randn(batch["motion"].shape, generator=torch.Generator().manual_seed(0))
    solver = DPMSolverMultistepScheduler.from_config(a.noise_scheduler.config, algorithm_type="dpmsolver++")
    solver.set_timesteps(STEPS)
    tail = solver.timesteps[2:]  # reset at the third grid step
    kwargs = a.start_state(batch, noise, tail[0].expand(2))
    out = a.sample([r["prompt"] for r in rows], 1, timesteps=tail, scheduler="dpmsolver++", guidance_scale=2.5,
                   generator=torch.Generator().manual_seed(1), **kwargs)

    alpha, sigma = alpha_sigma(a, tail[:1].expand(2))
    x, mask, cond = alpha * batch["motion"] + sigma * noise, batch["mask"], HashText()([r["prompt"] for r in rows])
    by_hand = DPMSolverMultistepScheduler.from_config(a.noise_scheduler.config, algorithm_type="dpmsolver++")
    by_hand.set_timesteps(timesteps=tail.tolist())
    model = a.unwrapped_policy.eval()
    with torch.no_grad():
        for t in by_hand.timesteps:
            x = by_hand.step(model.guided(x, t.expand(2), cond, mask, 2.5), t, x, return_dict=False)[0]
    assert torch.equal(out["mask"], mask)
    torch.testing.assert_close(out["motion"], x * mask.unsqueeze(-1), atol=1e-5, rtol=1e-5)


def mean_height(prompts, motions):
    return torch.stack([torch.sigmoid(m[:, 0].mean()) for m in motions])


def test_drpo_on_motion_resets_trains_and_names_the_reset_grid():
    a, rows = adapter(cond_drop_prob=0.0), expert_rows((12, 20))
    step = DRPOStep(mean_height, num_samples=2, beta=100.0, num_inference_steps=STEPS, reward_range=[0, 1],
                    sample_kwargs={"guidance_scale": 2.5})
    generator = torch.Generator().manual_seed(4)
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    kwargs, grid = step.noised_states(a, rows, generator)
    solver = DPMSolverMultistepScheduler.from_config(a.noise_scheduler.config, algorithm_type="dpmsolver++")
    solver.set_timesteps(STEPS)
    j = int(torch.randint(STEPS, (1,), generator=replay))
    eps = torch.randn(4, 20, D, generator=replay)
    x0 = a.collate(rows)["motion"].repeat_interleave(2, 0)
    alpha, sigma = alpha_sigma(a, solver.timesteps[j : j + 1].expand(4))
    torch.testing.assert_close(kwargs["start"], alpha * x0 + sigma * eps)
    assert kwargs["lengths"].tolist() == [12, 12, 20, 20] and grid.tolist() == solver.timesteps[j:].tolist()
    loss, metrics = step(a, rows, ctx(0))
    assert loss.requires_grad and torch.isfinite(loss).all() and 0 <= metrics["drpo/reset_depth"] < 1


# ------------------------------------------------------------------------------------------------ experiments
SHORT = ["train.max_steps=2", "train.batch_size=2", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
         "+data.train.limit=8", "evaluator.num_prompts=32", "evaluator.num_inference_steps=2",
         "evaluator.replications=2", "evaluator.num_gifs=0"]


@pytest.mark.parametrize("name, extra", [("motion_diffusion_dro", ["objective.num_inference_steps=4"]),
                                         ("motion_drpo", ["objective.num_inference_steps=3"])])
def test_short_motion_experiment_runs_on_the_shipped_model(tmp_path, name, extra):
    from hydra import compose, initialize_config_dir

    from genalign.cli import CONFIG_DIR, run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}", f"output_dir={tmp_path}", *SHORT, *extra])
    assert cfg.train.max_steps == 2  # the shipped configs run 100 x 8, motion_sopo's budget
    metrics = run(cfg)
    after = json.loads((tmp_path / "metrics.json").read_text())["after"]
    assert {"r_precision_top3", "fid", "mm_dist", "diversity"} <= set(after)
    first = metrics["history"][0]
    if name == "motion_diffusion_dro":
        assert first["loss"] == pytest.approx(MARGIN, rel=1e-4)  # policy = snapshot = reference at step 1
    else:
        assert first["loss"] == pytest.approx(math.log(2), rel=1e-4) or first["drpo/pairs"] == 0
