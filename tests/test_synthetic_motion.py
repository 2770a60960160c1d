"""The procedural motion set: exact HumanML3D round trip, each family's defining property measured from the joints,
sensible foot contacts, rigid bones, captions that match the drawn variation, and the written folder."""

import json

import numpy as np
import pytest

from genalign.data.humanml3d import HumanML3DDataset, read_captions
from genalign.data.motion_repr import HUMANML3D, canonicalize, feature_slices, features_to_joints
from genalign.data.synthetic_motion import (
    FAMILIES,
    MAX_FRAMES,
    MIN_FRAMES,
    REST_OFFSETS,
    ensure_dataset,
    family_of,
    generate,
    generate_motion,
    mirror,
    read_labels,
    tokenize,
    write_dataset,
)

N_PER_FAMILY = 3
PARENTS = HUMANML3D.parents
L_HIP, R_HIP, L_SHOULDER, R_SHOULDER, HEAD, NECK = 1, 2, 16, 17, 15, 12
ANKLE_TOE = {"left": (7, 10), "right": (8, 11)}
KNEE = {"left": 4, "right": 5}
WRIST = {"left": 20, "right": 21}


@pytest.fixture(scope="module")
def motions():
    """family -> list of (motion, canonical joints [T+1, 22, 3], features [T, 263])."""
    out = {}
    for m in generate(N_PER_FAMILY, seed=0):
        out.setdefault(m.family, []).append((m, canonicalize(m.joints), m.features()))
    return out


def facing(joints):
    """Per-frame unit facing (XZ) from hips and shoulders: up x (right - left)."""
    across = (joints[:, R_HIP] - joints[:, L_HIP]) + (joints[:, R_SHOULDER] - joints[:, L_SHOULDER])
    forward = np.stack([across[:, 2], -across[:, 0]], -1)  # (x, z) of (0, 1, 0) x across
    return forward / np.linalg.norm(forward, axis=-1, keepdims=True)


def heading_change_deg(joints):
    """Integrated change of the facing angle about +Y (counter-clockwise seen from above = to the left)."""
    f = facing(joints)
    angle = np.unwrap(np.arctan2(f[:, 0], f[:, 1]))
    return np.degrees(angle[-1] - angle[0])


def left_of(joints):
    """Unit XZ vector to the body's left in frame 0 (facing rotated by +90 degrees about +Y)."""
    f = facing(joints)[0]
    return np.array([f[1], -f[0]])


def travel_turn_deg(joints, window=10):
    """Integrated change of the direction of travel (root displacement over ``window`` frames), degrees."""
    step = root_xz(joints)[window:] - root_xz(joints)[:-window]
    angle = np.unwrap(np.arctan2(step[:, 0], step[:, 1]))
    return np.degrees(angle[-1] - angle[0])


def root_xz(joints):
    return joints[:, 0, [0, 2]]


def test_every_family_present_with_lengths_in_range(motions):
    assert set(motions) == set(FAMILIES) and len(FAMILIES) >= 8
    for family, items in motions.items():
        for motion, joints, features in items:
            assert features.shape == (len(joints) - 1, 263) and features.dtype == np.float32
            assert MIN_FRAMES <= len(features) <= MAX_FRAMES, (family, len(features))
            assert joints.shape[1:] == (22, 3) and np.isfinite(features).all()


def test_features_reproduce_the_canonical_joints(motions):
    for items in motions.values():
        for motion, joints, features in items:
            assert np.abs(features_to_joints(features) - joints[:-1]).max() <= 1e-4, motion.id


def test_canonical_frame_floor_origin_and_facing(motions):
    for items in motions.values():
        for _, joints, _ in items:
            assert abs(joints[..., 1].min()) < 1e-9  # floor at y=0
            np.testing.assert_allclose(joints[0, 0, [0, 2]], 0, atol=1e-9)
            np.testing.assert_allclose(facing(joints[:1])[0], [0, 1], atol=1e-6)  # faces +Z


def test_bone_lengths_constant_and_equal_to_the_rest_skeleton(motions):
    rest = np.linalg.norm(REST_OFFSETS[1:], axis=-1)
    for items in motions.values():
        for motion, joints, _ in items:
            bones = np.linalg.norm(joints[:, 1:] - joints[:, PARENTS[1:]], axis=-1)  # [T, 21]
            assert np.abs(bones - rest).max() < 1e-9, motion.id


def test_feet_on_the_floor_and_nothing_below_it(motions):
    feet = [7, 10, 8, 11]
    for family, items in motions.items():
        for motion, joints, _ in items:
            lowest = joints[:, feet, 1].min(1)
            if family != "jump":  # every other family keeps a foot on the floor in every frame
                assert lowest.max() < 1e-6, motion.id
            assert joints[..., 1].min() >= -1e-9


def test_walks_move_along_or_against_the_facing(motions):
    for family, sign in (("walk_forward", 1), ("walk_backward", -1)):
        for motion, joints, _ in motions[family]:
            along = (root_xz(joints)[-1] - root_xz(joints)[0]) @ facing(joints)[0]
            seconds = (len(joints) - 1) / 20
            assert sign * along > 0.3 * seconds, (motion.id, along, seconds)  # > 0.3 m/s in the right direction
            assert abs(heading_change_deg(joints)) < 60, motion.id


def test_turns_have_the_named_sign_of_integrated_yaw(motions):
    for family, sign in (("turn_left", 1), ("turn_right", -1)):
        for motion, joints, _ in motions[family]:
            change = heading_change_deg(joints)
            assert sign * change > 60, (motion.id, change)
            assert abs(change - sign * motion.params["angle_deg"]) < 25, (motion.id, change, motion.params)
            # the path bends the same way: the direction of travel turns by about the same angle
            assert abs(travel_turn_deg(joints) - change) < 30, (motion.id, travel_turn_deg(joints), change)


def test_run_is_faster_than_any_walk(motions):
    def speed(joints):
        return np.linalg.norm(np.diff(root_xz(joints), axis=0), axis=1).mean() * 20

    walks = [speed(j) for f in ("walk_forward", "walk_backward") for _, j, _ in motions[f]]
    runs = [speed(j) for _, j, _ in motions["run"]]
    assert min(runs) > 1.5 and min(runs) > max(walks)


def test_sidestep_moves_to_the_named_side(motions):
    for motion, joints, _ in motions["sidestep"]:
        lateral = (root_xz(joints)[-1] - root_xz(joints)[0]) @ left_of(joints)
        along = (root_xz(joints)[-1] - root_xz(joints)[0]) @ facing(joints)[0]
        sign = 1 if motion.params["side"] == "left" else -1
        assert sign * lateral > 0.2 and abs(along) < 0.5 * abs(lateral), (motion.id, lateral, along)


def test_jump_apex_is_high_with_both_feet_off_the_floor(motions):
    for motion, joints, _ in motions["jump"]:
        rest = joints[0, 0, 1]
        apex = int(np.argmax(joints[:, 0, 1]))
        assert joints[apex, 0, 1] - rest > 0.12, motion.id
        assert joints[apex, [7, 10, 8, 11], 1].min() > 0.05, motion.id
        airborne = joints[:, [7, 10, 8, 11], 1].min(1) > 0.02
        takeoffs = np.count_nonzero(np.diff(airborne.astype(int)) == 1)
        assert takeoffs == motion.params["count"], motion.id


def test_squat_lowers_the_root(motions):
    for motion, joints, _ in motions["squat"]:
        rest = joints[0, 0, 1]
        assert joints[:, 0, 1].min() < rest - 0.2, motion.id
        assert abs(joints[-1, 0, 1] - rest) < 0.05  # stands back up
        # the number of descents below half depth is the count the captions name
        low = joints[:, 0, 1] < rest - 0.1
        assert np.count_nonzero(np.diff(low.astype(int)) == 1) == motion.params["count"], motion.id


def test_wave_raises_and_oscillates_only_the_named_wrist(motions):
    for family, side, other in (("wave_left", "left", "right"), ("wave_right", "right", "left")):
        for motion, joints, _ in motions[family]:
            wrist, still = joints[:, WRIST[side]], joints[:, WRIST[other]]
            above = wrist[:, 1] > joints[:, HEAD, 1]
            assert above.mean() > 0.2, motion.id
            assert not (still[:, 1] > joints[:, HEAD, 1]).any(), motion.id
            assert still[:, 1].max() < joints[:, R_SHOULDER if other == "right" else L_SHOULDER, 1].min()
            # oscillation: the wrist's sideways position relative to the neck reverses direction several times
            lateral = (wrist[above] - joints[above, NECK])[:, [0, 2]] @ left_of(joints)
            reversals = np.count_nonzero(np.diff(np.sign(np.diff(lateral))) != 0)
            assert reversals >= 2, (motion.id, reversals)


def test_kick_lifts_the_named_foot_above_the_standing_knee(motions):
    sides = set()
    for motion, joints, _ in motions["kick"]:
        side = motion.params["side"]
        stand = "right" if side == "left" else "left"
        sides.add(side)
        foot = joints[:, list(ANKLE_TOE[side]), 1].max(1)
        assert (foot > joints[:, KNEE[stand], 1]).any(), motion.id
        assert joints[:, list(ANKLE_TOE[stand]), 1].min(1).max() < 0.01  # the standing foot stays down
        assert joints[:, list(ANKLE_TOE[stand]), 1].max() < joints[:, KNEE[side], 1].min()
    more = [generate_motion("kick", np.random.default_rng([9, i])).params["side"] for i in range(8)]
    assert sides | set(more) == {"left", "right"}  # both legs occur


def test_walking_foot_contacts_alternate_without_sliding(motions):
    contact = feature_slices(22)["foot_contact"]
    for family in ("walk_forward", "walk_backward", "turn_left"):
        for motion, joints, features in motions[family]:
            c = features[:, contact] > 0.5  # left ankle, left toe, right ankle, right toe
            left, right = c[:, :2].any(1), c[:, 2:].any(1)
            assert (left | right).all(), motion.id  # walking never leaves the ground
            for foot in (left, right):
                assert 0.3 < foot.mean() < 0.9, (motion.id, foot.mean())
                assert np.count_nonzero(np.diff(foot.astype(int)) == 1) >= 1  # it lifts off and lands again
            # the lowest foot joint is planted: it moves < 5 mm horizontally between frames while it stays lowest
            feet = joints[:, [7, 10, 8, 11]]
            lowest = feet[..., 1].argmin(1)
            keep = lowest[1:] == lowest[:-1]
            idx = np.flatnonzero(keep)
            slide = np.linalg.norm(feet[idx + 1, lowest[idx]][:, [0, 2]] - feet[idx, lowest[idx]][:, [0, 2]], axis=-1)
            assert slide.max() < 0.005, (motion.id, slide.max())


SPEED_WORDS = {"slow": ("slowly", "slow pace"), "fast": ("quickly", "fast pace")}


def test_captions_name_the_drawn_variation(motions):
    for family, items in motions.items():
        for motion, _, _ in items:
            assert len(set(motion.captions)) == 3
            for caption in motion.captions:
                label = motion.params.get("speed_label")
                for speed, words in SPEED_WORDS.items():
                    assert any(w in caption for w in words) == (label == speed), (caption, motion.params)
                if "side" in motion.params:
                    other = "right" if motion.params["side"] == "left" else "left"
                    assert motion.params["side"] in caption and other not in caption, caption
                count = int(motion.params.get("count", 1))
                assert ("twice" in caption) == (count == 2) and ("three times" in caption) == (count == 3), caption
    assert "left" in motions["turn_left"][0][0].captions[0] and "right" in motions["turn_right"][0][0].captions[0]


def test_tokens_are_lemma_pos_and_unknown_words_are_named():
    assert tokenize("a man waves his left hand above his head") == [
        "a/DET", "man/NOUN", "wave/VERB", "his/DET", "left/ADJ", "hand/NOUN", "above/ADP", "his/DET", "head/NOUN"]
    assert tokenize("someone sidesteps to the right quickly")[-2:] == ["right/NOUN", "quickly/ADV"]
    with pytest.raises(ValueError, match="cartwheels"):
        tokenize("a person cartwheels")


def test_generation_is_deterministic_and_per_motion_seeded():
    a, b = generate(2, seed=4, families=["squat"]), generate(2, seed=4, families=["squat"])
    assert all(np.array_equal(x.joints, y.joints) and x.captions == y.captions for x, y in zip(a, b))
    first = generate(1, seed=4, families=["squat"])[0]
    assert np.array_equal(first.joints, a[0].joints)  # motion 0 does not depend on how many are drawn
    assert not np.array_equal(generate(1, seed=5, families=["squat"])[0].joints[:40], first.joints[:40])
    with pytest.raises(ValueError, match="backflip"):
        generate(1, families=["backflip"])


def test_mirror_swaps_sides_and_is_an_involution(motions):
    motion, joints, _ = motions["wave_left"][0]
    mirrored = mirror(joints)
    np.testing.assert_array_equal(mirror(mirrored), joints)
    assert mirrored[:, WRIST["right"], 1].max() > mirrored[:, HEAD, 1].max()
    np.testing.assert_allclose(mirrored[:, 21, 0], -joints[:, 20, 0])


def test_family_of_ids():
    assert family_of("walk_backward_012") == "walk_backward" and family_of("wave_left_000") == "wave_left"
    for bad in ("moonwalk_001", "squat", "squat_x1"):
        with pytest.raises(ValueError, match="family"):
            family_of(bad)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-motion")
    families = ["walk_forward", "jump", "wave_right"]
    splits = write_dataset(root, n_per_family=5, seed=1, families=families)
    return root, splits, families


def test_written_folder_reads_as_humanml3d(written):
    root, splits, families = written
    ids = {s: (root / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in ids.items()} == {"train": 9, "val": 3, "test": 3}  # 5 per family: 3/1/1
    assert ids == splits
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["train"]) & set(ids["test"])
    assert not set(ids["val"]) & set(ids["test"])
    assert sorted(sum(ids.values(), [])) == sorted((root / "all.txt").read_text().split())
    for split, split_ids in ids.items():
        ds = HumanML3DDataset(root, split, random_crop=False)
        assert len(ds) == len(split_ids) and not ds.dropped  # one whole-clip entry per motion, none dropped
        assert sorted(c.id for c in ds.clips) == sorted(split_ids)
        assert {family_of(i) for i in split_ids} == set(families)  # every family in every split
    item = HumanML3DDataset(root, "train", random_crop=False)[0]
    assert item["motion"].shape == (196, 263) and item["caption"] in read_captions(root / "texts" / f"{item['id']}.txt")[0].text


def test_written_statistics_joints_texts_and_labels(written):
    root, splits, families = written
    train = np.concatenate([np.load(root / "new_joint_vecs" / f"{i}.npy") for i in splits["train"]]).astype(np.float64)
    np.testing.assert_allclose(np.load(root / "Mean.npy"), train.mean(0), rtol=1e-5, atol=1e-6)
    std = np.load(root / "Std.npy")
    np.testing.assert_allclose(std, np.maximum(train.std(0), 1e-3), rtol=1e-4, atol=1e-7)
    assert std.min() >= 1e-3 - 1e-9
    labels = read_labels(root)
    stored = json.loads((root / "labels.json").read_text())
    assert stored["seed"] == 1 and stored["families"] == families
    for motion_id, family in labels.items():
        assert family == family_of(motion_id)
        features = np.load(root / "new_joint_vecs" / f"{motion_id}.npy")
        joints = np.load(root / "new_joints" / f"{motion_id}.npy")
        assert joints.shape == (len(features), 22, 3) and stored["motions"][motion_id]["frames"] == len(features)
        np.testing.assert_allclose(joints, features_to_joints(features), atol=1e-5)
        captions = read_captions(root / "texts" / f"{motion_id}.txt")
        assert len(captions) == 3 and all(c.whole for c in captions)
        assert all(list(c.tokens) == tokenize(c.text) for c in captions)
    # same seed, same files
    again = generate(1, seed=1, families=["jump"])[0]
    np.testing.assert_array_equal(np.load(root / "new_joint_vecs" / "jump_000.npy"), again.features())


def test_ensure_dataset_writes_once_and_rewrites_on_new_settings(tmp_path):
    ensure_dataset(tmp_path, n_per_family=3, seed=2, families=["squat"])
    features = tmp_path / "new_joint_vecs" / "squat_000.npy"
    first = features.read_bytes()
    features.write_bytes(b"sentinel")  # an unchanged request must not touch the folder
    ensure_dataset(tmp_path, n_per_family=3, seed=2, families=["squat"])
    assert features.read_bytes() == b"sentinel"
    ensure_dataset(tmp_path, n_per_family=3, seed=3, families=["squat"])  # a new seed regenerates
    assert features.read_bytes() not in (b"sentinel", first)
    assert json.loads((tmp_path / "labels.json").read_text())["seed"] == 3
