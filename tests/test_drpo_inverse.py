"""DR-PO (text, tiny arithmetic LM) and inverse alignment (exact tabular adapter): reset states, reward-picked pairs
and DPO values against independent recomputation, the refit's subset and fit, exact resume, bad input."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from test_online_steps_a import redraw
from tiny_pixel import expert_rows, pixel_adapter

from genalign.adapters.tabular import TabularAdapter
from genalign.adapters.text import TextAdapter
from genalign.data.arithmetic import TINY_LM_PATH, pairs
from genalign.objectives import dpo
from genalign.online import draws
from genalign.online.drpo import DRPOStep
from genalign.online.inverse_alignment import InverseAlignmentStep, fit_bradley_terry
from genalign.steps import StepContext, build_step
from genalign.train import Trainer, TrainConfig


@pytest.fixture(scope="module")
def text_adapter():
    adapter = TextAdapter.from_pretrained(TINY_LM_PATH, reference="copy", max_length=32, max_prompt_length=16)
    with torch.no_grad():
        for p in adapter.policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return adapter


def answer_length(prompts, responses):
    """A toy reward: the length of the full response (distinguishes 1-, 2- and 3-character answers)."""
    return torch.tensor([float(len(r)) for r in responses])


# ------------------------------------------------------------------------------------------------ DR-PO
def test_drpo_resets_are_token_prefixes_of_the_preferred_response(text_adapter):
    step = DRPOStep(answer_length)
    rows = [{"prompt": "12+34=", "chosen": "46", "rejected": "36"}, {"prompt": "1+2=", "response": "3"}]
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        prompts, prefixes = step.reset_states(text_adapter, rows, generator)
        assert prompts == ["12+34=", "1+2="] and prefixes[1] == ""  # a 1-token response resets only at h = 0
        assert prefixes[0] in ("", "4")  # h ∈ {0, 1}: never the whole response
        seen.add(prefixes[0])
    assert seen == {"", "4"}


def test_drpo_loss_is_dpo_on_the_reward_best_and_worst_continuations(text_adapter, monkeypatch):
    captured = {}
    real_draw = draws.draw

    def spy(adapter, prompts, k, generator, **kw):
        captured["starts"], captured["samples"] = list(prompts), real_draw(adapter, prompts, k, generator, **kw)
        return captured["samples"]

    monkeypatch.setattr(draws, "draw", spy)
    step = DRPOStep(answer_length, num_samples=4, beta=0.3, sample_kwargs={"max_new_tokens": 4, "temperature": 3.0})
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b)} for a, b in ((12, 34), (7, 8), (40, 9), (25, 25))]
    loss, metrics = step(text_adapter, rows, StepContext(torch.Generator().manual_seed(3)))
    samples, k = captured["samples"], 4
    prefixes = [s[len(r["prompt"]):] for s, r in zip(captured["starts"], rows)]
    reward = torch.tensor([len(prefixes[q // k] + t) for q, t in enumerate(samples["texts"])], dtype=torch.float32)
    reward = torch.where(draws.ended(text_adapter, samples), reward, reward.min() - 1).view(len(rows), k)
    with torch.no_grad():
        scores = text_adapter.score(samples)
    pol, ref = scores.policy.view(-1, k), scores.reference.view(-1, k)
    expected = [dpo(pol[b, [reward[b].argmax()]], pol[b, [reward[b].argmin()]], ref[b, [reward[b].argmax()]],
                    ref[b, [reward[b].argmin()]], beta=0.3) for b in range(len(rows)) if reward[b].max() > reward[b].min()]
    assert expected, "the toy reward should separate some continuations"
    torch.testing.assert_close(loss.detach(), torch.cat(expected), rtol=1e-4, atol=1e-6)
    assert metrics["drpo/ties"] == len(rows) - len(expected)


def test_drpo_counts_unfinished_rollouts_and_rejects_bad_input(text_adapter):
    step = DRPOStep("genalign.online.judges.arithmetic_correctness", sample_kwargs={"max_new_tokens": 1},
                    reward_range=[0, 1])
    rows = [{"prompt": "12+34=", "chosen": "46"}, {"prompt": "40+9=", "chosen": "49"}]
    loss, metrics = step(text_adapter, rows, StepContext(torch.Generator().manual_seed(0)))
    assert metrics["drpo/unfinished"] > 0 and torch.isfinite(loss).all()
    with pytest.raises(TypeError, match="DR-PO resets to states of preferred text or images"):
        step(TabularAdapter(1, 2), [{"prompt": 0, "chosen": 1}], StepContext(torch.Generator()))
    with pytest.raises(ValueError, match="row 5: DR-PO needs a string 'prompt'"):
        step(text_adapter, [{"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "row": 5}],
             StepContext(torch.Generator()))
    out_of_range = DRPOStep(answer_length, reward_range=[0, 1], sample_kwargs={"max_new_tokens": 4})
    with pytest.raises(ValueError, match="outside the declared reward_range"):
        out_of_range(text_adapter, rows, StepContext(torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="num_samples"):
        build_step("drpo", reward=answer_length, num_samples=1)


def brightness(prompts, images):
    return torch.stack([image.mean() for image in images])


def test_drpo_diffusion_resets_are_the_preferred_image_noised_on_the_grid():
    adapter = pixel_adapter()
    rows = expert_rows(2)
    step = DRPOStep(brightness, num_samples=3, num_inference_steps=5)
    generator = torch.Generator().manual_seed(4)
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    start, grid = step.noised_states(adapter, rows, generator)
    start = start["start"]  # sample() keyword arguments
    solver = DPMSolverMultistepScheduler.from_config(adapter.noise_scheduler.config, algorithm_type="dpmsolver++")
    solver.set_timesteps(5)
    full = solver.timesteps
    j = int(torch.randint(5, (1,), generator=replay))
    x0 = torch.stack([r["response"] for r in rows]).repeat_interleave(3, 0)
    eps = torch.randn(x0.shape, generator=replay)
    alpha = adapter.noise_scheduler.alphas_cumprod[int(full[j])]
    torch.testing.assert_close(start, alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps)
    assert grid.tolist() == full[j:].tolist()


def test_sampling_from_a_late_reset_stays_near_the_preferred_image():
    adapter = pixel_adapter()
    image = expert_rows(1)[0]["response"][None]
    t = torch.tensor([1])
    start = adapter.noise_scheduler.add_noise(image, torch.randn(image.shape, generator=torch.Generator()), t)
    out = adapter.sample(["a cat"], 1, start=start, timesteps=t, guidance_scale=1.0, decode=False)
    assert (out["x0"] - image).abs().max() < 0.1  # one denoising step from t = 1 barely moves the image
    with pytest.raises(ValueError, match="start must hold one state per returned sample"):
        adapter.sample(["a cat"], 2, start=start, timesteps=t)


def test_drpo_diffusion_loss_is_diffusion_dpo_on_best_and_worst_with_shared_noise(monkeypatch):
    adapter = pixel_adapter()
    rows = expert_rows(2)
    captured = {}
    real_draw, real_score = draws.draw, adapter.score

    def spy_draw(*args, **kw):
        captured["samples"] = real_draw(*args, **kw)
        return captured["samples"]

    def spy_score(samples, *, groups=None, generator=None, with_reference=True):
        captured["groups"] = groups.clone()
        captured["generator"] = torch.Generator()
        captured["generator"].set_state(generator.get_state())
        return real_score(samples, groups=groups, generator=generator, with_reference=with_reference)

    monkeypatch.setattr(draws, "draw", spy_draw)
    monkeypatch.setattr(adapter, "score", spy_score)
    step = DRPOStep(brightness, num_samples=3, beta=50.0, num_inference_steps=4,
                    sample_kwargs={"guidance_scale": 1.0})
    loss, _ = step(adapter, rows, StepContext(torch.Generator().manual_seed(1)))
    samples = captured["samples"]
    assert captured["groups"].tolist() == [0, 0, 0, 1, 1, 1]  # a prompt's rollouts share t and noise
    reward = torch.stack([img.mean() for img in samples["images"]]).view(2, 3)
    with torch.no_grad():
        scores = real_score(samples, groups=captured["groups"], generator=captured["generator"])
    pol, ref = scores.policy.view(2, 3), scores.reference.view(2, 3)
    b, w, l = torch.arange(2), reward.argmax(1), reward.argmin(1)
    expected = dpo(pol[b, w], pol[b, l], ref[b, w], ref[b, l], beta=50.0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ inverse alignment
TAB_PAIRS = [{"prompt": 0, "chosen": w, "rejected": l, "row": i}
             for i, (w, l) in enumerate([(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)])]


def tab_adapter(probs=(0.1, 0.2, 0.3, 0.4)):
    adapter = TabularAdapter(1, 4)
    with torch.no_grad():
        adapter.policy.logits.copy_(torch.tensor([probs]).log())
    return adapter


def test_inverse_alignment_refits_on_the_pairs_closest_to_the_policy():
    adapter = tab_adapter()
    step = InverseAlignmentStep(TAB_PAIRS, subset_fraction=0.5, rm_lr=0.1, rm_epochs=100, rm_batch_size=3)
    indices, close = step.closest(adapter)
    logp = np.log([0.1, 0.2, 0.3, 0.4])
    c = [0.5 * (logp[p["chosen"]] + logp[p["rejected"]]) for p in TAB_PAIRS]
    assert indices == list(np.argsort(c)[::-1][:3])  # pairs (2, 3), (1, 3), (1, 2): the likeliest actions
    np.testing.assert_allclose(close.numpy(), np.sort(c)[::-1][:3], rtol=1e-5)
    step.refit(adapter, torch.Generator().manual_seed(0))
    r = step.reward_model([(0, a) for a in range(4)]).detach()
    assert r[1] > r[2] > r[3]  # the order the subset states; action 0 appears in no kept pair
    assert step.last_fit["inverse/rm_train_accuracy"] == 1.0 and step.phase == 1 and not step.due


def test_inverse_alignment_warm_start_fine_tunes_one_reward_model():
    """warm_start (FRFT): the first fit uses every offline pair, the next refit continues training that same model
    on the closest subset — equal to fitting a copy of it on that subset with the same seed."""
    adapter = tab_adapter()
    step = InverseAlignmentStep(TAB_PAIRS, subset_fraction=0.5, rm_lr=0.1, rm_epochs=3, rm_batch_size=2,
                                warm_start=True)
    generator = torch.Generator().manual_seed(0)
    seeds = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(0)).tolist()
    step.refit(adapter, generator)
    assert step.last_fit["inverse/rm_pairs"] == len(TAB_PAIRS)
    first = step.reward_model
    expected = copy.deepcopy(first)
    indices, _ = step.closest(adapter)
    fit_bradley_terry(expected, [TAB_PAIRS[i] for i in indices], epochs=3, batch_size=2, lr=0.1,
                      generator=torch.Generator().manual_seed(seeds[1]))
    step.refit(adapter, generator)
    assert step.reward_model is first and step.last_fit["inverse/rm_pairs"] == 3 and step.phase == 2
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(first.state_dict()[name], value, msg=name)


def test_inverse_alignment_online_loss_is_dpo_on_the_reward_models_best_and_worst():
    adapter = tab_adapter((0.25, 0.25, 0.25, 0.25))
    step = InverseAlignmentStep(TAB_PAIRS, subset_fraction=1.0, num_samples=4, beta=0.5, rm_epochs=50)
    generator = torch.Generator().manual_seed(2)
    step.refit(adapter, generator)
    with torch.no_grad():
        adapter.policy.logits.copy_(torch.tensor([[0.3, -0.2, 0.1, 0.0]]))
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    loss, _ = step(adapter, [{"prompt": 0}, {"prompt": 0}], StepContext(generator))
    drawn = redraw(torch.softmax(adapter.policy.logits.detach(), -1), [0, 0], 4, replay).reshape(2, 4)
    rm = step.reward_model([(0, a) for a in range(4)]).detach()
    lp = torch.log_softmax(adapter.policy.logits.detach()[0], -1)
    expected = []
    for actions in drawn:
        values = rm[actions]
        if values.max() > values.min():
            w, l = actions[values.argmax()], actions[values.argmin()]
            expected.append(dpo(lp[w].reshape(1), lp[l].reshape(1), torch.tensor([0.25]).log(), torch.tensor([0.25]).log(), beta=0.5))
    torch.testing.assert_close(loss.detach(), torch.cat(expected), rtol=1e-5, atol=1e-7)


def test_inverse_alignment_phases_and_exact_resume(tmp_path):
    prompts = [{"prompt": 0, "row": i} for i in range(4)]

    def run(out, steps):
        adapter = TabularAdapter(1, 4)
        step = InverseAlignmentStep(TAB_PAIRS, refit_every=2, num_samples=3, rm_epochs=3)
        cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=2, learning_rate=0.1, save_every=3,
                          log_every=1)
        Trainer(adapter, step, prompts, cfg).train()
        return adapter.policy.logits.detach().clone(), step.phase, step.reward_model.embed.weight.detach().clone()

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6)
    assert straight[1] == resumed[1] == 3  # refits before steps 1, 3 and 5
    assert torch.equal(straight[0], resumed[0]) and torch.equal(straight[2], resumed[2])


def test_inverse_alignment_bad_input():
    with pytest.raises(ValueError, match="offline pair 1 has no field"):
        InverseAlignmentStep([TAB_PAIRS[0], {"prompt": 0, "chosen": 1, "row": 1}])
    with pytest.raises(ValueError, match="got none"):
        InverseAlignmentStep([])
    with pytest.raises(ValueError, match="subset_fraction"):
        build_step("inverse_alignment", pairs=TAB_PAIRS, subset_fraction=0.0)
    built = build_step("inverse_alignment", pairs={"_target_": "genalign.data.arithmetic.pairs", "split": "heldout",
                                                    "n": 5})
    assert built.pairs == pairs("heldout", n=5)


def test_reference_feature_reward_model_generalises_to_held_out_pairs(text_adapter):
    """A head on the frozen tiny LM's features, fitted on 300 training pairs, ranks held-out pairs better than
    chance, where the hashed n-gram model (memorising the training strings) stays near chance."""
    train, held = pairs("train", n=300), pairs("heldout", n=200)
    accuracy = {}
    for kind in ("reference", "hashed"):
        step = InverseAlignmentStep(train, subset_fraction=1.0, rm_features=kind, rm_lr=0.01, rm_epochs=20)
        step.refit(text_adapter, torch.Generator().manual_seed(0))
        with torch.no_grad():
            margin = (step.reward_model([(p["prompt"], p["chosen"]) for p in held])
                      - step.reward_model([(p["prompt"], p["rejected"]) for p in held]))
        accuracy[kind] = float((margin > 0).float().mean())
    assert accuracy["reference"] > 0.6 and accuracy["reference"] > accuracy["hashed"] + 0.05, accuracy
    records = [(p["prompt"], p["chosen"]) for p in held[:5]]
    batch = text_adapter.collate([{"prompt": x, "response": y} for x, y in records])
    reference_rm = InverseAlignmentStep(train, rm_features="reference").new_reward_model(text_adapter)
    torch.testing.assert_close(reference_rm(batch), reference_rm(records))  # a drawn batch scores like its texts
    with pytest.raises(TypeError, match="not a TextAdapter"):
        InverseAlignmentStep(TAB_PAIRS, rm_features="reference").refit(tab_adapter(), torch.Generator())


def test_finetuned_reward_model_fits_its_own_copy_of_the_reference(text_adapter):
    """rm_features='finetune': the Bradley–Terry fit trains a copy of the reference LM with the head (the training
    pairs' BT loss, recomputed here, falls), the adapter's reference stays as it was, and the copy is checkpointed."""
    train = pairs("train", n=64)
    step = InverseAlignmentStep(train, subset_fraction=1.0, rm_features="finetune", rm_lr=1e-3, rm_epochs=3)
    reference = {k: v.clone() for k, v in text_adapter.reference_model.state_dict().items()}
    chosen, rejected = [(p["prompt"], p["chosen"]) for p in train], [(p["prompt"], p["rejected"]) for p in train]

    def bt_loss(rm):
        with torch.no_grad():
            return float(torch.nn.functional.softplus(rm(rejected) - rm(chosen)).mean())

    torch.manual_seed(0)
    before = bt_loss(step.new_reward_model(text_adapter))
    step.refit(text_adapter, torch.Generator().manual_seed(0))
    rm = step.reward_model
    assert bt_loss(rm) < before - 0.05
    for name, value in text_adapter.reference_model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert any(not torch.equal(p, reference[k]) for k, p in rm.backbone.state_dict().items())
    reloaded = step.new_reward_model(text_adapter)
    reloaded.load_state_dict(rm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(chosen[:8]), rm(chosen[:8]))
    no_copy = TextAdapter.from_pretrained(TINY_LM_PATH, reference="none", max_length=32, max_prompt_length=16)
    with pytest.raises(ValueError, match="reference='copy'"):
        step.new_reward_model(no_copy)
