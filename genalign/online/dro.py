"""DRO: Direct Reward Optimisation from single-trajectory feedback (Richemond et al. 2024, "Offline Regularised
Reinforcement Learning for Large Language Models Alignment").

Data: rows ``(x, y, R)``, one response per prompt with a scalar reward (no pairs). A value network V(x) over the
prompt is trained jointly with the policy on the same per-example loss::

    L = ½ (R − V(x) − τ·(log π(y|x) − log ref(y|x)))²          (genalign.objectives.direct_reward)

Its minimiser over π and V, for any data distribution covering the responses, is the KL-regularised optimum
π*(y|x) ∝ ref(y|x)·exp(R̄(x, y)/τ) with V*(x) = τ·log E_ref[exp(R̄/τ)], R̄ the mean reward of (x, y).

The value network (:class:`~genalign.online.hashed.HashedTextNet`, linear by default) has its own Adam optimizer:
the loss's backward fills its gradients, and the step applies them after every optimizer step of the trainer.
Network and optimizer state are checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.data.batching import labelled_batch
from genalign.data.single_trajectory import check_reward_range
from genalign.objectives._checks import positive
from genalign.online.hashed import HashedTextNet
from genalign.online import draws
from genalign.steps import Step, StepContext


class DROStep(Step):
    """DRO on rows ``{"prompt", "response" | "completion", "reward"}``.

    Args:
        tau: τ, the KL regularisation strength.
        value_lr: Adam learning rate of the value network.
        value_hidden: hidden width of the value network (0 = linear over the hashed prompt features).
        value_buckets: hash buckets of the value network's features.
        reward_range: ``[low, high]``; a batch with a reward outside it raises naming the row (``None``: unchecked).
    """

    def __init__(self, tau: float = 1.0, *, value_lr: float = 1e-2, value_hidden: int = 0, value_buckets: int = 2**14,
                 reward_range: Sequence[float] | None = None):
        self.tau = positive("tau", tau)
        self.value = HashedTextNet(buckets=value_buckets, hidden=value_hidden)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=positive("value_lr", value_lr))
        if reward_range is not None and len(reward_range) != 2:
            raise ValueError(f"reward_range must be [low, high], got {reward_range!r}")
        self.reward_range = None if reward_range is None else tuple(float(v) for v in reward_range)

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        if self.reward_range is not None:
            check_reward_range(rows, *self.reward_range)
        batch = labelled_batch(adapter, rows).to(draws.device(adapter))
        if batch.reward is None:
            raise ValueError("DRO needs a scalar 'reward' field on every row (single-trajectory feedback)")
        scores = adapter.score(batch.samples, groups=torch.arange(batch.size), generator=ctx.generator)
        reference = scores.reference if batch.reference is None else batch.reference
        if reference is None:
            raise ValueError("DRO regularises towards a reference model; the adapter has none (reference='none')")
        value = self.value.to(scores.policy.device)(draws.prompts(rows))
        loss = objectives.direct_reward(scores.policy, reference, batch.reward, value, tau=self.tau)
        log_ratio = (scores.policy - reference).detach()
        metrics = {"dro/value": value.detach().mean(), "dro/advantage": (batch.reward - value.detach()).mean(),
                   "dro/log_ratio": log_ratio.mean(), "dro/reward": batch.reward.mean()}
        return loss, metrics

    # ------------------------------------------------------------------------------------------ trainer hooks
    def on_optimizer_step(self, adapter: Adapter, global_step: int) -> None:
        """Apply the value network's accumulated gradients (the trainer only steps the policy), averaged over the
        processes first when training is distributed, so every process keeps the same value network."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for param in self.value.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= world
        self.value_optimizer.step()
        self.value_optimizer.zero_grad(set_to_none=True)

    def checkpoint_state(self) -> list[Any]:
        return [self]

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.state_dict(), "optimizer": self.value_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value.load_state_dict(state["value"])
        self.value_optimizer.load_state_dict(state["optimizer"])
