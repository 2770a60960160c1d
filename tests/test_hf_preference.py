"""genalign.data.hf_preference: tiny files in the real public layouts (parquet through pyarrow with the real column
names and nested message structs, JSONL, gzip JSONL), rows checked against what each format means, errors that name
the file, row and field, and short training runs: pairwise files train DPO, KTO files train KTO."""

from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from genalign.cli import CONFIG_DIR, run
from genalign.data.hf_preference import read_preferences, split_of

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
ULTRAFEEDBACK = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                           ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                           ("score_rejected", pa.float64())])


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def uf_row(i: int, question: str, good: str, bad: str, scores=(8.0, 3.5)) -> dict:
    """One UltraFeedback-binarized row; its structs list ``content`` before ``role``, as the published files do."""
    chosen = [{"content": question, "role": "user"}, {"content": good, "role": "assistant"}]
    rejected = [{"content": question, "role": "user"}, {"content": bad, "role": "assistant"}]
    return {"prompt": question, "prompt_id": f"p{i}", "chosen": chosen, "rejected": rejected, "messages": chosen,
            "score_chosen": scores[0], "score_rejected": scores[1]}


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def transcript(messages: list[dict]) -> str:
    """Anthropic HH's rendering of a conversation, written independently of the reader."""
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


# ------------------------------------------------------------------------------------------------ UltraFeedback / TRL
def test_ultrafeedback_snapshot_reads_the_chosen_split_across_shards(tmp_path):
    root = tmp_path / "ultrafeedback_binarized"
    write_parquet(root / "data" / "train_prefs-00000-of-00002.parquet",
                  [uf_row(0, "Name a prime.", "7", "8"), uf_row(1, "2+2?", "4", "5", (9.0, 9.0))], ULTRAFEEDBACK)
    write_parquet(root / "data" / "train_prefs-00001-of-00002.parquet", [uf_row(2, "Capital of France?", "Paris",
                                                                             "Lyon")], ULTRAFEEDBACK)
    write_parquet(root / "data" / "test_prefs-00000-of-00001.parquet", [uf_row(3, "q", "a", "b")], ULTRAFEEDBACK)
    write_parquet(root / "data" / "train_sft-00000-of-00001.parquet", [uf_row(4, "q", "a", "b")], ULTRAFEEDBACK)
    write_parquet(root / ".cache" / "huggingface" / "stale.parquet", [{"x": 1}])  # hidden: never read
    (root / "README.md").write_text("# card")

    rows = read_preferences(root, split="train_prefs")
    assert [r["prompt"] for r in rows] == [[user("Name a prime.")], [user("2+2?")], [user("Capital of France?")]]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ([assistant("7")], [assistant("8")]), ([assistant("4")], [assistant("5")]),
        ([assistant("Paris")], [assistant("Lyon")])]
    assert [(r["prompt_id"], r["score_chosen"], r["score_rejected"]) for r in rows] == [
        ("p0", 8.0, 3.5), ("p1", 9.0, 9.0), ("p2", 8.0, 3.5)]  # equal scores are kept: the texts differ
    assert [r["row"] for r in rows] == [0, 1, 2]
    shard0, shard1 = (root / "data" / f"train_prefs-0000{k}-of-00002.parquet" for k in (0, 1))
    assert [r["source"] for r in rows] == [f"{shard0} row 0", f"{shard0} row 1", f"{shard1} row 0"]
    assert [r["prompt_id"] for r in read_preferences(root, split="test_prefs")] == ["p3"]

    with pytest.raises(ValueError, match=r"splits \['test_prefs', 'train_prefs', 'train_sft'\]; choose one"):
        read_preferences(root)
    with pytest.raises(ValueError, match=r"no file of split 'train'; its splits are \['test_prefs'"):
        read_preferences(root, split="train")


def test_trl_conversational_layouts(tmp_path):
    """TRL's explicit-prompt layout keeps its prompt; the implicit one takes the shared leading messages."""
    explicit = {"prompt": [user("Hi"), assistant("Hello!"), user("2+3?")], "chosen": [assistant("5")],
                "rejected": [assistant("6")]}
    implicit = {"chosen": [user("2+3?"), assistant("5")], "rejected": [user("2+3?"), assistant("6")]}
    path = write_jsonl(tmp_path / "train.jsonl", [explicit, implicit])
    rows = read_preferences(path)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (explicit["prompt"], [assistant("5")], [assistant("6")]), ([user("2+3?")], [assistant("5")], [assistant("6")])]
    assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:2"]


# ------------------------------------------------------------------------------------------------ Anthropic HH
def test_hh_prompt_is_the_shared_transcript_prefix_and_the_completion_the_last_assistant_turn(tmp_path, caplog):
    context = [user("What should I cook tonight?"), assistant("How about pasta?\n\nIt is quick. "),  # kept as written
               user("Something without gluten?")]
    good, bad = assistant("Risotto: rice is gluten-free.\n\nAdd mushrooms."), assistant("Bread.")
    first = {"chosen": transcript(context + [good]), "rejected": transcript(context + [bad])}
    tie = {"chosen": transcript([user("Hi"), assistant("Hello")]), "rejected": transcript([user("Hi"), assistant("Hello")])}
    second = {"chosen": transcript([user("Thanks!"), assistant("You're welcome.")]),
              "rejected": transcript([user("Thanks!"), assistant("Whatever.")])}
    # the layout of Anthropic/hh-rlhf: one gzip JSONL per subset and split
    write_jsonl(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz", [first, tie])
    write_jsonl(tmp_path / "hh" / "harmless-base" / "train.jsonl.gz", [second])
    write_jsonl(tmp_path / "hh" / "helpful-base" / "test.jsonl.gz", [second])

    with caplog.at_level(logging.WARNING, logger="genalign.data.hf_preference"):
        rows = read_preferences(tmp_path / "hh", split="train")
    # harmless-base sorts before helpful-base; the tie is skipped and counted
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ([user("Thanks!")], [assistant("You're welcome.")], [assistant("Whatever.")]),
        (context, [good], [bad]),
    ]
    assert "kept 2 of 3 rows; skipped 1 pairs whose chosen equals rejected and 0 invalid rows" in caplog.text
    assert rows[1]["source"] == f"{tmp_path / 'hh' / 'helpful-base' / 'train.jsonl.gz'}:1"


def test_hh_errors_name_the_file_line_and_field(tmp_path):
    ok = {"chosen": transcript([user("a"), assistant("b")]), "rejected": transcript([user("a"), assistant("c")])}
    path = write_jsonl(tmp_path / "train.jsonl", [ok, {"chosen": ok["chosen"], "rejected": "no transcript here"}])
    with pytest.raises(ValueError, match=rf"^{path}:2: field 'rejected' is not an HH transcript"):
        read_preferences(path, format="hh")
    diverging = {"chosen": transcript([user("a"), assistant("b")]),
                 "rejected": transcript([user("a"), assistant("b"), user("more?"), assistant("no")])}
    path = write_jsonl(tmp_path / "diverging.jsonl", [diverging])
    with pytest.raises(ValueError, match=rf"^{path}:1: "):
        read_preferences(path)


# ------------------------------------------------------------------------------------------------ TL;DR and KTO
def test_tldr_strings_and_kto_rows(tmp_path):
    post = "SUBREDDIT: r/cooking\nTITLE: Burnt rice\nPOST: Every time I cook rice it burns.\nTL;DR:"
    tldr = tmp_path / "tldr" / "data"
    write_parquet(tldr / "train-00000-of-00001.parquet",
                  [{"prompt": post, "chosen": " Lower the heat.", "rejected": " Rice bad."}])
    write_parquet(tldr / "validation-00000-of-00001.parquet", [{"prompt": "x", "chosen": "y", "rejected": "z"}])
    rows = read_preferences(tmp_path / "tldr", split="train")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [(post, " Lower the heat.", " Rice bad.")]

    kto_schema = pa.schema([("prompt", MESSAGES), ("completion", MESSAGES), ("label", pa.bool_())])
    kto = write_parquet(tmp_path / "kto" / "data" / "train-00000-of-00001.parquet", [
        {"prompt": [{"content": "2+2?", "role": "user"}], "completion": [{"content": "4", "role": "assistant"}],
         "label": True},
        {"prompt": [{"content": "2+2?", "role": "user"}], "completion": [{"content": "5", "role": "assistant"}],
         "label": False}], kto_schema)
    rows = read_preferences(kto.parent.parent)
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ([user("2+2?")], [assistant("4")], True), ([user("2+2?")], [assistant("5")], False)]
    assert "chosen" not in rows[0]


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_file_row_and_field(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [uf_row(0, "q", "a", "b"), uf_row(1, "q", "a", "b")],
                         ULTRAFEEDBACK)
    table = pq.read_table(path).to_pylist()
    table[1]["chosen"] = None  # a null cell
    write_parquet(path, table, ULTRAFEEDBACK)
    with pytest.raises(ValueError, match=rf"^{path} row 1: field 'chosen' must be a list of messages"):
        read_preferences(path)

    swapped = write_parquet(tmp_path / "swapped.parquet", [uf_row(0, "q", "a", "b", (2.0, 7.0))], ULTRAFEEDBACK)
    with pytest.raises(ValueError, match=rf"^{swapped} row 0: field 'score_chosen' \(2.0\) is below 'score_rejected'"):
        read_preferences(swapped)

    disagree = uf_row(0, "q", "a", "b")
    disagree["prompt"] = "another question"
    path = write_parquet(tmp_path / "disagree.parquet", [disagree], ULTRAFEEDBACK)
    with pytest.raises(ValueError, match=rf"^{path} row 0: field 'prompt' \('another question'\) is no user turn"):
        read_preferences(path)

    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(ValueError, match=rf"^{path}:1: field 'label' must be true or false"):
        read_preferences(path)

    path = write_jsonl(tmp_path / "short.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=rf"^{path}:1: missing field 'rejected'; the tldr format needs"):
        read_preferences(path, format="tldr")

    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=rf"^{path}:1: cannot tell the preference format from the fields "
                                         r"\['answer', 'question'\].*data.format=NAME"):
        read_preferences(path)


def test_a_forced_format_checks_its_field_types(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [uf_row(0, "q", "a", "b")], ULTRAFEEDBACK)
    with pytest.raises(ValueError, match=rf"^{path} row 0: field 'chosen' must be a string in the tldr format, got "
                                         "list; message lists are format=ultrafeedback"):
        read_preferences(path, format="tldr")
    with pytest.raises(ValueError, match="unknown preference format 'alpaca'"):
        read_preferences(path, format="alpaca")


def test_skip_invalid_counts_and_logs_the_skipped_rows(tmp_path, caplog):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "p", "chosen": "", "rejected": "bad"},
            {"prompt": "q", "chosen": "fine", "rejected": "worse"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{path}:2: field 'chosen' is an empty completion"):
        read_preferences(path)
    with caplog.at_level(logging.WARNING, logger="genalign.data.hf_preference"):
        kept = read_preferences(path, skip_invalid=True)
    assert [(r["chosen"], r["row"], r["source"]) for r in kept] == [("good", 0, f"{path}:1"), ("fine", 1, f"{path}:3")]
    assert "kept 2 of 3 rows; skipped 0 pairs whose chosen equals rejected and 1 invalid rows" in caplog.text
    assert f"{path}:2: field 'chosen' is an empty completion" in caplog.text


def test_shards_of_different_formats_and_split_mismatches_are_refused(tmp_path):
    write_jsonl(tmp_path / "mixed" / "train-00000-of-00002.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "mixed" / "train-00001-of-00002.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    with pytest.raises(ValueError, match=r"train-00001-of-00002.jsonl holds 'kto' rows but .*train-00000-of-00002.jsonl "
                                         r"holds 'tldr' rows"):
        read_preferences(tmp_path / "mixed")
    single = tmp_path / "mixed" / "train-00000-of-00002.jsonl"
    assert len(read_preferences(single, split="train")) == 1
    with pytest.raises(ValueError, match=r"is split 'train' by its name, not data.split='test'"):
        read_preferences(single, split="test")
    with pytest.raises(FileNotFoundError, match="no preference file or folder"):
        read_preferences(tmp_path / "absent")


@pytest.mark.parametrize("name, split", [
    ("data/train-00000-of-00004.parquet", "train"),
    ("data/train_prefs-00000-of-00001.parquet", "train_prefs"),
    ("data/test-00000-of-00001-5a8ffb8c1e4a2f3d.parquet", "test"),  # older Hub conversions add a hash
    ("helpful-base/train.jsonl.gz", "train"),
    ("default/validation/0000.parquet", "validation"),  # refs/convert/parquet: the folder is the split
    ("prefs.jsonl", "prefs"),
])
def test_split_of_follows_the_hugging_face_file_naming(name, split):
    assert split_of(Path(name)) == split


# ------------------------------------------------------------------------------------------------ training
def _run(tmp_path: Path, experiment: str, data: Path, *overrides: str) -> list[dict]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"experiment={experiment}", "data=hf_preference", f"data.path={data}", "evaluator=none",
            f"output_dir={tmp_path / experiment}", "train.batch_size=16", "train.max_steps=12", "train.log_every=1",
            "train.learning_rate=3e-3", "train.warmup_steps=0", "train.save_every=0", *overrides])
    run(cfg)
    return [json.loads(line) for line in (tmp_path / experiment / "log.jsonl").read_text().splitlines()]


PROBLEMS = [(a, b) for a in range(10, 42, 4) for b in range(3, 11)]  # 64 problems


def test_tldr_pairs_train_dpo(tmp_path):
    """At step 0 the policy is the reference, so DPO's loss is ln 2; a few steps on correct-vs-wrong sums make the
    implicit reward prefer the correct answers (batch accuracy and margin up)."""
    data = write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet",
                         [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10)} for a, b in PROBLEMS])
    log = _run(tmp_path, "text_dpo", data.parent.parent)
    assert math.isclose(log[0]["loss"], math.log(2), abs_tol=1e-4)  # float32 sums over a few tokens
    assert log[-1]["rewards/margin"] > 0 and log[-1]["rewards/accuracy"] > 0.8
    assert log[-1]["loss"] < log[0]["loss"]


def test_kto_rows_train_kto(tmp_path):
    """KTO-format rows (unpaired, labelled) train objective=kto: at step 0 r = π − ref = 0 = z, so every sample's
    loss is λ(1 − σ(0)) = 0.5; then desirable samples' reward rises above the undesirable ones'."""
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b + (10 if wrong else 0)), "label": not wrong}
            for i, (a, b) in enumerate(PROBLEMS) for wrong in [i % 2 == 1]]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    log = _run(tmp_path, "text_kto", data)
    assert math.isclose(log[0]["loss"], 0.5, abs_tol=1e-5)
    assert log[-1]["rewards/desirable"] > log[-1]["rewards/undesirable"]
