"""Skeleton rendering: GIF frame count, MP4 only with ffmpeg, filmstrip size and content, not mirrored."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.data.motion_repr import canonicalize
from genalign.data.synthetic_motion import generate_motion
from genalign.render.skeleton import (
    ffmpeg_available,
    filmstrip_frames,
    save_animation,
    save_animations,
    save_filmstrip,
)


@pytest.fixture(scope="module")
def wave():
    """A short left-hand wave (canonical joints, the raised wrist moves every frame)."""
    motion = generate_motion("wave_left", np.random.default_rng(0))
    return canonicalize(motion.joints)[30:42], motion.captions[0]


def colour_mask(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return (np.abs(image[..., :3].astype(int) - rgb) < tol).all(-1)


def test_gif_has_one_frame_per_pose(wave, tmp_path):
    joints, caption = wave
    path = save_animation(torch.from_numpy(joints), tmp_path / "wave.gif", caption=caption, fps=10, size_px=160)
    with Image.open(path) as gif:
        assert gif.n_frames == len(joints) == 12
        assert gif.size == (160, 160)
        assert gif.info["duration"] == 100  # ms per frame at 10 fps


def test_mp4_needs_ffmpeg_and_is_skipped_with_a_message(wave, tmp_path, caplog):
    joints, caption = wave
    short = joints[:3]
    if ffmpeg_available():
        written = save_animations(short, tmp_path / "clip", caption=caption, size_px=96)
        assert [p.suffix for p in written] == [".gif", ".mp4"] and all(p.stat().st_size > 0 for p in written)
        return
    with pytest.raises(RuntimeError, match="ffmpeg"):
        save_animation(short, tmp_path / "clip.mp4")
    with caplog.at_level(logging.WARNING, logger="genalign.render.skeleton"):
        written = save_animations(short, tmp_path / "clip", caption=caption, size_px=96)
    assert written == [tmp_path / "clip.gif"] and not (tmp_path / "clip.mp4").exists()
    assert "ffmpeg not found" in caplog.text and "clip.mp4" in caplog.text


def test_filmstrip_size_and_drawn_limbs(wave, tmp_path):
    joints, caption = wave
    path = save_filmstrip(joints, tmp_path / "strip.png", caption=caption, k=4, panel_px=150)
    with Image.open(path) as png:
        assert png.size == (4 * 150, 150)
        image = np.asarray(png.convert("RGB"))
    for rgb in ((0x1F, 0x5F, 0xBF), (0xD6, 0x27, 0x28), (0x22, 0x22, 0x22)):  # left, right and spine chains
        columns = np.flatnonzero(colour_mask(image, rgb).any(0))
        assert {c // 150 for c in columns} == {0, 1, 2, 3}  # drawn in every panel


def test_front_view_is_not_mirrored(tmp_path):
    # A standing pose facing +Z seen from the front: the subject's left (blue) appears on the image's right.
    joints = canonicalize(generate_motion("squat", np.random.default_rng(1)).joints)[:1]
    path = save_filmstrip(joints, tmp_path / "front.png", k=1, panel_px=240)
    image = np.asarray(Image.open(path).convert("RGB"))
    left_x = np.flatnonzero(colour_mask(image, (0x1F, 0x5F, 0xBF)).any(0)).mean()
    right_x = np.flatnonzero(colour_mask(image, (0xD6, 0x27, 0x28)).any(0)).mean()
    assert left_x > right_x + 10


def test_filmstrip_frames_span_the_motion():
    assert filmstrip_frames(100, 5).tolist() == [0, 25, 50, 74, 99]
    assert filmstrip_frames(3, 6).tolist() == [0, 1, 2]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"\[T, 22, 3\]"):
        save_filmstrip(np.zeros((5, 21, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        save_filmstrip(np.full((5, 22, 3), np.nan), tmp_path / "x.png")
    with pytest.raises(ValueError, match=".gif or .mp4"):
        save_animation(np.zeros((5, 22, 3)), tmp_path / "x.avi")


def test_comparison_strip_layout_and_errors(wave, tmp_path):
    from genalign.render.skeleton import save_comparison

    joints, caption = wave
    rows = [("base", [joints, joints[::-1]]), ("trained", [joints, joints])]
    path = save_comparison(rows, [caption, "walks back"], tmp_path / "strip.png", k=3, panel_px=60)
    with Image.open(path) as image:
        assert image.size == (60 + 2 * 3 * 60, int(2.4 * 60))  # label margin + 2 captions x 3 frames; title + 2 rows
        pixels = np.asarray(image.convert("RGB"))
    for r in range(2):  # both rows draw limbs in both captions' cells
        for c in range(2):
            cell = pixels[int(0.4 * 60) + r * 60 : int(0.4 * 60) + (r + 1) * 60, 60 + c * 180 : 60 + (c + 1) * 180]
            assert (colour_mask(cell, (31, 95, 191)) | colour_mask(cell, (214, 39, 40))).sum() > 10
    with pytest.raises(ValueError, match="row 'trained' has 1 motions for 2 captions"):
        save_comparison([("trained", [joints])], [caption, "x"], tmp_path / "bad.png")
