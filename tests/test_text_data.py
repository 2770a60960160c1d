"""Text preference readers: accepted layouts, row/source bookkeeping, and errors that name file, line and field."""

from __future__ import annotations

import json

import pytest

from genalign.adapters.text import TextAdapter
from genalign.data.batching import labelled_batch, pairwise_batch
from genalign.data.text import pairs_from_lists, pairs_to_unpaired, read_pairwise, read_unpaired
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2

USER = {"role": "user", "content": "hi"}
GOOD = {"role": "assistant", "content": "hello"}
BAD = {"role": "assistant", "content": "go away"}


def write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_pairwise_layouts(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5", "strength": 0.8},
        "",  # blank lines are not rows
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # TRL conversational, implicit prompt
        {"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, GOOD, USER, BAD]},
    ])
    rows = read_pairwise(path)
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert [r["source"] for r in rows] == [f"{path}:{n}" for n in (1, 3, 4, 5)]
    assert rows[0] == {"prompt": "2+2=", "chosen": "4", "rejected": "5", "strength": 0.8, "row": 0, "source": f"{path}:1"}
    assert (rows[1]["prompt"], rows[1]["chosen"], rows[1]["rejected"]) == ([USER], [GOOD], [BAD])
    assert (rows[2]["prompt"], rows[2]["chosen"], rows[2]["rejected"]) == ([USER], [GOOD], [BAD])
    assert (rows[3]["prompt"], rows[3]["chosen"], rows[3]["rejected"]) == ([USER, GOOD, USER], [GOOD], [BAD])
    assert "strength" not in rows[1]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "missing field 'prompt'"),
    ({"prompt": "a", "chosen": "  ", "rejected": "c"}, "'chosen' is an empty completion"),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, "'prompt' must be a string or a list of messages, got int"),
    ({"prompt": "a", "chosen": "b", "rejected": {"x": 1}}, "'rejected' must be a string or a list"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "strength": 1.5}, r"'strength' must be a number in \[0, 1\]"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "strength": True}, "'strength' must be a number"),
    ({"prompt": "a", "chosen": [{"role": "user"}], "rejected": "c"}, "'chosen' message 0"),
    ({"prompt": "a", "chosen": [USER], "rejected": "c"}, "'chosen' has no assistant message"),
    ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "no differing messages"),
    ({"chosen": [GOOD], "rejected": [BAD]}, "share no leading message"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_pairwise_rows_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "1", "rejected": "2"}, row])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        read_pairwise(path)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        read_pairwise(path)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_pairwise(tmp_path / "nowhere.jsonl")


def test_unpaired_rows(tmp_path):
    path = write(tmp_path / "kto.jsonl", [
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": [USER], "completion": [BAD], "label": False},
        {"prompt": "2+2=", "completion": "5", "reward": -1},
    ])
    rows = read_unpaired(path)
    assert [r.get("label") for r in rows] == [True, False, None]
    assert rows[2]["reward"] == -1.0 and isinstance(rows[2]["reward"], float)
    for row, message in [
        ({"prompt": "a", "completion": "b", "label": "yes"}, "'label' must be true or false"),
        ({"prompt": "a", "completion": "b", "reward": float("nan")}, "'reward' must be a finite number"),
        ({"prompt": "a", "completion": "b", "reward": "3"}, "'reward' must be a finite number"),
        ({"prompt": "a", "completion": "b"}, "missing field 'label'"),
        ({"prompt": "a", "completion": "", "label": True}, "'completion' is an empty completion"),
        ({"completion": "b", "label": True}, "missing field 'prompt'"),
    ]:
        with pytest.raises(ValueError, match=f"bad.jsonl:1: .*{message}"):
            read_unpaired(write(tmp_path / "bad.jsonl", [row]))


def test_pairs_from_lists():
    rows = pairs_from_lists(["1+1=", "2+2="], ["2", "4"], ["3", "5"], strength=[1.0, 0.6])
    assert rows[1] == {"prompt": "2+2=", "chosen": "4", "rejected": "5", "strength": 0.6, "row": 1}
    with pytest.raises(ValueError, match=r"'prompts': 2, 'chosen': 2, 'rejected': 1"):
        pairs_from_lists(["a", "b"], ["c", "d"], ["e"])
    with pytest.raises(ValueError, match="pair 1: field 'rejected' is an empty completion"):
        pairs_from_lists(["a", "b"], ["c", "d"], ["e", ""])


def test_rows_feed_the_text_adapter(tmp_path):
    """Reader rows go through the trainer's batching into the adapter; KTO on pairs: chosen good, rejected bad."""
    tokenizer = char_tokenizer("0123456789+= abcdefghijklmnopqrstuvwxyz:")
    adapter = TextAdapter(tiny_gpt2(tokenizer, n_positions=64), tokenizer, reference="copy", max_length=60,
                          max_prompt_length=40)
    pairs = read_pairwise(write(tmp_path / "p.jsonl", [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3", "strength": 0.9},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD], "strength": 0.7},
    ]))
    batch = pairwise_batch(adapter, pairs)
    assert batch.strength.tolist() == pytest.approx([0.9, 0.7]) and batch.index.tolist() == [0, 1]
    unpaired = pairs_to_unpaired(pairs)
    assert [u["desirable"] for u in unpaired] == [True, False, True, False]
    assert [u["response"] for u in unpaired[:2]] == ["2", "3"] and [u["row"] for u in unpaired] == [0, 0, 1, 1]
    labelled = labelled_batch(adapter, unpaired)
    assert labelled.desirable.tolist() == [True, False, True, False]
    scores = adapter.score(labelled.samples)
    chosen, rejected = adapter.score_pairs(batch)
    assert scores.policy[0::2].tolist() == pytest.approx(chosen.policy.tolist(), abs=1e-5)
    assert scores.policy[1::2].tolist() == pytest.approx(rejected.policy.tolist(), abs=1e-5)
