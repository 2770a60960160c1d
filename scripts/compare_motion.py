"""Compare SoPo, MoDiPO, Diffusion-DPO, Diffusion-KTO and Diffusion-DRO on the embedded motion demo over seeds.

Runs ``genalign-train experiment=motion_<method> train.seed=<seed>`` (one process after another) into
``<runs>/<method>/seed<seed>``, skipping finished runs (:mod:`genalign.eval.sweep`'s run bookkeeping), then writes
``docs/motion_comparison.md`` — per method (with the learning rate its runs used), before and after: mean ± sample
std over the seeds of R-precision top-1/top-3, MM-Dist, FID and Diversity, plus each run's own 95 % half-width (the
protocol's 20 replications) — and ``docs/motion_comparison.png`` (bars with the std over seeds). Only finished runs
enter the table; a method whose ``configs/experiment/motion_<method>.yaml`` does not exist is left out.

    OMP_NUM_THREADS=1 python scripts/compare_motion.py --seeds 0 1 2
    python scripts/compare_motion.py --no-run   # tabulate the finished runs only
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from genalign.eval.sweep import REPO_ROOT, folder_arguments, mean_std, publish, run_dir, summarise, sweep_folders, \
    wall_times

METHODS = {"sopo": "SoPo", "modipo": "MoDiPO", "dpo": "Diffusion-DPO (GT vs base)", "kto": "Diffusion-KTO",
           "diffusion_dro": "Diffusion-DRO"}
AVAILABLE = [m for m in METHODS if (REPO_ROOT / "configs" / "experiment" / f"motion_{m}.yaml").exists()]
METRICS = {"r_precision_top1": "top-1 ↑", "r_precision_top3": "top-3 ↑", "mm_dist": "MM-Dist ↓", "fid": "FID ↓",
           "diversity": "Diversity"}


def cell(runs: list[dict], when: str, key: str) -> str:
    """``mean ± std over seeds`` and, for one run, ``mean ± its 95 % half-width``."""
    if len(runs) == 1:
        return f"{runs[0][when][key]:.3f} (±{runs[0][when][key + '_ci95']:.3f})"
    mean, std = mean_std([r[when][key] for r in runs])
    return f"{mean:.3f} ± {std:.3f}"


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


def markdown(results: dict[str, dict[str, dict]], rates: dict[str, str], command: str) -> str:
    """The table of ``results`` (:func:`~genalign.eval.sweep.collect`'s shape) and their recorded wall times."""
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
        seeds = sorted(by_seed, key=int)
        runs = [by_seed[s] for s in seeds]
        cells = [cell(runs, when, key) for key in METRICS for when in ("before", "after")]
        lines.append(f"| {METHODS[method]} | {rates[method]} | {', '.join(seeds)} | " + " | ".join(cells)
                     + f" | {significant(runs, 'r_precision_top3', 'up')} | {significant(runs, 'mm_dist', 'down')} |")
    if walls := wall_times(results, METHODS):
        lines += ["", "Wall time per run (seconds, whole `genalign-train` process with both evaluations, on a CPU "
                  f"shared with other jobs): {walls}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = folder_arguments(__doc__.splitlines()[0], AVAILABLE, REPO_ROOT / "outputs" / "motion_comparison") \
        .parse_args()
    results = sweep_folders(args, "motion_")
    rates = {m: learning_rates(args.runs, m, sorted(map(int, by_seed))) for m, by_seed in results.items()}
    text = markdown(results, rates, "python scripts/compare_motion.py --seeds " + " ".join(map(str, args.seeds)))
    labels = {m: label.split(" ")[0] for m, label in METHODS.items()}
    publish(args.docs, "motion_comparison", text, args.note, summarise(results, list(METRICS)), labels, METRICS)


if __name__ == "__main__":
    main()
