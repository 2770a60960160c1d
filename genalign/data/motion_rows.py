"""Training rows for text-to-motion alignment from a HumanML3D-layout folder and a text-motion judge.

* :func:`demonstration_rows` — the dataset's own (caption, motion) pairs, one row per caption: SoPo's offline
  preferred motions (Tan et al. 2025) and Diffusion-DRO's expert demonstrations (Wu et al. 2025).
* :func:`feedback_pairs` — MoDiPO's AI feedback (Pappa et al. 2024): K generations of the frozen base model per
  caption ranked by the judge, (best, worst) as (chosen, rejected) (:func:`genalign.online.pairs.ai_feedback_pairs`).
* :func:`ground_truth_pairs` — offline Diffusion-DPO pairs without a judge (Wallace et al. 2024's objective on
  real-vs-generated pairs): chosen = the dataset motion of a caption, rejected = one base generation for that
  caption at the same length; SoPo's offline counterpart (no online negatives, no threshold, no weighting).
* :func:`feedback_labels` — per-sample feedback for Diffusion-KTO (Li et al. 2024): base generations, desirable iff
  the judge's reward r(c, x) > ``threshold`` (SoPo's τ = 0.45 by default).

The judge is a :class:`~genalign.models.t2m_evaluator.TextMotionEvaluator` folder (e.g. ``assets/motion-reward``),
used through the retrieval reward r(c, x) = exp(−|e_text(c) − e_motion(x)| / 5) ∈ (0, 1]
(:class:`genalign.rewards.motion.TextMotionRetrievalReward`). Motions in rows are float32 tensors ``[T, D]``
normalised with the dataset's ``Mean.npy``/``Std.npy`` (the base model's space), cut to their real length.

Base generations are drawn from the adapter about to be trained (the base model), with a seeded generator, and
cached in ``cache_file`` keyed by the settings and a digest of the base weights (:func:`genalign.data.row_cache.cached_rows`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genalign.adapters.motion import MotionAdapter, pad_motions
from genalign.data.humanml3d import MAX_FRAMES, MAX_LENGTH, UNIT_LENGTH, HumanML3DDataset
from genalign.data.row_cache import cached_rows
from genalign.data.synthetic_motion import ensure_dataset
from genalign.models.t2m_evaluator import TextMotionEvaluator
from genalign.online.pairs import Reward, ai_feedback_pairs, rewards, sample_responses
from genalign.rewards.motion import TextMotionRetrievalReward

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]


def synthetic_motion_root() -> Path:
    """The embedded synthetic motion set, ``<assets>/synthetic-motion`` (``$GENALIGN_ASSETS`` or ``<repo>/assets``,
    as ``genalign.cli.asset_path``), written by :func:`ensure_dataset` when missing (it is not shipped: ~70 MB)."""
    from genalign.cli import REPO_ROOT

    return ensure_dataset(Path(os.environ.get("GENALIGN_ASSETS", REPO_ROOT / "assets")) / "synthetic-motion")


def demonstration_rows(
    root: str | Path,
    split: str = "train",
    *,
    limit: int | None = None,
    min_length: int | None = None,
    max_frames: int = MAX_FRAMES,
    max_length: int = MAX_LENGTH,
    unit_length: int = UNIT_LENGTH,
) -> Rows:
    """One row ``{"prompt", "response", "motion_id", "row"}`` per caption of every clip of ``split`` (clip order,
    then caption order); ``response`` is the clip's normalised features cut to a multiple of ``unit_length`` (4)
    frames (HumanML3D protocol). The length rules (``min_length <= T < max_frames``, at most ``max_length`` frames;
    defaults: the protocol's 40 / 200 / 196) are :class:`HumanML3DDataset`'s, which counts and logs what they drop;
    NaN/inf frames raise naming the file."""
    dataset = HumanML3DDataset(root, split, random_crop=False, min_length=min_length, max_frames=max_frames,
                               max_length=max_length, unit_length=unit_length)
    rows: Rows = []
    for index, clip in enumerate(dataset.clips):
        item = dataset[index]
        motion = item["motion"][: item["length"]]
        if not torch.isfinite(motion).all():
            bad = (~torch.isfinite(motion).all(-1)).nonzero().flatten() + item["clip"][0]
            raise ValueError(f"{dataset.motion_dir / (clip.id + '.npy')}: frames {bad[:10].tolist()} hold NaN or inf; "
                             f"fix or remove the motion (and its id in {split}.txt)")
        for caption in clip.captions:
            rows.append({"prompt": caption.text, "response": motion, "motion_id": clip.id, "row": len(rows)})
    if limit is not None:
        if int(limit) != limit or limit < 1:
            raise ValueError(f"limit must be a positive number of rows, got {limit!r}")
        rows = rows[: int(limit)]
    if not rows:
        raise ValueError(f"{dataset.root}/{split}.txt gives no usable clip (dropped: {dict(dataset.dropped)})")
    return rows


def training_prompts(root: str | Path, split: str, num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` distinct captions of ``split`` in a seeded random order (all of them when fewer)."""
    if int(num_prompts) != num_prompts or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive integer, got {num_prompts!r}")
    dataset = HumanML3DDataset(root, split, random_crop=False)
    captions = list(dict.fromkeys(c.text for clip in dataset.clips for c in clip.captions))
    order = np.random.default_rng(seed).permutation(len(captions))
    return [captions[i] for i in order[: int(num_prompts)]]


def evaluator_reward(evaluator: str | Path | TextMotionEvaluator) -> Reward:
    """The judge as a pairs-style reward ``(captions, motions [T_i, D]) -> [N]`` in (0, 1]."""
    if not isinstance(evaluator, TextMotionEvaluator):
        evaluator = TextMotionEvaluator.load(evaluator)
    reward = TextMotionRetrievalReward(evaluator)

    def score(captions: list[str], motions: list[torch.Tensor]) -> torch.Tensor:
        batch = pad_motions([torch.as_tensor(m) for m in motions])
        return reward(captions, batch["motion"], batch["mask"].sum(1)).cpu()

    return score


def feedback_pairs(
    adapter: MotionAdapter,
    root: str | Path,
    evaluator: str | Path,
    *,
    split: str = "train",
    num_prompts: int = 128,
    num_samples: int = 4,
    seed: int = 0,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.5,
    scheduler: str = "ddim",
    batch_size: int = 32,
    cache_file: str | Path | None = None,
) -> Rows:
    """MoDiPO pairs ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "row"}``: best vs worst of
    ``num_samples`` base generations for each of ``num_prompts`` captions; ties are dropped (logged)."""
    settings = {"kind": "motion_pairs", "root": str(root), "split": split, "num_prompts": num_prompts,
                "num_samples": num_samples, "seed": seed, "evaluator": str(evaluator), **_sampling(
                    num_inference_steps, guidance_scale, scheduler)}

    def build() -> Rows:
        pairs = ai_feedback_pairs(
            adapter, training_prompts(root, split, num_prompts, seed), evaluator_reward(evaluator), num_samples,
            generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
            **_sampling(num_inference_steps, guidance_scale, scheduler),
        )  # fmt: skip
        if pairs.num_ties:
            log.info("feedback_pairs: %d prompts dropped (all %d samples scored the same)", pairs.num_ties, num_samples)
        return pairs.rows

    return cached_rows(cache_file, settings, adapter, build)


def ground_truth_pairs(
    adapter: MotionAdapter,
    root: str | Path,
    *,
    split: str = "train",
    num_prompts: int = 128,
    seed: int = 0,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.5,
    scheduler: str = "ddim",
    batch_size: int = 32,
    cache_file: str | Path | None = None,
) -> Rows:
    """Pairs ``{"prompt", "chosen": dataset motion, "rejected": base generation of the same length, "row"}`` for
    ``num_prompts`` demonstration rows of ``split`` in a seeded random order (``row`` = the demonstration row)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (prompts per sampling call), got {batch_size}")
    settings = {"kind": "motion_gt_pairs", "root": str(root), "split": split, "num_prompts": num_prompts,
                "seed": seed, **_sampling(num_inference_steps, guidance_scale, scheduler)}

    def build() -> Rows:
        demos = demonstration_rows(root, split)
        picked = [demos[i] for i in np.random.default_rng(seed).permutation(len(demos))[: int(num_prompts)]]
        generator = torch.Generator().manual_seed(seed)
        rows: Rows = []
        for start in range(0, len(picked), batch_size):
            chunk = picked[start : start + batch_size]
            samples = sample_responses(adapter.sample(
                [d["prompt"] for d in chunk], generator=generator, lengths=[len(d["response"]) for d in chunk],
                **_sampling(num_inference_steps, guidance_scale, scheduler)))  # fmt: skip
            rows += [{"prompt": d["prompt"], "chosen": d["response"], "rejected": x, "row": d["row"]}
                     for d, x in zip(chunk, samples)]
        return rows

    return cached_rows(cache_file, settings, adapter, build)


def feedback_labels(
    adapter: MotionAdapter,
    root: str | Path,
    evaluator: str | Path,
    *,
    split: str = "train",
    num_prompts: int = 128,
    num_samples: int = 4,
    threshold: float = 0.45,
    seed: int = 0,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.5,
    scheduler: str = "ddim",
    batch_size: int = 32,
    cache_file: str | Path | None = None,
) -> Rows:
    """KTO samples ``{"prompt", "response", "desirable", "reward", "row"}``: ``num_samples`` base generations for
    each of ``num_prompts`` captions, desirable iff reward > ``threshold``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a reward cut in (0, 1), got {threshold}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (prompts per sampling call), got {batch_size}")
    settings = {"kind": "motion_labels", "root": str(root), "split": split, "num_prompts": num_prompts,
                "num_samples": num_samples, "threshold": threshold, "seed": seed, "evaluator": str(evaluator),
                **_sampling(num_inference_steps, guidance_scale, scheduler)}

    def build() -> Rows:
        prompts, reward_fn = training_prompts(root, split, num_prompts, seed), evaluator_reward(evaluator)
        generator = torch.Generator().manual_seed(seed)
        rows: Rows = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            motions = sample_responses(adapter.sample(chunk, num_samples, generator=generator,
                                                      **_sampling(num_inference_steps, guidance_scale, scheduler)))
            flat = [p for p in chunk for _ in range(num_samples)]
            for prompt, motion, score in zip(flat, motions, rewards(reward_fn, flat, motions).tolist()):
                rows.append({"prompt": prompt, "response": motion, "desirable": score > threshold, "reward": score,
                             "row": len(rows)})
        liked = sum(r["desirable"] for r in rows)
        log.info("feedback_labels: %d of %d base samples desirable (reward > %g)", liked, len(rows), threshold)
        if liked in (0, len(rows)):
            raise ValueError(f"all {len(rows)} base samples are {'un' if liked == 0 else ''}desirable at threshold "
                             f"{threshold}: KTO needs both kinds; choose a threshold inside the rewards' range "
                             f"[{min(r['reward'] for r in rows):.3f}, {max(r['reward'] for r in rows):.3f}]")
        return rows

    return cached_rows(cache_file, settings, adapter, build)


def _sampling(num_inference_steps: int, guidance_scale: float, scheduler: str) -> dict[str, Any]:
    return {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "scheduler": scheduler}
