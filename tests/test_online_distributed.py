"""Two CPU processes (gloo) run SeRA's review exactly like one process with the same global batch.

SeRA keeps the top-k of each batch's offline pairs by implicit-reward margin: under two processes the top-k must be
taken over the *global* batch and the kept losses weighed as one mean over every process's pairs, or the run changes
(a per-process top-k, the negative control, does). Inverse alignment's reward model, fitted at step 1, must be the
one-process run's on every process (its seed is one draw of the shared generator, made as the one-process run makes
it; a draw sliced per process gave each process its own reward model).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import _free_port

from genalign.adapters.tabular import TabularAdapter
from genalign.distributed import Shard
from genalign.online.inverse_alignment import InverseAlignmentStep
from genalign.online.sera import SeRAStep
from genalign.steps import StepContext
from genalign.train import Trainer, TrainConfig

TOL = 1e-5
STEPS = 4


class LocalTopKSeRA(SeRAStep):
    """SeRA with the top-k wrongly taken over this process's pairs only (negative control)."""

    def select(self, adapter, batch, ctx):
        return super().select(adapter, batch, StepContext(ctx.generator, shard=Shard()))


def two_action_pairs(n: int = 24) -> list[dict]:
    """Context c prefers action c mod 2 over the other (every action of a context is in its pairs, so no gradient is
    a rounding residual that Adam's normalisation would blow up differently in the two runs)."""
    return [{"prompt": i % 7, "chosen": i % 7 % 2, "rejected": 1 - i % 7 % 2, "row": i} for i in range(n)]


SCENARIOS = {
    "sera": lambda: SeRAStep(beta=0.5, top_fraction=0.25, round_steps=1, num_samples=0),
    "sera_local_topk": lambda: LocalTopKSeRA(beta=0.5, top_fraction=0.25, round_steps=1, num_samples=0),
    "inverse": lambda: InverseAlignmentStep(two_action_pairs(12), refit_every=10, rm_epochs=2, rm_buckets=256,
                                            rm_batch_size=2),
}


def train(name: str, output_dir) -> dict:
    torch.manual_seed(0)
    adapter, step = TabularAdapter(7, 2), SCENARIOS[name]()
    cfg = TrainConfig(output_dir=str(output_dir / name), max_steps=STEPS, batch_size=8, learning_rate=0.05,
                      log_every=1, seed=5)
    history = Trainer(adapter, step, two_action_pairs(), cfg).train()["history"]
    rm = getattr(step, "reward_model", None)
    return {"loss": [h["loss"] for h in history], "weights": adapter.unwrapped_policy.logits.detach().clone(),
            "reward_model": None if rm is None else {k: v.clone() for k, v in rm.state_dict().items()}}


def _worker(rank: int, port: int, output_dir, result_file) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)  # the parent's one-process state came with the fork
    GradientState._reset_state()
    assert PartialState(cpu=True).num_processes == 2
    torch.save({name: train(name, output_dir / f"rank{rank}") for name in SCENARIOS}, f"{result_file}.{rank}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_distributed")
    processes = mp.start_processes(_worker, args=(_free_port(), root / "two", root / "two.pt"), nprocs=2,
                                   join=False, start_method="fork")
    deadline = time.monotonic() + 300
    while not processes.join(timeout=2):  # raises with the child's traceback if one fails
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail("the two training processes did not finish within 5 minutes")
    two = [torch.load(root / f"two.pt.{rank}", weights_only=False) for rank in (0, 1)]
    one = {name: train(name, root / "one") for name in SCENARIOS}
    return one, two


def test_sera_global_top_k_two_processes_equal_one_process(runs):
    one, two = runs
    for rank in (0, 1):
        assert two[rank]["sera"]["loss"] == pytest.approx(one["sera"]["loss"], abs=TOL, rel=0)
        torch.testing.assert_close(two[rank]["sera"]["weights"], one["sera"]["weights"], atol=TOL, rtol=0)
    # a per-process top-k keeps other pairs: the run differs (so the test above has teeth)
    assert one["sera_local_topk"]["loss"] == pytest.approx(one["sera"]["loss"], abs=TOL, rel=0)
    assert two[0]["sera_local_topk"]["loss"] != pytest.approx(one["sera"]["loss"], abs=1e-3, rel=0)


def test_inverse_alignment_fits_one_reward_model_on_every_process(runs):
    one, two = runs
    for name, w in one["inverse"]["reward_model"].items():
        torch.testing.assert_close(two[0]["inverse"]["reward_model"][name], w, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(two[1]["inverse"]["reward_model"][name], w, atol=TOL, rtol=0, msg=name)
