"""The embedded text-to-motion demo set: procedural motions of the 22-joint SMPL skeleton in the HumanML3D format.

Each motion is forward kinematics of simple joint-angle curves on one fixed rest skeleton (a T-pose with adult
bone lengths in metres, Y up, facing +Z, the subject's left on +X), at HumanML3D's 20 fps:

- local rotations ``R_j = R_y(a_y) R_x(a_x) R_z(a_z)`` from per-joint angle curves; global ``G_j = G_parent R_j``
  (the root also carries the world heading ``R_y(heading)``); positions ``p_j = p_parent + G_parent offset_j``;
- root height: the lowest foot joint touches the floor, except in flight (jumps), where the height between
  take-off and landing is interpolated and a ballistic lift ``v0 t - g t^2 / 2`` is added;
- root XZ: the foot joints are contact points weighted by ``softmin(height / 1 mm)`` (the higher of a joint's two
  heights over the step); between frames the root moves so that the weighted contact point stays still, so a
  stance foot does not slide and turning pivots on it.

Families (the ``*_right`` families and the right-sided kicks and sidesteps mirror the left ones across the
body's sagittal plane): walk forward/backward, turn left/right while walking, run, sidestep, jump, squat, wave
left/right hand, kick. Speed, amplitude, counts, side, start heading and length (40..196 feature frames) are drawn
from a seeded numpy generator; captions are paraphrases that name the variation (slowly/quickly, twice, left/right).

Each joint motion of ``T + 1`` frames becomes ``[T, 263]`` features with
:func:`genalign.data.motion_repr.joints_to_features`; :func:`write_dataset` writes the HumanML3D folder layout
read by :class:`genalign.data.humanml3d.HumanML3DDataset`, plus ``labels.json`` (family, split, parameters).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d

from genalign.data.motion_repr import HUMANML3D, features_to_joints, joints_to_features

FPS = HUMANML3D.fps
MIN_FRAMES, MAX_FRAMES = 40, 196  # feature frames per motion (the joints have one more)
GENERATOR_VERSION = 1
GRAVITY = 9.81
OVERSAMPLE = 4  # fine time steps per output frame

#: Rest pose (T-pose) bone offsets ``p_j - p_parent(j)`` in metres, SMPL joint order.
REST_OFFSETS = np.array(
    [
        (0.0, 0.0, 0.0),  # 0 pelvis
        (0.07, -0.08, -0.005), (-0.07, -0.08, -0.005),  # 1/2 hips
        (0.0, 0.11, -0.02),  # 3 spine1
        (0.01, -0.39, 0.005), (-0.01, -0.39, 0.005),  # 4/5 knees
        (0.0, 0.135, 0.01),  # 6 spine2
        (0.0, -0.41, -0.035), (0.0, -0.41, -0.035),  # 7/8 ankles
        (0.0, 0.055, 0.02),  # 9 spine3
        (0.0, -0.06, 0.125), (0.0, -0.06, 0.125),  # 10/11 feet (toes)
        (0.0, 0.21, -0.02),  # 12 neck
        (0.075, 0.115, -0.01), (-0.075, 0.115, -0.01),  # 13/14 collars
        (0.0, 0.09, 0.05),  # 15 head
        (0.12, 0.0, -0.01), (-0.12, 0.0, -0.01),  # 16/17 shoulders
        (0.26, 0.0, 0.0), (-0.26, 0.0, 0.0),  # 18/19 elbows
        (0.25, 0.0, 0.0), (-0.25, 0.0, 0.0),  # 20/21 wrists
    ]
)
PARENTS = tuple(HUMANML3D.parents)
FOOT_JOINTS = HUMANML3D.feet_left + HUMANML3D.feet_right  # ankles and toes
#: joint j of a motion is joint MIRROR[j] of its mirror image (left <-> right)
MIRROR = (0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15, 17, 16, 19, 18, 21, 20)
_SIDES = {
    "left": dict(sign=1.0, hip=1, knee=4, ankle=7, collar=13, shoulder=16, elbow=18),
    "right": dict(sign=-1.0, hip=2, knee=5, ankle=8, collar=14, shoulder=17, elbow=19),
}
_SPINE, _NECK = (3, 6, 9), 12
_UPPER_BODY = (3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19)
_CONTACT_SOFTNESS = 0.001  # metres


# --------------------------------------------------------------------------------------------------- captions
#: caption paraphrases by family; slots: {adv} speed adverb, {count} repetitions, {side}, {turn}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "walk_forward": (
        "a person walks forward{adv}", "someone walks straight ahead{adv}", "a man walks forwards{adv}",
        "a person takes a few paces forward{adv}", "the person keeps walking forward{adv}",
    ),
    "walk_backward": (
        "a person walks backward{adv}", "someone walks backwards{adv}", "a man moves backwards{adv}",
        "the person walks in reverse{adv}", "a person takes a few paces backward{adv}",
    ),
    "turn": (
        "a person walks and turns {turn}{adv}", "someone turns {turn} while walking{adv}",
        "a man walks forward and then turns {turn}{adv}", "the person walks in a curve to the {side}{adv}",
    ),
    "run": (
        "a person runs forward{adv}", "someone jogs straight ahead{adv}", "a man runs forwards{adv}",
        "the person is jogging forward{adv}",
    ),
    "sidestep": (
        "a person sidesteps to the {side}{adv}", "someone steps sideways to the {side}{adv}",
        "a man shuffles sideways to the {side}{adv}", "the person moves sideways toward the {side}{adv}",
    ),
    "jump": (
        "a person jumps up{count}", "someone jumps in place{count}", "a man jumps straight up{count}",
        "the person jumps up and down{count}",
    ),
    "squat": (
        "a person squats down{count}{adv}", "someone does a squat{count}{adv}",
        "a man crouches down and stands back up{count}{adv}", "the person bends the knees into a squat{count}{adv}",
    ),
    "wave": (
        "a person waves with the {side} hand{adv}", "someone raises the {side} arm and waves{adv}",
        "a man waves his {side} hand above his head{adv}", "the person lifts the {side} hand and waves hello{adv}",
    ),
    "kick": (
        "a person kicks with the {side} leg{count}", "someone kicks forward with the {side} foot{count}",
        "a man does a kick with his {side} leg{count}", "the person kicks the {side} foot forward{count}",
    ),
}
_ADVERBS = {"slow": (" slowly", " at a slow pace"), "normal": ("",), "fast": (" quickly", " at a fast pace")}
_COUNTS = {1: "", 2: " twice", 3: " three times"}

#: word -> (lemma, universal POS tag), enough for every caption above (HumanML3D tokens are ``lemma/POS``)
POS_TABLE: dict[str, tuple[str, str]] = {
    **{w: (w, "DET") for w in ("a", "the", "his")},
    **{w: (w, "PRON") for w in ("someone",)},
    **{w: (w, "NOUN") for w in ("person", "man", "line", "curve", "hand", "arm", "head", "leg", "foot", "squat",
                                "kick", "pace", "left", "right", "place", "reverse")},
    **{w: (w[:-1], "NOUN") for w in ("paces", "knees", "times")},
    **{w: (w[:-1], "VERB") for w in ("walks", "turns", "runs", "jogs", "moves", "jumps", "squats",
                                     "bends", "raises", "waves", "kicks", "lifts", "stands", "takes", "keeps",
                                     "steps", "shuffles", "sidesteps")},
    "crouches": ("crouch", "VERB"), "does": ("do", "VERB"), "walking": ("walk", "VERB"), "jogging": ("jog", "VERB"),
    "is": ("be", "AUX"),
    **{w: (w, "ADV") for w in ("forward", "forwards", "backward", "backwards", "straight", "ahead", "then", "back",
                               "up", "down", "around", "sideways", "slowly", "quickly", "twice", "hello")},
    **{w: (w, "ADJ") for w in ("few", "slow", "fast")},
    **{w: (w, "ADP") for w in ("to", "in", "at", "with", "while", "into", "above", "toward")},
    "and": ("and", "CCONJ"), "three": ("three", "NUM"),
}


_MODIFIERS = {"left", "right"}  # ADJ before a noun ("the left leg"), NOUN otherwise ("to the left")


def tokenize(caption: str) -> list[str]:
    """``lemma/POS`` tokens of a caption from :data:`POS_TABLE`; raises naming any word the table lacks."""
    words = re.findall(r"[a-z]+", caption.lower())
    missing = sorted({w for w in words if w not in POS_TABLE})
    if missing:
        raise ValueError(f"caption {caption!r}: words {missing} are not in POS_TABLE; add them with their lemma and tag")
    tags = [POS_TABLE[w][1] for w in words]
    for i, word in enumerate(words[:-1]):
        if word in _MODIFIERS and tags[i + 1] == "NOUN":
            tags[i] = "ADJ"
    return [f"{POS_TABLE[w][0]}/{tag}" for w, tag in zip(words, tags)]


def _speed_label(factor: float) -> str:
    return "slow" if factor < 0.85 else "fast" if factor > 1.15 else "normal"


def _captions(rng: np.random.Generator, group: str, slots: dict, k: int = 3) -> tuple[str, ...]:
    """``k`` distinct paraphrases of ``TEMPLATES[group]`` with the slots filled (an adverb drawn per caption)."""
    picks = rng.choice(len(TEMPLATES[group]), size=min(k, len(TEMPLATES[group])), replace=False)
    speed = slots.get("speed", "normal")
    filled = []
    for i in picks:
        adverb = _ADVERBS[speed][rng.integers(len(_ADVERBS[speed]))]
        filled.append(TEMPLATES[group][i].format(adv=adverb, count=_COUNTS[slots.get("count", 1)],
                                                 side=slots.get("side", ""), turn=slots.get("turn", "")))
    return tuple(filled)


# ------------------------------------------------------------------------------------------- kinematics helpers
def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _keyframes(t: np.ndarray, knots: Sequence[tuple[float, float]]) -> np.ndarray:
    """Piecewise smoothstep through ``(time, value)`` knots (times increasing); constant outside them."""
    times, values = np.array(knots, dtype=np.float64).T
    i = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(times) - 2)
    alpha = _smoothstep((t - times[i]) / np.maximum(times[i + 1] - times[i], 1e-9))
    return values[i] + (values[i + 1] - values[i]) * alpha


class _Pose:
    """Joint angles in degrees ``[T, 22, 3]`` (about the joint's x, y, z axes), world heading and flight lift.

    Sign conventions (left side; the right side mirrors y and z): hip flexion swings the leg forward, knee and
    elbow flexion bend the joint, arm elevation is the angle above horizontal (-90 hangs down), swing moves the
    arm forward, spine lean bends forward.
    """

    def __init__(self, frames: int):
        self.angles = np.zeros((frames, len(PARENTS), 3))
        self.heading = np.zeros(frames)  # radians, facing (sin h, 0, cos h)
        self.lift = np.zeros(frames)  # metres above the interpolated ground height; > 0 only in flight

    @property
    def frames(self) -> int:
        return len(self.angles)

    def leg(self, side: str, flex, knee, plantar=0.0, abduct=0.0) -> None:
        """Hip flexion/abduction and knee flexion; the foot stays parallel to the floor plus ``plantar`` toe-down."""
        s = _SIDES[side]
        self.angles[:, s["hip"], 0] = -flex
        self.angles[:, s["hip"], 2] = s["sign"] * abduct
        self.angles[:, s["knee"], 0] = knee
        self.angles[:, s["ankle"], 0] = flex - knee + plantar
        self.angles[:, s["ankle"], 2] = -s["sign"] * abduct

    def arm(self, side: str, elevation, swing=0.0, elbow=0.0, elbow_roll=0.0) -> None:
        """Shoulder elevation then forward swing; elbow flexion towards the front and roll in the arm's plane."""
        s = _SIDES[side]
        self.angles[:, s["shoulder"], 2] = s["sign"] * elevation
        self.angles[:, s["shoulder"], 0] = -swing
        self.angles[:, s["elbow"], 1] = -s["sign"] * elbow
        self.angles[:, s["elbow"], 2] = s["sign"] * elbow_roll

    def trunk(self, lean=0.0, twist=0.0) -> None:
        """Forward lean and twist spread over the three spine joints; the head keeps looking ahead."""
        for j in _SPINE:
            self.angles[:, j, 0] = lean / 3
            self.angles[:, j, 1] = twist / 3
        self.angles[:, _NECK, 0] = -0.4 * lean


def _stand(frames: int, style: dict) -> _Pose:
    """The idle standing pose over ``frames`` output frames (on the fine grid of :func:`_time`): straight legs, arms
    hanging (style: hang elevation, elbow bend, lean)."""
    pose = _Pose(len(_time(frames)))
    for side in _SIDES:
        pose.leg(side, 0.0, 3.0)
        pose.arm(side, style["hang"], 0.0, style["elbow"])
    pose.trunk(style["lean"])
    return pose


def _rotation(angle: np.ndarray, axis: int) -> np.ndarray:
    """Right-handed rotation matrices ``[..., 3, 3]`` by ``angle`` (radians) about coordinate ``axis``."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    out = np.zeros(angle.shape + (3, 3))
    out[..., axis, axis] = 1.0
    out[..., i, i] = out[..., j, j] = c
    out[..., i, j], out[..., j, i] = -s, s
    return out


def forward_kinematics(angles_deg: np.ndarray, heading: np.ndarray) -> np.ndarray:
    """Joint positions ``[T, 22, 3]`` of the rest skeleton with the root at the origin (see the module docstring)."""
    frames, joints = angles_deg.shape[:2]
    x, y, z = np.moveaxis(np.deg2rad(angles_deg), -1, 0)
    local = _rotation(y, 1) @ _rotation(x, 0) @ _rotation(z, 2)
    rotations, positions = np.empty_like(local), np.zeros((frames, joints, 3))
    rotations[:, 0] = _rotation(heading, 1) @ local[:, 0]
    for j in range(1, joints):
        p = PARENTS[j]
        positions[:, j] = positions[:, p] + rotations[:, p] @ REST_OFFSETS[j]
        rotations[:, j] = rotations[:, p] @ local[:, j]
    return positions


def _place_on_floor(pose: _Pose, start_xz: np.ndarray) -> np.ndarray:
    """World joints ``[T, 22, 3]``: root height from the floor contact (and flight), root XZ from the contact point."""
    body = forward_kinematics(pose.angles, pose.heading)
    feet = body[:, FOOT_JOINTS]
    height = -feet[..., 1].min(1)
    air = pose.lift > 0
    if air.any():
        index = np.arange(pose.frames)
        height[air] = np.interp(index[air], index[~air], height[~air]) + pose.lift[air]
    above = feet[..., 1] + height[:, None]
    above = np.maximum(above[1:], above[:-1])  # per step: a foot that is lifting off or landing counts as up
    weights = np.exp(-(above - above.min(1, keepdims=True)) / _CONTACT_SOFTNESS)
    weights /= weights.sum(1, keepdims=True)
    step = -(weights[..., None] * np.diff(feet[..., [0, 2]], axis=0)).sum(1)
    step[air[1:] | air[:-1]] = 0.0  # vertical jumps: no horizontal drift in flight
    root_xz = start_xz + np.concatenate([np.zeros((1, 2)), np.cumsum(step, 0)])
    root = np.stack([root_xz[:, 0], height, root_xz[:, 1]], -1)
    return body + root[:, None]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, std: float) -> np.ndarray:
    """Gaussian-smoothed white noise along axis 0 with standard deviation ``std`` (filtered with a margin that is
    then cut off, so the ends are as variable as the middle)."""
    margin = int(4 * sigma)
    white = rng.normal(size=(shape[0] + 2 * margin, *shape[1:]))
    smooth = gaussian_filter1d(white, sigma, axis=0)[margin : margin + shape[0]]
    return std * smooth * np.sqrt(2 * np.sqrt(np.pi) * sigma)  # the filter's gain on unit white noise


def mirror(joints: np.ndarray) -> np.ndarray:
    """The motion mirrored across the world YZ plane with left and right joints swapped."""
    out = np.asarray(joints)[..., MIRROR, :].copy()
    out[..., 0] *= -1
    return out


# ------------------------------------------------------------------------------------------------ the families
@dataclass
class _Draft:
    pose: _Pose
    params: dict
    group: str  # caption template group
    slots: dict = field(default_factory=dict)


def _time(frames: int) -> np.ndarray:
    """Seconds of the fine grid (``OVERSAMPLE`` steps per output frame) spanning ``frames`` output frames.

    The root is integrated on this grid so that a contact passing from one foot to the other within a frame
    does not stall the root; :func:`generate_motion` keeps every ``OVERSAMPLE``-th pose.
    """
    return np.arange((frames - 1) * OVERSAMPLE + 1) / (FPS * OVERSAMPLE)


def _duration(frames: int) -> float:
    """Seconds from the first to the last of ``frames`` output frames."""
    return (frames - 1) / FPS


def _frames_for(rng: np.random.Generator, seconds_needed: float = 0.0) -> int:
    """Joint frames: feature length uniform in [max(MIN_FRAMES, needed), MAX_FRAMES], plus one."""
    low = int(np.clip(np.ceil(seconds_needed * FPS), MIN_FRAMES, MAX_FRAMES))
    return int(rng.integers(low, MAX_FRAMES + 1)) + 1


def _leg_ik(forward: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hip flexion, knee flexion) in degrees placing the ankle at ``(forward, up)`` metres from the hip in the
    sagittal plane: two-link IK with the rest thigh and shank of :data:`REST_OFFSETS` (law of cosines)."""
    thigh, shank = REST_OFFSETS[4, 1:], REST_OFFSETS[7, 1:]  # (y, z)
    l1, l2 = np.hypot(*thigh), np.hypot(*shank)
    rest1, rest2 = np.arctan2(thigh[1], -thigh[0]), np.arctan2(shank[1], -shank[0])  # forward angles from down
    dist = np.clip(np.hypot(forward, up), abs(l1 - l2) + 1e-6, l1 + l2 - 1e-6)
    bend = np.arccos(np.clip((dist**2 - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0))  # thigh minus shank angle
    thigh_angle = np.arctan2(forward, -up) + np.arctan2(l2 * np.sin(bend), l1 + l2 * np.cos(bend))
    return np.rad2deg(thigh_angle - rest1), np.rad2deg(bend - rest1 + rest2)


def _gait_leg(u: np.ndarray, duty: float, half_step: float, clearance: float, reach: float):
    """One leg's (hip flexion, knee flexion) at gait phase ``u`` (cycles), from an ankle path relative to the hip.

    Stance (``duty`` of the cycle): the ankle slides back linearly from ``+half_step`` to ``-half_step`` at the
    distance ``reach`` from the hip. Swing: a cubic Hermite back to ``+half_step`` whose end slopes equal the
    stance sweep's, so the foot leaves and lands moving at the walking speed, lifted by ``clearance sin^2(pi s)``.
    Both stance feet then sit at equal heights and move at equal speeds whenever the contact passes between them.
    """
    u = np.mod(u, 1.0)
    stance = u < duty
    s = np.where(stance, u / duty, (u - duty) / (1 - duty))
    slope = -2 * half_step * (1 - duty) / duty  # d forward / d s of the stance sweep, in swing-phase units
    swing = half_step * (2 * s**2 * (3 - 2 * s) - 1) + slope * (2 * s**3 - 3 * s**2 + s)
    forward = np.where(stance, half_step * (1 - 2 * s), swing)
    up = -np.sqrt(reach**2 - forward**2) + np.where(stance, 0.0, clearance * np.sin(np.pi * s) ** 2)
    return _leg_ik(forward, up)


def _locomotion(rng, style, frames, *, cadence, half_step, clearance, reach, duty, direction=1.0, lean=0.0,
                arm_swing=20.0, elbow=None) -> _Pose:
    """Walking (``direction`` +1 forward, -1 backward) or running gait with counter-swinging arms.

    The body moves ``2 half_step / duty`` metres per gait cycle of ``1 / cadence`` seconds.
    """
    pose = _stand(frames, style)
    phase = direction * cadence * _time(frames) + rng.uniform()
    legs = {side: _gait_leg(phase + offset, duty, half_step, clearance, reach)
            for side, offset in (("left", 0.0), ("right", 0.5))}
    scale = max(np.abs(legs["left"][0]).max(), 1e-6)
    for side, other in (("left", "right"), ("right", "left")):
        pose.leg(side, *legs[side])
        pose.arm(side, style["hang"], arm_swing * legs[other][0] / scale, style["elbow"] if elbow is None else elbow)
    pose.angles[:, 0, 1] = 4.0 * legs["right"][0] / scale  # pelvis twist with the stride
    pose.trunk(style["lean"] + lean, -0.5 * pose.angles[:, 0, 1])
    return pose


_LEG = float(np.hypot(*REST_OFFSETS[4, 1:]) + np.hypot(*REST_OFFSETS[7, 1:]))  # hip to ankle, straight


def _walk(rng, style, direction: float) -> _Draft:
    speed = rng.uniform(0.7, 1.3)
    frames = _frames_for(rng)
    pose = _locomotion(rng, style, frames, cadence=(0.9 if direction > 0 else 0.8) * speed**0.6,
                       half_step=(0.3 if direction > 0 else 0.22) * speed**0.4, clearance=0.12, reach=0.995 * _LEG,
                       duty=0.6, direction=direction)
    drift = np.deg2rad(rng.uniform(-3.0, 3.0))  # rad/s: slightly curved paths, at most 30 degrees in a clip
    pose.heading = drift * _time(frames)
    label = _speed_label(speed)
    return _Draft(pose, {"speed": speed, "drift_deg_per_s": np.rad2deg(drift)}, "walk_forward" if direction > 0
                  else "walk_backward", {"speed": label})


_MAX_TURN_RATE = 90.0  # degrees per second; faster turns make the planted feet slide in double support


def _turn(rng, style) -> _Draft:
    """Walk while turning left by 70..200 degrees, at most 90 degrees a second, over part of the clip (turn right
    is its mirror)."""
    speed = rng.uniform(0.75, 1.25)
    frames = _frames_for(rng, 2.5)
    seconds = _duration(frames)
    pose = _locomotion(rng, style, frames, cadence=0.9 * speed**0.6, half_step=0.3 * speed**0.4, clearance=0.12,
                       reach=0.995 * _LEG, duty=0.6)
    longest = 0.7 * seconds
    angle = min(rng.uniform(70.0, 200.0), _MAX_TURN_RATE * longest)
    duration = min(max(rng.uniform(1.2, 2.5), angle / _MAX_TURN_RATE), longest)
    start = rng.uniform(0.0, seconds - duration)
    t = _time(frames)
    pose.heading = np.deg2rad(angle) * _smoothstep((t - start) / duration)
    turn = "around to the left" if angle >= 140 else "left"
    return _Draft(pose, {"speed": speed, "angle_deg": angle}, "turn",
                  {"speed": _speed_label(speed), "turn": turn, "side": "left"})


def _run(rng, style) -> _Draft:
    speed = rng.uniform(0.75, 1.25)
    frames = _frames_for(rng)
    pose = _locomotion(rng, style, frames, cadence=1.4 * speed**0.5, half_step=0.38 * speed**0.4, clearance=0.3,
                       reach=0.96 * _LEG, duty=0.5, lean=10.0, arm_swing=35.0, elbow=85.0)
    pose.heading = np.deg2rad(rng.uniform(-3.0, 3.0)) * _time(frames)
    return _Draft(pose, {"speed": speed}, "run", {"speed": _speed_label(speed)})


def _sidestep(rng, style) -> _Draft:
    """Step sideways to the left: the left leg reaches out while the right one pushes, then the right one follows."""
    speed = rng.uniform(0.7, 1.3)
    frames = _frames_for(rng)
    pose = _stand(frames, style)
    u = np.mod(0.8 * speed * _time(frames), 1.0)
    first = u < 0.5
    s = np.where(first, u, u - 0.5) * 2
    reach = rng.uniform(8.0, 13.0)
    lift = 30.0 * np.sin(np.pi * s)
    pose.leg("left", np.where(first, 0.4 * lift, 0.0), 3.0 + np.where(first, lift, 0.0),
             abduct=np.where(first, reach * _smoothstep(s), reach * (1 - s)))
    pose.leg("right", np.where(first, 0.0, 0.4 * lift), 3.0 + np.where(first, 0.0, lift),
             abduct=np.where(first, reach * s, reach * (1 - _smoothstep(s))))
    for side in _SIDES:
        pose.arm(side, style["hang"] + 8.0, 0.0, style["elbow"])
    return _Draft(pose, {"speed": speed, "reach_deg": reach}, "sidestep", {"speed": _speed_label(speed),
                                                                           "side": "left"})


def _repetitions(draw: Callable[[], tuple[float, ...]], count: int, pad: float = 0.4) -> list[tuple[float, ...]]:
    """``count`` repetitions of phase durations (seconds) from ``draw``, fewer if they overflow MAX_FRAMES."""
    reps = [draw() for _ in range(count)]
    while len(reps) > 1 and sum(map(sum, reps)) + pad > MAX_FRAMES / FPS:
        reps.pop()
    return reps


def _action_frames(rng, reps) -> tuple[int, np.ndarray, float]:
    """Joint frames, their times and a start time leaving at least 0.1 s of standing before and after."""
    busy = sum(map(sum, reps))
    frames = _frames_for(rng, busy + 0.4)
    return frames, _time(frames), rng.uniform(0.1, _duration(frames) - busy - 0.2)


def _jump(rng, style) -> _Draft:
    """Jumps in place: crouch, push off onto the toes, ballistic flight with a slight tuck, land into a crouch."""
    height, crouch = rng.uniform(0.15, 0.35), rng.uniform(0.6, 1.0)
    flight = 2 * np.sqrt(2 * height / GRAVITY)
    reps = _repetitions(lambda: (rng.uniform(0.35, 0.6), 0.15, flight, 0.18, rng.uniform(0.3, 0.5)),
                        int(rng.integers(1, 4)))
    frames, t, start = _action_frames(rng, reps)
    pose = _stand(frames, style)
    knots = {"crouch": [(0.0, 0.0)], "plantar": [(0.0, 0.0)], "arms": [(0.0, 0.0)], "tuck": [(0.0, 0.0)]}
    for phases in reps:
        bottom, takeoff, landing, absorbed, end = start + np.cumsum(phases)
        knots["crouch"] += [(start, 0.0), (bottom, crouch), (takeoff, 0.0), (landing, 0.0), (absorbed, 0.5 * crouch),
                            (end, 0.0)]
        knots["plantar"] += [(bottom, 0.0), (takeoff, 35.0), (landing, 20.0), (absorbed, 0.0)]
        knots["arms"] += [(start, 0.0), (bottom, -45.0), (takeoff + 0.05, 110.0), (landing, 30.0), (end, 0.0)]
        knots["tuck"] += [(takeoff, 0.0), ((takeoff + landing) / 2, 1.0), (landing, 0.0)]
        airborne = (t > takeoff) & (t < landing)
        tau = t[airborne] - takeoff
        pose.lift[airborne] = np.sqrt(2 * GRAVITY * height) * tau - GRAVITY * tau**2 / 2
        start = end
    c, plantar, arms, tuck = (_keyframes(t, knots[k]) for k in ("crouch", "plantar", "arms", "tuck"))
    for side in _SIDES:
        pose.leg(side, 55.0 * c + 25.0 * tuck, 3.0 + 95.0 * c + 35.0 * tuck, plantar)
        pose.arm(side, style["hang"], arms, style["elbow"] + 20.0 * c)
    pose.trunk(style["lean"] + 30.0 * c)
    return _Draft(pose, {"height_m": height, "crouch": crouch, "count": len(reps)}, "jump", {"count": len(reps)})


def _squat(rng, style) -> _Draft:
    """Squats with flat feet: hips back and down, trunk leaning forward, arms reaching forward for balance."""
    speed, depth = rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.0)
    reps = _repetitions(lambda: (0.9 / speed, rng.uniform(0.0, 0.4), 0.9 / speed, rng.uniform(0.2, 0.6)),
                        int(rng.integers(1, 4)))
    frames, t, start = _action_frames(rng, reps)
    knots = [(0.0, 0.0)]
    for phases in reps:
        down, hold, up, rest = start + np.cumsum(phases)
        knots += [(start, 0.0), (down, 1.0), (hold, 1.0), (up, 0.0)]
        start = rest
    k = _keyframes(t, knots) * depth
    pose = _stand(frames, style)
    for side in _SIDES:
        pose.leg(side, 100.0 * k, 3.0 + 117.0 * k)
        pose.arm(side, style["hang"] + 10.0 * k, 80.0 * k, style["elbow"])
    pose.trunk(style["lean"] + 40.0 * k)
    return _Draft(pose, {"speed": speed, "depth": depth, "count": len(reps)}, "squat",
                  {"speed": _speed_label(speed), "count": len(reps)})


def _kick(rng, style) -> _Draft:
    """Front kicks with the left leg (wind up, snap the straight leg up, retract, put down) on a slightly bent
    right leg, arms out for balance (right-leg kicks are the mirror)."""
    speed, reach = rng.uniform(0.75, 1.25), rng.uniform(70.0, 100.0)
    reps = _repetitions(lambda: (0.35 / speed, 0.22 / speed, 0.25 / speed, 0.3 / speed, rng.uniform(0.2, 0.5)),
                        int(rng.integers(1, 3)))
    frames, t, start = _action_frames(rng, reps)
    flex, knee, plantar, lean, arms = ([(0.0, 0.0)] for _ in range(5))
    for phases in reps:
        wind, snap, back, down, end = start + np.cumsum(phases)
        flex += [(start, 0.0), (wind, -20.0), (snap, reach), (back, 35.0), (down, 0.0)]
        knee += [(start, 0.0), (wind, 60.0), (snap, 2.0), (back, 70.0), (down, 0.0)]
        plantar += [(wind, 0.0), (snap, 25.0), (back, 10.0), (down, 0.0)]
        lean += [(wind, 0.0), (snap, -10.0), (down, 0.0)]
        arms += [(wind, 0.0), (snap, 1.0), (down, 0.0)]
        start = end
    pose = _stand(frames, style)
    f, a = _keyframes(t, flex), _keyframes(t, arms)
    pose.leg("left", f, 3.0 + _keyframes(t, knee), _keyframes(t, plantar))
    pose.leg("right", 5.0 * a, 3.0 + 8.0 * a)
    pose.arm("right", style["hang"] + 18.0, 30.0 * a, style["elbow"])
    pose.arm("left", style["hang"] + 18.0, -25.0 * a, style["elbow"])
    pose.trunk(style["lean"] + _keyframes(t, lean))
    return _Draft(pose, {"speed": speed, "reach_deg": reach, "count": len(reps)}, "kick",
                  {"count": len(reps), "side": "left"})


def _wave(rng, style) -> _Draft:
    """Raise the left arm with the forearm up and wave it side to side (the right hand is the mirror)."""
    rate = rng.uniform(1.2, 3.0)  # waves per second
    elevation, amplitude = rng.uniform(35.0, 65.0), rng.uniform(20.0, 35.0)
    frames = _frames_for(rng)
    seconds = _duration(frames)
    raise_at = rng.uniform(0.1, min(0.8, seconds - 1.9))
    tail = rng.uniform(0.0, max(seconds - raise_at - 1.9, 0.0) * 0.3)
    waving = seconds - raise_at - 1.0 - tail
    t = _time(frames)
    up, down = raise_at + 0.5, raise_at + 0.5 + waving
    r = _keyframes(t, [(raise_at, 0.0), (up, 1.0), (down, 1.0), (down + 0.5, 0.0)])
    envelope = _keyframes(t, [(up - 0.1, 0.0), (up + 0.2, 1.0), (down - 0.2, 1.0), (down, 0.0)])
    pose = _stand(frames, style)
    pose.arm("left", style["hang"] + (elevation - style["hang"]) * r, 15.0 * r, style["elbow"] * (1 - r),
             (90.0 - elevation) * r + envelope * amplitude * np.sin(2 * np.pi * rate * (t - up)))
    label = "slow" if rate < 1.6 else "fast" if rate > 2.5 else "normal"
    return _Draft(pose, {"rate_hz": rate, "elevation_deg": elevation, "amplitude_deg": amplitude}, "wave",
                  {"speed": label, "side": "left"})


#: family -> (generator of its left-sided version, whether to mirror: "never", "always" or "random")
_FAMILIES: dict[str, tuple[Callable, str]] = {
    "walk_forward": (lambda rng, style: _walk(rng, style, 1.0), "never"),
    "walk_backward": (lambda rng, style: _walk(rng, style, -1.0), "never"),
    "turn_left": (_turn, "never"),
    "turn_right": (_turn, "always"),
    "run": (_run, "never"),
    "sidestep": (_sidestep, "random"),
    "jump": (_jump, "never"),
    "squat": (_squat, "never"),
    "wave_left": (_wave, "never"),
    "wave_right": (_wave, "always"),
    "kick": (_kick, "random"),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


@dataclass(frozen=True)
class SyntheticMotion:
    """One generated motion: world joints ``[T+1, 22, 3]`` (metres, Y up), captions and the drawn parameters."""

    id: str
    family: str
    joints: np.ndarray
    captions: tuple[str, ...]
    params: dict

    def features(self) -> np.ndarray:
        """HumanML3D features ``[T, 263]`` (float32)."""
        return joints_to_features(self.joints)


def generate_motion(family: str, rng: np.random.Generator, motion_id: str | None = None) -> SyntheticMotion:
    """Draw one motion of ``family`` (one of :data:`FAMILIES`) from ``rng``."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown motion family {family!r}; expected one of {list(FAMILIES)}")
    make, mirroring = _FAMILIES[family]
    style = {"hang": rng.uniform(-82.0, -74.0), "elbow": rng.uniform(8.0, 18.0), "lean": rng.uniform(0.0, 5.0)}
    draft = make(rng, style)
    pose = draft.pose
    pose.angles[:, _UPPER_BODY] += _smooth_noise(rng, (pose.frames, len(_UPPER_BODY), 3), 6.0 * OVERSAMPLE, 2.5)
    pose.heading = pose.heading + rng.uniform(0, 2 * np.pi)
    joints = _place_on_floor(pose, rng.uniform(-1.0, 1.0, size=2))[::OVERSAMPLE]
    side = "left"
    if mirroring == "always" or (mirroring == "random" and rng.random() < 0.5):
        joints, side = mirror(joints), "right"
    params = {k: round(float(v), 4) for k, v in draft.params.items()}
    slots = dict(draft.slots)
    if "side" in slots:
        slots["side"] = params["side"] = side
    if "turn" in slots:
        slots["turn"] = slots["turn"].replace("left", side)
    if "speed" in slots:
        params["speed_label"] = slots["speed"]
    captions = _captions(rng, draft.group, slots)
    return SyntheticMotion(motion_id or family, family, joints, captions, params)


def motion_id(family: str, index: int) -> str:
    return f"{family}_{index:03d}"


def family_of(motion_id: str) -> str:
    """The family of an id written by :func:`write_dataset` (``<family>_<index>``)."""
    family, _, index = motion_id.rpartition("_")
    if family not in _FAMILIES or not index.isdigit():
        raise ValueError(f"motion id {motion_id!r} is not '<family>_<index>' with a family in {list(FAMILIES)}")
    return family


def generate(n_per_family: int, seed: int = 0, families: Sequence[str] = FAMILIES) -> list[SyntheticMotion]:
    """``n_per_family`` motions of each family; motion i of family f depends only on (seed, f, i)."""
    unknown = [f for f in families if f not in _FAMILIES]
    if unknown:
        raise ValueError(f"unknown motion families {unknown}; expected some of {list(FAMILIES)}")
    out = []
    for family in families:
        for i in range(n_per_family):
            rng = np.random.default_rng([seed, FAMILIES.index(family), i])
            out.append(generate_motion(family, rng, motion_id(family, i)))
    return out


# ------------------------------------------------------------------------------------------------------ writing
SPLITS = ("train", "val", "test")


def split_ids(ids_by_family: dict[str, list[str]], seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """Per-family shuffled split (val and test get ``round(fraction * n)`` each, at least one)."""
    rng = np.random.default_rng([seed, 7919])
    splits = {name: [] for name in SPLITS}
    for family, ids in ids_by_family.items():
        if len(ids) < 3:
            raise ValueError(f"family {family!r} has {len(ids)} motions; at least 3 are needed for train/val/test")
        order = [ids[i] for i in rng.permutation(len(ids))]
        n_val, n_test = (max(1, round(f * len(ids))) for f in fractions[1:])
        splits["val"] += order[:n_val]
        splits["test"] += order[n_val : n_val + n_test]
        splits["train"] += order[n_val + n_test :]
    return {name: sorted(ids) for name, ids in splits.items()}


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def write_dataset(
    root: str | Path,
    n_per_family: int = 40,
    seed: int = 0,
    *,
    families: Sequence[str] = FAMILIES,
    std_floor: float = 1e-3,
    write_joints: bool = True,
) -> dict[str, list[str]]:
    """Write the set in the HumanML3D layout under ``root``; returns the split ids.

    ``new_joint_vecs/<id>.npy`` features ``[T, 263]``; ``new_joints/<id>.npy`` the joints recovered from them
    ``[T, 22, 3]`` (as in HumanML3D); ``texts/<id>.txt`` lines ``caption#lemma/POS ...#0.0#0.0``;
    ``Mean.npy``/``Std.npy`` over all train frames per channel, the std floored at ``std_floor``;
    ``train.txt``/``val.txt``/``test.txt``/``all.txt``; ``labels.json`` with the generator settings and, per id,
    the family, split, frame count and drawn parameters.
    """
    motions = generate(n_per_family, seed, families)
    root = Path(root)
    for sub in ("new_joint_vecs", "texts") + (("new_joints",) if write_joints else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    by_family: dict[str, list[str]] = {f: [] for f in families}
    features = {}
    for motion in motions:
        by_family[motion.family].append(motion.id)
        features[motion.id] = motion.features()
        np.save(root / "new_joint_vecs" / f"{motion.id}.npy", features[motion.id])
        if write_joints:
            np.save(root / "new_joints" / f"{motion.id}.npy", features_to_joints(features[motion.id]).astype(np.float32))
        _write_lines(root / "texts" / f"{motion.id}.txt", [f"{c}#{' '.join(tokenize(c))}#0.0#0.0" for c in motion.captions])
    splits = split_ids(by_family, seed)
    train = np.concatenate([features[i] for i in splits["train"]]).astype(np.float64)
    np.save(root / "Mean.npy", train.mean(0).astype(np.float32))
    np.save(root / "Std.npy", np.maximum(train.std(0), std_floor).astype(np.float32))
    for name, ids in splits.items():
        _write_lines(root / f"{name}.txt", ids)
    _write_lines(root / "all.txt", [m.id for m in motions])
    split_of = {i: name for name, ids in splits.items() for i in ids}
    labels = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "n_per_family": n_per_family, "families": list(families),
        "motions": {m.id: {"family": m.family, "split": split_of[m.id], "frames": len(features[m.id]),
                           "params": m.params} for m in motions},
    }
    (root / "labels.json").write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")
    return splits


def read_labels(root: str | Path) -> dict[str, str]:
    """``{id: family}`` from ``<root>/labels.json``."""
    path = Path(root) / "labels.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: write the set with genalign.data.synthetic_motion.write_dataset")
    return {i: entry["family"] for i, entry in json.loads(path.read_text(encoding="utf-8"))["motions"].items()}


def ensure_dataset(root: str | Path, n_per_family: int = 40, seed: int = 0,
                   families: Sequence[str] = FAMILIES) -> Path:
    """Write the set under ``root`` unless ``labels.json`` there already records the same settings."""
    root = Path(root)
    path = root / "labels.json"
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_per_family": n_per_family,
                  "families": list(families)}
        if all(stored.get(k) == v for k, v in wanted.items()):
            return root
    write_dataset(root, n_per_family, seed, families=families)
    return root
