"""HumanML3D feature <-> joint conversions against the real public files in tests/fixtures/humanml3d."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from genalign.data.motion_repr import (
    HUMANML3D,
    KIT,
    canonicalize,
    feature_slices,
    features_to_joints,
    joints_to_features,
    retarget,
)

FIXTURES = Path(__file__).parent / "fixtures" / "humanml3d"


@pytest.fixture(scope="module")
def features():
    return np.load(FIXTURES / "new_joint_vecs_012314.npy")  # [170, 263]


@pytest.fixture(scope="module")
def joints():
    return np.load(FIXTURES / "new_joints_012314.npy")  # [170, 22, 3]


def yaw_matrix(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def synthetic_motion(pose, frames=90, turns=2.0):
    """A pose spinning ``turns`` times (its facing crosses -Z) while walking a curve, off the origin and floor."""
    t = np.arange(frames)
    yaw = np.linspace(0, 2 * np.pi * turns, frames) + 0.7
    moving = np.repeat(pose[None] - pose[0] * [1, 0, 1], frames, 0)
    moving[:, -1] += 0.1 * np.sin(t / 5)[:, None] * [0, 1, 0]  # wave the last joint
    rotated = np.einsum("tij,tkj->tki", np.stack([yaw_matrix(a) for a in yaw]), moving)
    return rotated + np.stack([np.cos(t / 20) + 3, 0.3 + 0 * t, 2 * np.sin(t / 20) - 1], -1)[:, None]


def test_features_to_joints_reproduces_the_joints_file(features, joints):
    # new_joints/012314.npy is the recovery of new_joint_vecs/012314.npy: same 170 frames, frame i <-> frame i.
    assert features.shape == (170, 263) and joints.shape == (170, 22, 3)
    recovered = features_to_joints(features)
    assert isinstance(recovered, np.ndarray) and recovered.shape == (170, 22, 3)
    assert np.abs(recovered - joints).max() < 1e-4


def test_features_to_joints_batched_torch_and_differentiable(features, joints):
    x = torch.from_numpy(features).double().repeat(2, 1, 1).requires_grad_(True)
    recovered = features_to_joints(x)
    assert recovered.shape == (2, 170, 22, 3)
    assert torch.allclose(recovered[1], torch.from_numpy(joints).double(), atol=1e-4)
    recovered[..., 0, 1].sum().backward()  # root height is channel 3, one to one
    expected = torch.zeros_like(x)
    expected[..., 3] = 1
    assert torch.equal(x.grad, expected)


def test_joints_to_features_matches_humanml3d_processing(features, joints):
    # HumanML3D made the 170 feature frames from 171 joint frames; the joints file holds the first 170. The
    # facing is Gaussian-smoothed (sigma 20, radius 80 frames), so feature frames 0..88 never see the missing
    # last frame and must agree in every channel; the root height and foot contacts agree in all 169 frames.
    ours = joints_to_features(joints)
    assert ours.shape == (169, 263) and ours.dtype == np.float32
    assert np.abs(ours[:89] - features[:89]).max() < 1e-4
    parts = feature_slices(22)
    for name in ("root_height", "foot_contact"):
        np.testing.assert_array_equal(ours[:, parts[name]], features[:169, parts[name]])


def test_round_trip_on_fixture_and_synthetic_motion(joints):
    for motion in (joints, synthetic_motion(joints[0].astype(np.float64))):
        canonical = canonicalize(motion)
        assert abs(canonical[..., 1].min()) < 1e-12 and np.abs(canonical[0, 0, [0, 2]]).max() < 1e-12
        across = (canonical[0, 2] - canonical[0, 1]) + (canonical[0, 17] - canonical[0, 16])  # right minus left
        assert across[0] < 0 and abs(across[2]) < 1e-9  # body's right is -X: facing +Z
        recovered = features_to_joints(joints_to_features(motion))
        assert np.abs(recovered - canonical[:-1]).max() < 1e-4


def test_rot6d_composes_to_the_bone_directions(joints):
    # Rebuild each local rotation from its 6D (Gram-Schmidt), compose along the chains from the root yaw and
    # rotate the rest direction: it must point along the bone, in the canonical frame.
    motion = synthetic_motion(joints[0].astype(np.float64), frames=40, turns=0.5)
    feats = joints_to_features(motion).astype(np.float64)
    canonical = canonicalize(motion)[:-1]
    yaw = 2 * np.concatenate([[0.0], np.cumsum(feats[:-1, 0])])
    six = feats[:, feature_slices(22)["rot6d"]].reshape(len(feats), 21, 6)
    a, b = six[..., :3], six[..., 3:]
    c1 = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b - (c1 * b).sum(-1, keepdims=True) * c1
    c2 = b / np.linalg.norm(b, axis=-1, keepdims=True)
    local = np.stack([c1, c2, np.cross(c1, c2)], -1)  # columns
    rest = np.asarray(HUMANML3D.rest_directions, dtype=np.float64)
    for t in (0, 17, 38):
        for chain in HUMANML3D.kinematic_chains:
            world = Rotation.from_matrix(yaw_matrix(yaw[t]))
            for parent, child in zip(chain[:-1], chain[1:]):
                world = world * Rotation.from_matrix(local[t, child - 1])
                bone = canonical[t, child] - canonical[t, parent]
                np.testing.assert_allclose(world.apply(rest[child]), bone / np.linalg.norm(bone), atol=1e-5)


def test_retarget_onto_the_reference_skeleton(joints):
    motion = joints.astype(np.float64)
    bigger = motion * 1.1 + [0.5, 0.2, -1.0]
    moved = retarget(bigger, motion[0])
    parents = HUMANML3D.parents
    lengths = lambda x: np.linalg.norm(x[:, 1:] - x[:, parents[1:]], axis=-1)  # noqa: E731
    np.testing.assert_allclose(lengths(moved), np.broadcast_to(lengths(motion[:1]), (170, 21)), atol=1e-6)
    np.testing.assert_allclose(moved[:, 0], bigger[:, 0] / 1.1, atol=1e-6)  # leg-length ratio scales the root
    np.testing.assert_allclose(joints_to_features(bigger, reference=motion[0]), joints_to_features(motion), atol=1e-4)


def test_kit_layout_round_trip():
    rest = np.asarray(KIT.rest_directions, dtype=np.float64)
    lengths = np.linspace(0.1, 0.3, KIT.num_joints)  # unequal: shoulders and hips do not cancel in the facing
    pose = np.zeros((KIT.num_joints, 3))
    for chain in KIT.kinematic_chains:
        for parent, child in zip(chain[:-1], chain[1:]):
            pose[child] = pose[parent] + rest[child] * lengths[child]
    motion = synthetic_motion(pose, frames=50, turns=1.0)
    feats = joints_to_features(motion, "kit")
    assert feats.shape == (49, 251)
    assert np.abs(features_to_joints(feats) - canonicalize(motion, "kit")[:-1]).max() < 1e-4


def test_layout_of_the_feature_vector():
    parts = feature_slices(22)
    assert parts["rot6d"] == slice(67, 193) and parts["local_vel"] == slice(193, 259)
    assert parts["foot_contact"] == slice(259, 263) and HUMANML3D.feature_dim == 263 and KIT.feature_dim == 251


def test_bad_shapes_raise_clear_errors(joints):
    with pytest.raises(ValueError, match="263"):
        features_to_joints(np.zeros((10, 100)))
    with pytest.raises(ValueError, match=r"\[T, 22, 3\]"):
        joints_to_features(joints[:, :21])
    with pytest.raises(ValueError, match="NaN"):
        joints_to_features(np.full((5, 22, 3), np.nan))
    with pytest.raises(ValueError, match="unknown motion layout"):
        joints_to_features(joints, "smplx")
