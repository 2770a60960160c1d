"""Training data built from a reward model: AI-feedback preference pairs and expert demonstration sets.

* :func:`ai_feedback_pairs` — the AI-feedback recipe of MoDiPO (Pappa et al. 2024): draw K samples per prompt
  from the frozen base model, score them with a reward model and keep (argmax, argmin) as (chosen, rejected);
  prompts whose K samples all score the same carry no preference and are dropped (and counted). Diffusion-DPO's
  AI-feedback experiments (Wallace et al. 2023) label pairs with a reward model the same way.
* :func:`demonstration_set` — how Diffusion-DRO (Wu et al. 2025) picks its experts: the top-K images of a corpus
  (Pick-a-Pic) by a reward model, over the whole corpus or per prompt.

Both are modality-agnostic. A reward function is ``reward_fn(prompts: list[str], responses: list) -> [N]`` (higher
is better), where a response is what a dataset row holds: an image ``[C, H, W]`` in [−1, 1] or a motion ``[T, D]``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch

from genalign.adapters.base import Adapter

Reward = Callable[[list[str], list[Any]], torch.Tensor]


class FeedbackPairs(NamedTuple):
    """Pairwise rows ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "row"}`` (``row`` = the
    prompt's index) and the number of prompts dropped because all their samples tied."""

    rows: list[dict[str, Any]]
    num_ties: int


def ai_feedback_pairs(
    adapter: Adapter,
    prompts: Sequence[str],
    reward_fn: Reward,
    num_samples: int = 4,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 8,
    **sample_kw: Any,
) -> FeedbackPairs:
    """Best-vs-worst pairs from ``num_samples`` (K ≥ 2) samples per prompt of ``adapter.sample`` (the policy; pass
    ``use_reference=True`` for the reference), ranked by ``reward_fn``.

    Prompts are sampled ``batch_size`` at a time; ``sample_kw`` (e.g. ``num_inference_steps``, ``guidance_scale``)
    goes to every ``adapter.sample`` call unchanged. Ties between equal best scores go to the earliest sample.
    """
    if int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"AI-feedback pairs need num_samples >= 2 samples per prompt to compare, got {num_samples}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (prompts per sampling call), got {batch_size}")
    prompts = list(prompts)
    rows, ties = [], 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        responses = sample_responses(adapter.sample(chunk, num_samples, generator=generator, **sample_kw))
        if len(responses) != len(chunk) * num_samples:
            raise ValueError(f"{type(adapter).__name__}.sample returned {len(responses)} samples for "
                             f"{len(chunk)} prompts x {num_samples}")
        flat = [p for p in chunk for _ in range(num_samples)]
        scores = rewards(reward_fn, flat, responses).view(len(chunk), num_samples)
        best, worst = scores.max(1), scores.min(1)
        for i, prompt in enumerate(chunk):
            if best.values[i] == worst.values[i]:
                ties += 1
                continue
            base = i * num_samples
            rows.append({
                "prompt": prompt,
                "chosen": responses[base + int(best.indices[i])],
                "rejected": responses[base + int(worst.indices[i])],
                "chosen_score": float(best.values[i]),
                "rejected_score": float(worst.values[i]),
                "row": start + i,
            })
    return FeedbackPairs(rows, ties)


def demonstration_set(
    responses: Sequence[Any] | torch.Tensor,
    prompts: Sequence[str],
    reward_fn: Reward,
    top_k: int,
    *,
    per_prompt: bool = False,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """The ``top_k`` responses by reward as demonstration rows ``{"prompt", "response", "reward", "row"}`` (``row`` =
    the response's index in the input), best first; equal rewards keep input order.

    ``per_prompt``: the top ``top_k`` of each prompt's responses instead (all of them when a prompt has fewer),
    prompts in first-seen order. Rewards are computed ``batch_size`` responses at a time.
    """
    responses = list(responses)
    prompts = list(prompts)
    if len(responses) != len(prompts):
        raise ValueError(f"got {len(responses)} responses but {len(prompts)} prompts; give one prompt per response")
    if int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if not per_prompt and top_k > len(responses):
        raise ValueError(f"top_k={top_k} exceeds the {len(responses)} responses given; lower top_k")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    scores = torch.cat([
        rewards(reward_fn, prompts[i : i + batch_size], responses[i : i + batch_size])
        for i in range(0, len(responses), batch_size)
    ])
    if per_prompt:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        chosen = [i for members in groups.values() for i in _top(scores, torch.tensor(members), top_k)]
    else:
        chosen = _top(scores, torch.arange(len(responses)), top_k)
    return [{"prompt": prompts[i], "response": responses[i], "reward": float(scores[i]), "row": i} for i in chosen]


def _top(scores: torch.Tensor, members: torch.Tensor, k: int) -> list[int]:
    """The k members with the highest score, best first, ties in member order."""
    order = torch.sort(scores[members], descending=True, stable=True).indices[:k]
    return members[order].tolist()


def sample_responses(batch: dict[str, Any]) -> list[torch.Tensor]:
    """Per-sample responses of an adapter's sample batch, on the CPU: its ``images`` ``[C, H, W]`` or its
    ``motion`` ``[T, D]`` (cut to the valid frames when the batch has a ``mask``)."""
    if batch.get("images") is not None:
        return [image.detach().cpu() for image in batch["images"]]
    if batch.get("motion") is not None:
        motion, mask = batch["motion"].detach().cpu(), batch.get("mask")
        if mask is None:
            return list(motion)
        return [m[v] for m, v in zip(motion, mask.cpu().bool())]
    raise ValueError(f"the sample batch has neither 'images' nor 'motion' (keys: {sorted(batch)}); "
                     "sample with decoding on (images) or from a motion adapter")


def rewards(reward_fn: Reward, prompts: list[str], responses: list[Any]) -> torch.Tensor:
    """``reward_fn(prompts, responses)`` as a finite float ``[N]`` tensor on the CPU; anything else raises."""
    values = reward_fn(prompts, responses)
    values = torch.as_tensor(values.detach() if isinstance(values, torch.Tensor) else values).float().cpu()
    if values.shape != (len(prompts),):
        raise ValueError(f"reward_fn must return one score per response ([{len(prompts)}]), got shape "
                         f"{tuple(values.shape)}")
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"reward_fn returned a non-finite score {values[bad[0]].item()} for prompt "
                         f"{prompts[bad[0]]!r} ({len(bad)} non-finite in this batch)")
    return values
