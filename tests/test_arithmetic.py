"""The arithmetic embedded default: splits, pairs, the shipped tiny LM, its evaluator, and DPO improving it."""

from __future__ import annotations

import random

import pytest
import torch

from genalign import objectives
from genalign.adapters.text import TextAdapter
from genalign.data import arithmetic
from genalign.data.batching import pairwise_batch
from genalign.eval.text import ArithmeticEvaluator, implicit_reward_accuracy


def test_splits_are_disjoint_seeded_and_complete():
    train, heldout = arithmetic.problems("train"), arithmetic.problems("heldout")
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == arithmetic.MAX_OPERAND**2 and len(heldout) == 500
    assert arithmetic.problems("heldout") == heldout  # deterministic
    assert arithmetic.problems("heldout", seed=7) != heldout
    with pytest.raises(ValueError, match="unknown arithmetic split 'test'"):
        arithmetic.problems("test")


def test_carry_mistake_known_cases():
    assert arithmetic.carry_mistake(15, 17) == 22  # ones 5+7=12: the carry is dropped
    assert arithmetic.carry_mistake(13, 15) == 38  # ones 3+5=8: a carry is invented
    assert arithmetic.carry_mistake(12, 13) == 25  # ones 5: right
    wrong = sum(arithmetic.carry_mistake(a, b) != a + b for a, b in arithmetic.problems("all"))
    assert wrong == 0.64 * arithmetic.MAX_OPERAND**2


def test_pairs_and_labelled_rows():
    rows = arithmetic.pairs("heldout", n=200, seed=3)
    assert rows == arithmetic.pairs("heldout", n=200, seed=3)
    for row in rows:
        a, b = arithmetic.parse_prompt(row["prompt"])
        wrong = int(row["rejected"])
        assert row["chosen"] == str(a + b) and wrong != a + b and wrong >= 0
        assert abs(wrong - (a + b)) <= 10 or row["rejected"] == row["chosen"][::-1] or wrong == arithmetic.carry_mistake(a, b)
    labelled = arithmetic.labelled("train", n=300)
    assert all((row["completion"] == str(sum(arithmetic.parse_prompt(row["prompt"])))) == row["label"] for row in labelled)
    assert 100 < sum(row["label"] for row in labelled) < 200
    with pytest.raises(ValueError, match="n=600 heldout problems but the split has only 500"):
        arithmetic.pairs("heldout", n=600)
    with pytest.raises(ValueError, match="'a\\+b='"):
        arithmetic.parse_prompt("1-2=")


def test_noisy_answers_follow_their_mixture():
    rng = random.Random(0)
    draws = [arithmetic.noisy_answer(15, 17, rng, p_correct=0.3, p_mistake=0.5) for _ in range(4000)]
    assert draws.count(32) / 4000 == pytest.approx(0.3, abs=0.03)
    assert draws.count(22) / 4000 == pytest.approx(0.5 + 0.2 * 0.5, abs=0.03)  # + half of the other wrong draws


@pytest.fixture()
def tiny_lm():
    return TextAdapter.from_pretrained(arithmetic.TINY_LM_PATH, reference="lora",
                                       lora={"r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]},
                                       max_length=16, max_prompt_length=8)


def test_shipped_model_is_small_and_mediocre(tiny_lm):
    size = sum(f.stat().st_size for f in arithmetic.TINY_LM_PATH.iterdir())
    assert size < 2 * 2**20
    metrics = ArithmeticEvaluator(n=200)(tiny_lm)
    assert 0.2 <= metrics["accuracy"] <= 0.55
    # at step 0 the policy is the reference: every pair ties
    assert metrics["implicit_reward_accuracy"] == 0.5 and metrics["mean_margin"] == 0.0
    # its mistakes are the carry confusion it was trained on
    easy = [row for row in arithmetic.pairs("heldout") if arithmetic.carry_mistake(*arithmetic.parse_prompt(row["prompt"]))
            == int(row["chosen"])][:100]
    texts = tiny_lm.sample([row["prompt"] for row in easy], do_sample=False, max_new_tokens=4)["texts"]
    assert sum(t == row["chosen"] for t, row in zip(texts, easy)) >= 80


def test_implicit_reward_accuracy_matches_its_formula(tiny_lm):
    pairs = arithmetic.pairs("heldout", n=40)
    optimizer = torch.optim.Adam(tiny_lm.trainable_parameters(), lr=1e-2)
    chosen, rejected = tiny_lm.score_pairs(pairwise_batch(tiny_lm, pairs[:20]))
    (-chosen.policy.mean()).backward()  # any step that moves the policy
    optimizer.step()
    with torch.no_grad():
        chosen, rejected = tiny_lm.score_pairs(pairwise_batch(tiny_lm, pairs))
    margin = 0.5 * ((chosen.policy - chosen.reference) - (rejected.policy - rejected.reference))
    result = implicit_reward_accuracy(tiny_lm, pairs, beta=0.5, batch_size=16)
    assert result["implicit_reward_accuracy"] == pytest.approx(((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item())
    assert result["mean_margin"] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert margin.abs().max() > 0  # the step moved the policy off the reference


def test_dpo_raises_heldout_accuracy(tiny_lm):
    """60 Adam steps of DPO (beta 0.5, lr 3e-3, 32 pairs, LoRA r=8) on train pairs lift held-out greedy accuracy."""
    evaluator = ArithmeticEvaluator(n=200, beta=0.5)
    before = evaluator(tiny_lm)
    train = arithmetic.pairs("train", seed=1)
    rng = random.Random(0)
    optimizer = torch.optim.Adam(tiny_lm.trainable_parameters(), lr=3e-3)
    for _ in range(60):
        chosen, rejected = tiny_lm.score_pairs(pairwise_batch(tiny_lm, rng.sample(train, 32)))
        loss = objectives.dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=0.5).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluator(tiny_lm)
    assert after["accuracy"] >= before["accuracy"] + 0.2
    assert after["implicit_reward_accuracy"] > 0.9 and after["mean_margin"] > 0
