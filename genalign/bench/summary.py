"""A compact table of ``genalign-bench`` JSON results: per run and side, pairs/s, the genalign / side ratio, achieved
TFLOP/s and model FLOPs utilisation (``scripts/gpu_check.sh`` prints it after its runs, one JSON file per run).

    python -m genalign.bench.summary RESULT.json [RESULT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

HEADER = ("run", "side", "pairs/s", "genalign/side [IQR]", "TFLOP/s", "MFU")


def rows(run: str, results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per side of every speed suite in ``results`` (the online suite has no sides and is left out)."""
    out = []
    for suite in results["suites"].values():
        for side, entry in suite.get("sides", {}).items():
            comparison = suite["comparisons"].get(side)
            ratio = "—" if comparison is None else (f"{comparison['ratio_median']:.2f}x "
                                                    f"[{comparison['ratio_q1']:.2f}, {comparison['ratio_q3']:.2f}]")
            mfu = f"{entry['mfu']:.1%}" if "mfu" in entry else "—"
            out.append((run, side, f"{entry['samples_per_s_median']:.2f}", ratio, f"{entry['achieved_tflops']:.2f}",
                        mfu))
    return out


def table(paths: Sequence[str | Path]) -> str:
    """The runs' device and model lines, then the aligned table; a run is named by its file name without ``.json``."""
    lines, body = [], []
    for path in map(Path, paths):
        results = json.loads(path.read_text())
        gpu = results["machine"].get("gpu")
        for suite in results["suites"].values():
            if "config" in suite:
                config = suite["config"]
                lines.append(f"{path.stem}: {results['device']}{f' ({gpu})' if gpu else ''}; {config['model']}; "
                             f"batch {config['batch_size']} pairs, {config['mixed_precision']} mixed precision")
        body += rows(path.stem, results)
    widths = [max(len(row[i]) for row in [HEADER, *body]) for i in range(len(HEADER))]
    for row in [HEADER, tuple("-" * w for w in widths), *body]:
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    paths = sys.argv[1:] if argv is None else list(argv)
    if not paths:
        raise SystemExit("usage: python -m genalign.bench.summary RESULT.json [RESULT.json ...] (genalign-bench --json)")
    print(table(paths))


if __name__ == "__main__":
    main()
