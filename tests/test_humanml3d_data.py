"""HumanML3D / KIT-ML reader: folder layout, protocol length rules, normalisation, padding and clear errors."""

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from genalign.data.humanml3d import HumanML3DDataset, collate_motions, read_captions

FIXTURES = Path(__file__).parent / "fixtures" / "humanml3d"
WALK = "a person walks forward#a/DET person/NOUN walk/VERB forward/ADV#0.0#0.0"
JUMP = "someone jumps#someone/PRON jump/VERB#0.0#0.0"


def make_root(root: Path, motions: dict, captions: dict, split=None, dim=263, seed=0) -> dict:
    """Write a HumanML3D-style folder; returns the raw features by id."""
    rng = np.random.default_rng(seed)
    (root / "new_joint_vecs").mkdir(parents=True)
    (root / "texts").mkdir()
    raw = {}
    for motion_id, frames in motions.items():
        raw[motion_id] = rng.normal(size=(frames, dim)).astype(np.float32)
        np.save(root / "new_joint_vecs" / f"{motion_id}.npy", raw[motion_id])
        (root / "texts" / f"{motion_id}.txt").write_text("\n".join(captions[motion_id]) + "\n")
    np.save(root / "Mean.npy", rng.normal(size=dim).astype(np.float32))
    np.save(root / "Std.npy", rng.uniform(0.5, 2.0, size=dim).astype(np.float32))
    (root / "test.txt").write_text("\n".join(split or motions) + "\n")
    return raw


@pytest.fixture()
def folder(tmp_path):
    motions = {"000001": 100, "000002": 30, "000003": 250, "000004": 199, "M000005": 120}
    captions = {
        "000001": [WALK, JUMP, "he waves#he/PRON wave/VERB#1.0#3.5", "a step#a/DET step/NOUN#0.5#1.5"],
        "000002": [WALK],  # 30 frames: too short
        "000003": [WALK, "turns#turn/VERB#1.0#4.0"],  # 250 frames: too long, its sub-clip goes with it
        "000004": [JUMP],
        "M000005": ["sits down#sit/VERB down/ADV#1.0#nan", "stands#stand/VERB#0.5#3.0"],  # sub-clips only
    }
    return tmp_path, make_root(tmp_path, motions, captions)


def normalised(root, x):
    return (x - np.load(root / "Mean.npy")) / np.load(root / "Std.npy")


def test_length_rules_keep_and_count(folder, caplog):
    root, _ = folder
    with caplog.at_level(logging.WARNING):
        ds = HumanML3DDataset(root, "test", random_crop=False)
    spans = [(c.id, c.start, c.end) for c in ds.clips]
    # 000001 whole + its 1.0-3.5 s sub-clip (frames 20-70); 0.5-1.5 s is 20 frames (< 40); M000005: the NaN end
    # reads as 0 so 1.0#nan is frames 20:0 (empty), 0.5-3.0 s is frames 10-60.
    assert spans == [("000001", 0, 100), ("000001", 20, 70), ("000004", 0, 199), ("M000005", 10, 60)]
    assert ds.dropped == Counter(clip_too_short=2, motion_too_short=1, motion_too_long=1)
    assert "kept 4 clips" in caplog.text and "motion_too_long" in caplog.text
    assert [c.text for c in ds.clips[0].captions] == ["a person walks forward", "someone jumps"]


def test_items_are_normalised_cropped_and_padded(folder):
    root, raw = folder
    ds = HumanML3DDataset(root, "test", random_crop=False)
    item = ds[0]
    assert item["motion"].shape == (196, 263) and item["motion"].dtype == torch.float32
    assert item["length"] == 100 and item["id"] == "000001" and item["clip"] == (0, 100)
    assert item["caption"] == "a person walks forward" and item["tokens"] == ["a/DET", "person/NOUN", "walk/VERB", "forward/ADV"]
    np.testing.assert_allclose(item["motion"][:100].numpy(), normalised(root, raw["000001"]), rtol=1e-5, atol=1e-5)
    assert not item["motion"][100:].any()
    sub = ds[1]  # frames 20-70: 50 frames crop to 48
    assert sub["length"] == 48 and sub["clip"] == (20, 68) and sub["caption"] == "he waves"
    np.testing.assert_allclose(sub["motion"][:48].numpy(), normalised(root, raw["000001"][20:68]), rtol=1e-5, atol=1e-5)
    assert ds[2]["length"] == 196  # 199 frames -> 49 units
    np.testing.assert_allclose(ds.denormalize(ds.normalize(raw["000004"])), raw["000004"], rtol=1e-5, atol=1e-5)


def test_random_crop_follows_the_protocol(folder):
    root, raw = folder
    ds = HumanML3DDataset(root, "test")
    torch.manual_seed(0)
    draws = [ds[0] for _ in range(600)]
    lengths = Counter(d["length"] for d in draws)
    assert set(lengths) == {96, 100} and abs(lengths[96] / 600 - 1 / 3) < 0.06  # one unit shorter w.p. 1/3
    assert abs(Counter(d["caption"] for d in draws)["someone jumps"] / 600 - 0.5) < 0.07
    offsets = Counter(d["clip"][0] for d in draws if d["length"] == 96)
    assert set(offsets) <= set(range(5)) and len(offsets) == 5  # every offset of a 96-frame window in 100 frames
    d = next(d for d in draws if d["clip"][0] == 3)
    np.testing.assert_allclose(d["motion"][:96].numpy(), normalised(root, raw["000001"][3:99]), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    assert [ds[0]["clip"] for _ in range(20)] == [d["clip"] for d in draws[:20]]  # repeatable


def test_collate_and_dataloader(folder):
    root, _ = folder
    loader = DataLoader(HumanML3DDataset(root, "test", random_crop=False), batch_size=4, collate_fn=collate_motions)
    batch = next(iter(loader))
    assert batch["motion"].shape == (4, 196, 263)
    assert batch["length"].tolist() == [100, 48, 196, 48] and batch["length"].dtype == torch.long
    assert batch["id"] == ["000001", "000001", "000004", "M000005"] and len(batch["tokens"][1]) == 2


def test_kit_layout(tmp_path):
    raw = make_root(tmp_path, {"00001": 30, "00002": 20}, {"00001": [WALK], "00002": [WALK]}, dim=251)
    ds = HumanML3DDataset(tmp_path, "test", layout="kit", random_crop=False)  # KIT keeps 24 <= T < 200
    assert [c.id for c in ds.clips] == ["00001"] and ds.dropped == Counter(motion_too_short=1)
    item = ds[0]
    assert item["motion"].shape == (196, 251) and item["length"] == 28
    np.testing.assert_allclose(item["motion"][:28].numpy(), normalised(tmp_path, raw["00001"][:28]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"Mean\.npy: expected the feature mean of shape \(263,\)"):
        HumanML3DDataset(tmp_path, "test")  # a KIT-ML folder read as HumanML3D
    with pytest.raises(ValueError, match=r"00001\.npy: expected features of shape \[T, 263\]"):
        HumanML3DDataset(tmp_path, "test", mean=np.zeros(263), std=np.ones(263))


def test_real_motion_and_statistics(tmp_path):
    for name in ("new_joint_vecs", "texts"):
        (tmp_path / name).mkdir()
    shutil.copy(FIXTURES / "new_joint_vecs_012314.npy", tmp_path / "new_joint_vecs" / "012314.npy")
    shutil.copy(FIXTURES / "Mean.npy", tmp_path)
    shutil.copy(FIXTURES / "Std.npy", tmp_path)
    (tmp_path / "texts" / "012314.txt").write_text(WALK + "\n")
    (tmp_path / "val.txt").write_text("012314\n")
    ds = HumanML3DDataset(tmp_path, "val", random_crop=False)
    item = ds[0]
    assert item["length"] == 168 and not ds.dropped  # 170 frames -> 42 units
    features = np.load(FIXTURES / "new_joint_vecs_012314.npy")
    np.testing.assert_allclose(ds.denormalize(item["motion"][:168]).numpy(), features[:168], atol=1e-5)


def test_errors_name_the_path(folder, tmp_path_factory):
    root, _ = folder
    with pytest.raises(FileNotFoundError, match="new_joint_vecs/, texts/"):
        HumanML3DDataset(root / "nowhere", "test")
    with pytest.raises(FileNotFoundError, match=r"train\.txt not found.*test\.txt"):
        HumanML3DDataset(root, "train")
    (root / "test.txt").write_text("000001\n000009\n")
    with pytest.raises(FileNotFoundError, match=r"000009\.npy not found: expected the features of motion '000009'"):
        HumanML3DDataset(root, "test")
    (root / "test.txt").write_text("000001\n")
    (root / "texts" / "000001.txt").write_text(WALK + "\nbroken line#no/DET\n")
    with pytest.raises(ValueError, match=r"000001\.txt:2: expected 'caption#word/POS"):
        HumanML3DDataset(root, "test")
    np.save(root / "Std.npy", np.zeros(263, np.float32))
    (root / "texts" / "000001.txt").write_text(WALK + "\n")
    with pytest.raises(ValueError, match="non-positive"):
        HumanML3DDataset(root, "test")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=r"new_joint_vecs not found"):
        HumanML3DDataset(empty, "test")


def test_read_captions(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text(WALK + "\n\nsits#sit/VERB#1.5#nan\n")
    walk, sit = read_captions(path)
    assert walk.whole and walk.tokens == ("a/DET", "person/NOUN", "walk/VERB", "forward/ADV")
    assert (sit.start, sit.end, sit.whole) == (1.5, 0.0, False)
    path.write_text("sits#sit/VERB#soon#2\n")
    with pytest.raises(ValueError, match=r"x\.txt:1: start/end must be numbers"):
        read_captions(path)
