"""Motion experiment pieces: the rows builders (values, lengths, AI-feedback ranking, KTO labels, errors naming the
file), the trainer evaluator's metrics against an independent computation, and a few-step `motion_sopo` run
through the experiment config (tiny model, tiny judges) that moves the SoPo loss below its initial ln 2."""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from genalign.adapters.motion import MotionAdapter
from genalign.cli import CONFIG_DIR, run
from genalign.data import motion_rows
from genalign.eval.motion import evaluate_embeddings
from genalign.eval.motion_training import METRIC_NAMES, MotionTrainingEvaluator
from genalign.models.mdm import MotionDenoiser, MotionDenoiserConfig
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator
from genalign.online.sopo import SoPoStep
from genalign.steps import StepContext

D = 263
LENGTHS = [41, 48, 57, 60, 44, 52, 63, 40, 49, 58, 45, 61]  # frames; the protocol crops to multiples of 4
CAPTIONS = ["a person walks forward", "someone jumps in place", "a man waves his right hand"]
TINY_EVALUATOR = dict(movement_hidden=16, movement_latent=16, motion_hidden=16, text_hidden=16, embed_dim=8,
                      max_motion_length=64)


def write_dataset(root: Path, lengths=LENGTHS) -> Path:
    """A HumanML3D-layout folder: smooth random features, Mean/Std, three whole-clip captions per motion, every id
    in both train.txt and test.txt."""
    rng = np.random.default_rng(0)
    (root / "new_joint_vecs").mkdir(parents=True)
    (root / "texts").mkdir()
    ids = [f"m{i:03d}" for i in range(len(lengths))]
    for i, (motion_id, frames) in enumerate(zip(ids, lengths)):
        features = np.cumsum(rng.normal(size=(frames, D)), 0).astype(np.float32) * 0.1
        np.save(root / "new_joint_vecs" / f"{motion_id}.npy", features)
        lines = [f"{CAPTIONS[(i + j) % 3]} {i}#{CAPTIONS[(i + j) % 3].replace(' ', '/X ')}/X#0.0#0.0" for j in range(3)]
        (root / "texts" / f"{motion_id}.txt").write_text("\n".join(lines) + "\n")
    np.save(root / "Mean.npy", np.full(D, 0.5, np.float32))
    np.save(root / "Std.npy", np.full(D, 2.0, np.float32))
    for split in ("train", "test"):
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


class FakeText:
    """Caption -> a fixed random 384-d vector seeded by its characters (no text model)."""

    dim = 384

    def __call__(self, captions):
        return torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, c))))
                            for c in captions])


def write_glove(folder: Path, dim: int = 8) -> Path:
    """A tiny word table in the official GloVe file layout (other words map to 'unk')."""
    words = ["unk", "sos", "eos", "a", "person", "walk", "jump", "wave", "man", "someone"]
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "our_vab_data.npy", np.random.default_rng(0).normal(size=(len(words), dim)).astype(np.float32))
    (folder / "our_vab_words.pkl").write_bytes(pickle.dumps(words))
    (folder / "our_vab_idx.pkl").write_bytes(pickle.dumps({w: i for i, w in enumerate(words)}))
    return folder


def tiny_denoiser() -> MotionDenoiser:
    torch.manual_seed(0)
    return MotionDenoiser(MotionDenoiserConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, max_frames=64))


def tiny_evaluator(path: Path) -> TextMotionEvaluator:
    """A randomly initialised evaluator saved to ``path`` (its word table next to it)."""
    torch.manual_seed(1)
    glove = write_glove(path.parent / f"{path.name}-glove")
    evaluator = TextMotionEvaluator(EvaluatorConfig(word_dim=8, word_vectors=str(glove), **TINY_EVALUATOR))
    evaluator.save(path)
    return evaluator.eval()


# ------------------------------------------------------------------------------------------------ rows
def test_demonstration_rows_hold_normalised_motions_cut_to_the_protocol_length(dataset):
    rows = motion_rows.demonstration_rows(dataset, "train")
    assert len(rows) == 3 * len(LENGTHS) and [r["row"] for r in rows] == list(range(len(rows)))
    for i, frames in enumerate(LENGTHS):
        raw = np.load(dataset / "new_joint_vecs" / f"m{i:03d}.npy")
        expected = (raw[: frames // 4 * 4] - 0.5) / 2.0
        captions = [line.split("#")[0] for line in (dataset / "texts" / f"m{i:03d}.txt").read_text().splitlines()]
        for j in range(3):
            row = rows[3 * i + j]
            assert row["prompt"] == captions[j] and row["motion_id"] == f"m{i:03d}"
            assert row["response"].shape == (frames // 4 * 4, D)
            np.testing.assert_allclose(row["response"].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert len(motion_rows.demonstration_rows(dataset, "train", limit=5)) == 5


def test_demonstration_rows_errors_name_the_file(dataset):
    bad = np.load(dataset / "new_joint_vecs" / "m003.npy")
    bad[7] = np.nan
    np.save(dataset / "new_joint_vecs" / "m003.npy", bad)
    with pytest.raises(ValueError, match=r"m003\.npy: frames \[7\] hold NaN"):
        motion_rows.demonstration_rows(dataset, "train")
    np.save(dataset / "new_joint_vecs" / "m003.npy", np.zeros((50, 251), np.float32))
    with pytest.raises(ValueError, match=r"m003\.npy: expected features of shape \[T, 263\]"):
        motion_rows.demonstration_rows(dataset, "train")
    (dataset / "new_joint_vecs" / "m003.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"m003\.npy not found"):
        motion_rows.demonstration_rows(dataset, "train")
    (dataset / "texts" / "m001.txt").unlink()
    (dataset / "train.txt").write_text("m001\n")
    with pytest.raises(FileNotFoundError, match=r"texts/m001\.txt not found"):
        motion_rows.demonstration_rows(dataset, "train")


def test_short_motions_are_a_counted_skip_and_an_empty_split_an_error(tmp_path):
    root = write_dataset(tmp_path / "short", lengths=[30, 48])
    rows = motion_rows.demonstration_rows(root, "train")
    assert {r["motion_id"] for r in rows} == {"m001"}  # the 30-frame motion is below the 40-frame minimum
    (root / "train.txt").write_text("m000\n")
    with pytest.raises(ValueError, match=r"train\.txt gives no usable clip \(dropped: \{'motion_too_short': 1\}\)"):
        motion_rows.demonstration_rows(root, "train")


def test_feedback_pairs_and_labels_rank_base_samples_by_the_judge(dataset, tmp_path):
    adapter = MotionAdapter(tiny_denoiser(), FakeText())
    tiny_evaluator(tmp_path / "judge")
    kw = dict(num_prompts=6, num_samples=3, seed=3, num_inference_steps=2, batch_size=4)
    pairs = motion_rows.feedback_pairs(adapter, dataset, tmp_path / "judge", cache_file=tmp_path / "pairs.pt", **kw)
    reward = motion_rows.evaluator_reward(tmp_path / "judge")
    prompts = motion_rows.training_prompts(dataset, "train", 6, 3)
    assert [p["prompt"] for p in pairs] == prompts and len(set(prompts)) == 6
    for pair in pairs:
        scores = reward([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
        assert scores.tolist() == pytest.approx([pair["chosen_score"], pair["rejected_score"]], abs=1e-5)
        assert pair["chosen_score"] > pair["rejected_score"] and pair["chosen"].shape == pair["rejected"].shape
    cached = motion_rows.feedback_pairs(adapter, dataset, tmp_path / "judge", cache_file=tmp_path / "pairs.pt", **kw)
    assert all(torch.equal(a["chosen"], b["chosen"]) for a, b in zip(pairs, cached))

    rewards = torch.cat([reward([p["prompt"]] * 2, [p["chosen"], p["rejected"]]) for p in pairs])
    threshold = float(rewards.median())
    labels = motion_rows.feedback_labels(adapter, dataset, tmp_path / "judge", threshold=threshold, **kw)
    assert len(labels) == 18 and [r["prompt"] for r in labels[::3]] == prompts
    for row in labels:
        assert row["desirable"] == (row["reward"] > threshold)
        assert reward([row["prompt"]], [row["response"]]).item() == pytest.approx(row["reward"], abs=1e-5)
    demos = motion_rows.demonstration_rows(dataset, "train")
    gt = motion_rows.ground_truth_pairs(adapter, dataset, num_prompts=5, seed=3, num_inference_steps=2)
    assert len({r["row"] for r in gt}) == 5
    for row in gt:
        assert torch.equal(row["chosen"], demos[row["row"]]["response"]) and row["prompt"] == demos[row["row"]]["prompt"]
        assert row["rejected"].shape == row["chosen"].shape and not torch.equal(row["rejected"], row["chosen"])
    with pytest.raises(ValueError, match="KTO needs both kinds"):
        motion_rows.feedback_labels(adapter, dataset, tmp_path / "judge", threshold=1e-6, **kw)


# ------------------------------------------------------------------------------------------------ evaluator
def test_evaluator_metrics_equal_the_protocol_on_the_same_embeddings(dataset, tmp_path):
    tiny_evaluator(tmp_path / "ev")
    evaluator = MotionTrainingEvaluator(tmp_path / "ev", dataset, num_prompts=32, replications=3,
                                        num_inference_steps=2, batch_size=20, num_gifs=1)
    adapter = MotionAdapter(tiny_denoiser(), FakeText())
    adapter.policy.eval()
    metrics = evaluator(adapter, tag="before", output_dir=tmp_path / "out")
    assert set(metrics) == {name + suffix for name in METRIC_NAMES.values() for suffix in ("", "_ci95")}
    motions = evaluator.generate(adapter)
    assert [len(m) for m in motions] == evaluator.lengths.tolist()
    gen = evaluator.embed(torch.nn.utils.rnn.pad_sequence(motions, batch_first=True), evaluator.lengths)
    runs = []
    for i in range(3):  # bootstrap resamples of the 32 rows, as the docstring says
        rng = np.random.default_rng(i)
        rows = rng.choice(32, 32, replace=True)
        runs.append(evaluate_embeddings(evaluator.text_emb[rows], gen[rows], evaluator.real_emb, generator=rng,
                                        diversity_pairs=32))
    for short, name in METRIC_NAMES.items():
        values = np.array([r[short] for r in runs])
        assert metrics[name] == pytest.approx(values.mean(), abs=1e-6)
        assert metrics[name + "_ci95"] == pytest.approx(1.96 * values.std() / math.sqrt(3), abs=1e-6)
    assert (tmp_path / "out" / "motion_before_0.gif").stat().st_size > 0
    assert metrics["mm_dist_ci95"] > 0 and metrics["fid_ci95"] > 0  # resampling moves every metric
    real = evaluator.real_metrics()
    assert set(real) == set(metrics)


# ------------------------------------------------------------------------------------------------ experiment
def test_few_step_motion_sopo_run_lowers_the_sopo_loss(dataset, tmp_path):
    tiny_denoiser().save_pretrained(tmp_path / "mdm")
    tiny_evaluator(tmp_path / "judge")
    out = tmp_path / "run"
    overrides = [
        "experiment=motion_sopo", f"output_dir={out}", f"adapter.model={tmp_path / 'mdm'}",
        f"+adapter.text={{_target_: {__name__}.FakeText}}",
        f"data.train.root={dataset}", "+data.train.limit=4", f"objective.evaluator={tmp_path / 'judge'}",
        f"evaluator.evaluator_path={tmp_path / 'judge'}", f"evaluator.data_root={dataset}", "evaluator.num_prompts=32",
        "evaluator.replications=2", "evaluator.num_inference_steps=2", "evaluator.num_gifs=1",
        "objective.num_inference_steps=2", "train.max_steps=4", "train.batch_size=4", "train.learning_rate=3e-3",
        "train.save_every=0",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics = run(cfg)
    stored = json.loads((out / "metrics.json").read_text())
    assert set(stored["before"]) == set(stored["after"]) >= {"r_precision_top1", "r_precision_top3", "mm_dist", "fid",
                                                             "diversity", "mm_dist_ci95"}
    assert stored["after"] == metrics["after"]
    assert (out / "motion_before_0.gif").exists() and (out / "motion_after_0.gif").exists()

    rows = motion_rows.demonstration_rows(dataset, "train", limit=4)
    step = SoPoStep(evaluator=tmp_path / "judge", num_samples=2, num_inference_steps=2)
    base = MotionAdapter(tmp_path / "mdm", FakeText()).reference  # frozen copy of the base model

    def sopo_loss(model_dir: Path) -> float:
        """SoPo loss of a model against the base at fixed randomness (eval mode: no condition drop)."""
        adapter = MotionAdapter(model_dir, FakeText())
        adapter.reference = base
        adapter.policy.eval()
        loss, _ = step(adapter, rows, StepContext(generator=torch.Generator().manual_seed(5),
                                                  global_mean=lambda t: t.mean()))
        return loss.mean().item()

    assert sopo_loss(tmp_path / "mdm") == pytest.approx(math.log(2), abs=1e-6)
    assert sopo_loss(out / "final") < math.log(2) - 1e-4


# ------------------------------------------------------------------------------------------------ shipped base
def test_shipped_base_is_a_small_x0_mdm_whose_motions_spread_like_real_ones():
    """Base samples of 12 test captions are spread in the shipped evaluator's space about like the real motions
    (an untrained denoiser of the same size collapses to one pose), and follow their captions less than the real
    motions do (the room alignment should fill)."""
    from genalign.cli import asset_path

    folder = Path(asset_path("motion-mdm"))
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10 * 2**20
    shipped = MotionDenoiser.from_pretrained(folder)
    assert shipped.config.prediction_type == "sample" and shipped.config.cond_drop_prob == 0.1
    torch.manual_seed(0)
    untrained = MotionDenoiser(shipped.config)
    evaluator = TextMotionEvaluator.load(asset_path("motion-evaluator"))
    rows = motion_rows.demonstration_rows(motion_rows.synthetic_motion_root(), "test")[::11][:12]
    prompts = [r["prompt"] for r in rows]
    real = torch.nn.utils.rnn.pad_sequence([r["response"] for r in rows], batch_first=True)

    def spread(embeddings):  # mean pairwise distance
        return torch.cdist(embeddings, embeddings).sum().item() / (len(embeddings) * (len(embeddings) - 1))

    with torch.no_grad():
        real_emb = evaluator.encode_motion(real, [len(r["response"]) for r in rows])
        spreads, matched = {}, {}
        for name, model in (("shipped", shipped), ("untrained", untrained)):
            batch = MotionAdapter(model).sample(prompts, generator=torch.Generator().manual_seed(0), lengths=[64] * 12,
                                                num_inference_steps=10, scheduler="ddim")
            emb = evaluator.encode_motion(batch["motion"], batch["mask"].sum(1))
            spreads[name] = spread(emb)
            matched[name] = (evaluator.encode_text(prompts) - emb).norm(dim=1).mean().item()
        real_matched = (evaluator.encode_text(prompts) - real_emb).norm(dim=1).mean().item()
    assert spreads["shipped"] > 0.4 * spread(real_emb) and spreads["untrained"] < 0.1 * spread(real_emb)
    assert matched["shipped"] > 2 * real_matched
