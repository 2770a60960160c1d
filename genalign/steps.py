"""Loss steps: bind a batch type to an adapter's scores and an objective from :mod:`genalign.objectives`.

A step is ``step(adapter, rows, ctx) -> (per_example_loss, metrics)``. It collates the rows itself, so each
objective gets the batch type it needs (pairs for DPO-style objectives, labelled samples for KTO). Methods that
draw the policy's own samples (Diffusion-DRO, SoPo, online methods) provide their own steps in
:mod:`genalign.online`; this module holds the offline ones.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.data.batching import labelled_batch, pairs_to_unpaired, pairwise_batch
from genalign.distributed import Shard


@dataclass
class StepContext:
    """What a step may need from the trainer: shared randomness, a cross-process mean and this process's shard
    (see :mod:`genalign.distributed`)."""

    generator: torch.Generator
    global_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.mean()
    shard: Shard = field(default_factory=Shard)


class Step(abc.ABC):
    """Base of the loss steps: ``step(adapter, rows, ctx) -> (per_example_loss, metrics)``.

    Steps that keep state across optimizer steps (online buffers, sampler snapshots) override the two hooks:
    the trainer checkpoints what :meth:`checkpoint_state` returns and calls :meth:`on_optimizer_step` after
    every optimizer step.
    """

    @abc.abstractmethod
    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        """Collate ``rows``, score them through ``adapter`` and return ``(per_example_loss, metrics)``."""

    def checkpoint_state(self) -> list[Any]:
        """Objects with ``state_dict``/``load_state_dict`` to save in checkpoints."""
        return []

    def on_optimizer_step(self, adapter: Adapter, global_step: int) -> None:
        """Called after optimizer step ``global_step`` (1-based) has been applied."""


class PairwiseStep(Step):
    """Offline pairwise objectives (DPO family): one concatenated forward, shared randomness per pair."""

    kind = "pairwise"
    names = ("dpo", "robust_dpo", "ipo", "slic", "gpo", "simpo", "soft_preference")

    def __init__(self, name: str, length_normalize: bool = False, **params: Any):
        self.name, self.fn, self.params = name, getattr(objectives, name), params
        self.length_normalize = length_normalize
        self.beta = params.get("beta", inspect.signature(self.fn).parameters["beta"].default)

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        batch = pairwise_batch(adapter, rows).to(_device(adapter))
        chosen, rejected = adapter.score_pairs(batch, generator=ctx.generator)
        kwargs = dict(self.params)
        if self.name == "soft_preference":
            if batch.strength is None:
                raise ValueError("soft_preference needs a 'strength' field (preference probability in [0, 1]) on every pair")
            kwargs["strength"] = batch.strength
        if self.length_normalize or self.name == "simpo":
            kwargs.update(chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths)
        if self.name == "simpo":
            loss = self.fn(chosen.policy, rejected.policy, **kwargs)
        else:
            loss = self.fn(chosen.policy, rejected.policy, chosen.reference, rejected.reference, **kwargs)
        metrics = {}
        if chosen.reference is not None:
            metrics = objectives.pairwise_metrics(
                chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=self.beta
            )
        return loss, metrics


class KTOStep(Step):
    """KTO on labelled samples; paired rows are split into a desirable and an undesirable sample.

    The reference point z is the detached mean of (π − ref) over the *global* batch (all processes).
    """

    kind = "unpaired"
    names = ("kto",)

    def __init__(self, name: str = "kto", **params: Any):
        self.params = params

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        if rows and "chosen" in rows[0]:
            rows = pairs_to_unpaired(rows)
        batch = labelled_batch(adapter, rows).to(_device(adapter))
        if batch.desirable is None:
            raise ValueError("kto needs a boolean 'desirable' (or 'label') field on every sample")
        scores = adapter.score(batch.samples, groups=torch.arange(batch.size), generator=ctx.generator)
        reference = scores.reference if batch.reference is None else batch.reference
        kl = ctx.global_mean((scores.policy - reference).detach().float())
        loss = objectives.kto(scores.policy, reference, batch.desirable, kl=kl, **self.params)
        r = (scores.policy - reference).detach()
        metrics = {"kto/kl": kl, "rewards/desirable": _global_masked_mean(r, batch.desirable, ctx.global_mean),
                   "rewards/undesirable": _global_masked_mean(r, ~batch.desirable, ctx.global_mean)}
        return loss, metrics


OFFLINE_STEPS = {name: cls for cls in (PairwiseStep, KTOStep) for name in cls.names}
#: steps that sample from the policy, as ``"module:Class"`` imported on first use (they pull in their models)
ONLINE_STEPS = {
    "sopo": "genalign.online.sopo:SoPoStep",
    "diffusion_dro": "genalign.online.diffusion_dro:DiffusionDROStep",
    "dro": "genalign.online.dro:DROStep",
    "pmpo": "genalign.online.pmpo:PMPOStep",
    "sera": "genalign.online.sera:SeRAStep",
    "osp": "genalign.online.osp:OSPStep",
    "drpo": "genalign.online.drpo:DRPOStep",
    "inverse_alignment": "genalign.online.inverse_alignment:InverseAlignmentStep",
    "oaif": "genalign.online.oaif:OAIFStep",
    "ipo_md": "genalign.online.oaif:IPOMDStep",
    "nash_md": "genalign.online.nash_md:NashMDStep",
    "hypo": "genalign.online.hypo:HyPOStep",
    "selm": "genalign.online.selm:SELMStep",
}


def build_step(name: str, **params: Any):
    """The loss step for objective ``name`` with its hyper-parameters (from the objective config)."""
    if name in ONLINE_STEPS:
        module, _, attr = ONLINE_STEPS[name].partition(":")
        cls = getattr(importlib.import_module(module), attr)
        signature = inspect.signature(cls).parameters
        _reject_unknown(name, params, set(signature))
        missing = [k for k, v in signature.items() if v.default is inspect.Parameter.empty
                   and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and k not in params]
        if missing:
            raise ValueError(f"objective {name!r} needs {missing}: set them in the objective config or on the command "
                             f"line, e.g. objective.{missing[0]}=...")
        return cls(**params)
    if name not in OFFLINE_STEPS:
        known = sorted(objectives.OBJECTIVES)
        if name in known:
            raise ValueError(
                f"objective {name!r} exists as the function genalign.objectives.{name} but has no training step yet; "
                f"trainable objectives are {sorted([*OFFLINE_STEPS, *ONLINE_STEPS])}"
            )
        raise ValueError(f"unknown objective {name!r}; choose one of {known}")
    accepted = set(inspect.signature(getattr(objectives, name)).parameters)
    if name == "ipo":
        accepted.add("length_normalize")  # IPO on per-token means, as TRL does
    _reject_unknown(name, params, accepted)
    return OFFLINE_STEPS[name](name, **params)


def _reject_unknown(name: str, params: dict[str, Any], accepted: set[str]) -> None:
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"objective {name!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask].mean() if mask.any() else x.new_tensor(float("nan"))


def _global_masked_mean(x: torch.Tensor, mask: torch.Tensor, global_mean: Callable) -> torch.Tensor:
    """Mean of ``x`` over the masked rows of the global batch (all processes): mean(x·mask) / mean(mask); NaN when
    no row is masked."""
    return global_mean(x * mask) / global_mean(mask.float())


def _device(adapter: Adapter) -> torch.device:
    return next(adapter.policy.parameters()).device
