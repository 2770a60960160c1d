"""Inverse alignment: a reward model re-fitted, phase after phase, on the offline preference data closest to the
current policy, and used to label the policy's own samples in the next online phase (Krishna & Sahoo 2024, "Solving
the Inverse Alignment Problem for Efficient RLHF"; with ``warm_start`` the reward model is fine-tuned phase after
phase, starting from one fitted on all offline pairs, as in their Filtered Reward Fine-Tuning).

A reward model fitted once on all offline pairs is accurate where the offline responses lie, which drifts away from
where the policy samples as it trains. So training runs in phases of ``refit_every`` optimizer steps. At the start of
each phase the policy is frozen (no gradient), every offline pair (x, y_w, y_l) is scored by how likely the policy
finds it, c = ½(mean-token log π(y_w|x) + mean-token log π(y_l|x)), and a fresh Bradley–Terry reward model

    min_r  −mean log σ(r(x, y_w) − r(x, y_l))        over the ``subset_fraction`` of pairs with the highest c

is fitted. During the phase each step draws K responses per prompt from the policy, the reward model picks the best
and the worst, and the policy takes a DPO step on that pair (prompts whose K rewards tie are skipped and counted; a
text response that hit the length limit unfinished ranks last and is counted).

Reward models (``rm_features``): "hashed" — :class:`~genalign.online.hashed.HashedTextNet` over ``(prompt, response)``
(any modality; it memorises seen pairs but hardly generalises from character n-grams); "reference" — a head on the
frozen reference language model's features of the response (its last hidden state at the response's last scored token
and its mean over the response tokens); "finetune" — the same head on a trainable copy of the reference LM, fitted
together, as reward models are usually built (a pretrained backbone fine-tuned with a scalar head; text adapters with
reference='copy'). The head (and copy), the phase counter and the refit flag are checkpointed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Sequence

import torch

from torch import nn

from genalign.adapters.base import Adapter
from genalign.adapters.text import TextAdapter, eval_mode
from genalign.data.batching import pairwise_batch
from genalign.objectives._checks import in_range, positive
from genalign.online import draws, global_batch
from genalign.online.hashed import HashedTextNet, render
from genalign.online.self_pairs import best_worst_dpo, global_share
from genalign.steps import Step, StepContext

RM_FEATURES = ("hashed", "reference", "finetune")


class InverseAlignmentStep(Step):
    """Inverse alignment on rows with a ``prompt`` (the online phase's prompts).

    Args:
        pairs: the offline preference rows ``{"prompt", "chosen", "rejected"}`` (a list, or a hydra spec of a row
            builder such as ``genalign.data.arithmetic.pairs``).
        refit_every: optimizer steps per phase.
        subset_fraction: fraction of the offline pairs, closest to the policy, the reward model is fitted on.
        num_samples, beta: K samples per prompt and DPO's β.
        rm_features: "hashed" or "reference" (text only), see the module docstring.
        rm_hidden, rm_buckets, rm_lr, rm_epochs, rm_batch_size: the reward model and its fit (Adam).
        warm_start: fine-tune the previous reward model at each refit instead of fitting a fresh one, the first fit
            on every offline pair (Filtered Reward Fine-Tuning, Krishna & Sahoo 2024).
        sample_kwargs: extra keyword arguments of ``adapter.sample``.
    """

    def __init__(self, pairs: Any, *, refit_every: int = 50, subset_fraction: float = 0.5, num_samples: int = 4,
                 beta: float = 0.1, rm_features: str = "hashed", rm_hidden: int = 0, rm_buckets: int = 2**14,
                 rm_lr: float = 0.05,
                 rm_epochs: int = 5, rm_batch_size: int = 64, warm_start: bool = False,
                 sample_kwargs: dict[str, Any] | None = None):
        self.pairs = _rows(pairs)
        for name, value, low in (("refit_every", refit_every, 1), ("num_samples", num_samples, 2),
                                 ("rm_epochs", rm_epochs, 1), ("rm_batch_size", rm_batch_size, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        self.refit_every, self.num_samples = int(refit_every), int(num_samples)
        self.rm_epochs, self.rm_batch_size = int(rm_epochs), int(rm_batch_size)
        self.warm_start = bool(warm_start)
        self.subset_fraction = in_range("subset_fraction", subset_fraction, 0.0, 1.0)
        if self.subset_fraction == 0.0:
            raise ValueError("subset_fraction must be > 0 (the fraction of offline pairs the reward model is fitted on)")
        self.beta, self.rm_lr = positive("beta", beta), positive("rm_lr", rm_lr)
        if rm_features not in RM_FEATURES:
            raise ValueError(f"rm_features must be one of {RM_FEATURES}, got {rm_features!r}")
        self.rm_features, self.rm_hidden, self.rm_buckets = rm_features, int(rm_hidden), int(rm_buckets)
        self.sample_kwargs = dict(sample_kwargs or {})
        self.reward_model: nn.Module | None = None
        self.pending: dict[str, Any] | None = None  # a checkpointed head, rebuilt once the adapter is at hand
        self.phase, self.due = 0, True
        self.last_fit: dict[str, float] = {}

    def new_reward_model(self, adapter: Adapter) -> nn.Module:
        if self.rm_features == "hashed":
            return HashedTextNet(buckets=self.rm_buckets, hidden=self.rm_hidden)
        if not isinstance(adapter, TextAdapter):
            raise TypeError(f"rm_features={self.rm_features!r} uses a language model's features; "
                            f"{type(adapter).__name__} is not a TextAdapter (use rm_features='hashed')")
        return ReferenceFeatureReward(adapter, self.rm_hidden, finetune=self.rm_features == "finetune")

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        if self.pending is not None:
            self.reward_model = self.new_reward_model(adapter)
            self.reward_model.load_state_dict(self.pending)
            self.pending = None
        if self.due:
            with ctx.shard.remap(None):  # one reward model: every process draws the one-process run's seed
                self.refit(adapter, ctx.generator)
        prompts = draws.prompts(rows)
        n, k = len(prompts), self.num_samples
        samples = global_batch.draw(adapter, prompts, k, ctx, **self.sample_kwargs)
        responses = draws.responses(samples)
        with torch.no_grad():
            inputs = samples if isinstance(self.reward_model, ReferenceFeatureReward) else [
                (prompts[q // k], r) for q, r in enumerate(responses)]  # the samples as drawn, or their texts
            reward = self.reward_model(inputs).float().cpu().view(n, k)
        loss, metrics = best_worst_dpo(adapter, samples, reward, beta=self.beta, generator=ctx.generator,
                                       prefix="inverse")
        loss = global_share(loss if metrics["inverse/pairs"] else loss[:0], ctx.shard)
        metrics.update({"inverse/phase": float(self.phase), "inverse/reward": reward.mean().item(), **self.last_fit})
        return loss, metrics

    # ------------------------------------------------------------------------------------------ the refit
    @torch.no_grad()
    def closeness(self, adapter: Adapter, batch_size: int = 256) -> torch.Tensor:
        """c per offline pair ``[P]``: the frozen policy's mean per-token log-likelihood of both responses."""
        out = []
        for start in range(0, len(self.pairs), batch_size):
            batch = pairwise_batch(adapter, self.pairs[start : start + batch_size]).to(draws.device(adapter))
            chosen, rejected = adapter.score_pairs(batch)
            out.append(0.5 * (chosen.mean_policy + rejected.mean_policy).float().cpu())
        return torch.cat(out)

    def closest(self, adapter: Adapter) -> tuple[list[int], torch.Tensor]:
        """Indices of the ``subset_fraction`` of offline pairs with the highest closeness (eval mode), and their c."""
        model = adapter.unwrapped_policy
        was_training = model.training
        model.eval()
        try:
            close = self.closeness(adapter)
        finally:
            model.train(was_training)
        count = max(1, math.ceil(self.subset_fraction * len(self.pairs)))
        order = torch.sort(close, descending=True, stable=True).indices[:count]
        return order.tolist(), close[order]

    def refit(self, adapter: Adapter, generator: torch.Generator) -> None:
        """Fit the reward model on the ``subset_fraction`` of offline pairs closest to the frozen policy: a fresh one,
        or with ``warm_start`` the current one fine-tuned further (the first fit then uses every offline pair)."""
        indices, close = self.closest(adapter)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        first = self.reward_model is None
        if first or not self.warm_start:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.reward_model = self.new_reward_model(adapter)
        subset = self.pairs if first and self.warm_start else [self.pairs[i] for i in indices]
        accuracy = fit_bradley_terry(self.reward_model, subset, epochs=self.rm_epochs, batch_size=self.rm_batch_size,
                                     lr=self.rm_lr, generator=torch.Generator().manual_seed(seed))
        self.phase += 1
        self.due = False
        self.last_fit = {"inverse/rm_train_accuracy": accuracy, "inverse/subset_closeness": float(close.mean()),
                         "inverse/rm_pairs": float(len(subset))}

    # ------------------------------------------------------------------------------------------ trainer hooks
    def on_optimizer_step(self, adapter: Adapter, global_step: int) -> None:
        if global_step % self.refit_every == 0:
            self.due = True

    def checkpoint_state(self) -> list[Any]:
        return [self]

    def state_dict(self) -> dict[str, Any]:
        head = self.pending if self.reward_model is None else self.reward_model.state_dict()
        return {"reward_model": head, "phase": self.phase, "due": self.due, "last_fit": dict(self.last_fit)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reward_model, self.pending = None, state["reward_model"]
        self.phase, self.due, self.last_fit = int(state["phase"]), bool(state["due"]), dict(state["last_fit"])


class ReferenceFeatureReward(nn.Module):
    """r(x, y) = head([h_last, h_mean]): h the reference LM's last-layer hidden states over the response's scored
    tokens (last one, mean). Frozen (``finetune=False``): the features never change and are cached by (prompt,
    response). ``finetune=True``: the reward model owns a trainable copy of the reference LM, fitted with the head (how
    reward models are usually built: the pretrained backbone fine-tuned with a scalar head); needs reference='copy'."""

    def __init__(self, adapter: TextAdapter, hidden: int = 0, *, finetune: bool = False):
        super().__init__()
        self.adapter = adapter  # not a module: not saved, not trained
        width = 2 * adapter.unwrapped_policy.config.hidden_size
        self.head = nn.Linear(width, 1) if not hidden else nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.backbone: nn.Module | None = None
        if finetune:
            if adapter.reference_mode != "copy":
                raise ValueError("rm_features='finetune' copies the frozen reference LM into the reward model; it needs "
                                 f"an adapter with reference='copy' (got {adapter.reference_mode!r})")
            self.backbone = copy.deepcopy(adapter.reference_model).requires_grad_(True)
        self.cache: dict[str, torch.Tensor] = {}

    def batch_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, 2H]`` features of a collated text batch (e.g. the policy's own samples, as drawn)."""
        adapter = self.adapter
        ids, attention, mask = (batch[k].to(adapter._device()) for k in ("input_ids", "attention_mask", "loss_mask"))
        if self.backbone is not None:  # trained in train mode, scored without dropout
            with eval_mode(self.backbone) if not torch.is_grad_enabled() else contextlib.nullcontext():
                h = self.backbone.to(ids.device)(input_ids=ids, attention_mask=attention, output_hidden_states=True,
                                                 use_cache=False).hidden_states[-1].float()
        else:
            with torch.no_grad(), adapter._generation_model(use_reference=True) as model, eval_mode(model):
                h = model(input_ids=ids, attention_mask=attention, output_hidden_states=True,
                          use_cache=False).hidden_states[-1].float()
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        weights = mask.unsqueeze(-1).float()
        return torch.cat([h[torch.arange(len(ids)), last], (h * weights).sum(1) / weights.sum(1).clamp(min=1)], -1)

    def features(self, inputs: Sequence[tuple[Any, Any]]) -> torch.Tensor:
        """Features of ``(prompt, response)`` records (cached by their rendering when the backbone is frozen)."""
        if self.backbone is not None:
            return self.batch_features(self.adapter.collate([{"prompt": p, "response": r} for p, r in inputs]))
        keys = [render(list(x)) for x in inputs]
        missing = sorted({k: x for k, x in zip(keys, inputs) if k not in self.cache}.items())
        if missing:
            batch = self.adapter.collate([{"prompt": p, "response": r} for _, (p, r) in missing])
            self.cache.update({k: f for (k, _), f in zip(missing, self.batch_features(batch).cpu())})
        return torch.stack([self.cache[k] for k in keys])

    def forward(self, inputs: Sequence[tuple[Any, Any]] | dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards ``[N]`` of ``(prompt, response)`` records or of a collated sample batch."""
        feats = self.batch_features(inputs) if isinstance(inputs, dict) else self.features(inputs)
        return self.head(feats.to(next(self.head.parameters()).device)).squeeze(-1)


def fit_bradley_terry(model: nn.Module, pairs: Sequence[dict], *, epochs: int, batch_size: int, lr: float,
                      generator: torch.Generator) -> float:
    """Minimise −log σ(r(x, y_w) − r(x, y_l)) with Adam over shuffled mini-batches; returns the final training
    accuracy (ties count ½)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    chosen = [(p["prompt"], p["chosen"]) for p in pairs]
    rejected = [(p["prompt"], p["rejected"]) for p in pairs]
    for _ in range(epochs):
        for idx in torch.randperm(len(pairs), generator=generator).split(batch_size):
            idx = idx.tolist()
            margin = model([chosen[i] for i in idx]) - model([rejected[i] for i in idx])
            loss = torch.nn.functional.softplus(-margin).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        margin = model(chosen) - model(rejected)
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def _rows(pairs: Any) -> list[dict]:
    if isinstance(pairs, dict) and "_target_" in pairs:
        from hydra.utils import instantiate

        pairs = instantiate(pairs)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("inverse alignment needs offline preference pairs to fit its reward model; got none")
    for i, p in enumerate(pairs):
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in p]
        if missing:
            raise ValueError(f"offline pair {p.get('row', i)} has no field(s) {missing}; rows must be "
                             "{prompt, chosen, rejected}")
    return pairs
