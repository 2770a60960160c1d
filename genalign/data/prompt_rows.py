"""Prompt-only rows for online methods, which draw their own responses: ``{"prompt", "row"}`` per prompt."""

from __future__ import annotations

from typing import Any, Sequence


def prompt_rows(prompts: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per prompt, ``row`` = its index; an empty list raises."""
    if not prompts:
        raise ValueError("prompt_rows got no prompts; give at least one prompt to sample from")
    return [{"prompt": p, "row": i} for i, p in enumerate(prompts)]


def digit_caption_rows(repeats: int = 1) -> list[dict[str, Any]]:
    """Every digits caption (10 digits x the caption templates), each ``repeats`` times, as prompt rows."""
    from genalign.data.digits_rows import all_captions

    return prompt_rows(all_captions(repeats))


def motion_caption_rows(split: str = "train", num_prompts: int = 128, seed: int = 0) -> list[dict[str, Any]]:
    """``num_prompts`` seeded captions of the embedded synthetic motion set's ``split``, as prompt rows."""
    from genalign.data.motion_rows import synthetic_motion_root, training_prompts

    return prompt_rows(training_prompts(synthetic_motion_root(), split, num_prompts, seed))
