"""The digits evaluation protocol as a trainer evaluator: sample the adapter's policy on the protocol's fixed
prompts and seed, return ``{"reward", "prompt_accuracy", "fid"}`` and write the grid ``samples_<tag>.png``
(``samples_before.png``, ``samples_after.png``, ``samples_step-N.png``; see :class:`genalign.train.Trainer`), and
after training ``samples_before_after.png``: the same prompts and noise before | after, each cell framed green / red
by the classifier (:mod:`genalign.eval.digits_grid`).
With an EMA (the adapter's ``ema_decay``) the EMA weights are the ones evaluated, as in Diffusion-DPO/-DRO.

With ``cache_dir`` the sampled images are stored under a key made of the evaluated weights, the prompts, the seed
and the sampler settings, so the "before" samples of the shipped base model are drawn once per machine, not once
per run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from genalign.adapters.image import ImageDiffusionAdapter
from genalign.data.row_cache import cache_key, save_atomic
from genalign.eval.digits import DigitsEvaluator, save_sample_grid
from genalign.eval.digits_grid import save_before_after_grid

log = logging.getLogger(__name__)


class DigitsTrainingEvaluator:
    """``evaluator(adapter, tag=, output_dir=) -> metrics`` for :class:`~genalign.train.Trainer`.

    Args:
        protocol: the :class:`DigitsEvaluator` (prompts, seed, classifier, real digits for FID).
        num_inference_steps / guidance_scale / scheduler: how the policy samples (``ImageDiffusionAdapter.sample``).
        grid_columns: images per digit shown in the sample grids.
        cache_dir: a folder for the sampled images (``None``: no cache).
    """

    def __init__(
        self,
        protocol: DigitsEvaluator,
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        scheduler: str = "dpmsolver++",
        grid_columns: int = 10,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.protocol = protocol
        self.sample_kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                          "scheduler": scheduler}
        self.grid_columns = grid_columns
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def __call__(
        self, adapter: ImageDiffusionAdapter, *, tag: str | None = None, output_dir: str | Path | None = None
    ) -> dict[str, float]:
        def sample_fn(prompts: list[str], generator: torch.Generator) -> torch.Tensor:
            return adapter.sample(prompts, generator=generator, **self.sample_kw)["images"]

        with adapter.ema_weights():  # the EMA weights when the adapter keeps an EMA (as the papers evaluate)
            images = self._cached(adapter, lambda: self.protocol.generate(sample_fn))
        if output_dir is not None and tag is not None:
            self._write_grids(images, tag, Path(output_dir))
        return self.protocol.metrics(images)

    def _write_grids(self, images: torch.Tensor, tag: str, output_dir: Path) -> None:
        """``samples_<tag>.png``; the "before" images are kept as ``samples_before.pt`` (so a resumed run still has
        them) and the "after" evaluation adds the side-by-side ``samples_before_after.png``."""
        prompts = self.protocol.prompts
        save_sample_grid(images, prompts, output_dir / f"samples_{tag}.png", columns=self.grid_columns)
        before = output_dir / "samples_before.pt"
        if tag == "before":
            save_atomic(images, before)
        elif tag == "after" and before.exists():
            save_before_after_grid(torch.load(before, weights_only=True), images, prompts, self.protocol.classifier,
                                   output_dir / "samples_before_after.png", columns=self.grid_columns)
        elif tag == "after":
            log.warning("no %s (the run's 'before' evaluation): samples_before_after.png not written", before)

    def _cached(self, adapter: ImageDiffusionAdapter, generate: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``generate()``, or the images stored under the same weights, prompts, seed and sampler settings."""
        if self.cache_dir is None:
            return generate()
        settings = {"prompts": list(self.protocol.prompts), "seed": self.protocol.seed, **self.sample_kw}
        path = self.cache_dir / f"{cache_key(settings, adapter)}.pt"
        if path.exists():
            log.info("evaluation samples loaded from %s", path)
            return torch.load(path, weights_only=True)
        images = generate()
        save_atomic(images, path)
        return images
