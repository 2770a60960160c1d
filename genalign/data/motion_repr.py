"""HumanML3D motion features <-> joint positions (Guo et al. 2022, "Generating Diverse and Natural 3D Human
Motions from Text", the "new_joint_vecs" representation).

A motion of T+1 joint frames ``[T+1, J, 3]`` (Y up, metres) becomes ``[T, 12J-1]`` features (263 for the 22-joint
SMPL skeleton of HumanML3D, 251 for the 21-joint KIT-ML skeleton):

=================  ============  ==========================================================================
channels            size          meaning (frame t; ``R_t`` = yaw that turns the body's facing to +Z)
=================  ============  ==========================================================================
``root_rot_vel``    1             half-angle yaw increment ``(a_{t+1} - a_t) / 2`` (the quaternion half-angle)
``root_lin_vel``    2             XZ of ``R_{t+1} (root_{t+1} - root_t)``
``root_height``     1             root Y
``ric``             3(J-1)        ``R_t (p_j - root_xz)`` for the non-root joints
``rot6d``           6(J-1)        first two columns of each joint's local rotation (inverse kinematics)
``local_vel``       3J            ``R_t (p_{t+1} - p_t)`` for every joint
``foot_contact``    4             ``|p_{t+1} - p_t|^2 < threshold`` for the two left then two right foot joints
=================  ============  ==========================================================================

``features_to_joints`` integrates the root yaw and XZ velocity and places the root-relative joints around the
root; it needs only the root and ``ric`` channels. ``joints_to_features`` canonicalises first (floor at y=0,
root of frame 0 at the XZ origin, frame 0 facing +Z) and follows HumanML3D's processing, including two of its
conventions: the per-frame facing is Gaussian-smoothed (sigma 20 frames) and the first frame's yaw is zero.
One deliberate difference: HumanML3D stores ``arcsin`` of the y component of the relative root quaternion,
which flips sign on the frame where the facing crosses -Z (the quaternion's sign flips there); here the yaw
increment is the shortest arc, identical everywhere else and exactly invertible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.transform import Rotation


@dataclass(frozen=True)
class SkeletonLayout:
    """A dataset's skeleton and sequence conventions.

    ``rest_directions[j]`` is the unit direction of the bone parent(j) -> j in the rest pose; ``face_joints`` is
    (right hip, left hip, right shoulder, left shoulder); ``leg_bones`` are the two bones whose lengths set the
    retargeting scale; ``min_length`` is the shortest clip the text-to-motion protocol keeps.
    """

    name: str
    kinematic_chains: tuple[tuple[int, ...], ...]
    rest_directions: tuple[tuple[float, float, float], ...]
    face_joints: tuple[int, int, int, int]
    feet_left: tuple[int, int]
    feet_right: tuple[int, int]
    leg_bones: tuple[int, int]
    feet_threshold: float
    fps: float
    min_length: int

    @property
    def num_joints(self) -> int:
        return len(self.rest_directions)

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.num_joints)

    @property
    def parents(self) -> list[int]:
        parents = [-1] * self.num_joints
        for chain in self.kinematic_chains:
            for parent, child in zip(chain[:-1], chain[1:]):
                parents[child] = parent
        return parents


_X, _NX, _Y, _NY, _Z = (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1)

#: HumanML3D: the first 22 SMPL joints (0 pelvis, 1/2 left/right hip, ..., 20/21 left/right wrist), 20 fps.
HUMANML3D = SkeletonLayout(
    name="humanml3d",
    kinematic_chains=((0, 2, 5, 8, 11), (0, 1, 4, 7, 10), (0, 3, 6, 9, 12, 15), (9, 14, 17, 19, 21), (9, 13, 16, 18, 20)),
    rest_directions=((0, 0, 0), _X, _NX, _Y, _NY, _NY, _Y, _NY, _NY, _Y, _Z, _Z, _Y, _X, _NX, _Z) + (_NY,) * 6,
    face_joints=(2, 1, 17, 16),
    feet_left=(7, 10),
    feet_right=(8, 11),
    leg_bones=(5, 8),
    feet_threshold=0.002,
    fps=20.0,
    min_length=40,
)

#: KIT-ML in the HumanML3D format: 21 joints, 12.5 fps.
KIT = SkeletonLayout(
    name="kit",
    kinematic_chains=((0, 11, 12, 13, 14, 15), (0, 16, 17, 18, 19, 20), (0, 1, 2, 3, 4), (3, 5, 6, 7), (3, 8, 9, 10)),
    rest_directions=((0, 0, 0), _Y, _Y, _Y, _Y, _X, _NY, _NY, _NX, _NY, _NY, _X, _NY, _NY, _Z, _Z, _NX, _NY, _NY, _Z, _Z),
    face_joints=(11, 16, 5, 8),
    feet_left=(19, 20),
    feet_right=(14, 15),
    leg_bones=(17, 18),
    feet_threshold=0.05,
    fps=12.5,
    min_length=24,
)

LAYOUTS = {"humanml3d": HUMANML3D, "t2m": HUMANML3D, "kit": KIT}


def get_layout(layout: str | SkeletonLayout) -> SkeletonLayout:
    """Resolve ``"humanml3d"``/``"t2m"``/``"kit"`` (or pass a layout through)."""
    if isinstance(layout, SkeletonLayout):
        return layout
    try:
        return LAYOUTS[layout.lower()]
    except KeyError:
        raise ValueError(f"unknown motion layout {layout!r}; expected one of {sorted(LAYOUTS)}") from None


def feature_dim(num_joints: int) -> int:
    """``4 + 3(J-1) + 6(J-1) + 3J + 4 = 12J - 1`` (263 for 22 joints)."""
    return 12 * num_joints - 1


def num_joints_of(dim: int) -> int:
    """Inverse of :func:`feature_dim`; raises for a dimension no skeleton produces."""
    if (dim + 1) % 12 or dim < 23:
        raise ValueError(f"feature dimension {dim} is not 12*J-1 for a skeleton of J>=2 joints (HumanML3D: 263, KIT: 251)")
    return (dim + 1) // 12


def feature_slices(num_joints: int) -> dict[str, slice]:
    """Channel ranges of the feature vector by name (see the module docstring)."""
    sizes = {"root_rot_vel": 1, "root_lin_vel": 2, "root_height": 1, "ric": 3 * (num_joints - 1),
             "rot6d": 6 * (num_joints - 1), "local_vel": 3 * num_joints, "foot_contact": 4}
    slices, start = {}, 0
    for name, size in sizes.items():
        slices[name] = slice(start, start + size)
        start += size
    return slices


# ---------------------------------------------------------------------------------------------- features -> joints
def _rotate_y(v, angle):
    """Rotate vectors ``v[..., 3]`` by ``angle`` about +Y (right-handed); works for numpy arrays and tensors."""
    lib = torch if isinstance(v, torch.Tensor) else np
    c, s = lib.cos(angle), lib.sin(angle)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return lib.stack([x * c + z * s, y, z * c - x * s], -1)


def features_to_joints(features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Unnormalised features ``[..., T, 12J-1]`` -> joint positions ``[..., T, J, 3]`` (HumanML3D ``recover_from_ric``).

    Yaw: ``a_0 = 0``, ``a_t = 2 * sum_{s<t} f[s, 0]``. Root: ``xz_0 = 0``, ``xz_t = xz_{t-1} + R_t^{-1} v_{t-1}`` with
    ``v = f[:, 1:3]``, height ``f[:, 3]``. Joint j: ``R_t^{-1} ric_j + xz_t``. Differentiable for tensors; returns the
    input's type.
    """
    is_numpy = not isinstance(features, torch.Tensor)
    x = torch.as_tensor(features)
    if not x.is_floating_point():
        x = x.float()
    if x.ndim < 2:
        raise ValueError(f"features must be [..., T, D], got shape {tuple(x.shape)}")
    num_joints = num_joints_of(x.shape[-1])
    first = torch.zeros_like(x[..., :1, :3])  # frame 0: no yaw, root at the origin
    yaw = 2 * torch.cumsum(torch.cat([first[..., 0], x[..., :-1, 0]], -1), -1)  # a_t, [..., T]
    step = _pad_y(torch.cat([first[..., 1:], x[..., :-1, 1:3]], -2))
    root = torch.cumsum(_rotate_y(step, -yaw), -2)
    root = torch.cat([root[..., :1], x[..., 3:4], root[..., 2:]], -1)
    ric = x[..., 4 : 4 + 3 * (num_joints - 1)].unflatten(-1, (num_joints - 1, 3))
    body = _rotate_y(ric, -yaw.unsqueeze(-1)) + _pad_y(root[..., [0, 2]]).unsqueeze(-2)
    joints = torch.cat([root.unsqueeze(-2), body], -2)
    return joints.numpy() if is_numpy else joints


def _pad_y(xz: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` XZ -> ``[..., 3]`` with y = 0."""
    return torch.stack([xz[..., 0], torch.zeros_like(xz[..., 0]), xz[..., 1]], -1)


# ---------------------------------------------------------------------------------------------- joints -> features
def _as_joints(joints: np.ndarray | torch.Tensor, layout: SkeletonLayout, min_frames: int = 1) -> np.ndarray:
    j = joints.detach().cpu().numpy() if isinstance(joints, torch.Tensor) else np.asarray(joints)
    expected = (layout.num_joints, 3)
    if j.ndim != 3 or j.shape[1:] != expected or j.shape[0] < min_frames:
        raise ValueError(
            f"joints must be [T, {expected[0]}, 3] with T >= {min_frames} for the {layout.name} skeleton, got {j.shape}"
        )
    if not np.isfinite(j).all():
        raise ValueError("joints contain NaN or inf")
    return j.astype(np.float64)


def _facing_yaw(across: np.ndarray, smooth_sigma: float = 0.0) -> np.ndarray:
    """Yaw a with ``R_y(a) f = +Z`` for the facing ``f = up x across/|across|`` (``across`` points to the right).

    With ``smooth_sigma > 0`` the facing of ``across[T, 3]`` is Gaussian-smoothed over time first.
    """
    forward = np.cross(np.array([0.0, 1.0, 0.0]), across / np.linalg.norm(across, axis=-1, keepdims=True))
    if smooth_sigma > 0:
        forward = gaussian_filter1d(forward, smooth_sigma, axis=0, mode="nearest")
    return np.arctan2(-forward[..., 0], forward[..., 2])


def canonicalize(joints: np.ndarray | torch.Tensor, layout: str | SkeletonLayout = HUMANML3D) -> np.ndarray:
    """Floor at y=0 (lowest joint over the clip), frame-0 root at the XZ origin, frame 0 facing +Z.

    Frame 0's facing is ``up x [(r_hip - l_hip) + (r_shoulder - l_shoulder)]``, as in HumanML3D.
    """
    layout = get_layout(layout)
    j = _as_joints(joints, layout)
    j = j - np.array([0.0, j[..., 1].min(), 0.0])
    j = j - j[0, 0] * np.array([1.0, 0.0, 1.0])
    rh, lh, rs, ls = layout.face_joints
    yaw = _facing_yaw((j[0, rh] - j[0, lh]) + (j[0, rs] - j[0, ls]))
    return _rotate_y(j, yaw)


def retarget(
    joints: np.ndarray | torch.Tensor, reference: np.ndarray, layout: str | SkeletonLayout = HUMANML3D
) -> np.ndarray:
    """Put a motion on the skeleton of ``reference`` (one frame ``[J, 3]``): HumanML3D's ``uniform_skeleton``.

    Each bone keeps its direction and takes the reference bone's length; the root trajectory is scaled by the
    ratio of the leg lengths (the two ``layout.leg_bones``). This equals HumanML3D's inverse then forward
    kinematics with the target offsets, since that chain reproduces every bone direction exactly.
    """
    layout = get_layout(layout)
    j = _as_joints(joints, layout)
    ref = _as_joints(np.asarray(reference)[None], layout)[0]
    target, source = _bone_lengths(ref, layout), _bone_lengths(j[0], layout)
    out = np.empty_like(j)
    out[:, 0] = j[:, 0] * target[list(layout.leg_bones)].sum() / source[list(layout.leg_bones)].sum()
    for chain in layout.kinematic_chains:
        for parent, child in zip(chain[:-1], chain[1:]):
            direction = j[:, child] - j[:, parent]
            out[:, child] = out[:, parent] + direction / np.linalg.norm(direction, axis=-1, keepdims=True) * target[child]
    return out


def _bone_lengths(pose: np.ndarray, layout: SkeletonLayout) -> np.ndarray:
    """``|p_j - p_parent(j)|`` of one frame ``[J, 3]``, indexed by the child joint (0 for the root)."""
    parents = np.array(layout.parents)
    lengths = np.linalg.norm(pose - pose[np.maximum(parents, 0)], axis=-1)
    return np.where(parents < 0, 0.0, lengths)


def _between(u: np.ndarray, v: np.ndarray) -> Rotation:
    """Shortest-arc rotations taking unit vectors ``u[N, 3]`` to ``v[N, 3]`` (a half-turn for opposite vectors)."""
    axis = np.cross(u, v)
    sin, cos = np.linalg.norm(axis, axis=-1), (u * v).sum(-1)
    degenerate = sin < 1e-12
    if degenerate.any():  # parallel or opposite: any axis perpendicular to u
        helper = np.where(np.abs(u[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        perpendicular = np.cross(u, helper)
        axis = np.where(degenerate[:, None], perpendicular / np.linalg.norm(perpendicular, axis=-1, keepdims=True), axis)
        sin = np.where(degenerate, 1.0, sin)
    angle = np.arctan2(np.where(degenerate, 0.0, sin), cos)
    return Rotation.from_rotvec(axis / sin[:, None] * angle[:, None])


def local_rotations_6d(joints: np.ndarray, root_yaw: np.ndarray, layout: SkeletonLayout) -> np.ndarray:
    """Continuous 6D rotations ``[T, J-1, 6]`` (Zhou et al. 2019) of the non-root joints, HumanML3D's IK.

    Along each kinematic chain, starting from the root rotation ``R_y(root_yaw)`` (also for the arm chains that
    start at the spine), joint j's local rotation is ``G_parent^{-1} between(rest_dir_j, p_j - p_parent)`` and
    ``G_j = G_parent L_j``. The 6D vector is the first then second column of ``L_j``.
    """
    frames = len(joints)
    root = Rotation.from_rotvec(np.outer(root_yaw, [0.0, 1.0, 0.0]))
    rest = np.asarray(layout.rest_directions, dtype=np.float64)
    local = np.zeros((frames, layout.num_joints, 3, 3))
    for chain in layout.kinematic_chains:
        parent_global = root
        for parent, child in zip(chain[:-1], chain[1:]):
            bone = joints[:, child] - joints[:, parent]
            target = _between(np.repeat(rest[None, child], frames, 0), bone / np.linalg.norm(bone, axis=-1, keepdims=True))
            rotation = parent_global.inv() * target
            local[:, child] = rotation.as_matrix()
            parent_global = parent_global * rotation
    return np.concatenate([local[:, 1:, :, 0], local[:, 1:, :, 1]], -1)


def joints_to_features(
    joints: np.ndarray | torch.Tensor,
    layout: str | SkeletonLayout = HUMANML3D,
    *,
    reference: np.ndarray | None = None,
    feet_threshold: float | None = None,
    smooth_sigma: float = 20.0,
) -> np.ndarray:
    """Joint positions ``[T, J, 3]`` (Y up, metres) -> HumanML3D features ``[T-1, 12J-1]`` (float32).

    Steps: optional :func:`retarget` onto ``reference``; :func:`canonicalize`; per-frame facing from
    ``up x [(l_hip - r_hip) + (r_shoulder - l_shoulder)]`` (HumanML3D's inverse-kinematics convention), smoothed
    over time with a Gaussian of ``smooth_sigma`` frames, turned into the yaw ``a_t`` with ``a_0 = 0``; then the
    channels of the module docstring. ``features_to_joints`` of the result gives back the canonicalised joints
    of frames ``0..T-2``.
    """
    layout = get_layout(layout)
    j = _as_joints(joints, layout, min_frames=2)
    if reference is not None:
        j = retarget(j, reference, layout)
    j = canonicalize(j, layout)
    rh, lh, rs, ls = layout.face_joints
    yaw = _facing_yaw((j[:, lh] - j[:, rh]) + (j[:, rs] - j[:, ls]), smooth_sigma)
    yaw[0] = 0.0
    turn = np.angle(np.exp(1j * np.diff(yaw)))  # shortest arc in (-pi, pi]

    root_xz = j[:, 0] * np.array([1.0, 0.0, 1.0])
    root_vel = _rotate_y(j[1:, 0] - j[:-1, 0], yaw[1:])[:, [0, 2]]
    ric = _rotate_y(j[:, 1:] - root_xz[:, None], yaw[:, None])
    rot6d = local_rotations_6d(j, yaw, layout)
    local_vel = _rotate_y(j[1:] - j[:-1], yaw[:-1, None])
    threshold = layout.feet_threshold if feet_threshold is None else feet_threshold
    speed2 = ((j[1:] - j[:-1]) ** 2).sum(-1)
    contacts = speed2[:, list(layout.feet_left) + list(layout.feet_right)] < threshold
    frames = len(j) - 1
    features = np.concatenate(
        [
            turn[:, None] / 2,
            root_vel,
            j[:-1, 0, 1:2],
            ric[:-1].reshape(frames, -1),
            rot6d[:-1].reshape(frames, -1),
            local_vel.reshape(frames, -1),
            contacts.astype(np.float64),
        ],
        -1,
    )
    return features.astype(np.float32)
