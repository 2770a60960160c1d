"""The digits evaluation protocol as a trainer evaluator: sample the adapter's policy on the protocol's fixed
prompts and seed, return ``{"reward", "prompt_accuracy", "fid"}`` and write the grid ``samples_<tag>.png``
(``samples_before.png``, ``samples_after.png``, ``samples_step-N.png``; see :class:`genalign.train.Trainer`).
With an EMA (the adapter's ``ema_decay``) the EMA weights are the ones evaluated, as in Diffusion-DPO/-DRO."""

from __future__ import annotations

from pathlib import Path

import torch

from genalign.adapters.image import ImageDiffusionAdapter
from genalign.eval.digits import DigitsEvaluator, save_sample_grid


class DigitsTrainingEvaluator:
    """``evaluator(adapter, tag=, output_dir=) -> metrics`` for :class:`~genalign.train.Trainer`.

    Args:
        protocol: the :class:`DigitsEvaluator` (prompts, seed, classifier, real digits for FID).
        num_inference_steps / guidance_scale / scheduler: how the policy samples (``ImageDiffusionAdapter.sample``).
        grid_columns: images per digit shown in the sample grids.
    """

    def __init__(
        self,
        protocol: DigitsEvaluator,
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        scheduler: str = "dpmsolver++",
        grid_columns: int = 10,
    ) -> None:
        self.protocol = protocol
        self.sample_kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                          "scheduler": scheduler}
        self.grid_columns = grid_columns

    def __call__(
        self, adapter: ImageDiffusionAdapter, *, tag: str | None = None, output_dir: str | Path | None = None
    ) -> dict[str, float]:
        def sample_fn(prompts: list[str], generator: torch.Generator) -> torch.Tensor:
            return adapter.sample(prompts, generator=generator, **self.sample_kw)["images"]

        with adapter.ema_weights():  # the EMA weights when the adapter keeps an EMA (as the papers evaluate)
            images = self.protocol.generate(sample_fn)
        if output_dir is not None and tag is not None:
            save_sample_grid(images, self.protocol.prompts, Path(output_dir) / f"samples_{tag}.png",
                             columns=self.grid_columns)
        return self.protocol.metrics(images)
