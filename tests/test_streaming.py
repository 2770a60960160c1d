"""Rows stream through a DataLoader: the trainer reads only the rows it trains on, never the whole set; a run with
DataLoader workers equals the list run exactly; resume and two processes stay exact; cached reference scores are
kept by row index without modifying the rows; iterable datasets are refused.

The tabular adapter's scores are exact log-probabilities of a table and every run below does the same float32
operations in the same order whatever process or worker read a row, so runs are compared for exact equality.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from test_train import pair_rows
from torch.utils.data import Dataset, IterableDataset
from two_processes import run_two_processes

from genalign.adapters.tabular import TabularAdapter
from genalign.data.batching import RowOrder
from genalign.data.loader import SKIPPED_ROWS
from genalign.distributed import Shard
from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig

#: a non-uniform frozen reference, so cached reference scores differ from row to row
REFERENCE = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.1, 0.4]])


class CountingPairs(Dataset):
    """Map-style pairs that count how often each row is read and refuse to be iterated as a whole."""

    def __init__(self, n: int = 64):
        self.rows = pair_rows(n)
        self.reads: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        self.reads[i] = self.reads.get(i, 0) + 1
        return dict(self.rows[i])

    def __iter__(self):
        raise AssertionError("the trainer iterated over the whole dataset")


@pytest.fixture(autouse=True)
def no_training_curve(monkeypatch):
    """The PNG of the curves is not under test here and costs more than these tiny runs (forked children too)."""
    monkeypatch.setattr("genalign.train._plot_curves", lambda history, path: None)


def config(tmp_path, name: str, max_steps: int = 4, **options) -> TrainConfig:
    return TrainConfig(output_dir=str(tmp_path / name), max_steps=max_steps, batch_size=4,
                       gradient_accumulation_steps=2, learning_rate=0.05, log_every=1, seed=3, **options)


def run(tmp_path, name: str, rows, max_steps: int = 4, **options) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(TabularAdapter(3, 4, reference_probs=REFERENCE), build_step("dpo", beta=0.5), rows,
                      config(tmp_path, name, max_steps, **options))
    return trainer, trainer.train()["history"]


def test_trainer_reads_only_the_rows_it_trains_on(tmp_path):
    data = CountingPairs(64)
    trainer, history = run(tmp_path, "counted", data, max_steps=3, cache_reference=False)
    order = RowOrder(64, 4, seed=3)
    trained = [i for k in range(3 * 2) for i in order.indices(k)]  # 3 optimizer steps x 2 micro-batches x 4 rows
    assert len(set(trained)) == len(trained) == 24
    assert data.reads == {i: 1 for i in trained}  # once each, nothing else: 24 of 64 rows
    assert len(history) == 3 and trainer.rows is data  # the dataset itself, not a copy


def test_reference_caching_reads_each_row_once_in_chunks_and_never_modifies_rows(tmp_path):
    data = CountingPairs(10)  # 10 rows in chunks of 4: the last chunk is partial
    before = copy.deepcopy(data.rows)
    trainer, history = run(tmp_path, "cached", data, max_steps=2)
    assert data.rows == before  # nothing written into the rows
    # independent computation: log ref(a | c) of each pair from the reference table
    expected = torch.tensor([[REFERENCE[r["prompt"], r["chosen"]].log().item(),
                              REFERENCE[r["prompt"], r["rejected"]].log().item()] for r in before])
    torch.testing.assert_close(trainer.reference_scores, expected, rtol=0, atol=1e-6)  # float32 log of a float32
    # row 0 once to see that rows are pairs, every row once for the cache, then the 2 x 2 x 4 training reads
    assert sum(data.reads.values()) == 1 + 10 + 16
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the cached reference equals the policy at 0


def test_cached_reference_run_equals_the_run_that_scores_the_reference_each_step(tmp_path):
    _, cached = run(tmp_path, "with_cache", pair_rows(32))
    _, fresh = run(tmp_path, "without_cache", pair_rows(32), cache_reference=False)
    assert [h["loss"] for h in cached] == pytest.approx([h["loss"] for h in fresh], abs=1e-6, rel=0)
    assert cached[-1]["loss"] < cached[0]["loss"]  # training moved: the comparison is not the trivial ln 2


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_give_exactly_the_list_run(tmp_path, workers):
    listed, expected = run(tmp_path, "list", pair_rows(32))
    streamed, history = run(tmp_path, f"workers{workers}", CountingPairs(32), num_workers=workers, prefetch_factor=1)
    assert [h["loss"] for h in history] == [h["loss"] for h in expected]  # exact: same rows, same operations
    assert history[-1]["loss"] < history[0]["loss"]
    assert torch.equal(streamed.adapter.probs(), listed.adapter.probs())


def test_resume_through_workers_equals_uninterrupted_run(tmp_path):
    straight, expected = run(tmp_path, "straight", CountingPairs(32), max_steps=6, num_workers=1)
    run(tmp_path, "split", CountingPairs(32), max_steps=3, num_workers=1)
    data = CountingPairs(32)
    resumed, history = run(tmp_path, "split", data, max_steps=6, num_workers=0)  # resumed without workers
    assert [h["step"] for h in history] == list(range(1, 7))
    assert [h["loss"] for h in history] == [h["loss"] for h in expected]
    assert torch.equal(resumed.adapter.probs(), straight.adapter.probs())
    order = RowOrder(32, 4, seed=3)
    # row 0 (are rows pairs?), the reference cache reads every row once, then only the micro-batches of steps 4-6
    # (micro-steps 6-11) are read
    expected_reads = Counter([0, *range(32)]) + Counter(i for k in range(6, 12) for i in order.indices(k))
    assert data.reads == dict(expected_reads)


class SubstitutingPairs(CountingPairs):
    """Rows 3, 10 and 17 are "bad": the next row stands in and names them, as PickAPicDataset(skip_bad_rows=True)."""

    skip_bad_rows = True
    BAD = (3, 10, 17)

    def __getitem__(self, i: int) -> dict:
        if i in self.BAD:
            return {**super().__getitem__((i + 1) % len(self)), SKIPPED_ROWS: [f"pairs row {i}"]}
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 1])
def test_substituted_bad_rows_are_counted_in_the_logs(tmp_path, workers, caplog):
    with caplog.at_level("WARNING", logger="genalign.train"):
        _, history = run(tmp_path, f"bad{workers}", SubstitutingPairs(32), cache_reference=False, num_workers=workers)
    order = RowOrder(32, 4, seed=3)
    seen = set()
    for step, logs in enumerate(history, start=1):  # cumulative count of the distinct bad rows met so far
        seen |= {i for k in range(2 * step - 2, 2 * step) for i in order.indices(k) if i in SubstitutingPairs.BAD}
        assert logs["data/bad_rows_skipped"] == len(seen)
    assert seen and all(f"bad row skipped: pairs row {i}" in caplog.text for i in seen)


def _two_process_run(rank: int, output_dir, result_file) -> None:
    trainer, history = run(output_dir, "two", CountingPairs(36), num_workers=1)  # 9 reference chunks over 2
    if rank == 0:
        torch.save({"history": history, "reference": trainer.reference_scores, "probs": trainer.adapter.probs()},
                   result_file)


def test_two_processes_streaming_a_dataset_equal_one_process(tmp_path):
    run_two_processes(_two_process_run, tmp_path / "two-processes", tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt")
    one, expected = run(tmp_path, "one", pair_rows(36))
    # the reference scores of all 36 rows reach both processes though each scored only its share of the chunks
    assert torch.equal(two["reference"], one.reference_scores)
    for a, b in zip(expected, two["history"]):
        # DDP averages the two processes' gradients: (g0 + g1) / 2 rounds differently from the one-process mean
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6, rel=0)
    torch.testing.assert_close(two["probs"], one.adapter.probs(), rtol=0, atol=1e-6)


def test_shard_of_micro_batches_is_the_process_share_of_the_row_order():
    from genalign.data.loader import MicroBatches

    order = RowOrder(12, 4, seed=0)
    shares = [list(MicroBatches(order, Shard(r, 2), 2, 5)) for r in range(2)]
    for k, (a, b) in enumerate(zip(*shares), start=2):
        assert a + b == order.indices(k)


class Stream(IterableDataset):
    def __iter__(self):
        yield from pair_rows(8)


@pytest.mark.parametrize("rows", [Stream(), (r for r in pair_rows(8))])
def test_iterable_datasets_are_refused_with_the_reason(tmp_path, rows):
    with pytest.raises(TypeError, match=r"map-style dataset \(__len__ and __getitem__\).*exact resume"):
        Trainer(TabularAdapter(3, 4), build_step("dpo"), rows, config(tmp_path, "iterable"))


def test_encoding_cache_larger_than_its_memory_budget_reads_back_from_disk(tmp_path):
    """12 prompt encodings of 6 x 16 float32 (384 bytes each) under a 1,000-byte memory budget: memory keeps the two
    most recent, the rest come back from disk, exactly as computed, and the encoder never runs twice for a prompt."""
    from tiny_pixel import pixel_adapter

    adapter = pixel_adapter(cache_dir=tmp_path / "cache", cache_namespace="tiny-pixel", cache_memory_bytes=1000)
    encoder, calls, cache = adapter.encode, [], adapter.cache
    adapter.encode = lambda prompts: calls.append(list(prompts)) or encoder(prompts)
    prompts = [f"prompt {i:02d}" for i in range(12)]
    first = [adapter.encode_prompts(prompts[s : s + 4])["cond"] for s in range(0, 12, 4)]
    assert sum(map(len, calls)) == 12 and cache.counts == {"memory": 0, "disk": 0, "computed": 12}
    assert cache.memory_used == 2 * 6 * 16 * 4 <= cache.memory_bytes
    assert len(list((tmp_path / "cache").glob("prompt-*.safetensors"))) == 12
    again = [adapter.encode_prompts(prompts[s : s + 4])["cond"] for s in range(0, 12, 4)]
    assert sum(map(len, calls)) == 12  # nothing recomputed
    assert cache.counts == {"memory": 0, "disk": 12, "computed": 12}  # in order, each was evicted before its turn
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # safetensors stores float32 exactly
    adapter.encode_prompts(prompts[-2:])
    assert cache.counts["memory"] == 2 and cache.memory_used <= cache.memory_bytes


def test_a_run_resumes_under_other_data_loading_settings(tmp_path):
    """Workers, prefetch and pinning change who reads a row, not which: a run folder accepts them changed, and one
    written before these keys existed resumes too."""
    from omegaconf import OmegaConf
    from test_cli import compose_experiment

    from genalign.cli import check_resumable

    started = compose_experiment("text_dpo", tmp_path)
    out = tmp_path / "text_dpo"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    saved = OmegaConf.to_container(started, resolve=True)
    for key in ("num_workers", "prefetch_factor", "pin_memory"):
        del saved["train"][key]  # as written by a version without them
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    check_resumable(out, compose_experiment("text_dpo", tmp_path, "train.num_workers=4", "train.prefetch_factor=8"))
    with pytest.raises(ValueError, match=r"train\.seed"):
        check_resumable(out, compose_experiment("text_dpo", tmp_path, "train.seed=1"))
