"""Run experiments × seeds one process after another, keep their results in one JSON file, and summarise them.

A comparison script names its rows (``name -> experiment config``), calls :func:`run_rows` for the rows and seeds it
wants (re-run rows replace their old entries, the others stay), then tabulates :func:`summarise` of the merged file.
Each run is ``python -m genalign.cli experiment=<experiment> train.seed=<seed> output_dir=<runs>/<name>/seed<seed>
<overrides>`` in its own process; its entry in the results file is::

    results[name][str(seed)] = {"before": {...}, "after": {...}, "wall_seconds": s, "commit": "abc1234[+dirty]",
                                "overrides": [...]}

``commit`` is HEAD when the run started, ``+dirty`` when the row's watched paths (default ``configs/`` and
``genalign/``) had uncommitted changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


WATCHED = ("configs", "genalign")


def commit(root: Path = REPO_ROOT, paths: Sequence[str] = WATCHED) -> str:
    """Short HEAD of ``root``, with ``+dirty`` when any of ``paths`` differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=root).returncode
    return head + ("+dirty" if dirty else "")


def launch(experiment: str, seed: int, output_dir: Path, overrides: Sequence[str] = (), root: Path = REPO_ROOT,
           watch: Sequence[str] = WATCHED) -> dict:
    """Train ``experiment`` with ``seed`` into a fresh ``output_dir`` (an old run there is deleted: the trainer would
    resume it) in a subprocess (raises if it fails); returns its results entry (the run's metrics.json
    "before"/"after", wall seconds of the whole process, :func:`commit` of ``watch``, overrides)."""
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [sys.executable, "-m", "genalign.cli", f"experiment={experiment}", f"train.seed={seed}",
               f"output_dir={output_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    started_at, start = commit(root, watch), time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, cwd=root, check=True, env=env)
    wall = time.time() - start
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    missing = {"before", "after"} - set(metrics)
    if missing:
        raise RuntimeError(f"{output_dir}/metrics.json has no {sorted(missing)} evaluation; the run did not finish")
    return {"before": metrics["before"], "after": metrics["after"], "wall_seconds": round(wall, 1),
            "commit": started_at, "overrides": list(overrides)}


def load(path: Path) -> dict[str, dict[str, dict]]:
    """The results file (``{}`` when it does not exist yet)."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def save(path: Path, results: Mapping[str, Mapping[str, dict]]) -> None:
    """Write the results atomically (a crash mid-write leaves the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_rows(
    rows: Mapping[str, str],
    seeds: Iterable[int],
    results_file: Path,
    runs: Path,
    overrides: Mapping[str, Sequence[str]] | None = None,
    *,
    watch: Mapping[str, Sequence[str]] | None = None,
    deadline: float | None = None,
    root: Path = REPO_ROOT,
) -> dict[str, dict[str, dict]]:
    """Run every ``name -> experiment`` of ``rows`` for every seed (seed-major, so an interrupted sweep still covers
    every row) and merge each finished run into ``results_file`` right away, replacing that row and seed's old entry.
    ``overrides[name]``: that row's extra hydra overrides; ``watch[name]``: the paths whose uncommitted changes mark
    its commit ``+dirty`` (default: all of ``configs/`` and ``genalign/``). After ``deadline`` (Unix time) nothing
    new is launched.
    Returns the merged results."""
    overrides = overrides or {}
    results = load(results_file)
    for seed in seeds:
        for name, experiment in rows.items():
            if deadline is not None and time.time() > deadline:
                print(f"deadline passed: not launching {name} seed {seed}", flush=True)
                continue
            entry = launch(experiment, seed, Path(runs) / name / f"seed{seed}", overrides.get(name, ()), root,
                           (watch or {}).get(name, WATCHED))
            results = load(results_file)  # another invocation may have merged rows meanwhile
            results.setdefault(name, {})[str(seed)] = entry
            save(results_file, results)
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(results: Mapping[str, Mapping[str, dict]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """name -> {"seeds": [...], "before"/"after": {metric: (mean, std)}, "wall_seconds": (mean, std),
    "commits": sorted distinct commits} over the seeds each row has."""
    table = {}
    for name, by_seed in results.items():
        entries = [by_seed[s] for s in sorted(by_seed, key=int)]
        row: dict[str, Any] = {"seeds": sorted(int(s) for s in by_seed)}
        for when in ("before", "after"):
            row[when] = {key: mean_std([e[when][key] for e in entries]) for key in metrics}
        row["wall_seconds"] = mean_std([e["wall_seconds"] for e in entries])
        row["commits"] = sorted({e["commit"] for e in entries})
        table[name] = row
    return table


def bar_chart(table: Mapping[str, dict], labels: Mapping[str, str], metrics: Mapping[str, str], path: Path) -> None:
    """One panel per metric: before (grey) and after (blue) bars per row with the std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    x = np.arange(len(names))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.75 * len(names) + 1.5), 2.6 * len(metrics)),
                             squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], metrics.items()):
        for offset, when, colour in ((-0.2, "before", "#9e9e9e"), (0.2, "after", "#1f77b4")):
            means = [table[n][when][key][0] for n in names]
            stds = [table[n][when][key][1] for n in names]
            ax.bar(x + offset, means, 0.4, yerr=stds, capsize=2, color=colour, label=when)
        ax.set_xticks(x, [labels.get(n, n) for n in names], rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
