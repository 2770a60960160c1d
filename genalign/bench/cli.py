"""``genalign-bench``: run the benchmark suites and write ``docs/BENCHMARKS.md`` and ``docs/benchmarks.json``.

Speed suites (``text``, ``image``) build every side on the same model, data, batch order and precision, then run
``--reps`` repetitions; each repetition runs every side for ``--warmup`` untimed and ``--steps`` timed optimizer
steps, alternating which side goes first. The peak-memory growth of each side is measured in a fresh subprocess
running that side alone (see :mod:`genalign.bench.measure`). The ``online`` suite reports the sampling share of
Diffusion-DRO and SoPo steps. ``--suite cpu`` runs all three on the CPU (CUDA hidden); ``--suite all`` (or a single
suite) on a CUDA machine picks the GPU sizes (SD-1.5-shaped UNet, ~0.5B LM, bf16) and reports model FLOPs
utilisation; ``--compile`` adds ``genalign-compiled`` to the speed suites: genalign with its policy through
``torch.compile`` (what ``train.compile`` does), timed alternating with the eager side. ``--image-shape sd15`` runs
the image suite at SD 1.5's real UNet/VAE/CLIP shapes in float32 with 1 pair per micro-batch on any device (the
CPU measurement of the real shape; the peak-memory subprocesses get the same shape). ``--image-train full`` trains
every UNet weight on both image sides (frozen reference copy) instead of the LoRA. ``--image-shape tiny`` and
``--text-shape tiny`` are plumbing sizes that run in seconds (``scripts/gpu_check.sh`` with ``GPU_CHECK_ALLOW_CPU=1``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from genalign.bench import image, measure, online, report, text

SPEED_SUITES = {"text": text, "image": image}
PEERS = {"text": ["trl", "trl+precompute"], "image": ["diffusers-loop"]}
#: genalign variants with one lever switched, measured next to the default
LEVERS = {"text": ["genalign-no-cache", "genalign-full-softmax"],
          "image": ["genalign-channels-last", "genalign-cached-reference"]}
COMPILED = "-compiled"


#: ``--image-shape`` / ``--text-shape``: sizes other than ``auto`` (the CPU defaults, or the GPU sizes on CUDA)
IMAGE_SHAPES = {"sd15": image.ImageConfig.sd15, "tiny": image.ImageConfig.tiny}
TEXT_SHAPES = {"tiny": text.TextConfig.tiny}


def suite_config(module, shape: str = "auto", image_train: str = "lora"):
    """The suite's config: ``shape`` from :data:`IMAGE_SHAPES` / :data:`TEXT_SHAPES`, or ``auto`` (CPU defaults,
    GPU sizes on CUDA); the image suite trains ``image_train`` (``lora`` or ``full``)."""
    shapes = IMAGE_SHAPES if module is image else TEXT_SHAPES
    if shape != "auto":
        config = shapes[shape]()
    else:
        config = module.TextConfig() if module is text else module.ImageConfig()
        config = type(config).for_cuda() if torch.cuda.is_available() else config
    return replace(config, train=image_train) if module is image else config


def suite_shape(suite: str, args: argparse.Namespace) -> str:
    return args.image_shape if suite == "image" else args.text_shape


def build_sides(module, config, names: Sequence[str]) -> dict[str, Any]:
    """The suite's sides by name; ``<side>-compiled`` is a separately built ``<side>`` whose policy goes through
    ``torch.compile`` after accelerate's ``prepare``, as ``Trainer`` does with ``TrainConfig(compile=True)``."""
    sides = module.build(config, tuple(n for n in names if not n.endswith(COMPILED)))
    for name in names:
        if name.endswith(COMPILED):
            side = module.build(config, (name.removesuffix(COMPILED),))[name.removesuffix(COMPILED)]
            side.trainer.adapter.policy = torch.compile(side.trainer.adapter.policy)
            sides[name] = side
    return {name: sides[name] for name in names}


def speed_suite(suite: str, args: argparse.Namespace) -> dict[str, Any]:
    module = SPEED_SUITES[suite]
    config = suite_config(module, suite_shape(suite, args), args.image_train)
    names = ["genalign", *PEERS[suite], *(LEVERS[suite] if args.levers else [])]
    names += ["genalign" + COMPILED] if args.compile else []
    _log(f"[{suite}] building {names}")
    sides = build_sides(module, config, names)
    flops = {name: measure.count_flops(side.step) for name, side in sides.items()}
    times = measure.alternate(args.reps, {
        name: (lambda s=side: measure.run_steps(s, args.steps, args.warmup, config.batch_size))
        for name, side in sides.items()
    }, log=_log)
    peak = measure.peak_flops()
    result: dict[str, Any] = {"config": module.describe(config), "sides": {}, "comparisons": {}}
    for name, side in sides.items():
        rates = [t.samples_per_s for t in times[name]]
        step_seconds = config.batch_size / statistics.median(rates)
        entry = {"samples_per_s_median": statistics.median(rates), "samples_per_s_per_rep": rates,
                 "step_seconds_per_rep": [sum(t.seconds) / len(t.seconds) for t in times[name]],
                 "setup_seconds": side.setup_seconds, "flops_per_step": flops[name],
                 "achieved_tflops": flops[name] / step_seconds / 1e12}
        if peak is not None:
            entry["mfu"] = flops[name] / step_seconds / peak
        result["sides"][name] = entry
    del side
    sides.clear()  # free the models before the fresh processes load theirs (SD 1.5 shapes: ~3.4 GB per UNet)
    gc.collect()
    for name, entry in result["sides"].items():
        if not (args.no_memory or name.endswith(COMPILED)):  # a compile in a fresh process takes many minutes
            _log(f"[{suite}] peak memory of {name} in a fresh process")
            worker = ["--memory-of", f"{suite}:{name}", "--memory-steps", str(args.memory_steps),
                      "--image-shape", args.image_shape, "--text-shape", args.text_shape,
                      "--image-train", args.image_train]
            entry["peak_memory_growth_mib"] = measure.run_isolated("genalign.bench.cli", worker)["growth_mib"]
    for name in names[1:]:
        result["comparisons"][name] = measure.compare(times["genalign"], times[name])
    if suite == "image":
        result["sd15_flops"] = image.sd15_flops()
    return result


def online_suite(args: argparse.Namespace) -> dict[str, Any]:
    config = suite_config(image)
    cases = []
    for case in online.CASES:
        _log(f"[online] {case.name}")
        cases.append(online.run_case(case, steps=args.online_steps, warmup=1, image_config=config))
        _log(f"  sampling share {cases[-1]['sampling_share']:.1%}")
    return {"cases": cases}


def memory_worker(spec: str, args: argparse.Namespace) -> None:
    """Run one side alone for ``--memory-steps`` steps and print its peak memory growth as JSON (used by the
    runner)."""
    suite, _, side = spec.partition(":")
    module = SPEED_SUITES[suite]
    runner = build_sides(module, suite_config(module, suite_shape(suite, args), args.image_train), [side])[side]
    with measure.PeakMemory() as peak:
        for _ in range(args.memory_steps):
            runner.step()
    print(json.dumps({"suite": suite, "side": side, "growth_mib": peak.growth_mib, "device": peak.kind}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="genalign-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("text", "image", "online", "cpu", "all"), default="cpu",
                        help="one suite (sizes follow the device), 'cpu' for every suite on the CPU with CUDA hidden, "
                             "or 'all' for every suite on the best device")
    parser.add_argument("--reps", type=int, default=4, help="repetitions per side (alternating)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per repetition")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each repetition's timed ones")
    parser.add_argument("--online-steps", type=int, default=2, help="timed steps per online case")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps run by each peak-memory subprocess")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--image-shape", choices=("auto", *IMAGE_SHAPES), default="auto",
                        help="image suite sizes: 'auto' (tiny SD1.5-layout model on the CPU, SD 1.5 in bf16 with 8 "
                             "pairs on CUDA), 'sd15' (SD 1.5's real UNet/VAE/CLIP shapes, float32, 1 pair per "
                             "micro-batch, on any device) or 'tiny' (a few channels at 64 pixels: plumbing checks)")
    parser.add_argument("--image-train", choices=image.TRAIN_MODES, default="lora",
                        help="image suite: train a LoRA (reference = adapters disabled) or every UNet weight "
                             "('full', reference = a frozen copy), on both sides")
    parser.add_argument("--text-shape", choices=("auto", *TEXT_SHAPES), default="auto",
                        help="text suite sizes: 'auto' (a small GPT-2 on the CPU, ~0.5B in bf16 on CUDA) or 'tiny' "
                             "(2 layers, 32 wide: plumbing checks)")
    parser.add_argument("--no-levers", dest="levers", action="store_false", help="skip the lever variants")
    parser.add_argument("--compile", action="store_true",
                        help="also time genalign with its policy through torch.compile (side genalign-compiled)")
    parser.add_argument("--json", default="docs/benchmarks.json")
    parser.add_argument("--markdown", default="docs/BENCHMARKS.md")
    parser.add_argument("--note", default="", help="a line printed at the top of the markdown (e.g. machine load)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        memory_worker(args.memory_of, args)
        return
    if min(args.reps, args.steps) < 1 or args.warmup < 0:
        parser.error("--reps and --steps must be >= 1 and --warmup >= 0")
    if args.suite == "cpu":  # before anything initialises CUDA; the memory subprocesses inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    suites = ["text", "image", "online"] if args.suite in ("cpu", "all") else [args.suite]
    results: dict[str, Any] = {
        "command": "genalign-bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": measure.device_kind(),
        "note": args.note,
        "machine": measure.machine_facts(),
        "settings": {k: getattr(args, k) for k in ("reps", "steps", "warmup", "online_steps", "memory_steps",
                                                   "levers", "compile", "image_shape", "image_train",
                                                   "text_shape")},
        "suites": {},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for suite in suites:  # both files are rewritten after each suite: a long run that fails keeps what it finished
        results["suites"][suite] = online_suite(args) if suite == "online" else speed_suite(suite, args)
        Path(args.json).write_text(json.dumps(results, indent=2))
        Path(args.markdown).write_text(report.markdown(results))
        _log(f"wrote {args.json} and {args.markdown} ({', '.join(results['suites'])})")


def _log(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    main()
