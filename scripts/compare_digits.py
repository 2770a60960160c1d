"""Compare Diffusion-DRO, Diffusion-DPO and Diffusion-KTO on the embedded digits demo over several seeds.

Runs ``genalign-train experiment=digits_<method> train.seed=<seed>`` (each in its own process, one after another)
into ``<runs>/<method>/seed<seed>``, skipping runs whose ``metrics.json`` already has an "after" entry, then writes
``docs/digits_comparison.md`` (mean ± sample std over the seeds of reward, prompt accuracy and FID, before and
after) and ``docs/digits_comparison.png`` (bar chart with the std as error bars). Only finished runs enter the
table; the table lists which.

    OMP_NUM_THREADS=1 python scripts/compare_digits.py --seeds 0 1 2
    python scripts/compare_digits.py --no-run   # tabulate the finished runs only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"dro": "Diffusion-DRO", "dpo": "Diffusion-DPO", "kto": "Diffusion-KTO"}
METRICS = {"reward": "reward ↑", "prompt_accuracy": "prompt accuracy ↑", "fid": "FID ↓"}


def run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / method / f"seed{seed}"


def finished(path: Path) -> dict | None:
    """The run's metrics if it reached its "after" evaluation, else None."""
    file = path / "metrics.json"
    if not file.exists():
        return None
    metrics = json.loads(file.read_text())
    return metrics if "after" in metrics and "before" in metrics else None


def launch(method: str, seed: int, out: Path, overrides: list[str]) -> None:
    """One experiment in a subprocess (raises if it fails); its wall time goes to ``out/wall_seconds.txt``."""
    command = [sys.executable, "-m", "genalign.cli", f"experiment=digits_{method}", f"train.seed={seed}",
               f"output_dir={out}", *overrides]  # fmt: skip
    print("$", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    (out / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")


def wall_seconds(path: Path) -> float | None:
    file = path / "wall_seconds.txt"
    return float(file.read_text()) if file.exists() else None


def summarise(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """method -> when ("before"/"after") -> metric -> (mean, sample std; 0 for a single run)."""
    table = {}
    for method, by_seed in results.items():
        table[method] = {}
        for when in ("before", "after"):
            table[method][when] = {}
            for key in METRICS:
                values = np.array([m[when][key] for m in by_seed.values()], dtype=float)
                table[method][when][key] = (values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0)
    return table


def markdown(table: dict, results: dict[str, dict[int, dict]], walls: dict[str, list[float]], command: str) -> str:
    """The table; ``walls``: method -> wall seconds of its runs (those launched by this script)."""
    lines = [
        "# Digits demo: Diffusion-DRO vs Diffusion-DPO vs Diffusion-KTO",
        "",
        f"Written by `{command}`. Each cell is the mean ± sample std over the seeds listed (the seed of training "
        "and of the AI-feedback sampling; the evaluation prompts and noise are fixed, so every \"before\" is the "
        "same base model). Metrics: mean p_cls(prompted digit), prompt accuracy and classifier-feature FID vs the "
        "360 held-out digits, from `configs/evaluator/digits.yaml`.",
        "",
        "| method | seeds | " + " | ".join(f"{label} before | {label} after" for label in METRICS.values()) + " |",
        "|---|---|" + "---|---|" * len(METRICS),
    ]
    for method, whens in table.items():
        cells = []
        for key in METRICS:
            for when in ("before", "after"):
                mean, std = whens[when][key]
                digits = 1 if key == "fid" else 3
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        seeds = ", ".join(str(s) for s in sorted(results[method]))
        lines.append(f"| {METHODS[method]} | {seeds} | " + " | ".join(cells) + " |")
    if any(walls.values()):
        lines += ["", "Wall time per run (seconds, whole `genalign-train` process incl. both evaluations, on the shared "
                  "CPU): " + "; ".join(
            f"{METHODS[m]} {', '.join(f'{w:.0f}' for w in ws)}" for m, ws in walls.items() if ws) + "."]
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    methods = list(table)
    x = np.arange(len(methods))
    for ax, (key, label) in zip(axes, METRICS.items()):
        for offset, when, colour in ((-0.2, "before", "#9e9e9e"), (0.2, "after", "#1f77b4")):
            means = [table[m][when][key][0] for m in methods]
            stds = [table[m][when][key][1] for m in methods]
            ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3, color=colour, label=when)
        ax.set_xticks(x, [METHODS[m] for m in methods])
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "digits_comparison")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-run", action="store_true", help="only tabulate runs that already finished")
    parser.add_argument("--deadline", type=float, default=None,
                        help="Unix time after which no new run is launched (what finished is still tabulated)")
    parser.add_argument("--note", default="", help="a paragraph of observations appended to the markdown")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run, e.g. train.max_steps=50")
    args = parser.parse_args()

    if not args.no_run:
        for seed in args.seeds:  # seed-major, so an interrupted comparison still covers every method
            for method in args.methods:
                out = run_dir(args.runs, method, seed)
                if finished(out):
                    continue
                if args.deadline is not None and time.time() > args.deadline:
                    print(f"deadline passed: not launching {method} seed {seed}", flush=True)
                    continue
                launch(method, seed, out, args.overrides)
    results = {m: {s: r for s in args.seeds if (r := finished(run_dir(args.runs, m, s)))} for m in args.methods}
    results = {m: by_seed for m, by_seed in results.items() if by_seed}
    walls = {m: [w for s in sorted(by_seed) if (w := wall_seconds(run_dir(args.runs, m, s))) is not None]
             for m, by_seed in results.items()}
    if not results:
        raise SystemExit(f"no finished runs under {args.runs}; run without --no-run first")
    table = summarise(results)
    args.docs.mkdir(parents=True, exist_ok=True)
    text = markdown(table, results, walls, "python scripts/compare_digits.py --seeds " + " ".join(map(str, args.seeds)))
    (args.docs / "digits_comparison.md").write_text(text + (f"\n{args.note}\n" if args.note else ""))
    bar_chart(table, args.docs / "digits_comparison.png")
    print((args.docs / "digits_comparison.md").read_text())


if __name__ == "__main__":
    main()
