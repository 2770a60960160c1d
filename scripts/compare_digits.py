"""Compare Diffusion-DRO, Diffusion-DPO and Diffusion-KTO on the embedded digits demo over several seeds.

Runs ``genalign-train experiment=digits_<method> train.seed=<seed>`` (each in its own process, one after another)
into ``<runs>/<method>/seed<seed>``, skipping runs whose ``metrics.json`` already has an "after" entry, then writes
``docs/digits_comparison.md`` (mean ± sample std over the seeds of reward, prompt accuracy and FID, before and
after) and ``docs/digits_comparison.png`` (bar chart with the std as error bars). Only finished runs enter the
table; the table lists which. The markdown file is rewritten whole: text kept below the table must come back
through ``--note``. The run bookkeeping is :mod:`genalign.eval.sweep`'s.

    OMP_NUM_THREADS=1 python scripts/compare_digits.py --seeds 0 1 2
    python scripts/compare_digits.py --no-run   # tabulate the finished runs only
"""

from __future__ import annotations

from genalign.eval.sweep import REPO_ROOT, folder_arguments, publish, summarise, sweep_folders, wall_times

METHODS = {"dro": "Diffusion-DRO", "dpo": "Diffusion-DPO", "kto": "Diffusion-KTO"}
METRICS = {"reward": "reward ↑", "prompt_accuracy": "prompt accuracy ↑", "fid": "FID ↓"}
DECIMALS = {"reward": 3, "prompt_accuracy": 3, "fid": 1}


def markdown(table: dict, results: dict, command: str) -> str:
    """The table of :func:`~genalign.eval.sweep.summarise` ``table``, and the wall times recorded in ``results``."""
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
    for method, row in table.items():
        cells = [f"{row[when][key][0]:.{DECIMALS[key]}f} ± {row[when][key][1]:.{DECIMALS[key]}f}"
                 for key in METRICS for when in ("before", "after")]
        lines.append(f"| {METHODS[method]} | {', '.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    if walls := wall_times(results, METHODS):
        lines += ["", "Wall time per run (seconds, whole `genalign-train` process incl. both evaluations, on the "
                  f"shared CPU): {walls}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = folder_arguments(__doc__.splitlines()[0], list(METHODS), REPO_ROOT / "outputs" / "digits_comparison") \
        .parse_args()
    results = sweep_folders(args, "digits_")
    table = summarise(results, list(METRICS))
    text = markdown(table, results, "python scripts/compare_digits.py --seeds " + " ".join(map(str, args.seeds)))
    publish(args.docs, "digits_comparison", text, args.note, table, METHODS, METRICS)


if __name__ == "__main__":
    main()
