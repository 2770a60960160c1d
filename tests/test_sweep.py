"""genalign.eval.sweep: re-run rows replace only their own entries in the results file, the summary is the mean
and sample std over the seeds, a deadline stops new launches, a launch records its wall time and starts fresh or
resumes, run-folder sweeps launch only unfinished runs and read the finished ones back; scripts/compare_online.py,
compare_digits.py and compare_motion.py tabulate their results (the genalign-train process stubbed out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from genalign.eval import sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import compare_digits  # noqa: E402
import compare_motion  # noqa: E402
import compare_online  # noqa: E402


def entry(accuracy: float, wall: float = 10.0, commit: str = "abc1234") -> dict:
    return {"before": {"accuracy": 0.4, "implicit_reward_accuracy": 0.5, "mean_margin": 0.0},
            "after": {"accuracy": accuracy, "implicit_reward_accuracy": 0.9, "mean_margin": 0.2},
            "wall_seconds": wall, "commit": commit, "overrides": ["train.max_steps=100", "train.batch_size=32"]}


@pytest.fixture
def fake_launch(monkeypatch):
    """launch() stand-in: the after-accuracy is 0.1·seed + (0.5 for 'b'); records what was launched."""
    launched = []

    def launch(experiment, seed, output_dir, overrides=(), root=None, watch=None, fresh=True):
        launched.append((experiment, seed, list(overrides), list(watch)))
        return entry(0.1 * seed + (0.5 if experiment.endswith("b") else 0.0), commit="new")

    monkeypatch.setattr(sweep, "launch", launch)
    return launched


def test_rerun_rows_replace_only_their_entries(tmp_path, fake_launch):
    results = tmp_path / "results.json"
    sweep.save(results, {"a": {"0": entry(0.9, commit="old"), "1": entry(0.8, commit="old")},
                         "c": {"0": entry(0.7, commit="old")}})
    merged = sweep.run_rows({"a": "text_a", "b": "text_b"}, [1, 2], results, tmp_path / "runs",
                            {"a": ["x=1"]}, watch={"b": ["configs/b.yaml"]})
    assert fake_launch == [("text_a", 1, ["x=1"], list(sweep.WATCHED)), ("text_b", 1, [], ["configs/b.yaml"]),
                           ("text_a", 2, ["x=1"], list(sweep.WATCHED)), ("text_b", 2, [], ["configs/b.yaml"])]
    assert merged == sweep.load(results)
    assert merged["a"]["0"]["commit"] == "old" and merged["a"]["1"]["commit"] == "new"  # seed 0 kept, 1 replaced
    assert merged["a"]["2"]["after"]["accuracy"] == pytest.approx(0.2)
    assert set(merged["b"]) == {"1", "2"} and merged["c"] == {"0": entry(0.7, commit="old")}


def test_deadline_stops_new_launches(tmp_path, fake_launch):
    merged = sweep.run_rows({"a": "text_a"}, [0, 1], tmp_path / "r.json", tmp_path / "runs", deadline=0.0)
    assert fake_launch == [] and merged == {}


def test_summary_is_mean_and_sample_std_over_seeds():
    values = [0.81, 0.9, 0.72]
    table = sweep.summarise({"a": {str(s): entry(v, wall=10.0 * (s + 1)) for s, v in enumerate(values)}},
                            ["accuracy"])
    assert table["a"]["seeds"] == [0, 1, 2]
    assert table["a"]["after"]["accuracy"] == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    assert table["a"]["before"]["accuracy"] == pytest.approx((0.4, 0.0))
    assert table["a"]["wall_seconds"] == pytest.approx((20.0, 10.0))
    assert sweep.mean_std([3.0]) == (3.0, 0.0)


def test_compare_online_table_rows_budget_and_chart(tmp_path):
    results = {"oaif": {"0": entry(0.8), "1": entry(0.9)}, "dpo": {"0": entry(0.85)}}
    text = compare_online.markdown(results, "cmd")
    rows = [line for line in text.splitlines() if line.startswith("| DPO") or line.startswith("| OAIF")]
    assert rows[0].startswith("| DPO (offline reference) | 0 (offline pairs) | 100 × 32 | 0 | 0.400 ± 0.000 | 0.850")
    assert rows[1].startswith("| OAIF | 2 policy | 100 × 32 | 0, 1 | 0.400 ± 0.000 | 0.850 ± 0.071 |")
    path = tmp_path / "chart.png"
    sweep.bar_chart(sweep.summarise(results, list(compare_online.METRICS)), {}, compare_online.METRICS, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, before: dict, after: dict | None, wall: float | None = None) -> None:
    """A run folder as genalign-train leaves it (``after`` None: interrupted after the first evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"before": before} if after is None else {"before": before, "after": after}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if wall is not None:
        (folder / "wall_seconds.txt").write_text(f"{wall:.1f}\n")


@pytest.mark.parametrize("fresh", [True, False])
def test_launch_records_wall_time_and_starts_fresh_or_resumes(tmp_path, monkeypatch, fresh):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    commands = []

    def fake_run(command, cwd, check, env):
        commands.append(command)
        assert (out / "checkpoints").exists() != fresh  # the trainer sees the old checkpoint only when resuming
        write_run(out, {"fid": 2.0}, {"fid": 1.0})

    monkeypatch.setattr(sweep, "commit", lambda root, paths: "abc1234")
    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    entry = sweep.launch("digits_dro", 3, out, ["x=1"], fresh=fresh)
    assert commands[0][-4:] == ["experiment=digits_dro", "train.seed=3", f"output_dir={out}", "x=1"]
    assert entry["before"] == {"fid": 2.0} and entry["after"] == {"fid": 1.0}
    assert entry["commit"] == "abc1234" and entry["overrides"] == ["x=1"]
    assert entry["wall_seconds"] == float((out / "wall_seconds.txt").read_text()) >= 0.0


def test_launch_raises_when_the_run_left_no_after_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "commit", lambda root, paths: "abc1234")
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: write_run(tmp_path / "run", {"fid": 2.0}, None))
    with pytest.raises(RuntimeError, match="run/metrics.json lacks the before or after"):
        sweep.launch("digits_dro", 0, tmp_path / "run")


@pytest.fixture
def folder_launch(monkeypatch):
    """launch() stand-in that finishes the run folder: after-fid = 10·seed + 1, wall 100 + seed; records calls."""
    launched = []

    def launch(experiment, seed, output_dir, overrides=(), root=None, watch=None, fresh=True):
        launched.append((experiment, seed, list(overrides), fresh))
        write_run(output_dir, BEFORE, {**AFTER, "reward": 0.1 * seed, "fid": 10.0 * seed + 1}, 100.0 + seed)

    monkeypatch.setattr(sweep, "launch", launch)
    return launched


BEFORE = {"reward": 0.3, "prompt_accuracy": 0.37, "fid": 26.6}
AFTER = {"reward": 0.5, "prompt_accuracy": 0.48, "fid": 30.0}


def test_run_missing_reuses_finished_folders_and_collect_reads_them_back(tmp_path, folder_launch):
    runs = tmp_path / "runs"
    write_run(runs / "a" / "seed0", BEFORE, AFTER, 643.0)
    write_run(runs / "a" / "seed1", BEFORE, None)  # interrupted: resumed, not restarted
    write_run(runs / "c" / "seed0", BEFORE, AFTER)  # finished, but c is not asked for
    sweep.run_missing({"a": "x_a", "b": "x_b"}, [0, 1], runs, ["k=v"])
    assert folder_launch == [("x_b", 0, ["k=v"], False), ("x_a", 1, ["k=v"], False), ("x_b", 1, ["k=v"], False)]
    results = sweep.collect(["b", "a", "d"], [1, 0], runs)
    assert list(results) == ["b", "a"] and list(results["a"]) == ["1", "0"]  # order as asked; d never finished
    assert results["a"]["0"] == {"before": BEFORE, "after": AFTER, "wall_seconds": 643.0}
    assert results["b"]["1"]["after"]["fid"] == 11.0 and results["b"]["1"]["wall_seconds"] == 101.0
    folder_launch.clear()
    sweep.run_missing({"a": "x_a", "e": "x_e"}, [0, 1], runs, deadline=0.0)
    assert folder_launch == [] and sweep.collect(["e"], [0, 1], runs) == {}


def test_summary_and_wall_times_skip_runs_without_a_recorded_wall_time():
    results = {"a": {"0": {**entry(0.8), "wall_seconds": None}, "1": {**entry(0.9), "wall_seconds": 30.4}},
               "b": {"2": {"before": BEFORE, "after": AFTER, "wall_seconds": None}}}
    table = sweep.summarise(results, [])
    assert table["a"]["wall_seconds"] == (30.4, 0.0) and table["b"]["wall_seconds"] is None
    assert table["a"]["commits"] == ["abc1234"] and table["b"]["commits"] == []
    assert sweep.wall_times(results, {"a": "Row A"}) == "Row A 30"
    assert sweep.wall_times({"b": results["b"]}, {}) == ""


def test_compare_digits_runs_the_missing_folders_and_tabulates_the_finished(tmp_path, folder_launch, monkeypatch):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    write_run(runs / "dro" / "seed0", BEFORE, {**AFTER, "reward": 0.46, "fid": 29.94}, 643.0)
    argv = ["compare_digits.py", "--seeds", "0", "1", "--methods", "dro", "kto", "--runs", str(runs),
            "--docs", str(docs), "--note", "Hand-written note.", "train.max_steps=5"]
    monkeypatch.setattr(sys, "argv", argv)
    compare_digits.main()
    assert folder_launch == [("digits_kto", 0, ["train.max_steps=5"], False),
                             ("digits_dro", 1, ["train.max_steps=5"], False),
                             ("digits_kto", 1, ["train.max_steps=5"], False)]
    text = (docs / "digits_comparison.md").read_text()
    assert "Written by `python scripts/compare_digits.py --seeds 0 1`" in text
    dro_fid = np.mean([29.94, 11.0]), np.std([29.94, 11.0], ddof=1)
    assert (f"| Diffusion-DRO | 0, 1 | 0.300 ± 0.000 | {np.mean([0.46, 0.1]):.3f} ± {np.std([0.46, 0.1], ddof=1):.3f}"
            f" | 0.370 ± 0.000 | 0.480 ± 0.000 | 26.6 ± 0.0 | {dro_fid[0]:.1f} ± {dro_fid[1]:.1f} |") in text
    assert "| Diffusion-KTO | 0, 1 | 0.300 ± 0.000 | 0.050 ± 0.071 |" in text
    assert "on the shared CPU): Diffusion-DRO 643, 101; Diffusion-KTO 100, 101." in text
    assert text.endswith("\n\nHand-written note.\n")
    assert (docs / "digits_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder_launch.clear()
    monkeypatch.setattr(sys, "argv", argv[:-3] + ["--no-run"])
    compare_digits.main()
    assert folder_launch == [] and "Hand-written note." not in (docs / "digits_comparison.md").read_text()


def motion_metrics(top3: float, mm_dist: float, ci: float) -> dict:
    values = {"r_precision_top1": 0.05, "r_precision_top3": top3, "mm_dist": mm_dist, "fid": 24.0, "diversity": 11.5}
    return {**values, **{f"{key}_ci95": ci for key in values}}


def test_compare_motion_cells_significance_and_learning_rates(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    runs, docs = tmp_path / "runs", tmp_path / "docs"
    # sopo: top-3 +0.06 and +0.077 > 0.01 + 0.01 (both significant); MM-Dist -0.01 (not) and -1.29 (significant)
    for seed, (top3, mm) in enumerate([(0.233, 12.28), (0.25, 11.0)]):
        write_run(runs / "sopo" / f"seed{seed}", motion_metrics(0.173, 12.29, 0.01), motion_metrics(top3, mm, 0.01))
        OmegaConf.save({"train": {"learning_rate": 3e-4}}, runs / "sopo" / f"seed{seed}" / "config.yaml")
    write_run(runs / "dpo" / "seed1", motion_metrics(0.173, 12.29, 0.01), motion_metrics(0.12, 13.5, 0.02), 236.0)
    OmegaConf.save({"train": {"learning_rate": 3e-5}}, runs / "dpo" / "seed1" / "config.yaml")
    monkeypatch.setattr(sys, "argv", ["compare_motion.py", "--no-run", "--seeds", "0", "1", "--methods", "sopo", "dpo",
                                      "--runs", str(runs), "--docs", str(docs)])
    compare_motion.main()
    lines = (docs / "motion_comparison.md").read_text().splitlines()
    rows = {line.split(" | ")[0]: line.split(" | ") for line in lines if line.startswith(("| S", "| D"))}
    sopo, dpo = rows["| SoPo"], rows["| Diffusion-DPO (GT vs base)"]
    assert sopo[1:3] == ["0.0003", "0, 1"] and dpo[1:3] == ["3e-05", "1"]
    assert sopo[6] == f"{np.mean([0.233, 0.25]):.3f} ± {np.std([0.233, 0.25], ddof=1):.3f}"
    assert dpo[5:7] == ["0.173 (±0.010)", "0.120 (±0.020)"]  # one seed: its own 95 % half-width
    assert sopo[-2:] == ["2/2", "1/2 |"] and dpo[-2:] == ["0/1", "0/1 |"]
    assert (docs / "motion_comparison.md").read_text().startswith("# Motion demo: SoPo vs Diffusion-DPO\n")
    assert (docs / "motion_comparison.png").exists()
