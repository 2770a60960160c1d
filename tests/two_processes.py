"""Run a function in two forked CPU processes that form a gloo process group, as ``accelerate launch`` would.

accelerate reads RANK/WORLD_SIZE/MASTER_* and ACCELERATE_USE_CPU from the environment; the children are forked (a
spawned child spends seconds importing diffusers), so the parent's one-process accelerate state is reset in them.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)  # forked after the parent used torch: one thread, as DataLoader workers do
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    state = PartialState(cpu=True)
    assert state.num_processes == 2 and state.backend == "gloo", (state.num_processes, state.backend)
    fn(rank, *args)


def run_two_processes(fn: Callable[..., None], *args: Any, timeout: float = 300) -> None:
    """``fn(rank, *args)`` on ranks 0 and 1; raises with a child's traceback if one fails, fails the test after
    ``timeout`` seconds (a collective waiting forever)."""
    processes = mp.start_processes(_child, args=(free_port(), fn, args), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not processes.join(timeout=2):
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail(f"the two processes did not finish within {timeout:.0f} s (a collective waiting forever?)")
