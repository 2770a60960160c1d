"""Training rows of the digits demo, built with the shipped digit classifier as the reward model
r(x, c) = p_cls(d(c) | x), the probability of the digit the caption names.

* :func:`demonstration_rows` — Diffusion-DRO experts (Wu et al. 2025 pick experts from a corpus by a reward model):
  the top-K real training digits with their captions by r (:func:`genalign.online.pairs.demonstration_set`).
* :func:`feedback_pairs` — Diffusion-DPO AI feedback (Wallace et al. 2023): K samples of the base model per prompt,
  (best, worst) by r as (chosen, rejected) (:func:`genalign.online.pairs.ai_feedback_pairs`).
* :func:`feedback_labels` — Diffusion-KTO per-image feedback (Li et al. 2024): base samples, desirable iff
  r(x, c) > ``threshold`` (0.5: the classifier thinks the prompted digit more likely than all others together).

The base samples are drawn from the adapter about to be trained, before training (so from the base model), with a
seeded generator, and cached in ``cache_file`` (:func:`genalign.data.row_cache.cached_rows`) together with a key of every setting and a digest of the model's
weights: reruns and resumed runs load them instead of sampling again, and a changed setting or model resamples.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from genalign.adapters.image import ImageDiffusionAdapter
from genalign.data.digits import CAPTION_TEMPLATES, DigitsDataset, caption
from genalign.data.row_cache import cached_rows
from genalign.online.pairs import Reward, ai_feedback_pairs, demonstration_set, rewards, sample_responses
from genalign.rewards.digit_classifier import DigitPromptReward, load_digit_classifier

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]


def classifier_reward(classifier_path: str | Path | None = None) -> Reward:
    """The digit classifier as a pairs-style reward ``(prompts, images) -> [N]``: p_cls(prompted digit | image)."""
    classifier = load_digit_classifier(classifier_path) if classifier_path else load_digit_classifier()
    scorer = DigitPromptReward(classifier)
    return lambda prompts, images: scorer(torch.stack(list(images)), prompts)


def all_captions(repeats: int = 1) -> list[str]:
    """Every caption (10 digits x the templates), digit-major, each repeated ``repeats`` times in a row."""
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats (prompts per caption) must be a positive integer, got {repeats!r}")
    return [caption(d, t) for d in range(10) for t in range(len(CAPTION_TEMPLATES)) for _ in range(int(repeats))]


def demonstration_rows(
    top_k: int = 1000, *, resolution: int = 16, per_prompt: bool = False, classifier_path: str | None = None
) -> Rows:
    """The ``top_k`` real training digits by classifier reward as rows ``{"prompt", "response", "reward", "row"}``
    (``row`` = the index in the train split), best first; ``per_prompt`` takes the top ``top_k`` of each caption."""
    data = DigitsDataset("train", resolution)
    return demonstration_set(list(data.images), data.prompts, classifier_reward(classifier_path), top_k,
                             per_prompt=per_prompt)


def feedback_pairs(
    adapter: ImageDiffusionAdapter,
    *,
    prompts_per_caption: int = 4,
    num_samples: int = 4,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    cache_file: str | Path | None = None,
    classifier_path: str | None = None,
) -> Rows:
    """Best-vs-worst pairs of ``num_samples`` base samples for each of ``prompts_per_caption`` x 50 prompts, rows
    ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "row"}``; prompts whose samples all tie
    are dropped (logged)."""
    settings = {"kind": "pairs", "prompts_per_caption": prompts_per_caption, "num_samples": num_samples, "seed": seed,
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}

    def build() -> Rows:
        pairs = ai_feedback_pairs(
            adapter, all_captions(prompts_per_caption), classifier_reward(classifier_path), num_samples,
            generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        )  # fmt: skip
        if pairs.num_ties:
            log.info("feedback_pairs: %d prompts dropped (all %d samples scored the same)", pairs.num_ties, num_samples)
        return pairs.rows

    return cached_rows(cache_file, settings, adapter, build)


def feedback_labels(
    adapter: ImageDiffusionAdapter,
    *,
    prompts_per_caption: int = 4,
    num_samples: int = 4,
    threshold: float = 0.5,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 50,
    cache_file: str | Path | None = None,
    classifier_path: str | None = None,
) -> Rows:
    """``num_samples`` base samples for each of ``prompts_per_caption`` x 50 prompts as rows ``{"prompt",
    "response", "desirable", "reward", "row"}`` with desirable = reward > ``threshold`` (``row`` = sample index)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a probability cut in (0, 1), got {threshold}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (prompts per sampling call), got {batch_size}")
    settings = {"kind": "labels", "prompts_per_caption": prompts_per_caption, "num_samples": num_samples,
                "threshold": threshold, "seed": seed, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale}

    def build() -> Rows:
        prompts, reward_fn = all_captions(prompts_per_caption), classifier_reward(classifier_path)
        generator = torch.Generator().manual_seed(seed)
        rows: Rows = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            images = sample_responses(adapter.sample(chunk, num_samples, generator=generator,
                                                     num_inference_steps=num_inference_steps,
                                                     guidance_scale=guidance_scale))  # fmt: skip
            flat = [p for p in chunk for _ in range(num_samples)]
            for prompt, image, score in zip(flat, images, rewards(reward_fn, flat, images).tolist()):
                rows.append({"prompt": prompt, "response": image, "desirable": score > threshold, "reward": score,
                             "row": len(rows)})
        liked = sum(r["desirable"] for r in rows)
        log.info("feedback_labels: %d of %d base samples desirable (reward > %g)", liked, len(rows), threshold)
        return rows

    return cached_rows(cache_file, settings, adapter, build)

