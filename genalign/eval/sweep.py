"""Run experiments × seeds one process after another, keep their results, and summarise them.

Each run is ``python -m genalign.cli experiment=<experiment> train.seed=<seed> output_dir=<runs>/<name>/seed<seed>
<overrides>`` in its own process, which also records its wall time in ``wall_seconds.txt`` there. A comparison script
names its rows (``name -> experiment config``) and keeps their results in one of two ways:

- a results file: :func:`run_rows` re-runs the rows and seeds asked for from scratch (re-run rows replace their old
  entries, the others stay); each entry is::

    results[name][str(seed)] = {"before": {...}, "after": {...}, "wall_seconds": s, "commit": "abc1234[+dirty]",
                                "overrides": [...]}

  ``commit`` is HEAD when the run started, ``+dirty`` when the row's watched paths (default ``configs/`` and
  ``genalign/``) had uncommitted changes;
- the run folders themselves: :func:`run_missing` launches only the runs whose folder has not finished (an
  interrupted one resumes from its last checkpoint) and :func:`collect` reads the finished folders back in the same
  shape (``before``, ``after`` and ``wall_seconds``, None where the folder recorded none). :func:`folder_arguments`,
  :func:`sweep_folders` and :func:`publish` are the command line, run-and-collect and write-out steps such a script
  shares.

Either way the script tabulates :func:`summarise` of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


WATCHED = ("configs", "genalign")


def commit(root: Path = REPO_ROOT, paths: Sequence[str] = WATCHED) -> str:
    """Short HEAD of ``root``, with ``+dirty`` when any of ``paths`` differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=root).returncode
    return head + ("+dirty" if dirty else "")


def run_dir(runs: Path, name: str, seed: int) -> Path:
    """Where row ``name``'s run with ``seed`` lives: ``<runs>/<name>/seed<seed>``."""
    return Path(runs) / name / f"seed{seed}"


def finished(output_dir: Path) -> dict | None:
    """``{"before", "after", "wall_seconds"}`` of a run folder whose ``metrics.json`` has both evaluations
    (``wall_seconds`` None when the folder has no ``wall_seconds.txt``), else None."""
    file, wall = Path(output_dir) / "metrics.json", Path(output_dir) / "wall_seconds.txt"
    metrics = json.loads(file.read_text()) if file.exists() else {}
    if not {"before", "after"} <= set(metrics):
        return None
    return {"before": metrics["before"], "after": metrics["after"],
            "wall_seconds": float(wall.read_text()) if wall.exists() else None}


def launch(experiment: str, seed: int, output_dir: Path, overrides: Sequence[str] = (), root: Path = REPO_ROOT,
           watch: Sequence[str] = WATCHED, fresh: bool = True) -> dict:
    """Train ``experiment`` with ``seed`` into ``output_dir`` in a subprocess (raises if it fails) and write the
    process's wall seconds to ``output_dir/wall_seconds.txt``. ``fresh``: delete an old run there first (the
    trainer would resume it); otherwise an interrupted run resumes from its last checkpoint. Returns its results
    entry (:func:`finished` of the folder, :func:`commit` of ``watch`` when it started, the overrides)."""
    output_dir = Path(output_dir).resolve()  # the run's working directory is ``root``, not ours
    if fresh:
        shutil.rmtree(output_dir, ignore_errors=True)
    command = [sys.executable, "-m", "genalign.cli", f"experiment={experiment}", f"train.seed={seed}",
               f"output_dir={output_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    started_at, start = commit(root, watch), time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, cwd=root, check=True, env=env)
    (output_dir / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
    entry = finished(output_dir)
    if entry is None:
        raise RuntimeError(f"{output_dir}/metrics.json lacks the before or after evaluation; the run did not finish")
    return {**entry, "commit": started_at, "overrides": list(overrides)}


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


def _grid(rows: Mapping[str, str], seeds: Iterable[int], runs: Path, deadline: float | None,
          skip_finished: bool) -> Iterator[tuple[str, str, int, Path]]:
    """(name, experiment, seed, run folder) to launch, seed-major so that an interrupted sweep still covers every
    row; nothing after ``deadline`` (Unix time), no finished folder when ``skip_finished``."""
    for seed in seeds:
        for name, experiment in rows.items():
            folder = run_dir(runs, name, seed)
            if skip_finished and finished(folder):
                continue
            if deadline is not None and time.time() > deadline:
                print(f"deadline passed: not launching {name} seed {seed}", flush=True)
                continue
            yield name, experiment, seed, folder


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
    """Run every ``name -> experiment`` of ``rows`` for every seed from scratch and merge each finished run into
    ``results_file`` right away, replacing that row and seed's old entry. ``overrides[name]``: that row's extra hydra
    overrides; ``watch[name]``: the paths whose uncommitted changes mark its commit ``+dirty`` (default: all of
    ``configs/`` and ``genalign/``). After ``deadline`` (Unix time) nothing new is launched.
    Returns the merged results."""
    overrides = overrides or {}
    results = load(results_file)
    for name, experiment, seed, folder in _grid(rows, seeds, runs, deadline, skip_finished=False):
        entry = launch(experiment, seed, folder, overrides.get(name, ()), root, (watch or {}).get(name, WATCHED))
        results = load(results_file)  # another invocation may have merged rows meanwhile
        results.setdefault(name, {})[str(seed)] = entry
        save(results_file, results)
    return results


def run_missing(rows: Mapping[str, str], seeds: Iterable[int], runs: Path, overrides: Sequence[str] = (), *,
                deadline: float | None = None, root: Path = REPO_ROOT) -> None:
    """Launch every ``name -> experiment`` of ``rows`` for every seed whose run folder has not finished (an
    interrupted run resumes), with the same extra hydra ``overrides``; after ``deadline`` nothing new is launched."""
    for _, experiment, seed, folder in _grid(rows, seeds, runs, deadline, skip_finished=True):
        launch(experiment, seed, folder, overrides, root, fresh=False)


def collect(names: Iterable[str], seeds: Iterable[int], runs: Path) -> dict[str, dict[str, dict]]:
    """The finished run folders of ``names`` × ``seeds`` as ``name -> str(seed) -> finished(folder)``, in the order
    given; unfinished folders are left out, and so are names with none finished."""
    seeds = list(seeds)
    results = {name: {str(s): entry for s in seeds if (entry := finished(run_dir(runs, name, s)))} for name in names}
    return {name: by_seed for name, by_seed in results.items() if by_seed}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(results: Mapping[str, Mapping[str, dict]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """name -> {"seeds": [...], "before"/"after": {metric: (mean, std)}, "wall_seconds": (mean, std) over the runs
    that recorded one (None if none did), "commits": sorted distinct commits of the runs that have one} over the
    seeds each row has."""
    table = {}
    for name, by_seed in results.items():
        entries = [by_seed[s] for s in sorted(by_seed, key=int)]
        row: dict[str, Any] = {"seeds": sorted(int(s) for s in by_seed)}
        for when in ("before", "after"):
            row[when] = {key: mean_std([e[when][key] for e in entries]) for key in metrics}
        walls = [e["wall_seconds"] for e in entries if e.get("wall_seconds") is not None]
        row["wall_seconds"] = mean_std(walls) if walls else None
        row["commits"] = sorted({e["commit"] for e in entries if "commit" in e})
        table[name] = row
    return table


def wall_times(results: Mapping[str, Mapping[str, dict]], labels: Mapping[str, str]) -> str:
    """Every row's recorded wall seconds in seed order, ``"<label> 643, 720; <label> 236"`` ("" if none recorded)."""
    parts = []
    for name, by_seed in results.items():
        walls = [by_seed[s]["wall_seconds"] for s in sorted(by_seed, key=int)]
        if any(w is not None for w in walls):
            parts.append(f"{labels.get(name, name)} {', '.join(f'{w:.0f}' for w in walls if w is not None)}")
    return "; ".join(parts)


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


def folder_arguments(description: str, methods: Sequence[str], runs: Path) -> argparse.ArgumentParser:
    """The command line of a comparison kept in run folders: ``--seeds``, ``--methods`` (choices ``methods``, all
    by default), ``--runs`` (default ``runs``), ``--docs``, ``--no-run``, ``--deadline``, ``--note`` and extra
    hydra overrides for every run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(methods), default=list(methods))
    parser.add_argument("--runs", type=Path, default=runs)
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--no-run", action="store_true", help="only tabulate runs that already finished")
    parser.add_argument("--deadline", type=float, default=None,
                        help="Unix time after which no new run is launched (what finished is still tabulated)")
    parser.add_argument("--note", default="", help="a paragraph of observations appended to the markdown")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run, e.g. train.max_steps=50")
    return parser


def sweep_folders(args: argparse.Namespace, prefix: str) -> dict[str, dict[str, dict]]:
    """For :func:`folder_arguments`' ``args``: launch the unfinished ``experiment=<prefix><method>`` runs (unless
    ``--no-run``), then :func:`collect` the finished ones; exits with a message when none has finished."""
    if not args.no_run:
        run_missing({m: f"{prefix}{m}" for m in args.methods}, args.seeds, args.runs, args.overrides,
                    deadline=args.deadline)
    results = collect(args.methods, args.seeds, args.runs)
    if not results:
        raise SystemExit(f"no finished runs under {args.runs}; run without --no-run first")
    return results


def publish(docs: Path, stem: str, text: str, note: str, table: Mapping[str, dict], labels: Mapping[str, str],
            metrics: Mapping[str, str]) -> None:
    """Write ``docs/<stem>.md`` (``text``, then the ``note`` paragraph if any; the whole file is replaced) and
    ``docs/<stem>.png`` (:func:`bar_chart` of ``table``), and print the markdown."""
    docs.mkdir(parents=True, exist_ok=True)
    text += f"\n{note}\n" if note else ""
    (docs / f"{stem}.md").write_text(text)
    bar_chart(table, labels, metrics, docs / f"{stem}.png")
    print(text, flush=True)
