"""The online experiments (text_oaif, text_nash_md, text_ipo_md, text_hypo, text_selm, digits_*) end to end on the
embedded defaults, shortened: configs compose, the judge and the sampler are built from them, metrics are written,
and the first loss is the known value at policy = reference."""

from __future__ import annotations

import json
import logging
import math

import pytest
from hydra import compose, initialize_config_dir

from genalign.cli import CONFIG_DIR, run
from genalign.data.prompt_rows import digit_caption_rows, prompt_rows

SHORT = ["train.max_steps=2", "train.batch_size=8", "train.save_every=0", "train.eval_every=0", "train.log_every=1"]


def compose_experiment(name, out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", f"output_dir={out}", *overrides])


def first_loss_at_reference(name, logs):
    """Policy = reference at step 1: every log-ratio is 0, so DPO-type losses are ln 2 (HyPO's KL surrogate and
    SELM's optimism term vanish), IPO's is (1/(2β))² = 25 at β = 0.1, and Nash-MD's KL estimate is 0."""
    if name == "text_oaif":
        return math.log(2) if logs["judge/valid"] > 0 else 0.0
    if name == "text_ipo_md":
        return 25.0 if logs["judge/valid"] > 0 else 0.0
    if name in ("text_hypo", "text_selm"):
        return math.log(2)
    assert logs["nash_md/kl"] == 0.0
    return logs["loss"]


@pytest.mark.parametrize("name", ["text_oaif", "text_nash_md", "text_ipo_md", "text_hypo", "text_selm"])
def test_short_text_experiment_writes_before_after_and_starts_at_the_known_loss(tmp_path, name):
    out = tmp_path / name
    metrics = run(compose_experiment(name, out, *SHORT, "evaluator.n=16", "+data.train.n=32", "train.cache_reference=false"))
    saved = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert set(saved[when]) == {"accuracy", "implicit_reward_accuracy", "mean_margin"}
    first = metrics["history"][0]
    assert first["loss"] == pytest.approx(first_loss_at_reference(name, first), rel=1e-5, abs=1e-7)
    assert len(metrics["history"]) == 2


def test_short_digits_nash_md_experiment_samples_mixtures_and_judges_with_the_classifier(tmp_path):
    out = tmp_path / "digits_nash_md"
    cfg = compose_experiment("digits_nash_md", out, *SHORT, "train.batch_size=2", "data.train.repeats=1",
                             "evaluator.protocol.per_digit=1", "evaluator.num_inference_steps=2",
                             "objective.sample.num_inference_steps=2")
    metrics = run(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["after"]) == {"reward", "prompt_accuracy", "fid"}
    first = metrics["history"][0]
    assert first["judge/pairs"] == 2 and first["judge/nan"] == 0 and first["nash_md/kl"] == 0.0


def test_prompt_rows():
    rows = digit_caption_rows(2)
    assert len(rows) % 20 == 0 and rows[0]["prompt"] == rows[1]["prompt"] and rows[5]["row"] == 5
    with pytest.raises(ValueError, match="got no prompts"):
        prompt_rows([])


def test_resumed_online_run_draws_the_same_samples_and_ends_with_the_same_weights(tmp_path, caplog):
    """The online steps keep no state besides the trainer's checkpointed generator: a run stopped after step 1 and
    resumed reaches exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    common = [*SHORT, "evaluator.n=8", "+data.train.n=32", "train.cache_reference=false", "train.save_every=1"]
    straight = run(compose_experiment("text_nash_md", tmp_path / "a", *common))
    run(compose_experiment("text_nash_md", tmp_path / "b", *common, "train.max_steps=1"))
    with caplog.at_level(logging.INFO, logger="genalign.train"):
        resumed = run(compose_experiment("text_nash_md", tmp_path / "b", *common))
    assert "at step 1" in caplog.text  # it really resumed from the step-1 checkpoint
    assert resumed["history"][-1]["loss"] == straight["history"][-1]["loss"]
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("a", "b"))
    assert all((a[k] == b[k]).all() for k in a)


def test_short_motion_oaif_experiment_judges_with_the_text_motion_reward(tmp_path):
    out = tmp_path / "motion_oaif"
    cfg = compose_experiment("motion_oaif", out, *SHORT, "train.batch_size=2", "data.train.num_prompts=4",
                             "evaluator.num_prompts=32", "evaluator.num_inference_steps=2", "evaluator.replications=2",
                             "evaluator.num_gifs=0", "objective.sample.num_inference_steps=2")
    metrics = run(cfg)
    assert {"r_precision_top3", "fid", "mm_dist"} <= set(json.loads((out / "metrics.json").read_text())["after"])
    first = metrics["history"][0]
    assert first["judge/pairs"] == 2 and first["judge/nan"] == 0
    assert first["loss"] == pytest.approx(math.log(2) if first["judge/valid"] else 0.0, rel=1e-5)
