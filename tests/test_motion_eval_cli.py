"""`genalign-eval motion` end to end: the shipped small MDM against a re-initialised base on a tiny HumanML3D folder
copied from the synthetic motion set, scored by the shipped evaluator; metrics.json, the comparison strip, rendered
GIFs and SMPL meshes (synthetic SMPL file of test_smpl_export); and the in-training evaluator's regeneration mode."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_motion_experiment import FakeText, tiny_denoiser, tiny_evaluator, write_dataset
from test_smpl_export import write_model

from genalign.adapters.motion import MotionAdapter
from genalign.data.motion_rows import synthetic_motion_root
from genalign.eval.motion import evaluate_embeddings
from genalign.eval.motion_training import METRIC_NAMES, MotionTrainingEvaluator
from genalign.eval_cli import main
from genalign.models.mdm import MotionDenoiser

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MDM, SHIPPED_EVALUATOR = ROOT / "assets" / "motion-mdm", ROOT / "assets" / "motion-evaluator"


def tiny_humanml3d(folder: Path, clips: int = 34) -> Path:
    """The ``clips`` shortest test clips of the synthetic motion set (46 to 141 frames: quick to sample) in the
    HumanML3D layout, with its Mean/Std."""
    source = synthetic_motion_root()
    ids = sorted((source / "test.txt").read_text().split(),
                 key=lambda i: len(np.load(source / "new_joint_vecs" / f"{i}.npy", mmap_mode="r")))[:clips]
    for sub in ("new_joint_vecs", "texts"):
        (folder / sub).mkdir(parents=True)
        for motion_id in ids:
            suffix = ".npy" if sub == "new_joint_vecs" else ".txt"
            shutil.copy(source / sub / f"{motion_id}{suffix}", folder / sub / f"{motion_id}{suffix}")
    for name in ("Mean.npy", "Std.npy"):
        shutil.copy(source / name, folder / name)
    (folder / "test.txt").write_text("\n".join(ids) + "\n")
    return folder


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("motion_eval")
    data = tiny_humanml3d(tmp / "data")
    torch.manual_seed(0)
    base = MotionDenoiser(MotionDenoiser.from_pretrained(SHIPPED_MDM).config)  # untrained, same layout
    base.save_pretrained(tmp / "base")
    out = tmp / "out"
    args = ["motion", "--checkpoint", str(SHIPPED_MDM), "--base", str(tmp / "base"), "--data-root", str(data),
            "--evaluator", str(SHIPPED_EVALUATOR), "--replications", "2", "--diversity-pairs", "16",
            "--steps", "3", "--scheduler", "ddim", "--strip", "3", "--render", "1", "--render-frames", "5",
            "--smpl-model", str(write_model(tmp / "body")), "--out", str(out)]
    assert main(args) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_json_holds_the_replicated_protocol_for_both_checkpoints(cli_run):
    _, metrics = cli_run
    names = {f"r_precision_top{k}" for k in (1, 2, 3)} | {"mm_dist", "fid", "diversity"}
    for row in ("before", "after", "ground_truth"):
        assert set(metrics[row]) == names | {f"{n}_ci95" for n in names}
        assert all(math.isfinite(v) for v in metrics[row].values())
    assert metrics["protocol"]["regenerated"] is True and metrics["protocol"]["replications"] == 2
    assert metrics["protocol"]["num_samples"] == 32  # one whole batch of the 34 clips
    # what the shipped evaluator must see: real motions match their captions far above chance (3/32), the shipped
    # model sits between them and an untrained denoiser, whose motions are far from the real distribution
    assert metrics["ground_truth"]["r_precision_top3"] > 0.6
    assert metrics["after"]["fid"] < metrics["before"]["fid"]
    assert metrics["ground_truth"]["fid"] < metrics["after"]["fid"]
    assert metrics["after"]["fid_ci95"] > 0  # regenerated every replication


def test_comparison_strip_and_rendered_outputs(cli_run):
    out, _ = cli_run
    with Image.open(out / "comparison.png") as strip:
        width, height = strip.size
        pixels = np.asarray(strip.convert("RGB"))
    assert width == 110 + 3 * 4 * 110 and height == int(3.4 * 110)  # label margin + 3 captions x 4 frames; 3 rows
    row_h = 110
    for r in range(3):  # every row has drawn limbs (non-white pixels) in each caption's cell
        band = pixels[int(0.4 * row_h) + r * row_h : int(0.4 * row_h) + (r + 1) * row_h, 110:]
        for c in range(3):
            cell = band[:, c * 440 : (c + 1) * 440]
            assert (cell < 200).any(axis=-1).mean() > 0.005
    render = out / "render"
    for label in ("base", "trained", "real"):
        with Image.open(render / f"{label}_0.gif") as gif:
            assert gif.n_frames == 5  # --render-frames
        meshes = sorted((render / f"{label}_0_smpl").glob("frame_*.obj"))
        with Image.open(render / f"{label}_0.gif") as gif:
            assert len(meshes) == gif.n_frames  # one mesh per animated frame
        with np.load(render / f"{label}_0_smpl" / "smpl_params.npz") as params:
            assert params["transl"].shape == (len(meshes), 3)


def test_folder_of_generated_motions_and_bad_arguments(tmp_path):
    data = tiny_humanml3d(tmp_path / "data")
    folder = tmp_path / "generated"
    folder.mkdir()
    for path in (data / "new_joint_vecs").glob("*.npy"):
        shutil.copy(path, folder / path.name)  # the real motions as "generated": scores equal the ground truth
    out = tmp_path / "out"
    assert main(["motion", "--motions", str(folder), "--data-root", str(data), "--evaluator", str(SHIPPED_EVALUATOR),
                 "--replications", "2", "--diversity-pairs", "16", "--strip", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["regenerated"] is False and "before" not in metrics
    # whole motions vs the protocol's random crops of the same motions: close, not identical
    assert abs(metrics["after"]["r_precision_top3"] - metrics["ground_truth"]["r_precision_top3"]) < 0.15
    with Image.open(out / "comparison.png") as strip:
        assert strip.size[1] == int(2.4 * 110)  # trained and real rows
    with pytest.raises(SystemExit, match="--base compares two checkpoints"):
        main(["motion", "--motions", str(folder), "--base", str(SHIPPED_MDM), "--data-root", str(data),
              "--evaluator", str(SHIPPED_EVALUATOR), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="expected a genalign motion final/ folder"):
        main(["motion", "--checkpoint", str(tmp_path), "--data-root", str(data), "--evaluator",
              str(SHIPPED_EVALUATOR), "--diversity-pairs", "16", "--out", str(out)])


def test_training_evaluator_regenerates_each_replication(tmp_path):
    dataset = write_dataset(tmp_path / "data")
    tiny_evaluator(tmp_path / "ev")
    evaluator = MotionTrainingEvaluator(tmp_path / "ev", dataset, num_prompts=32, replications=3, seed=5,
                                        num_inference_steps=2, batch_size=20, num_gifs=0, replicate_by="regenerate")
    adapter = MotionAdapter(tiny_denoiser(), FakeText())
    metrics = evaluator(adapter)
    runs = []
    for i in range(3):  # replication i: every prompt generated again from seed 5 + i, rows shuffled by that seed
        motions = evaluator.generate(adapter, 5 + i)
        gen = evaluator.embed(torch.nn.utils.rnn.pad_sequence(motions, batch_first=True), evaluator.lengths)
        runs.append(evaluate_embeddings(evaluator.text_emb, gen, evaluator.real_emb, generator=5 + i,
                                        diversity_pairs=32))
    for short, name in METRIC_NAMES.items():
        values = np.array([r[short] for r in runs])
        assert metrics[name] == pytest.approx(values.mean(), abs=1e-6)
        assert metrics[name + "_ci95"] == pytest.approx(1.96 * values.std() / math.sqrt(3), abs=1e-6)
    assert metrics["fid_ci95"] > 0
    with pytest.raises(ValueError, match="replicate_by must be one of"):
        MotionTrainingEvaluator(tmp_path / "ev", dataset, num_prompts=32, replicate_by="resample")
