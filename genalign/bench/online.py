"""Online suite: the share of a training step that Diffusion-DRO and SoPo spend sampling from the policy.

Each optimizer step of :class:`~genalign.train.Trainer` is timed whole, and the time inside the adapter's ``sample``
(trajectory collection for Diffusion-DRO, the K negatives for SoPo) is accumulated during it::

    sampling share = time in adapter.sample / step time

Diffusion-DRO runs at the paper's settings (DPM-Solver++ 20 steps, no guidance, snapshot re-synced every optimizer
step, M = 1, one trajectory per prompt, 20 % condition dropout) on the image suite's SD-1.5-layout UNet, and at the
variants the levers give: fewer solver steps (S = 10) and buffer reuse across M = 4 optimizer steps (prompts repeat
across steps, so trajectories sampled by the snapshot serve several steps). SoPo runs with its defaults (K = 4
negatives, 10 DDIM steps, guidance 2.5) on a small MDM-style denoiser with a T2M evaluator as reward.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from genalign.adapters.base import Adapter
from genalign.bench import image
from genalign.bench.measure import synchronize
from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig


@dataclass
class OnlineCase:
    """One online configuration to time."""

    name: str
    method: str  # "diffusion_dro" or "sopo"
    params: dict[str, Any]
    note: str


DRO_PAPER = {"num_inference_steps": 20, "resync_every": 1, "trajectories_per_prompt": 1, "guidance_scale": 1.0}
CASES = (
    OnlineCase("dro-paper", "diffusion_dro", DRO_PAPER, "paper settings: DPM-Solver++ 20 steps, M = 1, K = 1"),
    OnlineCase("dro-10-steps", "diffusion_dro", {**DRO_PAPER, "num_inference_steps": 10}, "lever: fewer solver steps"),
    OnlineCase("dro-M4", "diffusion_dro", {**DRO_PAPER, "resync_every": 4}, "lever: buffer reuse across M = 4 steps"),
    OnlineCase("dro-10-steps-M4", "diffusion_dro", {**DRO_PAPER, "num_inference_steps": 10, "resync_every": 4},
               "levers combined: 10 solver steps and M = 4"),
    OnlineCase("sopo", "sopo", {"num_samples": 4, "num_inference_steps": 10, "guidance_scale": 2.5},
               "SoPo defaults: K = 4, DDIM 10 steps, guidance 2.5"),
)


@contextmanager
def sampling_clock(adapter: Adapter) -> Iterator[list[float]]:
    """Accumulate the seconds spent inside ``adapter.sample`` into the yielded one-element list."""
    spent = [0.0]
    original = adapter.sample

    def timed_sample(*args, **kwargs):
        synchronize()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize()
            spent[0] += time.perf_counter() - start

    adapter.sample = timed_sample
    try:
        yield spent
    finally:
        del adapter.sample  # back to the class method


def dro_setup(config: image.ImageConfig) -> tuple[Adapter, list[dict]]:
    """The image suite's components, full fine-tuning (as the paper) with 20 % condition dropout; expert rows are the suite's chosen images, with a
    pool of prompts smaller than the data so prompts repeat across steps (as in Pick-a-Pic)."""
    components = image.make_components(config)
    adapter = image.genalign_adapter(components, config, cache_dir=None, lora=False)
    adapter.prompt_dropout = 0.2
    rows = [{"prompt": r["prompt"], "response": r["chosen"], "row": r["row"]} for r in image.make_rows(config)]
    prompts = sorted({r["prompt"] for r in rows})[: max(config.batch_size * 2, 1)]
    for i, r in enumerate(rows):
        r["prompt"] = prompts[i % len(prompts)]
    return adapter, rows


class SeededWords:
    """Word vectors for the benchmark's T2M evaluator: a fixed random vector per word (no download)."""

    dim = 16

    def lookup(self, words):
        vectors = np.stack([np.random.default_rng(sum(map(ord, w))).normal(size=self.dim) for w in words])
        return vectors.astype(np.float32), np.ones(len(words), dtype=bool)


def sopo_setup(seed: int = 0) -> tuple[Adapter, dict[str, Any], list[dict]]:
    """A small MDM-style denoiser (HumanML3D's 263 features) with LoRA, captions through the packaged MiniLM, and a
    randomly initialised T2M evaluator as reward and similarity."""
    from genalign.adapters.motion import MotionAdapter
    from genalign.models.mdm import MotionDenoiser, MotionDenoiserConfig
    from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator

    torch.manual_seed(seed)
    model = MotionDenoiser(MotionDenoiserConfig(d_model=128, num_layers=4, num_heads=4, ff_dim=256, max_frames=120))
    adapter = MotionAdapter(model, lora={"r": 8})
    evaluator = TextMotionEvaluator(EvaluatorConfig(word_dim=SeededWords.dim, movement_hidden=64, movement_latent=64,
                                                    motion_hidden=64, text_hidden=64, embed_dim=32),
                                    word_vectors=SeededWords()).eval()
    evaluator.to("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    captions = ["a person walks forward", "someone jumps twice", "a man waves his hand", "a person kicks"]
    rows = [{"prompt": captions[i % 4], "response": torch.randn(int(torch.randint(60, 120, (1,), generator=g)), 263,
                                                                   generator=g), "row": i} for i in range(16)]
    return adapter, {"evaluator": evaluator}, rows


def run_case(case: OnlineCase, steps: int, warmup: int, image_config: image.ImageConfig | None = None,
             batch_size: int = 4) -> dict[str, Any]:
    """Time ``warmup + steps`` optimizer steps (``steps`` rounded up to whole re-sync cycles of M steps, so the
    share is over complete cycles); returns the median step time and the sampling share."""
    cycle = int(case.params.get("resync_every", 1))
    steps = -(-steps // cycle) * cycle
    if case.method == "diffusion_dro":
        adapter, rows = dro_setup(image_config or image.ImageConfig())
        extra: dict[str, Any] = {}
    else:
        adapter, extra, rows = sopo_setup()
    step = build_step(case.method, **case.params, **extra)
    with tempfile.TemporaryDirectory(prefix="genalign-bench-online-") as workdir:
        mixed = image_config.mixed_precision if image_config is not None and case.method == "diffusion_dro" else "no"
        trainer = Trainer(adapter, step, rows, TrainConfig(output_dir=str(Path(workdir) / "run"), max_steps=10**9,
                                                           batch_size=batch_size, learning_rate=1e-5,
                                                           mixed_precision=mixed))
        step_seconds, sample_seconds = [], []
        for k in range(warmup + steps):
            with sampling_clock(trainer.adapter) as spent:
                synchronize()
                start = time.perf_counter()
                trainer.step()
                synchronize()
                elapsed = time.perf_counter() - start
            if k >= warmup:
                step_seconds.append(elapsed)
                sample_seconds.append(spent[0])
    share = sum(sample_seconds) / sum(step_seconds)
    return {"case": case.name, "method": case.method, "note": case.note, "params": case.params,
            "batch_size": batch_size, "steps": steps, "step_seconds_median": float(np.median(step_seconds)),
            "sampling_seconds_per_step": sum(sample_seconds) / steps, "sampling_share": share}
