"""Sampling time per process of an online step's draws (genalign.online.global_batch.draw) with N processes.

Two sides, alternating within one run on each process: ``sharded`` (the default: a row-wise sampler draws only this
process's rows) and ``global`` (every process draws the whole global batch and keeps its slice, as every sampler did
before). The model, prompts and sampler settings are an OAIF experiment's (``--experiment``: digits_oaif, the shipped
digits UNet with DPM-Solver++ 10 steps; text_oaif, the tiny arithmetic LM with 4 new tokens at temperature 1), 2
samples per prompt, a global batch of 32 prompts. Run it once per process count and compare the medians:

    export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1
    .venv/bin/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 1 scripts/bench_sharded_sampling.py
    .venv/bin/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 scripts/bench_sharded_sampling.py
    .venv/bin/accelerate launch ... --num_processes 2 scripts/bench_sharded_sampling.py --experiment text_oaif \
        objective.sample.max_new_tokens=16 objective.sample.temperature=2.0
    # a larger, randomly initialised GPT-2 (layers x width) with the experiment's tokenizer, 64 new tokens:
    .venv/bin/accelerate launch ... scripts/bench_sharded_sampling.py --experiment text_oaif --random-lm 6x512 \
        adapter.max_length=96 objective.sample.max_new_tokens=64

Each process prints one JSON line: its index, the process count and each side's median seconds per draw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from accelerate import PartialState
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from genalign.adapters.text import TextAdapter
from genalign.cli import CONFIG_DIR, build_rows
from genalign.distributed import Shard
from genalign.online import draws, global_batch
from genalign.steps import StepContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="digits_oaif", help="an OAIF experiment: its adapter, prompts, sampler")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--random-lm", help="LAYERSxWIDTH: sample from a random GPT-2 of that size instead (text)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. objective.sample.max_new_tokens=32")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    state = PartialState(cpu=not torch.cuda.is_available())
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={args.experiment}", "evaluator=none",
                                                           *args.overrides])
    adapter = instantiate(cfg.adapter)
    if args.random_lm:
        adapter = random_lm(adapter, args.random_lm, cfg)
    sample = OmegaConf.to_container(cfg.objective.sample, resolve=True)
    shard = Shard(state.process_index, state.num_processes)
    prompts = shard.rows(draws.prompts(build_rows(cfg.data.train, adapter)[: args.global_batch]))
    row_wise = adapter.row_wise_draws
    times: dict[str, list[float]] = {"sharded": [], "global": []}
    for rep in range(args.reps + 1):  # the first repetition warms up
        for side in (("sharded", "global") if rep % 2 else ("global", "sharded")):
            adapter.row_wise_draws = row_wise if side == "sharded" else (lambda **kwargs: False)
            generator = torch.Generator().manual_seed(rep)
            ctx = StepContext(generator, shard=shard)
            state.wait_for_everyone()
            start = time.perf_counter()
            with shard.draws(generator):
                samples = global_batch.draw(adapter, prompts, 2, ctx, **sample)
            if rep:
                times[side].append(time.perf_counter() - start)
            assert draws.batch_size(samples) == 2 * len(prompts)
    print(json.dumps({"experiment": args.experiment, "process": state.process_index, "processes": state.num_processes,
                      "global_batch": args.global_batch, "samples_per_prompt": 2, **sample,
                      **{f"{side}_s": round(statistics.median(values), 3) for side, values in times.items()}}))


def random_lm(adapter: TextAdapter, size: str, cfg) -> TextAdapter:
    """A TextAdapter over a randomly initialised GPT-2 of ``LAYERSxWIDTH`` with ``adapter``'s tokenizer and lengths."""
    layers, width = (int(v) for v in size.lower().split("x"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(adapter.tokenizer), n_positions=cfg.adapter.max_length,
                                       n_embd=width, n_layer=layers, n_head=max(1, width // 64)))
    return TextAdapter(model, adapter.tokenizer, reference="copy", max_length=cfg.adapter.max_length,
                       max_prompt_length=cfg.adapter.max_prompt_length)


if __name__ == "__main__":
    main()
