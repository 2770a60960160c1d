"""Compare the online and single-trajectory methods of issue 5 on the embedded text default (the tiny arithmetic LM).

Every method runs ``genalign-train experiment=text_<method>`` with the same sample budget (``--steps`` optimizer
steps × ``--batch-size`` prompts or offline rows per step) for each seed, one process after another
(:mod:`genalign.eval.sweep`). Results merge into ``docs/online_comparison.json`` (re-running a subset of methods or
seeds replaces only those entries), and the whole file is tabulated into ``docs/online_comparison.md`` (mean ±
sample std over the seeds of the held-out arithmetic metrics before and after, wall time per run, the commit each row
ran at) and ``docs/online_comparison.png`` (bars with the std as error bars).

    OMP_NUM_THREADS=1 nice -n 5 python scripts/compare_online.py --seeds 0 1 2
    OMP_NUM_THREADS=1 python scripts/compare_online.py --methods sera osp --seeds 0 1 2   # re-run two rows
    python scripts/compare_online.py --no-run   # tabulate the results file only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genalign.eval.sweep import REPO_ROOT, bar_chart, load, run_rows, summarise

#: name -> (label, what the method samples per prompt per step, the code it trains with besides its configs)
METHODS = {
    "dpo": ("DPO (offline reference)", "0 (offline pairs)", "genalign/steps.py"),
    "oaif": ("OAIF", "2 policy", "genalign/online/oaif.py"),
    "nash_md": ("Nash-MD", "1 policy + 1 mixture", "genalign/online/nash_md.py"),
    "ipo_md": ("IPO-MD", "2 mixture", "genalign/online/oaif.py"),
    "hypo": ("HyPO", "1 policy (+ offline pair)", "genalign/online/hypo.py"),
    "selm": ("SELM", "1 reference (+ offline pair)", "genalign/online/selm.py"),
    "sera": ("SeRA", "4 snapshot from round 2 on (+ offline pair)", "genalign/online/sera.py"),
    "osp": ("OSP", "4 policy", "genalign/online/osp.py"),
    "dro": ("DRO", "0 (offline rated answers)", "genalign/online/dro.py"),
    "pmpo": ("PMPO", "1 reference (+ offline rated answer)", "genalign/online/pmpo.py"),
    "drpo": ("DR-PO", "2 policy from a reset prefix", "genalign/online/drpo.py"),
    "inverse_alignment": ("Inverse alignment", "4 policy", "genalign/online/inverse_alignment.py"),
    "multiturn_dpo": ("Multi-turn DPO", "0 (offline dialogues)", "genalign/data/multiturn.py"),
    "multiturn_kto": ("Multi-turn KTO", "0 (offline dialogues)", "genalign/data/multiturn.py"),
}
METRICS = {"accuracy": "held-out accuracy ↑", "implicit_reward_accuracy": "implicit-reward accuracy ↑",
           "mean_margin": "mean implicit margin"}
RESULTS = REPO_ROOT / "docs" / "online_comparison.json"


def watched(name: str) -> list[str]:
    """What a row's commit is marked ``+dirty`` for: its experiment and objective configs and its step's code."""
    return [f"configs/experiment/text_{name}.yaml", "configs/objective", METHODS[name][2]]


def budget_overrides(steps: int, batch_size: int) -> list[str]:
    """The shared budget; intermediate evaluations and checkpoints are off (only before/after are tabulated)."""
    return [f"train.max_steps={steps}", f"train.batch_size={batch_size}", "train.eval_every=0", "train.save_every=0"]


def budget(overrides: list[str]) -> str:
    """"steps × batch" of a results entry's overrides."""
    values = dict(o.split("=", 1) for o in overrides)
    return f"{values.get('train.max_steps', '?')} × {values.get('train.batch_size', '?')}"


def table_of(results: dict) -> dict:
    """:func:`summarise` of the results, rows in :data:`METHODS` order (unknown rows last)."""
    table = summarise(results, list(METRICS))
    return {name: table[name] for name in [m for m in METHODS if m in table] + sorted(set(table) - set(METHODS))}


def markdown(results: dict, command: str, note: str = "") -> str:
    table = table_of(results)
    names = list(table)
    lines = [
        "# Online and single-trajectory methods on the tiny arithmetic LM",
        "",
        f"Written by `{command}` (rows merged from `docs/online_comparison.json`). Each method is "
        "`genalign-train experiment=text_<method>` with the budget shown (optimizer steps × batch of prompts or "
        "offline rows; the experiment configs themselves say 150 × 32), intermediate evaluations off. Cells are "
        "mean ± sample std over the seeds listed (training seed; the 500 held-out problems and greedy decoding are "
        "fixed, so every \"before\" is the same base model). Metrics from `genalign.eval.text.ArithmeticEvaluator`: "
        "greedy exact-answer accuracy, and the implicit reward β·log(π/ref) accuracy and mean margin on held-out "
        "(correct, wrong) pairs. Wall time: the whole process (both evaluations included) on a 2-core CPU shared "
        "with other jobs, so it is only a rough guide. Commit: HEAD when the row's runs started; `+dirty`: the row's "
        "experiment or objective config or its step's module had uncommitted changes then.",
        "",
        "| method | samples / prompt / step | steps × batch | seeds | "
        + " | ".join(f"{METRICS[k]} before | after" for k in METRICS) + " | wall s / run | commit |",
        "|---|---|---|---|" + "---|---|" * len(METRICS) + "---|---|",
    ]
    for name in names:
        row = table[name]
        cells = [f"{row[when][key][0]:.3f} ± {row[when][key][1]:.3f}" for key in METRICS for when in ("before", "after")]
        budgets = sorted({budget(e["overrides"]) for e in results[name].values()})
        label, sampled, _ = METHODS.get(name, (name, "?", ""))
        wall = f"{row['wall_seconds'][0]:.0f} ± {row['wall_seconds'][1]:.0f}"
        lines.append(f"| {label} | {sampled} | {', '.join(budgets)} | {', '.join(map(str, row['seeds']))} | "
                     + " | ".join(cells) + f" | {wall} | {', '.join(row['commits'])} |")
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--results", type=Path, default=RESULTS, help="results JSON to merge into")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "outputs" / "online_comparison")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--no-run", action="store_true", help="only tabulate the results file")
    parser.add_argument("--deadline", type=float, default=None, help="Unix time after which no run is launched")
    parser.add_argument("--note-file", type=Path, default=None, help="markdown appended to the table")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    args = parser.parse_args()

    if not args.no_run:
        shared = budget_overrides(args.steps, args.batch_size) + args.overrides
        run_rows({m: f"text_{m}" for m in args.methods}, args.seeds, args.results, args.runs,
                 {m: shared for m in args.methods}, watch={m: watched(m) for m in args.methods},
                 deadline=args.deadline)
    results = load(args.results)
    if not results:
        raise SystemExit(f"{args.results} holds no runs; run without --no-run first")
    command = "python scripts/compare_online.py"
    note = args.note_file.read_text().strip() if args.note_file else ""
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "online_comparison.md").write_text(markdown(results, command, note))
    labels = {m: label for m, (label, _, _) in METHODS.items()}
    bar_chart(table_of(results), labels, METRICS, args.docs / "online_comparison.png")
    print((args.docs / "online_comparison.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
