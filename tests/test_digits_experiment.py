"""The digits experiments (digits_dro / digits_dpo / digits_kto) end to end on the shipped digits UNet, shortened,
and the row builders they train on (checked against the digit classifier computed here)."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genalign.cli import CONFIG_DIR, build_rows, run
from genalign.data import digits_rows
from genalign.data.digits import DigitsDataset, parse_digit
from genalign.rewards.digit_classifier import load_digit_classifier

SHORT = [
    "train.max_steps=2", "train.batch_size=4", "train.save_every=0", "train.log_every=1",
    "evaluator.protocol.per_digit=2", "evaluator.num_inference_steps=2",
]  # fmt: skip
SHORT_DATA = {
    "digits_dro": ["data.train.top_k=16", "objective.num_inference_steps=2"],
    "digits_dpo": ["data.train.prompts_per_caption=1", "data.train.num_samples=2"],
    # weight 1 for likes too, so every sample's loss at step 0 is the same sigma(0)
    "digits_kto": ["data.train.prompts_per_caption=1", "data.train.num_samples=2", "objective.desirable_weight=1.0"],
}
#: the loss at step 0, where policy == reference: relu(0 + m) for DRO, ln 2 for DPO, sigma(0) for KTO
LOSS_AT_INIT = {"digits_dro": 1e-3, "digits_dpo": math.log(2), "digits_kto": 0.5}


def compose_experiment(name, out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


def prompted_probability(classifier, images, prompts):
    """p_cls(prompted digit | image), computed here from the classifier's logits."""
    with torch.no_grad():
        probs = classifier(torch.stack(list(images))).softmax(-1)
    return probs[torch.arange(len(prompts)), torch.tensor([parse_digit(p) for p in prompts])]


@pytest.mark.parametrize("experiment", ["digits_dro", "digits_dpo", "digits_kto"])
def test_short_experiment_writes_metrics_grids_and_starts_at_the_known_loss(tmp_path, experiment):
    out = tmp_path / experiment
    cfg = compose_experiment(experiment, out, *SHORT, *SHORT_DATA[experiment])
    metrics = run(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert set(saved[when]) == {"reward", "prompt_accuracy", "fid"}
        assert 0.0 <= saved[when]["reward"] <= 1.0 and 0.0 <= saved[when]["prompt_accuracy"] <= 1.0
        assert saved[when]["fid"] > 0.0
        assert (out / f"samples_{when}.png").stat().st_size > 0
    assert metrics["history"][0]["loss"] == pytest.approx(LOSS_AT_INIT[experiment], rel=1e-4)
    assert len(metrics["history"]) == 2


def test_demonstration_rows_are_the_top_real_digits_by_classifier_reward(classifier):
    rows = digits_rows.demonstration_rows(top_k=50)
    data = DigitsDataset("train", 16)
    everything = prompted_probability(classifier, data.images, data.prompts)
    assert len(rows) == 50
    assert [r["row"] for r in rows] == torch.sort(everything, descending=True, stable=True).indices[:50].tolist()
    for r in rows[:5]:
        assert r["prompt"] == data.prompts[r["row"]] and torch.equal(r["response"], data.images[r["row"]])
        assert r["reward"] == pytest.approx(float(everything[r["row"]]), abs=1e-6)


@pytest.fixture(scope="module")
def base_adapter(tmp_path_factory):
    cfg = compose_experiment("digits_dpo", tmp_path_factory.mktemp("adapter"))
    return instantiate(cfg.adapter)


def test_feedback_pairs_rank_base_samples_by_the_classifier_and_are_cached(base_adapter, classifier, tmp_path):
    cache = tmp_path / "pairs.pt"
    kw = {"prompts_per_caption": 1, "num_samples": 3, "num_inference_steps": 2, "cache_file": cache, "seed": 3}
    rows = digits_rows.feedback_pairs(base_adapter, **kw)
    assert 0 < len(rows) <= 50 and cache.exists()
    prompts = [r["prompt"] for r in rows]
    chosen = prompted_probability(classifier, [r["chosen"] for r in rows], prompts)
    rejected = prompted_probability(classifier, [r["rejected"] for r in rows], prompts)
    assert torch.allclose(chosen, torch.tensor([r["chosen_score"] for r in rows]), atol=1e-6)
    assert torch.allclose(rejected, torch.tensor([r["rejected_score"] for r in rows]), atol=1e-6)
    assert (chosen > rejected).all()
    with mock.patch.object(type(base_adapter), "sample", side_effect=AssertionError("sampled again")):
        again = digits_rows.feedback_pairs(base_adapter, **kw)  # from the cache: no sampling
    assert len(again) == len(rows) and all(torch.equal(a["chosen"], b["chosen"]) for a, b in zip(again, rows))
    changed = digits_rows.feedback_pairs(base_adapter, **{**kw, "seed": 4})  # another setting: sampled anew
    assert not all(torch.equal(a["chosen"], b["chosen"]) for a, b in zip(changed, rows))


def test_feedback_labels_mark_desirable_where_the_prompted_digit_is_more_likely_than_half(base_adapter, classifier):
    rows = digits_rows.feedback_labels(base_adapter, prompts_per_caption=1, num_samples=2, num_inference_steps=2)
    assert len(rows) == 100 and [r["row"] for r in rows] == list(range(100))
    assert [r["prompt"] for r in rows[:4]] == [digits_rows.all_captions()[0]] * 2 + [digits_rows.all_captions()[1]] * 2
    p = prompted_probability(classifier, [r["response"] for r in rows], [r["prompt"] for r in rows])
    assert [r["desirable"] for r in rows] == (p > 0.5).tolist()
    with pytest.raises(ValueError, match="threshold"):
        digits_rows.feedback_labels(base_adapter, threshold=1.5)


def rows_for(adapter, n):
    """A builder that asks for the adapter (cli.build_rows must pass it)."""
    return [{"adapter": adapter, "row": i} for i in range(n)]


def rows_without_adapter(n):
    return [{"row": i} for i in range(n)]


def test_build_rows_passes_the_adapter_only_to_builders_that_ask_for_it():
    adapter = object()
    asks = build_rows(OmegaConf.create({"_target_": f"{__name__}.rows_for", "n": 2}), adapter)
    assert [r["adapter"] for r in asks] == [adapter, adapter]
    plain = build_rows(OmegaConf.create({"_target_": f"{__name__}.rows_without_adapter", "n": 2}), adapter)
    assert plain == [{"row": 0}, {"row": 1}]


def test_evaluator_scores_the_ema_weights_and_restores_the_live_ones(tmp_path):
    """With an EMA, the digits evaluator samples with the EMA weights (as Diffusion-DPO/-DRO evaluate), and the
    live policy weights are back in place afterwards."""
    cfg = compose_experiment("digits_dro", tmp_path, "adapter.ema_decay=0.5", "evaluator.protocol.per_digit=1",
                             "evaluator.num_inference_steps=2")  # fmt: skip
    adapter, evaluator = instantiate(cfg.adapter), instantiate(cfg.evaluator)
    params = adapter.trainable_parameters()
    adapter.ema_step()  # the EMA now holds the base weights ...
    with torch.no_grad():
        for p in params:  # ... and the live policy moves away from them
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    live = [p.detach().clone() for p in params]

    def draw():
        return evaluator.protocol.generate(lambda prompts, generator: adapter.sample(
            prompts, generator=generator, **evaluator.sample_kw)["images"])

    raw_images = draw()
    with torch.no_grad():
        for p, shadow in zip(params, adapter.ema.shadow_params):
            p.copy_(shadow)
        ema_images = draw()
        for p, value in zip(params, live):
            p.copy_(value)
    assert not torch.allclose(raw_images, ema_images, atol=1e-3)
    with torch.no_grad():
        metrics = evaluator(adapter, tag="after", output_dir=tmp_path)
    assert metrics == evaluator.protocol.metrics(ema_images)
    assert metrics != evaluator.protocol.metrics(raw_images)
    assert all(torch.equal(p, value) for p, value in zip(params, live))


def test_evaluator_sample_cache_is_keyed_by_the_weights(tmp_path):
    """With cache_dir, the same weights and protocol load the stored samples (no sampling, same metrics); other
    weights sample again under a new key."""
    cfg = compose_experiment("digits_dro", tmp_path, "evaluator.protocol.per_digit=1", "evaluator.num_inference_steps=2",
                             f"+evaluator.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    adapter, evaluator = instantiate(cfg.adapter), instantiate(cfg.evaluator)
    calls = []
    sample = adapter.sample
    adapter.sample = lambda *a, **k: calls.append(1) or sample(*a, **k)
    with torch.no_grad():
        first = evaluator(adapter)
        assert len(calls) == 1 and len(list((tmp_path / "cache").glob("*.pt"))) == 1
        assert evaluator(adapter) == first and len(calls) == 1
        for p in adapter.trainable_parameters():
            p.add_(0.05)
        adapter.ema_step()  # the evaluated (EMA) weights: decay 0 at the first step, so now the moved weights
        moved = evaluator(adapter)
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert moved != first


def test_the_three_digits_experiments_share_one_budget(tmp_path):
    """DRO, DPO and KTO are compared at the same optimizer steps x batch and the same evaluation protocol."""
    configs = {name: compose_experiment(name, tmp_path / name) for name in ("digits_dro", "digits_dpo", "digits_kto")}
    budgets = {name: (cfg.train.max_steps, cfg.train.batch_size, cfg.train.gradient_accumulation_steps)
               for name, cfg in configs.items()}  # fmt: skip
    assert len(set(budgets.values())) == 1, budgets
    evaluators = {name: OmegaConf.to_yaml(cfg.evaluator) for name, cfg in configs.items()}
    assert len(set(evaluators.values())) == 1


def test_digits_dro_experts_are_the_top_digits_of_every_caption(tmp_path, classifier):
    """digits_dro's experts: the top_k training digits of each caption by the classifier, so every digit is
    represented about equally (a global top-K keeps far fewer of the hard digits)."""
    cfg = compose_experiment("digits_dro", tmp_path)
    rows = instantiate(cfg.data.train)
    data = DigitsDataset("train", 16)
    reward = prompted_probability(classifier, data.images, data.prompts)
    top_k = cfg.data.train.top_k
    for prompt in set(data.prompts):
        members = [i for i, p in enumerate(data.prompts) if p == prompt]
        best = sorted(members, key=lambda i: -float(reward[i]))[:top_k]
        assert sorted(r["row"] for r in rows if r["prompt"] == prompt) == sorted(best), prompt
    per_digit = torch.bincount(torch.tensor([parse_digit(r["prompt"]) for r in rows]), minlength=10)
    assert per_digit.min() >= 0.9 * per_digit.max(), per_digit
