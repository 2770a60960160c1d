"""The shipped motion evaluator (assets/motion-evaluator) and reward model (assets/motion-reward) on the
regenerated synthetic test split: the evaluator retrieves real motions from their captions (top-3 R-precision
>= 0.9, far above shuffled pairs), the reward model scores matched caption/motion pairs above pairs from other
action families, and SoPo's `evaluator:` folder loading gives both judges."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genalign.data.humanml3d import HumanML3DDataset
from genalign.data.synthetic_motion import ensure_dataset
from genalign.eval.motion import r_precision
from genalign.models.t2m_evaluator import TextMotionEvaluator
from genalign.models.t2m_training import embed_dataset
from genalign.online.sopo import _evaluator_judges
from genalign.rewards.motion import MotionSimilarity, TextMotionRetrievalReward

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EVALUATOR, REWARD = ASSETS / "motion-evaluator", ASSETS / "motion-reward"
DRAWS = 4  # caption/crop draws of the 44 test motions (the shipped figures use 20)


@pytest.fixture(scope="module")
def test_split():
    root = ensure_dataset(ASSETS / "synthetic-motion")
    labels = json.loads((root / "labels.json").read_text())["motions"]
    return HumanML3DDataset(root, "test"), labels


@pytest.fixture(scope="module")
def evaluator():
    return TextMotionEvaluator.load(EVALUATOR)


@pytest.fixture(scope="module")
def reward_model(evaluator):
    """The reward model, sharing the evaluator's word-vector table (both use the packaged MiniLM's)."""
    specs = {json.loads((folder / "config.json").read_text())["config"]["word_vectors"] for folder in (EVALUATOR, REWARD)}
    assert specs == {"minilm"}
    return TextMotionEvaluator.load(REWARD, word_vectors=evaluator.vectorizer.vectors)


def top_k_hits(text: np.ndarray, motion: np.ndarray, k: int) -> float:
    """Independent R-precision on one batch: the fraction of texts whose own motion is among the k nearest."""
    distances = np.sqrt(((text[:, None] - motion[None]) ** 2).sum(-1))
    own = np.diag(distances)
    return float(((distances < own[:, None]).sum(1) < k).mean())


@pytest.mark.parametrize("folder", [EVALUATOR, REWARD])
def test_assets_are_small_and_record_how_they_were_trained(folder):
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5e6
    training = json.loads((folder / "config.json").read_text())["training"]
    assert training["test_real_motions"]["top3"]["mean"] >= 0.9
    assert f"{training['test_real_motions']['top3']['mean']:.3f} ±" in (folder / "README.md").read_text()


def test_evaluator_retrieves_real_motions_and_not_shuffled_ones(evaluator, test_split):
    dataset, _ = test_split
    real, shuffled = [], []
    for seed in range(DRAWS):
        draw = embed_dataset(evaluator, dataset, seed=100 + seed)
        text, motion = draw["text_emb"].numpy(), draw["motion_emb"].numpy()
        rows = np.random.default_rng(seed).permutation(len(text))[:32]  # one protocol batch of 32
        real.append(top_k_hits(text[rows], motion[rows], 3))
        shuffled.append(top_k_hits(text[rows], motion[np.roll(rows, 5)], 3))
        # the library metric on the same batch agrees with the independent count
        assert np.isclose(r_precision(text[rows], motion[rows])[2], real[-1])
    recorded = json.loads((EVALUATOR / "config.json").read_text())["training"]["test_real_motions"]["top3"]["mean"]
    assert np.mean(real) >= 0.9 and abs(np.mean(real) - recorded) < 0.08
    assert np.mean(shuffled) < 0.3  # chance is 3/32


def test_reward_model_orders_matched_above_other_families(reward_model, test_split):
    dataset, labels = test_split
    reward = TextMotionRetrievalReward(reward_model)
    draw = embed_dataset(reward_model, dataset, seed=7)
    family = np.array([labels[i]["family"] for i in draw["id"]])
    # each caption against the first motion after it (cyclically) from another family
    n = len(family)
    other = [next((i + s) % n for s in range(1, n) if family[(i + s) % n] != family[i]) for i in range(n)]
    matched = reward(draw["tokens"], draw["motion"], draw["length"])
    mismatched = reward(draw["tokens"], draw["motion"][other], draw["length"][other])
    assert ((matched > 0) & (matched <= 1)).all() and ((mismatched > 0) & (mismatched <= 1)).all()
    assert (matched > mismatched).float().mean() >= 0.9
    distance = torch.linalg.vector_norm(draw["text_emb"] - draw["motion_emb"], dim=-1)
    torch.testing.assert_close(matched, torch.exp(-distance / 5.0))


def test_reward_model_is_a_different_network_and_loads_as_sopo_judges(evaluator, reward_model, test_split):
    dataset, labels = test_split
    shipped = {json.loads((f / "config.json").read_text())["training"]["seed"] for f in (EVALUATOR, REWARD)}
    assert len(shipped) == 2
    assert not torch.equal(reward_model.text_encoder.hidden, evaluator.text_encoder.hidden)
    reward, similarity = _evaluator_judges(REWARD)
    assert isinstance(reward, TextMotionRetrievalReward) and isinstance(similarity, MotionSimilarity)
    draw = embed_dataset(similarity.evaluator, dataset, seed=3)
    motions, lengths = draw["motion"], draw["length"]
    family = np.array([labels[i]["family"] for i in draw["id"]])
    torch.testing.assert_close(similarity(motions, lengths, motions, lengths), torch.ones(len(motions)))
    matrix = similarity.kernel(draw["motion_emb"][:, None], draw["motion_emb"][None])  # the same kernel, all pairs
    same = torch.from_numpy(family[:, None] == family[None]) & ~torch.eye(len(family), dtype=torch.bool)
    different = torch.from_numpy(family[:, None] != family[None])
    assert matrix[same].mean() > matrix[different].mean() + 0.1


def test_embed_dataset_is_repeatable_batch_independent_and_leaves_the_rng(evaluator, test_split):
    dataset, _ = test_split
    state = torch.get_rng_state()
    first = embed_dataset(evaluator, dataset, seed=5, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)
    again = embed_dataset(evaluator, dataset, seed=5)
    assert first["clip"] == again["clip"] and first["tokens"] == again["tokens"]
    for key in ("text_emb", "motion_emb"):
        torch.testing.assert_close(first[key], again[key], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        direct = evaluator.encode_motion(first["motion"][:3], first["length"][:3])
        torch.testing.assert_close(first["motion_emb"][:3], direct, rtol=1e-5, atol=1e-5)
    assert embed_dataset(evaluator, dataset, seed=6)["clip"] != first["clip"]  # other crops under another seed
