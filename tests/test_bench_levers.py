"""Levers the benchmark found: the adapter remembers its unwrapped policy instead of walking every submodule of the
network on each access (accelerate's ``extract_model_from_parallel`` looks for compiled regions), and still follows
a newly assigned (e.g. accelerate-prepared or compiled) policy."""

from __future__ import annotations

import torch

import genalign.adapters.base as base
from genalign.adapters.tabular import TabularAdapter


class Wrapper(torch.nn.Module):
    """Stands in for a DDP/compile wrapper: ``.module`` is the real network."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_unwrapped_policy_is_remembered_per_policy_object(monkeypatch):
    calls = []

    def unwrap(model):
        calls.append(model)
        return model.module if isinstance(model, Wrapper) else model

    monkeypatch.setattr(base, "extract_model_from_parallel", unwrap)
    adapter = TabularAdapter(num_contexts=3, num_actions=4)
    inner = adapter.policy
    assert adapter.unwrapped_policy is inner and adapter.unwrapped_policy is inner
    assert len(calls) == 1  # unwrapped once, not per access
    adapter.policy = Wrapper(inner)
    assert adapter.unwrapped_policy is inner and adapter.unwrapped_policy is inner
    assert len(calls) == 2  # a new policy object is unwrapped anew, once
    other = torch.nn.Linear(2, 2)
    adapter.policy = Wrapper(other)
    assert adapter.unwrapped_policy is other
