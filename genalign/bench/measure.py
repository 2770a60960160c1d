"""Timing, memory and summary statistics shared by the benchmark suites.

* Time: wall-clock seconds per training step (``torch.cuda.synchronize`` around it on a GPU), warm-up steps dropped.
* Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed steps minus the allocation before them; on the
  CPU, the growth of the process's peak resident set size (``VmHWM`` in ``/proc/self/status``, reset to the current
  RSS through ``/proc/self/clear_refs`` just before the first step). The CPU figure is only honest in a process that
  runs one side alone, so the runner measures it in a fresh subprocess per side (:func:`run_isolated`).
* Spread: the ratio genalign/peer is computed per repetition and summarised by its median and inter-quartile range.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call, with the device synchronised on both ends."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; CPU peak memory needs Linux")
    return int(match.group(1))


class PeakMemory:
    """Peak memory growth (MiB) over a block: CUDA max allocated, or the CPU peak RSS (see the module docstring)."""

    def __enter__(self) -> "PeakMemory":
        self.kind = device_kind()
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _status_kib("VmRSS") * 1024
        self.growth_mib = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = torch.cuda.max_memory_allocated() if self.kind == "cuda" else _status_kib("VmHWM") * 1024
        self.growth_mib = (peak - self.base) / 2**20


@dataclass
class StepTimes:
    """Per-step seconds of one repetition of one side, warm-up already dropped."""

    seconds: list[float]
    samples_per_step: int

    @property
    def samples_per_s(self) -> float:
        return self.samples_per_step * len(self.seconds) / sum(self.seconds)


def run_steps(side: Any, steps: int, warmup: int, samples_per_step: int) -> StepTimes:
    """``warmup + steps`` calls of ``side.step()``; the times of the last ``steps`` are kept."""
    seconds = [timed(side.step)[0] for _ in range(warmup + steps)]
    return StepTimes(seconds[warmup:], samples_per_step)


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs that one call of ``fn`` executes (forward and backward matmuls/convolutions/attention), counted by
    ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


#: dense bf16 tensor-core peak FLOP/s by GPU name fragment (vendor data sheets, SXM parts)
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops() -> float | None:
    """The device's dense bf16 peak, or None (CPU, or a GPU missing from :data:`PEAK_BF16_FLOPS`)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation (``statistics.quantiles`` inclusive)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def compare(ours: list[StepTimes], peer: list[StepTimes]) -> dict[str, Any]:
    """Median samples/s per side and the per-repetition ratio ours/peer with its quartiles."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"need the same positive number of repetitions per side, got {len(ours)} and {len(peer)}")
    ratios = [a.samples_per_s / b.samples_per_s for a, b in zip(ours, peer)]
    q1, median, q3 = quartiles(ratios)
    return {
        "genalign_samples_per_s": statistics.median(r.samples_per_s for r in ours),
        "peer_samples_per_s": statistics.median(r.samples_per_s for r in peer),
        "ratio_median": median,
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratios": ratios,
    }


def alternate(reps: int, sides: dict[str, Callable[[], StepTimes]], log: Callable[[str], None] = print) -> dict[str, list[StepTimes]]:
    """Run each side once per repetition, alternating which goes first, in this process."""
    names = list(sides)
    out: dict[str, list[StepTimes]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            result = sides[name]()
            out[name].append(result)
            log(f"  rep {rep + 1}/{reps} {name}: {result.samples_per_s:.2f} samples/s")
    return out


def run_isolated(module: str, args: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh process; its last stdout line is a JSON object, returned."""
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{module} {' '.join(args)} printed no JSON result:\n{done.stdout[-2000:]}")
    return json.loads(lines[-1])


def machine_facts() -> dict[str, Any]:
    """What ran the benchmark: CPU model and core count, memory, load, library versions, GPU if any."""
    from importlib.metadata import PackageNotFoundError, version

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 1),
        "platform": platform.platform(),
    }
    for package in ("torch", "transformers", "diffusers", "accelerate", "peft", "trl"):
        try:
            facts[package] = version(package)
        except PackageNotFoundError:
            facts[package] = "not installed"
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu_model"] = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
        facts["memory_gib"] = round(_meminfo_kib("MemTotal") / 2**20, 1)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))
