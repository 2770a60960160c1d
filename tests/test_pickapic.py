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
from genalign.data.loader import SKIPPED_ROWS
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
    assert data[1]["source"].endswith("train-0.parquet row group 0 row 1")
    assert data[2]["source"].endswith("row group 1 row 3")  # row numbers count the dropped ties


def test_folders_of_shards_and_resolution_crop(tmp_path):
    write_shard(tmp_path / "a.parquet", ROWS[:3])
    write_shard(tmp_path / "b.parquet", ROWS[3:], row_group_size=1)
    data = PickAPicDataset(tmp_path, resolution=8, cache_row_groups=1)
    assert (data.num_rows, data.num_ties, len(data)) == (6, 2, 4)
    assert [data[i]["prompt"] for i in range(4)] == ["a red fox", "a blue whale", "a bluebird", "a red rose"]
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


def test_bad_shards_raise_naming_file_row_group_row_and_column(tmp_path):
    with pytest.raises(ValueError, match=r"m\.parquet: missing column\(s\) \['label_1'\].*skip_bad_rows=true"):
        PickAPicDataset(write_shard(tmp_path / "m.parquet", ROWS, drop=("label_1",)))
    bad = ROWS[:2] + [("odd", 0.7, 0.3)]
    labels = r"l\.parquet row group 1 row 2, columns 'label_0', 'label_1': are \[0.7, 0.3\]"
    with pytest.raises(ValueError, match=labels):
        PickAPicDataset(write_shard(tmp_path / "l.parquet", bad))
    for name, caption in (("c", None), ("e", "  ")):
        caption_error = rf"{name}\.parquet row group 0 row 0, column 'caption': must be a non-empty"
        with pytest.raises(ValueError, match=caption_error):
            PickAPicDataset(write_shard(tmp_path / f"{name}.parquet", [(caption, 1.0, 0.0)]))
    corrupt = write_shard(tmp_path / "j.parquet", ROWS[:2], jpg_0=[encoded(RED), b"not a jpeg"])
    data = PickAPicDataset(corrupt)
    assert colour_of(data[0]["chosen"]) == "red"
    with pytest.raises(ValueError, match=r"j\.parquet row group 0 row 1, column 'jpg_0': cannot decode"):
        data[1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PickAPicDataset(tmp_path / "absent.parquet")


# rows 0-7, two per row group; row 2 is a tie, row 3 has an empty caption, row 4 bad labels, rows 1 and 6 a broken JPEG
MIXED = [("a red fox", 1.0, 0.0), ("broken one", 0.0, 1.0), ("a tie", 0.5, 0.5), ("", 1.0, 0.0),
         ("odd labels", 0.7, 0.3), ("a red rose", 1.0, 0.0), ("broken two", 1.0, 0.0), ("a blue whale", 0.0, 1.0)]
BROKEN = {1, 6}


def mixed_shard(path):
    jpg_0 = [b"\xff\xd8 truncated" if i in BROKEN else encoded(RED) for i in range(len(MIXED))]
    return write_shard(path, MIXED, jpg_0=jpg_0)


def test_skip_bad_rows_counts_rows_bad_at_open_and_substitutes_undecodable_ones(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"row group 1 row 3, column 'caption'"):  # the default raises
        PickAPicDataset(mixed_shard(tmp_path / "train-0.parquet"))
    with caplog.at_level("WARNING", logger="genalign.data.image_pairs"):
        data = PickAPicDataset(tmp_path / "train-0.parquet", skip_bad_rows=True)
    # open: 8 rows, 1 tie, 2 bad (empty caption, labels) -> 5 pairs: file rows 0, 1, 5, 6, 7
    assert (data.num_rows, data.num_ties, data.num_skipped, len(data)) == (8, 1, 2, 5)
    assert "skipped 2 bad row(s) of 8" in caplog.text and "row 3, column 'caption'" in caplog.text
    assert "row 4, columns 'label_0', 'label_1'" in caplog.text
    items = [data[i] for i in range(len(data))]
    # pair 1 (file row 1) does not decode: pair 2 (row 5) stands in; pair 3 (row 6) -> pair 4 (row 7)
    assert [item["source"].rsplit(" ", 1)[1] for item in items] == ["0", "5", "5", "7", "7"]
    assert SKIPPED_ROWS not in items[0] and SKIPPED_ROWS not in items[2]
    assert len(items[1][SKIPPED_ROWS]) == 1 and "row 1, column 'jpg_0': cannot decode" in items[1][SKIPPED_ROWS][0]
    assert "row 6, column 'jpg_0'" in items[3][SKIPPED_ROWS][0]
    assert data.num_skipped == 2 + 2
    # the substitute depends on the files only: a fresh copy (a DataLoader worker) returns the same records
    fresh = pickle.loads(pickle.dumps(PickAPicDataset(tmp_path / "train-0.parquet", skip_bad_rows=True)))
    assert fresh[3]["source"] == items[3]["source"] and fresh[3][SKIPPED_ROWS] == items[3][SKIPPED_ROWS]
    assert torch.equal(fresh[1]["chosen"]["image"], items[1]["chosen"]["image"])


def test_skip_bad_rows_wraps_around_and_refuses_a_set_with_nothing_readable(tmp_path):
    rows = [("first", 1.0, 0.0), ("last broken", 1.0, 0.0)]
    data = PickAPicDataset(write_shard(tmp_path / "w.parquet", rows, jpg_0=[encoded(RED), b"nope"]), skip_bad_rows=True)
    assert data[1]["prompt"] == "first" and "row 1, column 'jpg_0'" in data[1][SKIPPED_ROWS][0]
    dead = write_shard(tmp_path / "d.parquet", rows, jpg_0=[b"nope", b"nope"])
    with pytest.raises(ValueError, match="none of the 2 pairs"):
        PickAPicDataset(dead, skip_bad_rows=True)[0]
    # a file missing a column: with skip_bad_rows all its rows are counted as skipped, the other files are read
    (tmp_path / "folder").mkdir()
    write_shard(tmp_path / "folder" / "a.parquet", ROWS)
    write_shard(tmp_path / "folder" / "b.parquet", ROWS[:3], drop=("jpg_1",))
    mixed = PickAPicDataset(tmp_path / "folder", skip_bad_rows=True)
    assert (mixed.num_rows, mixed.num_skipped, len(mixed)) == (9, 3, 4)
    assert "b.parquet: missing column(s) ['jpg_1']" in mixed.skipped_sources[0]
    with pytest.raises(ValueError, match="no usable pairs"):
        PickAPicDataset(tmp_path / "folder" / "b.parquet", skip_bad_rows=True)


def test_split_selects_the_shards_named_by_the_hub_convention(tmp_path):
    data_dir = tmp_path / "pickapic_v2" / "data"  # the Hugging Face layout: <repo>/data/<split>-NNNNN-of-NNNNN-<hash>
    data_dir.mkdir(parents=True)
    names = {"train-00000-of-00002-ab12.parquet": ROWS[:2], "train-00001-of-00002-cd34.parquet": ROWS[3:4],
             "validation-00000-of-00001-ef56.parquet": ROWS[5:6],
             "validation_unique-00000-of-00001-0a1b.parquet": ROWS[:1]}
    for name, rows in names.items():
        write_shard(data_dir / name, rows)
    train = PickAPicDataset(tmp_path / "pickapic_v2", split="train")  # the repository folder: data/ is looked into
    assert [f.name for f in train.files] == sorted(n for n in names if n.startswith("train-")) and len(train) == 3
    validation = PickAPicDataset(data_dir, split="validation")  # not validation_unique
    assert [f.name for f in validation.files] == ["validation-00000-of-00001-ef56.parquet"]
    assert [data["prompt"] for data in PickAPicDataset(data_dir, split="validation_unique")] == ["a red fox"]
    assert len(PickAPicDataset(data_dir)) == 5  # no split: every shard
    names_found = (r"no 'test' shards \(test-\*\.parquet\); its files start "
                   r"\['train', 'validation', 'validation_unique'\]")
    with pytest.raises(FileNotFoundError, match=names_found):
        PickAPicDataset(data_dir, split="test")
    with pytest.raises(ValueError, match="not a 'test' shard"):
        PickAPicDataset(data_dir / "validation-00000-of-00001-ef56.parquet", split="test")
    with pytest.raises(ValueError, match=r"split='dev' is not a Pick-a-Pic v2 split"):
        PickAPicDataset(data_dir, split="dev")


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


def test_folder_skip_bad_rows_leaves_out_bad_lines_and_substitutes_broken_images(tmp_path):
    folder = write_folder(tmp_path, [
        {"prompt": "one", "chosen": "img/red.png", "rejected": "img/blue.jpg"},
        "{not json",
        {"prompt": "two", "chosen": "img/broken.png", "rejected": "img/blue.jpg"},
        {"prompt": "three", "chosen": "img/gone.png", "rejected": "img/blue.jpg"},
        {"prompt": "four", "chosen": "img/blue.jpg", "rejected": "img/red.png"},
    ])  # fmt: skip
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        ImagePairFolder(folder)
    data = ImagePairFolder(folder, skip_bad_rows=True)
    assert (len(data), data.num_skipped) == (3, 2)  # lines 2 (JSON) and 4 (missing file) left out at open
    assert "line 4: field 'chosen' points to" in data.skipped_sources[1]
    substitute = data[1]  # line 3's image does not decode: the next pair (line 5) stands in
    assert substitute["prompt"] == "four" and substitute["source"].endswith("line 5")
    assert "line 3 field 'chosen'" in substitute[SKIPPED_ROWS][0] and "cannot decode" in substitute[SKIPPED_ROWS][0]
    assert data.num_skipped == 3 and SKIPPED_ROWS not in data[0] and data[2]["prompt"] == "four"
