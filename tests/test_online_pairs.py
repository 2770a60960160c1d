"""AI-feedback pairs (argmax/argmin of a reward over the model's own samples, ties dropped and counted) and the
top-K demonstration set; both feed the training steps directly."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_pixel import pixel_adapter

from genalign.online.diffusion_dro import DiffusionDROStep
from genalign.online.pairs import ai_feedback_pairs, demonstration_set, sample_responses
from genalign.steps import StepContext, build_step


def brightness(prompts, responses):
    return torch.stack([r.float().mean() for r in responses])


def flat_for_cat(prompts, responses):
    """Mean brightness, except a constant for "a cat" (all of its samples tie)."""
    return torch.stack([torch.tensor(0.0) if p == "a cat" else r.mean() for p, r in zip(prompts, responses)])


PROMPTS = ["a cat", "a dog", "a fox"]
SAMPLE_KW = dict(num_inference_steps=4, guidance_scale=1.0)


def test_ai_feedback_pairs_pick_argmax_and_argmin_and_drop_ties():
    adapter = pixel_adapter()
    k = 4
    result = ai_feedback_pairs(adapter, PROMPTS, flat_for_cat, k, generator=torch.Generator().manual_seed(0),
                               **SAMPLE_KW)
    assert result.num_ties == 1 and [r["prompt"] for r in result.rows] == ["a dog", "a fox"]
    assert [r["row"] for r in result.rows] == [1, 2]

    # the same samples, drawn again, ranked here
    images = adapter.sample(PROMPTS, k, generator=torch.Generator().manual_seed(0), **SAMPLE_KW)["images"]
    for row in result.rows:
        i = PROMPTS.index(row["prompt"])
        group = images[i * k : (i + 1) * k]
        score = group.mean((1, 2, 3))
        assert score.argmax() != score.argmin()
        torch.testing.assert_close(row["chosen"], group[score.argmax()], atol=0, rtol=0)
        torch.testing.assert_close(row["rejected"], group[score.argmin()], atol=0, rtol=0)
        assert row["chosen_score"] == pytest.approx(float(score.max()), abs=1e-7)
        assert row["rejected_score"] == pytest.approx(float(score.min()), abs=1e-7)
        assert row["chosen_score"] > row["rejected_score"]

    # the pairs train as they are: Diffusion-DPO at init is ln 2
    loss, _ = build_step("dpo", beta=2500.0)(adapter, result.rows, StepContext(torch.Generator().manual_seed(0)))
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))


def test_ai_feedback_pairs_sampled_in_chunks_keep_rows_and_scores_consistent():
    adapter = pixel_adapter()
    result = ai_feedback_pairs(adapter, PROMPTS, brightness, 3, generator=torch.Generator().manual_seed(1),
                               batch_size=2, **SAMPLE_KW)
    assert result.num_ties == 0 and [(r["row"], r["prompt"]) for r in result.rows] == list(enumerate(PROMPTS))
    for row in result.rows:
        assert row["chosen_score"] == pytest.approx(float(row["chosen"].mean()), abs=1e-7)
        assert row["rejected_score"] == pytest.approx(float(row["rejected"].mean()), abs=1e-7)
        assert row["chosen_score"] > row["rejected_score"]


class MotionStub:
    """Stands in for a motion adapter's ``sample``: padded motions with a frame mask, sample i has i + 1 frames and
    values i (so its mean, the reward below, is i)."""

    def sample(self, prompts, num_samples, generator=None):
        n = len(prompts) * num_samples
        motion = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 5, 2).clone()
        mask = torch.arange(5) < (torch.arange(n) % 5 + 1).unsqueeze(1)
        return {"motion": motion * mask.unsqueeze(-1), "mask": mask}


def test_ai_feedback_pairs_work_on_motion_batches():
    result = ai_feedback_pairs(MotionStub(), ["walk", "jump"], brightness, 3)
    assert result.num_ties == 0
    walk, jump = result.rows
    assert walk["chosen"].shape == (3, 2) and torch.equal(walk["chosen"], torch.full((3, 2), 2.0))  # sample 2
    assert walk["rejected"].shape == (1, 2) and torch.equal(walk["rejected"], torch.zeros(1, 2))  # sample 0
    assert jump["chosen_score"] == 5.0 and jump["rejected_score"] == 3.0  # samples 3..5, their padding cut off


def test_ai_feedback_pairs_reject_bad_arguments_and_rewards():
    stub = MotionStub()
    with pytest.raises(ValueError, match="num_samples >= 2"):
        ai_feedback_pairs(stub, ["walk"], brightness, 1)
    with pytest.raises(ValueError, match=r"one score per response \(\[3\]\)"):
        ai_feedback_pairs(stub, ["walk"], lambda p, r: torch.zeros(2), 3)
    with pytest.raises(ValueError, match="non-finite score nan for prompt 'walk'"):
        ai_feedback_pairs(stub, ["walk"], lambda p, r: torch.full((3,), float("nan")), 3)
    with pytest.raises(ValueError, match="neither 'images' nor 'motion'"):
        sample_responses({"x0": torch.zeros(2, 1, 8, 8)})


def test_demonstration_set_keeps_the_top_k_by_reward():
    values = [0.3, 0.9, 0.1, 0.9, 0.5, 0.7]
    images = [torch.full((1, 8, 8), v) for v in values]
    prompts = ["a cat", "a dog", "a cat", "a fox", "a dog", "a cat"]
    top = demonstration_set(images, prompts, brightness, 3, batch_size=4)
    assert [r["row"] for r in top] == [1, 3, 5]  # 0.9, 0.9 (tie in input order), 0.7
    assert [r["reward"] for r in top] == pytest.approx([0.9, 0.9, 0.7])
    assert all(r["response"] is images[r["row"]] and r["prompt"] == prompts[r["row"]] for r in top)

    per_prompt = demonstration_set(images, prompts, brightness, 2, per_prompt=True)
    assert [r["row"] for r in per_prompt] == [5, 0, 1, 4, 3]  # cat: 0.7, 0.3; dog: 0.9, 0.5; fox: its only one

    with pytest.raises(ValueError, match="top_k=7 exceeds the 6 responses"):
        demonstration_set(images, prompts, brightness, 7)
    with pytest.raises(ValueError, match="6 responses but 5 prompts"):
        demonstration_set(images, prompts[:5], brightness, 2)

    # the rows are Diffusion-DRO's expert demonstrations as they are
    adapter = pixel_adapter()
    loss, _ = DiffusionDROStep(num_inference_steps=4)(adapter, top, StepContext(torch.Generator().manual_seed(0)))
    assert torch.equal(loss, torch.full((3,), 1e-3))
