"""Motion metrics (Guo et al. 2022 protocol) against brute-force loops and known cases."""

import logging
import math

import numpy as np
import pytest
import torch

from genalign.eval.motion import (
    MotionMetrics,
    confidence_interval,
    diversity,
    evaluate_embeddings,
    fid,
    gaussian_frechet_distance,
    mm_dist,
    multimodality,
    r_precision,
    replicate,
)


def brute_r_precision(text, motion, top_k=3, batch_size=32):
    hits = [0] * top_k
    batches = len(text) // batch_size
    for b in range(batches):
        for i in range(batch_size):
            t = text[b * batch_size + i]
            dists = [math.dist(t, motion[b * batch_size + j]) for j in range(batch_size)]
            closer = sum(d < dists[i] for d in dists)
            for k in range(top_k):
                hits[k] += closer <= k
    return np.array(hits) / (batches * batch_size)


def psd_sqrt(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_r_precision_matches_brute_force_and_drops_the_partial_batch(caplog):
    rng = np.random.default_rng(0)
    text = rng.normal(size=(70, 6))
    motion = text + rng.normal(scale=1.2, size=(70, 6))
    with caplog.at_level(logging.WARNING):
        ours = r_precision(text, motion)
    assert "6 samples do not fill a batch of 32" in caplog.text
    np.testing.assert_allclose(ours, brute_r_precision(text, motion), atol=1e-12)
    assert 0 < ours[0] < ours[1] < ours[2] < 1
    # with a generator the rows are shuffled by rng.permutation first
    order = np.random.default_rng(5).permutation(70)
    np.testing.assert_allclose(r_precision(text, motion, generator=5), brute_r_precision(text[order], motion[order]))
    np.testing.assert_allclose(r_precision(torch.tensor(text), torch.tensor(motion)), ours)


def test_r_precision_known_cases():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(64, 8))
    np.testing.assert_array_equal(r_precision(points, points), [1.0, 1.0, 1.0])
    # independent embeddings: the matching motion's rank is uniform over 32, so top-k = k/32
    n = 32 * 300
    chance = r_precision(rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), top_k=5)
    sigma = np.sqrt(np.arange(1, 6) / 32 * (1 - np.arange(1, 6) / 32) / n)
    assert (np.abs(chance - np.arange(1, 6) / 32) < 4 * sigma).all()


def test_mm_dist_is_the_mean_matched_distance():
    rng = np.random.default_rng(2)
    text, motion = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    assert mm_dist(text, motion) == pytest.approx(sum(math.dist(t, m) for t, m in zip(text, motion)) / 40)
    assert mm_dist(text, text + [3.0, 4.0, 0, 0, 0]) == pytest.approx(5.0)


def test_fid_closed_forms():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    assert abs(fid(x, x)) < 1e-6
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert gaussian_frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(9 + 1)
    # general covariances: tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) by eigendecomposition
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    root = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(root @ s2 @ root))
    assert gaussian_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # from samples: the Gaussian fit uses the mean and the unbiased covariance
    y = rng.normal(size=(300, 6)) @ b.T + mu2
    z = rng.normal(size=(200, 6)) @ a.T + mu1
    fitted = gaussian_frechet_distance(z.mean(0), np.cov(z.T), y.mean(0), np.cov(y.T))
    assert fid(z, y) == pytest.approx(fitted, rel=1e-10)
    big = 40000  # and approaches the population value
    population = gaussian_frechet_distance(mu1, a @ a.T, mu2, b @ b.T)
    sampled = fid(rng.normal(size=(big, 6)) @ a.T + mu1, rng.normal(size=(big, 6)) @ b.T + mu2)
    assert sampled == pytest.approx(population, rel=0.05)


def test_fid_with_singular_covariances_stays_finite():
    rng = np.random.default_rng(4)
    low_rank = rng.normal(size=(50, 2)) @ rng.normal(size=(2, 8))  # rank-2 covariance in 8 dims
    value = fid(low_rank, low_rank + 1.0)
    assert np.isfinite(value) and value == pytest.approx(8.0, abs=1e-2)  # only the mean shift remains
    with pytest.raises(ValueError, match="at least 2 rows in gen_emb"):
        fid(low_rank, low_rank[:1])


def test_diversity_brute_force_and_known_configurations():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 3))
    draws = np.random.default_rng(9)
    first, second = draws.choice(400, 300, replace=False), draws.choice(400, 300, replace=False)
    expected = sum(math.dist(x[i], x[j]) for i, j in zip(first, second)) / 300
    assert diversity(x, generator=9) == pytest.approx(expected)
    assert diversity(np.ones((300, 4))) == 0.0
    # vertices of a regular simplex (scaled basis): every pair of distinct points is 2*sqrt(2) apart
    simplex = 2 * np.eye(600)
    value = diversity(simplex, generator=1)
    repeats = 300 * (1 - value / (2 * np.sqrt(2)))  # pairs that drew the same vertex twice
    assert abs(repeats - round(repeats)) < 1e-9 and value > 0.97 * 2 * np.sqrt(2)
    with pytest.raises(ValueError, match="num_pairs=300"):
        diversity(x[:299])


def test_multimodality_brute_force_and_known_configuration():
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(100, 30, 4))
    draws = np.random.default_rng(3)
    first, second = draws.choice(30, 10, replace=False), draws.choice(30, 10, replace=False)
    expected = np.mean([math.dist(emb[t, i], emb[t, j]) for t in range(100) for i, j in zip(first, second)])
    assert multimodality(emb, generator=3) == pytest.approx(expected)
    # generation g of every text sits at g on a line: the value is mean |a_p - b_p|
    line = np.zeros((5, 10, 2))
    line[..., 0] = np.arange(10)
    draws = np.random.default_rng(7)
    first, second = draws.choice(10, 10, replace=False), draws.choice(10, 10, replace=False)
    assert multimodality(line, generator=7) == pytest.approx(np.abs(first - second).mean())
    assert multimodality(np.repeat(rng.normal(size=(100, 1, 4)), 30, 1)) == 0.0
    with pytest.raises(ValueError, match=r"\[num_texts, num_generations, D\]"):
        multimodality(emb[0])


def test_confidence_interval_and_replication():
    interval = confidence_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.mean == 2.5 and interval.half_width == pytest.approx(1.96 * np.sqrt(1.25) / 2)
    assert str(interval) == "2.500 ± 1.096"
    calls = []
    summary = replicate(lambda i: calls.append(i) or {"a": i, "b": 2.0}, n=20)
    assert calls == list(range(20))
    assert summary["a"].mean == pytest.approx(9.5) and summary["a"].half_width == pytest.approx(1.96 * np.std(range(20)) / np.sqrt(20))
    assert summary["b"].half_width == 0.0 and len(summary["b"].values) == 20
    metrics = MotionMetrics()
    metrics.update({"fid": 1.0})
    with pytest.raises(ValueError, match="reports"):
        metrics.update({"top1": 0.5})


def test_evaluate_embeddings_composes_the_protocol():
    rng = np.random.default_rng(7)
    text = rng.normal(size=(330, 8))
    motion = text + rng.normal(scale=0.5, size=(330, 8))
    real = text + rng.normal(scale=0.5, size=(330, 8))
    mm = rng.normal(size=(100, 30, 8))
    results = evaluate_embeddings(text, motion, real, mm_emb=mm, generator=11)
    rows = np.random.default_rng(11).permutation(330)[:320]
    np.testing.assert_allclose([results[f"top{k}"] for k in (1, 2, 3)], brute_r_precision(text[rows], motion[rows]))
    assert results["mm_dist"] == pytest.approx(mm_dist(text[rows], motion[rows]))
    assert results["fid"] == pytest.approx(fid(real, motion))
    assert set(results) == {"top1", "top2", "top3", "mm_dist", "fid", "diversity", "multimodality"}
    assert evaluate_embeddings(text, real, real, generator=0)["fid"] == pytest.approx(0.0, abs=1e-6)
    # better-aligned motions score better on R-precision and MM-Dist
    closer = evaluate_embeddings(text, text + rng.normal(scale=0.1, size=(330, 8)), real, generator=11)
    assert closer["top1"] > results["top1"] and closer["mm_dist"] < results["mm_dist"]


def test_bad_embeddings_raise():
    with pytest.raises(ValueError, match="must pair row by row"):
        r_precision(np.zeros((64, 4)), np.zeros((64, 5)))
    bad = np.zeros((64, 4))
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"motion_emb has NaN or inf in rows \[7\]"):
        mm_dist(np.zeros((64, 4)), bad)
    with pytest.raises(ValueError, match="at least batch_size=32"):
        r_precision(np.zeros((10, 4)), np.zeros((10, 4)))


# --------------------------------------------------------------------------- the official formulas, re-done here
def official_matching(text, motion, batch_size=32):
    """evaluate_matching_score of the official script: per loader batch (drop_last) the distance matrix by the
    expansion -2ab + |a|^2 + |b|^2, argsort per text, top-k as the running OR of 'column i is the text's own
    motion', and the matching score as the summed trace over the number of rows."""
    top_k_count, trace, size = np.zeros(3), 0.0, 0
    for start in range(0, len(text) // batch_size * batch_size, batch_size):
        a, b = text[start : start + batch_size], motion[start : start + batch_size]
        dist = np.sqrt(-2 * a @ b.T + (a**2).sum(1, keepdims=True) + (b**2).sum(1))
        order = np.argsort(dist, axis=1)
        own = order == np.arange(batch_size)[:, None]
        top_k_count += np.stack([own[:, : k + 1].any(1) for k in range(3)], 1).sum(0)
        trace += np.trace(dist)
        size += batch_size
    return top_k_count / size, trace / size


def test_metrics_equal_the_official_formulas():
    rng = np.random.default_rng(12)
    text = rng.normal(size=(100, 16))
    motion = text + rng.normal(scale=1.5, size=(100, 16))
    real = rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.2
    top, score = official_matching(text, motion)
    # float64 throughout; the expansion form of the distance differs from the direct one by ~1e-15
    np.testing.assert_allclose(r_precision(text, motion), top, atol=1e-12)
    assert mm_dist(text[:96], motion[:96]) == pytest.approx(score, rel=1e-10)
    mu_r, mu_g = real.mean(0), motion.mean(0)
    cov_r, cov_g = np.cov(real, rowvar=False), np.cov(motion, rowvar=False)
    from scipy import linalg

    official_fid = (mu_r - mu_g) @ (mu_r - mu_g) + np.trace(cov_r) + np.trace(cov_g) - 2 * np.trace(linalg.sqrtm(cov_r @ cov_g).real)
    assert fid(real, motion) == pytest.approx(official_fid, rel=1e-8)
    # Diversity / MultiModality: np.random.choice(N, times, replace=False) twice, mean row distance
    draws = np.random.default_rng(4)
    first, second = draws.choice(150, 100, replace=False), draws.choice(150, 100, replace=False)
    assert diversity(real, 100, generator=4) == pytest.approx(np.linalg.norm(real[first] - real[second], axis=1).mean())


# ------------------------------------------------------------------------------------------ the replicated protocol
from t2m_synthetic import ACTIONS, DIRECTIONS, TINY, class_motion, write_synthetic_humanml3d  # noqa: E402
from test_t2m_evaluator import write_glove  # noqa: E402

from genalign.eval.motion_protocol import MotionProtocol, ProtocolTestSet, folder_motions  # noqa: E402
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator  # noqa: E402
from genalign.models.word_vectors import GloVeVectors  # noqa: E402

WORDS = ["unk", "sos", "eos", "a", "person", "the", "man", "woman", "someone", *ACTIONS, *DIRECTIONS]
LENGTHS = dict(max_frames=64, max_length=60)


@pytest.fixture(scope="module")
def protocol_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    root = write_synthetic_humanml3d(tmp / "data", {"test": 2}, max_frames=64)  # 48 clips
    write_glove(tmp / "glove", WORDS, 8)
    torch.manual_seed(0)
    evaluator = TextMotionEvaluator(EvaluatorConfig(**TINY, word_dim=8, max_motion_length=60),
                                    word_vectors=GloVeVectors(tmp / "glove")).eval()
    test_set = ProtocolTestSet(root, **LENGTHS)
    evaluator.set_statistics(test_set.dataset.mean, test_set.dataset.std)
    return root, evaluator, test_set


def class_generator(noise: float, calls: list):
    """Motions of the caption's class plus seed-dependent noise; records each call."""

    def generate(captions, lengths, seed):
        calls.append((list(captions), list(lengths), seed))
        rng = np.random.default_rng(seed)
        out = []
        for caption, length in zip(captions, lengths):
            words = caption.split()
            a, d = ACTIONS.index(words[-2][:-1]), DIRECTIONS.index(words[-1])
            out.append(class_motion(a, d, length, rng) + noise * rng.normal(size=(length, 263)).astype(np.float32))
        return out

    return generate


def test_protocol_regenerates_every_replication_and_reports_the_interval(protocol_setup):
    _, evaluator, test_set = protocol_setup
    calls = []
    protocol = MotionProtocol(evaluator, test_set, replications=4, seed=10, diversity_pairs=20)
    assert protocol.num_samples == 32  # 1000 // 32 + 1 batches, capped at the 48 clips' one whole batch
    result = protocol.run(class_generator(0.5, calls))
    assert [seed for _, _, seed in calls] == [10, 11, 12, 13]  # a new generation per replication
    for r, (captions, lengths, seed) in enumerate(calls):
        rows = test_set.draw(seed)
        assert captions == [row.caption for row in rows[:32]] and lengths == [row.length for row in rows[:32]]
        assert all(length % 4 == 0 for length in lengths)
        # MM-Dist and FID do not depend on the batch order: recompute them from the evaluator directly
        gen = class_generator(0.5, [])(captions, lengths, seed)
        gen_emb = protocol.embed_motions(gen, lengths)
        real_emb = protocol.embed_motions([row.motion for row in rows], [row.length for row in rows])
        text_emb = evaluator.encode_text([list(row.tokens) for row in rows[:32]]).detach().numpy()
        assert result.generated["mm_dist"].values[r] == pytest.approx(np.linalg.norm(text_emb - gen_emb, axis=1).mean(), rel=1e-6)
        assert result.generated["fid"].values[r] == pytest.approx(fid(real_emb, gen_emb), rel=1e-6)
    fids = np.array(result.generated["fid"].values)
    assert fids.std() > 0  # regenerated motions differ between replications
    assert result.generated["fid"].half_width == pytest.approx(1.96 * fids.std() / 2)  # sqrt(4)
    assert result.to_json()["protocol"] == {"replications": 4, "num_samples": 32, "regenerated": True}


def test_a_generator_returning_the_real_crops_scores_as_the_ground_truth(protocol_setup):
    _, evaluator, test_set = protocol_setup
    def real(captions, lengths, seed):
        return [row.motion for row in test_set.draw(seed)[: len(captions)]]

    result = MotionProtocol(evaluator, test_set, replications=2, diversity_pairs=20).run(real)
    for name in ("r_precision_top1", "r_precision_top3", "mm_dist", "fid", "diversity"):
        np.testing.assert_allclose(result.generated[name].values, result.ground_truth[name].values, rtol=1e-6)


def test_multimodality_grows_with_the_generations_spread(protocol_setup):
    _, evaluator, test_set = protocol_setup
    values = []
    for noise in (0.2, 2.0):
        calls = []
        protocol = MotionProtocol(evaluator, test_set, replications=2, diversity_pairs=20, mm_captions=5,
                                  mm_generations=6, mm_pairs=3)
        values.append(protocol.run(class_generator(noise, calls)).generated["multimodality"].mean)
        mm_captions = calls[1][0]  # replication 0: the main generation, then the MultiModality one
        assert len(mm_captions) == 30 and all(mm_captions[i] == mm_captions[i - i % 6] for i in range(30))
    assert values[1] > 1.2 * values[0] > 0  # the class pattern and its 0.5 noise stay; only the extra noise grows


def test_fixed_motions_from_a_folder_and_bad_inputs(protocol_setup, tmp_path):
    root, evaluator, test_set = protocol_setup
    folder = tmp_path / "generated"
    folder.mkdir()
    for motion_id in test_set.ids[:-1]:
        np.save(folder / f"{motion_id}.npy", np.load(root / "new_joint_vecs" / f"{motion_id}.npy"))
    protocol = MotionProtocol(evaluator, test_set, replications=2, diversity_pairs=20)
    with pytest.raises(ValueError, match=f"no generated motion for 1 test clips, e.g. \\['{test_set.ids[-1]}'\\]"):
        protocol.run(motions=folder_motions(folder, test_set.ids, 263))
    np.save(folder / f"{test_set.ids[-1]}.npy", np.load(root / "new_joint_vecs" / f"{test_set.ids[-1]}.npy"))
    result = protocol.run(motions=folder_motions(folder, test_set.ids, 263))
    assert result.regenerated is False and result.generated["mm_dist"].mean > 0
    np.save(folder / "bad.npy", np.zeros((10, 251)))
    with pytest.raises(ValueError, match=r"bad.npy: expected finite un-normalised features \[T >= 4, 263\]"):
        folder_motions(folder, ["bad"], 263)
    text = root / "texts" / f"{test_set.ids[0]}.txt"
    lines = text.read_text().splitlines()
    original = text.read_text()
    text.write_text(lines[0] + "\n" + "a man walks left#a man walks left#0.0#0.0\n")
    try:
        with pytest.raises(ValueError, match=f"{text}:2: caption 'a man walks left' has no POS tags"):
            ProtocolTestSet(root, **LENGTHS)
    finally:
        text.write_text(original)
    with pytest.raises(ValueError, match="Diversity draws 300 pairs from 32 generated motions"):
        MotionProtocol(evaluator, test_set)
