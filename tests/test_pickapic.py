"""Pick-a-Pic parquet reader and the folder + JSONL image-pair reader, on real encoded images written in tmp_path."""

from __future__ import annotations

import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from genalign.data.image_pairs import ImagePairFolder, prepare_image
from genalign.data.pickapic import PickAPicDataset

RED, BLUE = (220, 30, 30), (30, 30, 220)


def encoded(color, size=(20, 12), fmt="JPEG") -> bytes:
    """A solid-colour image of ``size`` (width, height), encoded as JPEG or PNG bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def colour_of(sample) -> str:
    r, _, b = sample["image"].mean((1, 2)).tolist()
    return "red" if r > b else "blue"


# rows: (caption, label_0, label_1); jpg_0 is always red, jpg_1 always blue
ROWS = [
    ("a red fox", 1.0, 0.0),
    ("a blue whale", 0.0, 1.0),
    ("a tie", 0.5, 0.5),
    ("a bluebird", 0.0, 1.0),
    ("another tie", 0.5, 0.5),
    ("a red rose", 1.0, 0.0),
]


def write_shard(path, rows, *, jpg_0=None, row_group_size=2, drop=()):
    columns = {
        "caption": [r[0] for r in rows],
        "jpg_0": jpg_0 if jpg_0 is not None else [encoded(RED) for _ in rows],
        "jpg_1": [encoded(BLUE, size=(16, 24)) for _ in rows],
        "label_0": [r[1] for r in rows],
        "label_1": [r[2] for r in rows],
        "are_different": [True for _ in rows],  # real shards carry more columns; they are not read
    }
    table = pa.table({k: v for k, v in columns.items() if k not in drop})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_ties_are_dropped_and_counted_and_pairs_flip_to_the_preferred_image(tmp_path):
    data = PickAPicDataset(write_shard(tmp_path / "train-0.parquet", ROWS))
    assert (data.num_rows, data.num_ties, len(data)) == (6, 2, 4)
    kept = [r for r in ROWS if r[1] != 0.5]
    for item, (caption, label_0, _) in zip(data, kept):
        assert item["prompt"] == item["chosen"]["prompt"] == item["rejected"]["prompt"] == caption
        assert colour_of(item["chosen"]) == ("red" if label_0 == 1.0 else "blue")
        assert colour_of(item["rejected"]) == ("blue" if label_0 == 1.0 else "red")
        # the SDXL ids travel with their image: red files are 20x12 (w x h), blue ones 16x24
        expected_size = (12, 20) if colour_of(item["chosen"]) == "red" else (24, 16)
        assert item["chosen"]["original_size"] == expected_size
        assert item["chosen"]["image"].shape == (3, *expected_size)
        assert item["chosen"]["crop_top_left"] == (0, 0)
    assert data[1]["source"].endswith("train-0.parquet row 1")
    assert data[2]["source"].endswith("row 3")  # row numbers count the dropped ties


def test_folders_of_shards_and_resolution_crop(tmp_path):
    write_shard(tmp_path / "a.parquet", ROWS[:3])
    write_shard(tmp_path / "b.parquet", ROWS[3:], row_group_size=1)
    data = PickAPicDataset(tmp_path, resolution=8, cache_row_groups=1)
    assert (data.num_rows, data.num_ties, len(data)) == (6, 2, 4)
    assert data.prompts == ["a red fox", "a blue whale", "a bluebird", "a red rose"]
    item = data[0]  # chosen red 20x12 -> 13x8 (w x h) -> centre crop, left (13 - 8) // 2 = 2
    assert item["chosen"]["image"].shape == (3, 8, 8)
    assert item["chosen"]["original_size"] == (12, 20) and item["chosen"]["crop_top_left"] == (0, 2)
    assert item["rejected"]["original_size"] == (24, 16) and item["rejected"]["crop_top_left"] == (2, 0)  # 16x8 -> top 4
    red = torch.tensor(RED) / 127.5 - 1
    assert torch.allclose(item["chosen"]["image"].mean((1, 2)), red, atol=0.05)
    # the dataset survives pickling (DataLoader workers) and reads the same items afterwards
    again = pickle.loads(pickle.dumps(data))
    assert torch.equal(again[3]["chosen"]["image"], data[3]["chosen"]["image"])


def test_prepare_image_crop_ids_follow_sdxl_convention():
    image = Image.new("RGB", (30, 10), (0, 255, 0))  # width 30, height 10
    sample = prepare_image(image, "p", resolution=5)  # -> 15 x 5, crop left (15 - 5) // 2 = 5
    assert sample["original_size"] == (10, 30) and sample["crop_top_left"] == (0, 5)
    assert torch.allclose(sample["image"][1], torch.ones(5, 5)) and torch.allclose(sample["image"][0], -torch.ones(5, 5))


def test_bad_shards_raise_naming_file_row_and_field(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label_1'\]"):
        PickAPicDataset(write_shard(tmp_path / "m.parquet", ROWS, drop=("label_1",)))
    bad = ROWS[:2] + [("odd", 0.7, 0.3)]
    with pytest.raises(ValueError, match=r"l\.parquet row 2: fields 'label_0', 'label_1' are \[0.7, 0.3\]"):
        PickAPicDataset(write_shard(tmp_path / "l.parquet", bad))
    with pytest.raises(ValueError, match=r"row 0: field 'caption'"):
        PickAPicDataset(write_shard(tmp_path / "c.parquet", [(None, 1.0, 0.0)]))
    corrupt = write_shard(tmp_path / "j.parquet", ROWS[:2], jpg_0=[encoded(RED), b"not a jpeg"])
    data = PickAPicDataset(corrupt)
    assert colour_of(data[0]["chosen"]) == "red"
    with pytest.raises(ValueError, match=r"j\.parquet row 1 field 'jpg_0': cannot decode"):
        data[1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PickAPicDataset(tmp_path / "absent.parquet")


# ------------------------------------------------------------------------------------------- folder + JSONL
def write_folder(folder, lines):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "red.png").write_bytes(encoded(RED, fmt="PNG"))
    (folder / "img" / "blue.jpg").write_bytes(encoded(BLUE, size=(16, 24)))
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return folder


def test_folder_pairs_load_with_their_images(tmp_path):
    folder = write_folder(tmp_path, [
        {"prompt": "red please", "chosen": "img/red.png", "rejected": "img/blue.jpg"},
        "",
        {"prompt": "blue please", "chosen": "img/blue.jpg", "rejected": "img/red.png", "note": "extra fields are ignored"},
    ])  # fmt: skip
    data = ImagePairFolder(folder)
    assert len(data) == 2
    first, second = data[0], data[1]
    assert (colour_of(first["chosen"]), colour_of(first["rejected"])) == ("red", "blue")
    assert (colour_of(second["chosen"]), colour_of(second["rejected"])) == ("blue", "red")
    assert second["prompt"] == second["chosen"]["prompt"] == "blue please"
    assert second["source"].endswith("pairs.jsonl line 3")
    # PNG is lossless: the pixels come back exactly, scaled to [-1, 1]
    assert torch.allclose(first["chosen"]["image"][:, 0, 0], torch.tensor(RED) / 127.5 - 1)
    assert ImagePairFolder(folder, resolution=8)[1]["chosen"]["image"].shape == (3, 8, 8)


@pytest.mark.parametrize(
    "line, error, message",
    [
        ("{not json", ValueError, r"line 2: not valid JSON"),
        ({"prompt": "x", "chosen": "img/red.png"}, ValueError, r"line 2: field 'rejected' must be a non-empty string"),
        ({"prompt": 3, "chosen": "img/red.png", "rejected": "img/blue.jpg"}, ValueError, r"line 2: field 'prompt'"),
        ({"prompt": "x", "chosen": "img/red.png", "rejected": "img/gone.png"}, FileNotFoundError, r"line 2: field 'rejected' points to .*img/gone\.png"),
    ],
)  # fmt: skip
def test_folder_errors_name_line_field_and_path(tmp_path, line, error, message):
    good = {"prompt": "ok", "chosen": "img/red.png", "rejected": "img/blue.jpg"}
    with pytest.raises(error, match=message):
        ImagePairFolder(write_folder(tmp_path, [good, line]))


def test_undecodable_folder_image_names_line_and_file(tmp_path):
    folder = write_folder(tmp_path, [{"prompt": "x", "chosen": "img/red.png", "rejected": "img/broken.png"}])
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"line 1 field 'rejected' \(.*broken\.png\): cannot decode"):
        ImagePairFolder(folder)[0]
    with pytest.raises(FileNotFoundError, match="pair index"):
        ImagePairFolder(folder, index="missing.jsonl")
