"""Compare SoPo, MoDiPO, Diffusion-DPO, Diffusion-KTO and Diffusion-DRO on the embedded motion demo over seeds.

Runs ``genalign-train experiment=motion_<method> train.seed=<seed>`` (one process after another) into
``<runs>/<method>/seed<seed>``, skipping finished runs (the digits comparison's helpers), then writes
``docs/motion_comparison.md`` — per method (with the learning rate its runs used), before and after: mean ± sample std over the seeds of R-precision
top-1/top-3, MM-Dist, FID and Diversity, plus each run's own 95 % half-width (the protocol's 20 replications) —
and ``docs/motion_comparison.png`` (bars with the std over seeds). Only finished runs enter the table; a method
whose ``configs/experiment/motion_<method>.yaml`` does not exist is left out.

    OMP_NUM_THREADS=1 python scripts/compare_motion.py --seeds 0 1 2
    python scripts/compare_motion.py --no-run   # tabulate the finished runs only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_digits import finished, run_dir, wall_seconds  # noqa: E402  (the generic run bookkeeping)

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"sopo": "SoPo", "modipo": "MoDiPO", "dpo": "Diffusion-DPO (GT vs base)", "kto": "Diffusion-KTO",
           "diffusion_dro": "Diffusion-DRO"}
AVAILABLE = [m for m in METHODS if (ROOT / "configs" / "experiment" / f"motion_{m}.yaml").exists()]
METRICS = {"r_precision_top1": "top-1 ↑", "r_precision_top3": "top-3 ↑", "mm_dist": "MM-Dist ↓", "fid": "FID ↓",
           "diversity": "Diversity"}


def launch(method: str, seed: int, out: Path, overrides: list[str]) -> None:
    """One experiment in a subprocess (raises if it fails); its wall time goes to ``out/wall_seconds.txt``."""
    command = [sys.executable, "-m", "genalign.cli", f"experiment=motion_{method}", f"train.seed={seed}",
               f"output_dir={out}", *overrides]  # fmt: skip
    print("$", " ".join(command), flush=True)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    (out / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")


def cell(runs: list[dict], when: str, key: str) -> str:
    """``mean ± std over seeds`` and, for one run, ``mean ± its 95 % half-width``."""
    values = np.array([r[when][key] for r in runs])
    if len(values) == 1:
        return f"{values[0]:.3f} (±{runs[0][when][key + '_ci95']:.3f})"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def significant(runs: list[dict], key: str, better: str) -> str:
    """How many runs moved ``key`` in the ``better`` direction by more than both 95 % half-widths."""
    count = 0
    for r in runs:
        delta = r["after"][key] - r["before"][key]
        margin = r["after"][key + "_ci95"] + r["before"][key + "_ci95"]
        count += (delta > margin) if better == "up" else (-delta > margin)
    return f"{count}/{len(runs)}"


def learning_rates(runs: Path, method: str, seeds: list[int]) -> str:
    """The ``train.learning_rate`` values the method's runs were launched with (from each run's config.yaml)."""
    rates = sorted({float(OmegaConf.load(run_dir(runs, method, s) / "config.yaml").train.learning_rate) for s in seeds})
    return ", ".join(f"{r:g}" for r in rates)


def markdown(results: dict[str, dict[int, dict]], rates: dict[str, str], walls: dict[str, list[float]],
             command: str) -> str:
    lines = [
        "# Motion demo: " + " vs ".join(METHODS[m].split(" (")[0] for m in results),
        "",
        f"Written by `{command}`. Base: `assets/motion-mdm`; metrics: the HumanML3D protocol on the synthetic test "
        "split (`configs/evaluator/motion.yaml`: 96 test captions at their real lengths, fixed sampler noise, the "
        "shipped evaluator `assets/motion-evaluator`, 20 replications). A cell is the mean ± sample std over the "
        "seeds listed; with a single seed it is the run's value with its own 95 % half-width in brackets. "
        "\"significant\" counts the runs whose change exceeds the sum of the before and after half-widths.",
        "",
        "| method | lr | seeds | " + " | ".join(f"{label} before | {label} after" for label in METRICS.values())
        + " | top-3 ↑ significant | MM-Dist ↓ significant |",
        "|---|---|---|" + "---|---|" * len(METRICS) + "---|---|",
    ]
    for method, by_seed in results.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        cells = [cell(runs, when, key) for key in METRICS for when in ("before", "after")]
        seeds = ", ".join(str(s) for s in sorted(by_seed))
        lines.append(f"| {METHODS[method]} | {rates[method]} | {seeds} | " + " | ".join(cells)
                     + f" | {significant(runs, 'r_precision_top3', 'up')} | {significant(runs, 'mm_dist', 'down')} |")
    if any(walls.values()):
        lines += ["", "Wall time per run (seconds, whole `genalign-train` process with both evaluations, on a CPU "
                  "shared with other jobs): " + "; ".join(
                      f"{METHODS[m]} {', '.join(f'{w:.0f}' for w in ws)}" for m, ws in walls.items() if ws) + "."]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.6 * len(METRICS), 3.4))
    methods = list(results)
    x = np.arange(len(methods))
    for ax, (key, label) in zip(axes, METRICS.items()):
        for offset, when, colour in ((-0.2, "before", "#9e9e9e"), (0.2, "after", "#1f77b4")):
            values = [np.array([r[when][key] for r in results[m].values()]) for m in methods]
            stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.bar(x + offset, [v.mean() for v in values], 0.4, yerr=stds, capsize=3, color=colour, label=when)
        ax.set_xticks(x, [METHODS[m].split(" ")[0] for m in methods], rotation=20)
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=AVAILABLE, default=AVAILABLE)
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "motion_comparison")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-run", action="store_true", help="only tabulate runs that already finished")
    parser.add_argument("--deadline", type=float, default=None,
                        help="Unix time after which no new run is launched (what finished is still tabulated)")
    parser.add_argument("--note", default="", help="a paragraph of observations appended to the markdown")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
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
    if not results:
        raise SystemExit(f"no finished runs under {args.runs}; run without --no-run first")
    walls = {m: [w for s in sorted(by_seed) if (w := wall_seconds(run_dir(args.runs, m, s))) is not None]
             for m, by_seed in results.items()}
    rates = {m: learning_rates(args.runs, m, sorted(by_seed)) for m, by_seed in results.items()}
    args.docs.mkdir(parents=True, exist_ok=True)
    text = markdown(results, rates, walls, "python scripts/compare_motion.py --seeds " + " ".join(map(str, args.seeds)))
    (args.docs / "motion_comparison.md").write_text(text + (f"\n{args.note}\n" if args.note else ""))
    bar_chart(results, args.docs / "motion_comparison.png")
    print((args.docs / "motion_comparison.md").read_text())


if __name__ == "__main__":
    main()
