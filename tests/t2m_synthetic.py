"""Structured synthetic text-motion data in the HumanML3D folder layout, for the evaluator and reward tests.

Each motion belongs to a class (action, direction). Its 263-d raw features are noise plus the action's pattern (a
fixed random direction in feature space scaled by 0.5 + a sinusoid at the action's own frequency) plus the
direction's constant offset, so both words of the caption are visible in the motion. Captions name the action and direction
with varied subjects, tagged ``word/POS`` as HumanML3D's texts are.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genalign.data.humanml3d import HumanML3DDataset, collate_motions
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator
from genalign.models.t2m_training import train_evaluator
from genalign.models.word_vectors import MiniLMWordVectors

ACTIONS = ("walk", "run", "jump", "kick", "wave", "sit")
DIRECTIONS = ("forward", "backward", "left", "right")
SUBJECTS = (("a", "person"), ("the", "man"), ("a", "woman"), ("someone",))
DIM = 263


def class_caption(action: str, direction: str, subject: tuple[str, ...]) -> tuple[str, list[str]]:
    """``(text, tokens)`` of one caption."""
    tags = ["DET", "NOUN"] if len(subject) == 2 else ["PRON"]
    text = " ".join([*subject, action + "s", direction])
    tokens = [f"{w}/{t}" for w, t in zip(subject, tags)] + [f"{action}/VERB", f"{direction}/ADV"]
    return text, tokens


def class_motion(action: int, direction: int, frames: int, rng: np.random.Generator, seed: int = 7) -> np.ndarray:
    """Raw features ``[frames, 263]`` of class (action, direction); patterns are fixed by ``seed``."""
    patterns = np.random.default_rng(seed)
    action_dirs = patterns.normal(size=(len(ACTIONS), DIM))
    direction_offsets = patterns.normal(size=(len(DIRECTIONS), DIM))
    frequency = 0.5 + 0.4 * action  # Hz at 20 fps
    t = np.arange(frames) / 20.0
    wave = np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))[:, None]
    pattern = (0.5 + wave) * action_dirs[action] + direction_offsets[direction]
    return (0.5 * rng.normal(size=(frames, DIM)) + pattern).astype(np.float32)


def write_synthetic_humanml3d(root: Path, per_class: dict[str, int], seed: int = 0, max_frames: int = 200) -> Path:
    """Write ``per_class[split]`` motions of every class for each split, 40 to ``max_frames - 1`` frames long;
    returns ``root``."""
    rng = np.random.default_rng(seed)
    (root / "new_joint_vecs").mkdir(parents=True)
    (root / "texts").mkdir()
    frames_all = []
    for split, count in per_class.items():
        ids = []
        for a, action in enumerate(ACTIONS):
            for d, direction in enumerate(DIRECTIONS):
                for i in range(count):
                    motion_id = f"{split}_{a}{d}_{i:03d}"
                    motion = class_motion(a, d, int(rng.integers(40, max_frames)), rng)
                    np.save(root / "new_joint_vecs" / f"{motion_id}.npy", motion)
                    frames_all.append(motion)
                    lines = []
                    for s in rng.choice(len(SUBJECTS), size=2, replace=False):
                        text, tokens = class_caption(action, direction, SUBJECTS[s])
                        lines.append(f"{text}#{' '.join(tokens)}#0.0#0.0")
                    (root / "texts" / f"{motion_id}.txt").write_text("\n".join(lines) + "\n")
                    ids.append(motion_id)
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    stacked = np.concatenate(frames_all)
    np.save(root / "Mean.npy", stacked.mean(0).astype(np.float32))
    np.save(root / "Std.npy", stacked.std(0).astype(np.float32))
    return root


TINY = dict(movement_hidden=32, movement_latent=32, motion_hidden=32, text_hidden=32, embed_dim=16)
MAX_FRAMES, MAX_LENGTH = 64, 60  # short clips keep the tests fast


@dataclass
class TrainedSetup:
    """A tiny evaluator before and after ``train_evaluator`` on the synthetic training split, the held-out split
    as one collated batch (with each item's class), and the training history."""

    untrained: TextMotionEvaluator
    evaluator: TextMotionEvaluator
    test: dict
    classes: list[str]
    history: dict
    mean: np.ndarray
    std: np.ndarray


@functools.cache
def trained_setup() -> TrainedSetup:
    """Trained once per test session (shared by the evaluator and reward tests)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_humanml3d(Path(tmp) / "humanml3d", {"train": 8, "test": 4}, max_frames=MAX_FRAMES)
        lengths = dict(max_frames=MAX_FRAMES, max_length=MAX_LENGTH)
        train = HumanML3DDataset(root, "train", **lengths)
        test = HumanML3DDataset(root, "test", random_crop=False, **lengths)
        # three random crops of every clip, read into memory once (the file reads would dominate the test time)
        items = [train[i] for _ in range(3) for i in range(len(train))]
        test_items = [test[i] for i in range(len(test))]
    config = EvaluatorConfig(**TINY, max_motion_length=MAX_LENGTH)
    vectors = MiniLMWordVectors()  # the embedded default, loaded once for both
    untrained = TextMotionEvaluator(config, word_vectors=vectors).eval()
    evaluator = TextMotionEvaluator(config, word_vectors=vectors)
    evaluator.load_state_dict(untrained.state_dict())
    history = train_evaluator(evaluator, items, steps=150, movement_steps=20, lr=3e-3, progress=False)
    evaluator.set_statistics(train.mean, train.std)  # the items list carries no statistics
    classes = [item["id"].split("_")[1] for item in test_items]
    return TrainedSetup(untrained, evaluator, collate_motions(test_items), classes, history, train.mean, train.std)
