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
from genalign.objectives._checks import in_range
from genalign.types import PairwiseBatch, Scores


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
    """Offline pairwise objectives (DPO family): one concatenated forward, shared randomness per pair.

    Options that combine with every pairwise objective (TRL's names):

    * ``length_normalize``: each side's scores divided by its token count (objectives taking ``chosen_lengths``:
      ``dpo`` = TRL's ``sigmoid_norm``, ``ipo``).
    * ``reference_free``: reference scores taken as 0, so r = π (a reference that gives every response the same
      probability; TRL < 1.0's ``reference_free``). The adapter still runs its reference unless it has none (text:
      ``reference=none``).
    * ``rpo_alpha`` α: adds α·NLL of the chosen per token (:func:`genalign.objectives.chosen_nll`), RPO (Pang et al.
      2024). ``rpo_mean``: ``"sequence"`` divides each chosen score by its own length (the paper); ``"tokens"`` pools
      the tokens of the global batch, −π_w / mean(|y_w|) per pair, whose batch mean is Σ −π_w / Σ |y_w| (TRL's
      ``sft`` loss type and TRL < 1.0's ``rpo_alpha``).
    * ``use_weighting``: the pair's loss (NLL term included, as TRL does) times the detached WPO weight
      :func:`genalign.objectives.wpo_weights` of the policy's own token probabilities (needs an adapter with
      ``wpo_logps``: the text adapter). Not with ``aot``/``aot_unpaired``, whose entries are ranks, not pairs.
    """

    kind = "pairwise"
    names = ("dpo", "robust_dpo", "ipo", "slic", "gpo", "simpo", "soft_preference", "exo_pair", "nca_pair",
             "sppo_hard", "apo_zero", "apo_down", "discopop")
    RPO_MEANS = ("sequence", "tokens")

    def __init__(self, name: str, length_normalize: bool = False, *, reference_free: bool = False,
                 rpo_alpha: float | None = None, rpo_mean: str = "sequence", use_weighting: bool = False,
                 **params: Any):
        self.name, self.fn, self.params = name, getattr(objectives, name), params
        signature = inspect.signature(self.fn).parameters
        if length_normalize and "chosen_lengths" not in signature:
            raise ValueError(f"length_normalize is not an option of {name!r} (per-token means exist for dpo and ipo)")
        if reference_free and "reference_chosen" not in signature:
            raise ValueError(f"{name!r} uses no reference scores already; drop reference_free")
        if rpo_mean not in self.RPO_MEANS:
            raise ValueError(f"rpo_mean must be one of {self.RPO_MEANS}, got {rpo_mean!r}")
        self.length_normalize, self.reference_free, self.use_weighting = length_normalize, reference_free, use_weighting
        self.rpo_alpha = None if rpo_alpha is None else in_range("rpo_alpha", rpo_alpha, 0.0)
        self.rpo_mean = rpo_mean
        self.beta = params.get("beta", signature["beta"].default)

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        batch = pairwise_batch(adapter, rows).to(_device(adapter))
        chosen, rejected = adapter.score_pairs(batch, generator=ctx.generator)
        kwargs = {**self.params, **self.batch_params(batch, chosen, rejected, ctx)}
        if self.length_normalize or self.name == "simpo":
            kwargs.update(chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths)
        references = self.references(chosen, rejected)
        if self.name == "simpo":
            loss = self.fn(chosen.policy, rejected.policy, **kwargs)
        elif references is None:
            raise ValueError(f"{self.name!r} needs reference scores but the adapter gives none (reference='none'); "
                             "give the adapter a reference or set objective.reference_free=true")
        else:
            loss = self.fn(chosen.policy, rejected.policy, *references, **kwargs)
        metrics = {}
        if self.rpo_alpha is not None:
            nll = self.chosen_nll(chosen, ctx)
            loss = loss + self.rpo_alpha * nll
            metrics["rpo/nll"] = nll.detach().mean()
        if self.use_weighting:
            weights = self.wpo_weights(adapter, batch)
            loss = loss * weights
            metrics["wpo/weight"] = weights.mean()
        if references is not None:
            metrics.update(objectives.pairwise_metrics(chosen.policy, rejected.policy, *references, beta=self.beta))
        return loss, metrics

    def batch_params(self, batch: PairwiseBatch, chosen: Scores, rejected: Scores, ctx: StepContext) -> dict[str, Any]:
        """Objective keywords that come from the batch (soft preference strengths); subclasses add their own."""
        if self.name != "soft_preference":
            return {}
        if batch.strength is None:
            raise ValueError("soft_preference needs a 'strength' field (preference probability in [0, 1]) on every pair")
        return {"strength": batch.strength}

    def references(self, chosen: Scores, rejected: Scores) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference scores the objective sees: the adapter's (None if it has none), or zeros with
        ``reference_free``."""
        if self.reference_free:
            return torch.zeros_like(chosen.policy).detach(), torch.zeros_like(rejected.policy).detach()
        if chosen.reference is None:
            return None
        return chosen.reference, rejected.reference

    def chosen_nll(self, chosen: Scores, ctx: StepContext) -> torch.Tensor:
        """RPO's NLL term per pair: per-sequence token mean, or −π_w / (global mean chosen length) (``tokens``)."""
        if self.rpo_mean == "sequence" or chosen.lengths is None:
            return objectives.chosen_nll(chosen.policy, chosen.lengths)
        mean_length = ctx.global_mean(chosen.lengths.float())
        return objectives.chosen_nll(chosen.policy, mean_length.expand_as(chosen.policy))

    @staticmethod
    def wpo_weights(adapter: Adapter, batch: PairwiseBatch) -> torch.Tensor:
        """Detached WPO weight per pair from the adapter's per-token policy probabilities."""
        if not hasattr(adapter, "wpo_logps"):
            raise ValueError(f"use_weighting needs the policy's per-token probabilities; {type(adapter).__name__} "
                             "has no wpo_logps (the text adapter has)")
        aligned = adapter.wpo_logps(adapter.concat([batch.chosen, batch.rejected]))
        return objectives.wpo_weights(*aligned.split([batch.size, batch.size]))


class SortedPairwiseStep(PairwiseStep):
    """AOT's objectives (``aot``, ``aot_unpaired``): their loss entries are ranks of the sorted batch, not pairs, so
    per-pair weights (WPO, an online step's kept-pair weights) do not apply. Each process sorts its own share of the
    global batch, as TRL does per device: under several processes the loss is not the one-process loss."""

    names = ("aot", "aot_unpaired")

    def __init__(self, name: str, length_normalize: bool = False, *, use_weighting: bool = False, **params: Any):
        if use_weighting:
            raise ValueError(f"use_weighting does not apply to {name!r}: its loss entries are sorted ranks, not pairs")
        super().__init__(name, length_normalize, **params)


class RunningMean:
    """Mean of every value given to :meth:`update` so far, checkpointed with the step (``state_dict``).

    TRL's ``RunningMoments.mean`` fed one batch-mean value per update (its count starts at 1e-24, so its mean is
    this one up to float32 rounding)."""

    def __init__(self) -> None:
        self.mean, self.count = 0.0, 0

    def update(self, value: float) -> float:
        self.count += 1
        self.mean += (float(value) - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


class BCOPairStep(PairwiseStep):
    """``bco_pair`` with the reward shift δ of BCO (Jung et al. 2024): before each micro-batch's loss, the mean of
    the rewards β·(π − ref) over both sides of the *global* batch (all processes) is added to a running mean of
    such batch means, and δ is that running mean (TRL < 1.0's ``bco_pair``). It is checkpointed, so a resumed run
    continues with the same δ. ``reward_shift="none"`` keeps δ = 0 (TRL 1.16's ``bco_pair``)."""

    names = ("bco_pair",)
    SHIFTS = ("running_mean", "none")

    def __init__(self, name: str = "bco_pair", length_normalize: bool = False, *, reward_shift: str = "running_mean",
                 **params: Any):
        if reward_shift not in self.SHIFTS:
            raise ValueError(f"reward_shift must be one of {self.SHIFTS}, got {reward_shift!r}")
        if "delta" in params:
            raise ValueError("bco_pair's delta is the running reward mean (reward_shift=running_mean) or 0 "
                             "(reward_shift=none); it is not set by hand")
        super().__init__(name, length_normalize, **params)
        self.reward_shift = reward_shift
        self.running = RunningMean()

    def batch_params(self, batch: PairwiseBatch, chosen: Scores, rejected: Scores, ctx: StepContext) -> dict[str, Any]:
        if self.reward_shift == "none":
            return {}
        references = self.references(chosen, rejected)
        if references is None:  # the objective call raises the clear error
            return {}
        rewards = self.beta * torch.cat([chosen.policy - references[0], rejected.policy - references[1]]).detach().float()
        return {"delta": self.running.update(float(ctx.global_mean(rewards)))}

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        loss, metrics = super().__call__(adapter, rows, ctx)
        return loss, {**metrics, "bco/delta": torch.tensor(self.running.mean)}

    def checkpoint_state(self) -> list[Any]:
        return [self.running]


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


OFFLINE_STEPS = {name: cls for cls in (PairwiseStep, SortedPairwiseStep, BCOPairStep, KTOStep) for name in cls.names}
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
    accepted = set(inspect.signature(getattr(objectives, name)).parameters) | _step_options(OFFLINE_STEPS[name])
    _reject_unknown(name, params, accepted)
    return OFFLINE_STEPS[name](name, **params)


def _step_options(cls: type) -> set[str]:
    """The named keyword options of a step class, with those its base classes take through ``**params``."""
    options: set[str] = set()
    for klass in cls.__mro__:
        if issubclass(klass, Step) and "__init__" in vars(klass):
            options |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return options - {"self", "name"}


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
