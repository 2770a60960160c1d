"""The text-to-motion protocol (Guo et al. 2022) as a trainer evaluator for :class:`genalign.train.Trainer`.

Fixed prompts: the captions of a HumanML3D-layout split (every caption of every clip, clip-major, the first
``num_prompts``), each generated once at its real clip's length (as the protocol does) from a fixed noise seed, so
"before" and "after" see the same prompts, lengths and sampler noise. A text-motion evaluator
(:class:`~genalign.models.t2m_evaluator.TextMotionEvaluator`) embeds captions, generated and real motions; the
metrics of :func:`genalign.eval.motion.evaluate_embeddings` are replicated ``replications`` times (20) and reported
as the mean with the protocol's 95 % half-width 1.96·std/√n::

    r_precision_top1/2/3, mm_dist, fid, diversity      (+ <name>_ci95 = the half-width)

Replications (``replicate_by``):

* ``"regenerate"`` (the protocol's way, :mod:`genalign.eval.motion_protocol`): replication i generates every
  prompt again from seed ``seed + i`` and shuffles the rows into new 32-batches; the interval then reflects the
  sampler's randomness. Costs ``replications`` generations per call.
* ``"bootstrap"`` (default, 1 generation: 20 are too slow on a CPU during training): each replication is a
  bootstrap resample of the N (prompt, generated motion) rows (drawn with replacement), on which the 32-batches,
  MM-Dist, FID against all real motions and Diversity (min(300, N) pairs) are computed: the spread then reflects
  which prompts are evaluated, and every metric (MM-Dist and FID too) gets a non-zero interval.

With ``tag``/``output_dir`` (the trainer passes them) it writes ``motion_<tag>_<i>.gif`` skeleton animations of
``num_gifs`` prompts spread over the prompt list and prints a one-line summary.

Normalisation: the adapter's motions are normalised with the dataset's ``Mean.npy``/``Std.npy``; when the evaluator
recorded its own statistics, motions are converted ``evaluator.normalize(dataset.denormalize(x))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from genalign.adapters.motion import MotionAdapter, pad_motions
from genalign.data.humanml3d import HumanML3DDataset
from genalign.data.motion_repr import features_to_joints
from genalign.eval.motion import METRIC_NAMES, Interval, evaluate_embeddings, flatten, replicate, report_names
from genalign.models.t2m_evaluator import TextMotionEvaluator
from genalign.render.skeleton import save_animation

__all__ = ["METRIC_NAMES", "MotionTrainingEvaluator", "flatten"]
REPLICATE_BY = ("bootstrap", "regenerate")


class MotionTrainingEvaluator:
    """``evaluator(adapter, tag=, output_dir=) -> metrics``; see the module docstring.

    Args:
        evaluator_path: folder written by ``TextMotionEvaluator.save`` (e.g. ``assets/motion-evaluator``).
        data_root: the HumanML3D-layout dataset whose ``split`` gives the prompts and the real motions.
        num_prompts: how many (caption, length) prompts to generate (at least one R-precision batch, 32).
        seed: the sampler noise seed (and the replications' seeds ``seed + i``).
        num_inference_steps / guidance_scale / scheduler: ``MotionAdapter.sample`` settings.
        num_gifs: animations written per call (0: none).
        replicate_by: ``"bootstrap"`` or ``"regenerate"`` (see the module doc).
    """

    def __init__(
        self,
        evaluator_path: str | Path,
        data_root: str | Path,
        *,
        split: str = "test",
        num_prompts: int = 96,
        seed: int = 0,
        replications: int = 20,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.5,
        scheduler: str = "ddim",
        batch_size: int = 48,
        num_gifs: int = 3,
        replicate_by: str = "bootstrap",
    ) -> None:
        if replicate_by not in REPLICATE_BY:
            raise ValueError(f"replicate_by must be one of {REPLICATE_BY}, got {replicate_by!r}")
        self.replicate_by = replicate_by
        if int(num_prompts) != num_prompts or num_prompts < 32:
            raise ValueError(f"num_prompts must be an integer >= 32 (one R-precision batch), got {num_prompts}")
        self.evaluator = TextMotionEvaluator.load(evaluator_path)
        self.dataset = HumanML3DDataset(data_root, split, random_crop=False)
        self.prompts, self.real = _prompts(self.dataset, int(num_prompts))
        self.lengths = torch.tensor([len(m) for m in self.real])
        self.seed, self.replications, self.batch_size, self.num_gifs = seed, replications, batch_size, num_gifs
        self.diversity_pairs = min(300, len(self.prompts))  # the protocol's 300 pairs need at least 300 motions
        self.sample_kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                          "scheduler": scheduler}
        with torch.no_grad():
            self.text_emb = self.evaluator.encode_text(self.prompts).cpu()
            self.real_emb = self.embed(pad_motions(self.real)["motion"], self.lengths)

    def embed(self, motions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Evaluator motion embeddings ``[N, E]`` of dataset-normalised motions ``[N, T, D]``."""
        if self.evaluator.mean is not None:
            motions = self.evaluator.normalize(self.dataset.denormalize(motions))
        with torch.no_grad():
            return self.evaluator.encode_motion(motions, lengths).cpu()

    def generate(self, adapter: MotionAdapter, seed: int | None = None) -> list[torch.Tensor]:
        """One motion ``[T_i, D]`` per prompt at its real length, from ``seed`` (default: the fixed seed)."""
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        motions = []
        for start in range(0, len(self.prompts), self.batch_size):
            end = start + self.batch_size
            batch = adapter.sample(self.prompts[start:end], generator=generator, lengths=self.lengths[start:end],
                                   **self.sample_kw)
            motions += [m[v].cpu() for m, v in zip(batch["motion"], batch["mask"])]
        return motions

    def intervals(self, motion_emb: torch.Tensor) -> dict[str, Interval]:
        """The replicated protocol metrics of motion embeddings paired row-wise with the prompts."""
        def one(i: int) -> dict[str, float]:
            rng = np.random.default_rng(self.seed + i)
            rows = rng.choice(len(self.prompts), len(self.prompts), replace=True)
            return evaluate_embeddings(self.text_emb[rows], motion_emb[rows], self.real_emb, generator=rng,
                                       diversity_pairs=self.diversity_pairs)

        return report_names(replicate(one, self.replications))

    def regenerated_intervals(self, adapter: MotionAdapter) -> tuple[dict[str, Interval], list[torch.Tensor]]:
        """The protocol's replications: replication i regenerates every prompt from seed ``seed + i`` and draws
        new 32-batches; returns the intervals and the motions of replication 0."""
        first: list[torch.Tensor] = []

        def one(i: int) -> dict[str, float]:
            motions = self.generate(adapter, self.seed + i)
            first.extend(motions if i == 0 else [])
            emb = self.embed(pad_motions(motions)["motion"], self.lengths)
            return evaluate_embeddings(self.text_emb, emb, self.real_emb, generator=self.seed + i,
                                       diversity_pairs=self.diversity_pairs)

        return report_names(replicate(one, self.replications)), first

    def real_metrics(self) -> dict[str, float]:
        """The same metrics for the real motions (the ground-truth row of a results table)."""
        return flatten(self.intervals(self.real_emb))

    def __call__(
        self, adapter: MotionAdapter, *, tag: str | None = None, output_dir: str | Path | None = None
    ) -> dict[str, float]:
        if self.replicate_by == "regenerate":
            results, motions = self.regenerated_intervals(adapter)
        else:
            motions = self.generate(adapter)
            results = self.intervals(self.embed(pad_motions(motions)["motion"], self.lengths))
        print(f"[motion eval {tag or ''}] " + "  ".join(f"{k} {v}" for k, v in results.items()), flush=True)
        if output_dir is not None and tag is not None:
            self.write_gifs(motions, Path(output_dir), tag)
        return flatten(results)

    def write_gifs(self, motions: list[torch.Tensor], output_dir: Path, tag: str) -> list[Path]:
        """``motion_<tag>_<i>.gif`` for ``num_gifs`` prompts evenly spread over the prompt list."""
        picks = np.unique(np.linspace(0, len(motions) - 1, self.num_gifs).round().astype(int)) if self.num_gifs else []
        written = []
        for i, index in enumerate(picks):
            joints = features_to_joints(self.dataset.denormalize(motions[index].double())).numpy()
            written.append(save_animation(joints, output_dir / f"motion_{tag}_{i}.gif", caption=self.prompts[index]))
        return written


def _prompts(dataset: HumanML3DDataset, num_prompts: int) -> tuple[list[str], list[torch.Tensor]]:
    """The first ``num_prompts`` (caption, real motion cut to a multiple of 4 frames) of the split, caption-round
    major: every clip's first caption, then every clip's second caption, and so on."""
    rounds = max(len(clip.captions) for clip in dataset.clips)
    pairs: list[tuple[str, Any]] = [(clip.captions[j].text, clip) for j in range(rounds) for clip in dataset.clips
                                    if j < len(clip.captions)]
    if len(pairs) < num_prompts:
        raise ValueError(f"{dataset.root} split {dataset.split!r} has {len(pairs)} captions, fewer than num_prompts="
                         f"{num_prompts}; lower num_prompts")
    index = {clip: i for i, clip in enumerate(dataset.clips)}
    prompts, motions = [], []
    for caption, clip in pairs[:num_prompts]:
        item = dataset[index[clip]]
        prompts.append(caption)
        motions.append(item["motion"][: item["length"]])
    return prompts, motions
