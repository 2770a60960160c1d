"""Share of a training step an online experiment spends sampling from its policy, at its committed config.

Builds the experiment as ``genalign-train`` does (any hydra overrides after the experiment name), then times
``--warmup`` + ``--steps`` optimizer steps whole and the time inside the adapter's ``sample`` during them
(:func:`genalign.bench.online.sampling_clock`)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sampling_share.py digits_dro
    OMP_NUM_THREADS=1 .venv/bin/python scripts/sampling_share.py motion_sopo --steps 8
    OMP_NUM_THREADS=1 .venv/bin/python scripts/sampling_share.py digits_dro objective.resync_every=2

Prints one JSON line: the experiment, the overrides, the median step seconds, sampling seconds per step and the share.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genalign.bench.online import sampling_clock
from genalign.cli import CONFIG_DIR, build_rows
from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="genalign-sampling-share-") as out:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"experiment={args.experiment}", "evaluator=none",
                                                           f"output_dir={out}", *args.overrides])
        step = build_step(**OmegaConf.to_container(cfg.objective, resolve=True))
        adapter = instantiate(cfg.adapter)
        rows = build_rows(cfg.data.train, adapter)
        train = {**OmegaConf.to_container(cfg.train, resolve=True), "max_steps": 10**9, "save_every": 0}
        trainer = Trainer(adapter, step, rows, TrainConfig(output_dir=out, **train))
        step_seconds, sample_seconds = [], []
        for k in range(args.warmup + args.steps):
            with sampling_clock(trainer.adapter) as spent:
                start = time.perf_counter()
                trainer.step()
                elapsed = time.perf_counter() - start
            if k >= args.warmup:
                step_seconds.append(elapsed)
                sample_seconds.append(spent[0])
    print(json.dumps({"experiment": args.experiment, "overrides": args.overrides, "steps": args.steps,
                      "step_seconds_median": round(float(np.median(step_seconds)), 3),
                      "sampling_seconds_per_step": round(sum(sample_seconds) / args.steps, 3),
                      "sampling_share": round(sum(sample_seconds) / sum(step_seconds), 3)}))


if __name__ == "__main__":
    main()
