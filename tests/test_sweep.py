"""genalign.eval.sweep: re-run rows replace only their own entries in the results file, the summary is the mean
and sample std over the seeds, a deadline stops new launches, and scripts/compare_online.py tabulates the merged
file (one launch stubbed out; the real runs are genalign-train processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from genalign.eval import sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import compare_online  # noqa: E402


def entry(accuracy: float, wall: float = 10.0, commit: str = "abc1234") -> dict:
    return {"before": {"accuracy": 0.4, "implicit_reward_accuracy": 0.5, "mean_margin": 0.0},
            "after": {"accuracy": accuracy, "implicit_reward_accuracy": 0.9, "mean_margin": 0.2},
            "wall_seconds": wall, "commit": commit, "overrides": ["train.max_steps=100", "train.batch_size=32"]}


@pytest.fixture
def fake_launch(monkeypatch):
    """launch() stand-in: the after-accuracy is 0.1·seed + (0.5 for 'b'); records what was launched."""
    launched = []

    def launch(experiment, seed, output_dir, overrides=(), root=None, watch=None):
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
