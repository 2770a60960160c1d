"""The digits demo's before/after figure: the same prompts and noise side by side, each cell marked by the classifier.

Layout: two panels (before | after), one row per prompted digit (ascending), the first ``columns`` images of that
digit left to right in prompt order, so cell (r, c) of both panels comes from the same prompt and the same initial
noise. Every cell has a 1-pixel frame: green when the digit classifier's argmax is the prompted digit, red when not.
The title gives the prompt accuracy over *all* the images (not only the cells shown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from genalign.data.digits import parse_digit
from genalign.eval.image import prompt_hits

RIGHT = (0.0, 0.75, 0.0)  # frame colour (RGB in [0, 1]) of a cell the classifier reads as the prompted digit
WRONG = (0.9, 0.0, 0.0)
PAD, FRAME, GAP = 1, 1, 6  # white separator between cells, coloured frame width, white gap between the two panels


@dataclass
class MarkedGrid:
    """What :func:`save_before_after_grid` drew.

    ``canvas`` ``[3, H, W]`` RGB in [0, 1]; ``rows[digit]`` the prompt indices shown in that digit's row;
    ``hits[panel]`` ``[N]`` bools (classifier argmax == prompted digit) for every image; ``accuracy[panel]`` their
    mean; ``cell(panel, r, c)`` the (top, left) of the framed cell, frame included.
    """

    canvas: torch.Tensor
    rows: dict[int, list[int]]
    hits: dict[str, torch.Tensor]
    accuracy: dict[str, float]
    cell_size: tuple[int, int]
    panel_width: int

    def cell(self, panel: int, r: int, c: int) -> tuple[int, int]:
        ch, cw = self.cell_size
        return PAD + r * (ch + PAD), panel * (self.panel_width + GAP) + PAD + c * (cw + PAD)


def digit_rows(prompts: Sequence[str], columns: int | None = None) -> dict[int, list[int]]:
    """Prompt indices grouped by prompted digit (ascending digits, prompt order), at most ``columns`` per digit."""
    rows: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rows.setdefault(parse_digit(prompt), []).append(i)
    return {d: rows[d][:columns] for d in sorted(rows)}


@torch.no_grad()
def save_before_after_grid(
    before: torch.Tensor,
    after: torch.Tensor,
    prompts: Sequence[str],
    classifier: nn.Module,
    path: str | Path,
    *,
    columns: int = 10,
    labels: tuple[str, str] = ("before", "after"),
) -> MarkedGrid:
    """Write the before | after PNG of two image sets ``[N, 1, H, W]`` in [-1, 1] drawn for the same ``prompts``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if before.shape != after.shape or before.dim() != 4 or before.shape[1] != 1 or len(before) != len(prompts):
        raise ValueError(f"need before and after grey images of one shape [N, 1, H, W] and one prompt per image; got "
                         f"{tuple(before.shape)}, {tuple(after.shape)} and {len(prompts)} prompts")  # fmt: skip
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    panels = {labels[0]: before.detach().float().cpu(), labels[1]: after.detach().float().cpu()}
    hits = {name: prompt_hits(classifier, images, prompts) for name, images in panels.items()}
    rows = digit_rows(prompts, columns)
    h, w = before.shape[-2:]
    cell_size = (h + 2 * FRAME, w + 2 * FRAME)
    shown = max(len(indices) for indices in rows.values())
    panel_width = shown * (cell_size[1] + PAD) + PAD
    grid = MarkedGrid(torch.ones(3, len(rows) * (cell_size[0] + PAD) + PAD, 2 * panel_width + GAP), rows, hits,
                      {name: hit.float().mean().item() for name, hit in hits.items()}, cell_size, panel_width)
    for p, (name, images) in enumerate(panels.items()):
        for r, indices in enumerate(rows.values()):
            for c, i in enumerate(indices):
                top, left = grid.cell(p, r, c)
                colour = torch.tensor(RIGHT if hits[name][i] else WRONG)[:, None, None]
                grid.canvas[:, top : top + cell_size[0], left : left + cell_size[1]] = colour
                grid.canvas[:, top + FRAME : top + FRAME + h, left + FRAME : left + FRAME + w] = (images[i, 0].clamp(-1, 1) + 1) / 2

    inches_per_pixel = 0.04  # 4 screen pixels per image pixel at dpi 100
    height, width = grid.canvas.shape[1:]
    figure, axes = plt.subplots(figsize=(width * inches_per_pixel + 0.6, height * inches_per_pixel + 0.8))
    axes.imshow(grid.canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_yticks([PAD + r * (cell_size[0] + PAD) + (cell_size[0] - 1) / 2 for r in range(len(rows))],
                    [str(d) for d in rows])  # fmt: skip
    axes.set_xticks([p * (panel_width + GAP) + panel_width / 2 for p in range(2)], list(panels))
    axes.xaxis.tick_top()
    axes.set_ylabel("prompted digit")
    accuracy = " → ".join(f"{name} {grid.accuracy[name]:.3f}" for name in panels)
    axes.set_title(f"prompt accuracy over all {len(prompts)} images: {accuracy}\n"
                   "same prompt and noise side by side; frame: green = classifier reads the prompted digit, red = not",
                   fontsize=8)  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return grid
