"""Skeleton pictures of motions given as joint positions ``[T, J, 3]`` (metres, Y up, as HumanML3D's
``new_joints`` or :func:`genalign.data.motion_repr.features_to_joints` produce).

- :func:`save_animation`: a GIF through matplotlib's animation module and its Pillow writer, or an MP4 through
  its ffmpeg writer (raises when ffmpeg is missing); :func:`save_animations` writes the GIF and, when ffmpeg is
  on the PATH, the MP4 (otherwise it logs that the MP4 was skipped).
- :func:`save_filmstrip`: one PNG with ``k`` evenly spaced frames side by side, quick to look at.
- :func:`save_comparison`: a before/after strip, one row per model (base, trained, real), one column per caption.

Every picture shows the kinematic chains as coloured lines (left limbs blue, right limbs red, spine black), a floor
grid at y = 0, the root path on the floor, and the caption as title. Axis limits come from the whole motion, so the
body moves through a fixed scene; the camera looks at the first frame's front from 30 degrees to its left.
Figures are drawn off-screen (no pyplot, no display needed).
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib import animation
from matplotlib.figure import Figure

from genalign.data.motion_repr import SkeletonLayout, get_layout

log = logging.getLogger(__name__)

_SPINE_COLOUR, _LEFT_COLOUR, _RIGHT_COLOUR = "#222222", "#1f5fbf", "#d62728"
_MIN_HALF_WIDTH = 0.8  # metres: the floor shown is at least 1.6 m wide


def _to_plot(points: np.ndarray) -> np.ndarray:
    """World (x, y up, z) -> matplotlib (X, Y, Z up) as a proper rotation, (-x, z, y), so left stays left."""
    return np.stack([-points[..., 0], points[..., 2], points[..., 1]], -1)


def _as_joints(joints, layout: SkeletonLayout) -> np.ndarray:
    j = joints.detach().cpu().numpy() if isinstance(joints, torch.Tensor) else np.asarray(joints)
    if j.ndim != 3 or j.shape[1:] != (layout.num_joints, 3) or len(j) < 1:
        raise ValueError(f"joints must be [T, {layout.num_joints}, 3] for the {layout.name} skeleton, got {j.shape}")
    if not np.isfinite(j).all():
        raise ValueError("joints contain NaN or inf")
    return j.astype(np.float64)


def _chain_colour(chain: tuple[int, ...], joints0: np.ndarray, layout: SkeletonLayout) -> str:
    """Black for a chain whose first bone points up or down (the spine), else blue/red by the side that bone
    points to in the first frame (hips and collar bones point sideways)."""
    rh, lh, rs, ls = layout.face_joints
    across = (joints0[rh] - joints0[lh]) + (joints0[rs] - joints0[ls])  # points to the body's right
    bone = joints0[chain[1]] - joints0[chain[0]]
    side = float(np.dot(bone, across)) / (np.linalg.norm(bone) * np.linalg.norm(across) + 1e-9)
    if abs(side) < 0.3:
        return _SPINE_COLOUR
    return _RIGHT_COLOUR if side > 0 else _LEFT_COLOUR


@dataclass
class _Scene:
    """Fixed scene geometry for one motion: limits, floor grid, colours and camera."""

    joints: np.ndarray  # [T, J, 3] in plot coordinates
    layout: SkeletonLayout
    colours: list[str]
    low: np.ndarray  # plot-space box corners
    high: np.ndarray
    azim: float

    @classmethod
    def of(cls, joints: np.ndarray, layout: SkeletonLayout) -> "_Scene":
        rh, lh, rs, ls = layout.face_joints
        across = (joints[0, rh] - joints[0, lh]) + (joints[0, rs] - joints[0, ls])
        facing = _to_plot(np.cross([0.0, 1.0, 0.0], across))  # up x right = forward
        plot = _to_plot(joints).reshape(-1, 3)
        centre = (plot.min(0) + plot.max(0)) / 2
        half = np.maximum((plot.max(0) - plot.min(0)) / 2 + 0.3, _MIN_HALF_WIDTH)
        low, high = centre - half, centre + half
        low[2], high[2] = 0.0, max(plot[:, 2].max() + 0.1, 1.0)
        colours = [_chain_colour(chain, joints[0], layout) for chain in layout.kinematic_chains]
        azim = float(np.degrees(np.arctan2(facing[1], facing[0]))) + 30.0
        return cls(_to_plot(joints), layout, colours, low, high, azim)

    def axes(self, fig: Figure, rect: list[float]):
        ax = fig.add_axes(rect, projection="3d")
        ax.set_xlim(self.low[0], self.high[0])
        ax.set_ylim(self.low[1], self.high[1])
        ax.set_zlim(self.low[2], self.high[2])
        ax.set_box_aspect(tuple(self.high - self.low), zoom=1.3)  # metres are equal along every axis
        ax.view_init(elev=20, azim=self.azim)
        ax.set_axis_off()
        self._floor(ax)
        return ax

    def _floor(self, ax) -> None:
        (x0, y0), (x1, y1) = self.low[:2], self.high[:2]
        step = next(s for s in (0.5, 1.0, 2.0, 5.0, 10.0) if max(x1 - x0, y1 - y0) / s <= 12)
        for x in np.arange(np.ceil(x0 / step), np.floor(x1 / step) + 1) * step:
            ax.plot([x, x], [y0, y1], [0, 0], color="#bbbbbb", lw=0.6)
        for y in np.arange(np.ceil(y0 / step), np.floor(y1 / step) + 1) * step:
            ax.plot([x0, x1], [y, y], [0, 0], color="#bbbbbb", lw=0.6)
        root = self.joints[:, 0]
        ax.plot(root[:, 0], root[:, 1], np.zeros(len(root)), color="#e69f00", lw=1.2)

    def skeleton(self, ax, linewidth: float = 2.5) -> list:
        """One line per kinematic chain (update with :meth:`pose`)."""
        return [ax.plot([], [], [], color=c, lw=linewidth, solid_capstyle="round")[0] for c in self.colours]

    def pose(self, lines: list, frame: int) -> None:
        for line, chain in zip(lines, self.layout.kinematic_chains):
            points = self.joints[frame, list(chain)]
            line.set_data_3d(points[:, 0], points[:, 1], points[:, 2])


def _title(caption: str | None, width: int) -> str:
    return "\n".join(textwrap.wrap(caption or "", width)[:2])


def _animation(joints, caption, fps, layout, size_px, dpi) -> tuple[Figure, animation.FuncAnimation]:
    layout = get_layout(layout)
    j = _as_joints(joints, layout)
    scene = _Scene.of(j, layout)
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    fig.suptitle(_title(caption, 48), fontsize=9)
    ax = scene.axes(fig, [0.0, 0.0, 1.0, 0.88])
    lines = scene.skeleton(ax)
    clock = fig.text(0.02, 0.02, "", fontsize=7, color="#555555")

    def draw(frame: int):
        scene.pose(lines, frame)
        clock.set_text(f"{frame / fps:5.2f} s  frame {frame + 1}/{len(j)}")  # also keeps every GIF frame distinct
        return [*lines, clock]

    return fig, animation.FuncAnimation(fig, draw, frames=len(j), interval=1000 / fps, blit=False)


def ffmpeg_available() -> bool:
    return animation.writers.is_available("ffmpeg")


def save_animation(
    joints, path: str | Path, *, caption: str | None = None, fps: float = 20.0,
    layout: str | SkeletonLayout = "humanml3d", size_px: int = 320, dpi: int = 80,
) -> Path:
    """Animate ``joints [T, J, 3]`` into ``path``: ``.gif`` (Pillow writer) or ``.mp4`` (ffmpeg writer)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"{path}: the animation format comes from the suffix, expected .gif or .mp4")
    if suffix == ".mp4" and not ffmpeg_available():
        raise RuntimeError(f"{path}: writing MP4 needs ffmpeg on the PATH (matplotlib's ffmpeg writer); write a .gif instead")
    fig, anim = _animation(joints, caption, fps, layout, size_px, dpi)
    writer = animation.PillowWriter(fps=fps) if suffix == ".gif" else animation.FFMpegWriter(fps=fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    anim.save(str(path), writer=writer, dpi=dpi)
    return path


def save_animations(joints, stem: str | Path, **kwargs) -> list[Path]:
    """Write ``<stem>.gif`` and, if ffmpeg exists, ``<stem>.mp4``; returns the written paths."""
    stem = Path(stem)
    written = [save_animation(joints, stem.with_suffix(".gif"), **kwargs)]
    if ffmpeg_available():
        written.append(save_animation(joints, stem.with_suffix(".mp4"), **kwargs))
    else:
        log.warning("ffmpeg not found on the PATH: skipped %s (only the GIF was written)", stem.with_suffix(".mp4"))
    return written


def filmstrip_frames(num_frames: int, k: int) -> np.ndarray:
    """``k`` evenly spaced frame indices from the first to the last frame."""
    return np.unique(np.linspace(0, num_frames - 1, k).round().astype(int))


def save_filmstrip(
    joints, path: str | Path, *, caption: str | None = None, k: int = 6, fps: float = 20.0,
    layout: str | SkeletonLayout = "humanml3d", panel_px: int = 200, dpi: int = 100,
) -> Path:
    """A PNG of ``k`` frames side by side (``k * panel_px`` x ``panel_px`` pixels), each labelled with its time."""
    layout = get_layout(layout)
    j = _as_joints(joints, layout)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    frames = filmstrip_frames(len(j), k)
    scene = _Scene.of(j, layout)
    fig = Figure(figsize=(k * panel_px / dpi, panel_px / dpi), dpi=dpi)
    fig.suptitle(_title(caption, 18 * k), fontsize=9)
    for slot, frame in enumerate(frames):
        ax = scene.axes(fig, [slot / k, 0.0, 1.0 / k, 0.86])
        scene.pose(scene.skeleton(ax, 2.0), frame)
        ax.text2D(0.5, 0.02, f"{frame / fps:.2f} s", transform=ax.transAxes, ha="center", fontsize=7, color="#555555")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def save_comparison(
    rows: Sequence[tuple[str, Sequence]], captions: Sequence[str], path: str | Path, *, k: int = 4,
    fps: float = 20.0, layout: str | SkeletonLayout = "humanml3d", panel_px: int = 110, dpi: int = 100,
) -> Path:
    """A before/after strip: one row per ``(label, motions)`` (e.g. base, trained, real), one column per caption;
    each cell shows ``k`` evenly spaced frames of that row's motion ``[T, J, 3]`` for the column's caption, so the
    same captions can be compared across models. PNG of ``len(captions) * k * panel_px`` x
    ``(len(rows) + 0.4) * panel_px`` pixels (plus a label margin)."""
    layout = get_layout(layout)
    if not rows or not captions or k < 1:
        raise ValueError(f"need at least one row, one caption and k >= 1, got {len(rows)} rows, {len(captions)} "
                         f"captions, k={k}")
    for label, motions in rows:
        if len(motions) != len(captions):
            raise ValueError(f"row {label!r} has {len(motions)} motions for {len(captions)} captions")
    label_px, title_px = panel_px, 0.4 * panel_px
    width, height = label_px + len(captions) * k * panel_px, title_px + len(rows) * panel_px
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    cell_w, cell_h = k * panel_px / width, panel_px / height
    for c, caption in enumerate(captions):
        fig.text((label_px + (c + 0.5) * k * panel_px) / width, 1 - 0.5 * title_px / height,
                 _title(caption, 14 * k), ha="center", va="center", fontsize=8)
    for r, (label, motions) in enumerate(rows):
        bottom = 1 - (title_px + (r + 1) * panel_px) / height
        fig.text(0.5 * label_px / width, bottom + cell_h / 2, label, ha="center", va="center", fontsize=9,
                 rotation=90, weight="bold")
        for c, joints in enumerate(motions):
            j = _as_joints(joints, layout)
            scene = _Scene.of(j, layout)
            left = (label_px + c * k * panel_px) / width
            for slot, frame in enumerate(filmstrip_frames(len(j), k)):
                ax = scene.axes(fig, [left + slot * cell_w / k, bottom, cell_w / k, cell_h])
                scene.pose(scene.skeleton(ax, 1.5), frame)
                ax.text2D(0.5, 0.02, f"{frame / fps:.1f} s", transform=ax.transAxes, ha="center", fontsize=6,
                          color="#555555")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
