import math

import numpy as np
import pytest
import torch
from t2m_synthetic import trained_setup

from genalign.rewards.motion import MotionSimilarity, TextMotionRetrievalReward


def other_class(n, step=4):
    """Held-out rows come in runs of 4 per class: row (i + 4) mod n always belongs to another class."""
    return (torch.arange(n) + step) % n


def test_reward_is_exp_of_minus_distance_over_half_the_margin():
    setup = trained_setup()
    test, evaluator = setup.test, setup.evaluator
    reward = TextMotionRetrievalReward(evaluator)
    r = reward(test["tokens"], test["motion"], test["length"])
    with torch.no_grad():
        distance = torch.linalg.vector_norm(
            evaluator.encode_text(test["tokens"]) - evaluator.encode_motion(test["motion"], test["length"]), dim=-1
        )
    torch.testing.assert_close(r, torch.exp(-distance / (evaluator.config.margin / 2)))
    assert ((r > 0) & (r <= 1)).all() and not r.requires_grad
    # monotone: ordering by reward is the reverse ordering by distance
    assert torch.equal(torch.argsort(r), torch.argsort(-distance))
    hot = TextMotionRetrievalReward(evaluator, temperature=2.0)(test["tokens"], test["motion"], test["length"])
    torch.testing.assert_close(hot, torch.exp(-distance / 2.0))


def test_reward_prefers_the_matching_caption_after_training():
    setup = trained_setup()
    test = setup.test
    captions = test["tokens"]
    mismatched = [captions[j] for j in other_class(len(captions))]
    gaps = {}
    for name, evaluator in (("untrained", setup.untrained), ("trained", setup.evaluator)):
        reward = TextMotionRetrievalReward(evaluator)
        matched = reward(captions, test["motion"], test["length"])
        wrong = reward(mismatched, test["motion"], test["length"])
        gaps[name] = (matched > wrong).float().mean().item(), (matched - wrong).mean().item()
    assert gaps["trained"][0] >= 0.8 and gaps["trained"][1] > 0.05
    assert gaps["trained"][0] > gaps["untrained"][0]


def test_sopo_picks_the_off_caption_sample_as_unpreferred():
    """K = 3 candidates per caption: two of its class, one of another; argmin r should be the other-class one."""
    setup = trained_setup()
    test = setup.test
    n = len(test["tokens"])
    same = torch.tensor([i // 4 * 4 + (i + 1) % 4 for i in range(n)])  # another clip of the same class
    order = torch.stack([torch.arange(n), same, other_class(n)], dim=1)  # [N, K]
    reward = TextMotionRetrievalReward(setup.evaluator)
    rows = order.flatten()
    r = reward([c for c in test["tokens"] for _ in range(3)], test["motion"][rows], test["length"][rows])
    picked = r.view(n, 3).argmin(dim=1)
    assert (picked == 2).float().mean() >= 0.8


def test_similarity_is_one_on_identical_motions_and_lower_elsewhere():
    setup = trained_setup()
    test = setup.test
    motions, lengths = test["motion"], test["length"]
    similarity = MotionSimilarity(setup.evaluator)
    self_sim = similarity(motions, lengths, motions, lengths)
    torch.testing.assert_close(self_sim, torch.ones(len(motions)))
    j = other_class(len(motions))
    cross = similarity(motions, lengths, motions[j], lengths[j])
    assert ((cross > 0) & (cross < 1)).all()
    torch.testing.assert_close(cross, similarity(motions[j], lengths[j], motions, lengths))  # symmetric
    with torch.no_grad():
        emb = setup.evaluator.encode_motion(motions, lengths)
    torch.testing.assert_close(cross, torch.exp(-torch.linalg.vector_norm(emb - emb[j], dim=-1) / 5.0))
    same = torch.tensor([i // 4 * 4 + (i + 1) % 4 for i in range(len(motions))])
    assert similarity(motions, lengths, motions[same], lengths[same]).mean() > cross.mean()


def test_min_similarity_over_candidates():
    setup = trained_setup()
    test = setup.test
    motions, lengths = test["motion"][:6], test["length"][:6]
    similarity = MotionSimilarity(setup.evaluator)
    index = torch.tensor([[1, 2, 5], [0, 0, 3], [4, 2, 1], [5, 0, 2], [3, 1, 0], [2, 4, 3]])
    got = similarity.min_similarity(motions, lengths, motions[index], lengths[index])
    expected = torch.stack(
        [min(similarity(motions[i : i + 1], lengths[i : i + 1], motions[k : k + 1], lengths[k : k + 1]) for k in row)[0]
         for i, row in enumerate(index.tolist())]
    )  # fmt: skip
    torch.testing.assert_close(got, expected)
    assert (got > 0).all() and (got < 1).all()
    with pytest.raises(ValueError, match=r"candidate_lengths must be \[N, K\]"):
        similarity.min_similarity(motions, lengths, motions[index], lengths[:6])


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        TextMotionRetrievalReward(trained_setup().evaluator, temperature=temperature)


def test_count_mismatch_is_refused():
    setup = trained_setup()
    test = setup.test
    with pytest.raises(ValueError, match="one caption per motion: 2 captions, 3 motions"):
        TextMotionRetrievalReward(setup.evaluator)(test["tokens"][:2], test["motion"][:3], test["length"][:3])
    assert np.isclose(TextMotionRetrievalReward(setup.evaluator).temperature, 5.0)
