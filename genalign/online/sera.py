"""SeRA: self-reviewing and alignment with implicit reward margins (Ko et al. 2024, "SeRA: Self-Reviewing and
Alignment of Large Language Models using Implicit Reward Margins").

Training runs in rounds of ``round_steps`` optimizer steps. At the start of round t the policy is frozen into a
snapshot π_t, whose DPO implicit reward r_t(x, y) = β·(log π_t(y|x) − log ref(y|x)) reviews the data:

* **sample selection**: of each batch of offline pairs only the top ``top_fraction`` by implicit reward margin
  m_t = r_t(x, y_w) − r_t(x, y_l) are kept (pairs the model already finds clear; mislabelled or uninformative pairs
  have small or negative margins);
* **preference bootstrapping**: K responses per prompt are drawn from π_t and ranked by r_t; the best and the worst
  form a new pair (prompts whose K responses all tie are skipped and counted; a text response that hit the length
  limit without an end token ranks last).

The loss is DPO of the current policy on the selected offline pairs plus ``bootstrap_weight`` × DPO on the
bootstrapped pairs (per example, so the trainer's mean weighs both). In round 0, π_0 = ref gives every implicit
reward 0, so round 0 is plain DPO on all pairs. The snapshot and the round counter are checkpointed. Under W
processes the top-k is taken over the global batch and the losses are weighted as one mean over every process's
examples (:func:`~genalign.online.self_pairs.global_share`), so a multi-process run equals the one-process run.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.base import Adapter
from genalign.data.batching import pairwise_batch
from genalign.objectives._checks import in_range, positive
from genalign.online import draws, global_batch
from genalign.online.self_pairs import PolicySnapshot, best_worst_dpo, global_share, rewound
from genalign.steps import Step, StepContext


class SeRAStep(Step):
    """SeRA on pairwise rows ``{"prompt", "chosen", "rejected"}``.

    Args:
        beta: β of DPO and of the implicit reward.
        top_fraction: the fraction k of each batch's offline pairs kept by margin (at least one pair).
        round_steps: optimizer steps per round; the snapshot π_t is refreshed after each round.
        num_samples: K responses per prompt for bootstrapping (0 turns bootstrapping off).
        bootstrap_weight: weight of the bootstrapped pairs' DPO loss.
        sample_kwargs: extra keyword arguments of ``adapter.sample`` (e.g. ``max_new_tokens``).
    """

    def __init__(self, beta: float = 0.1, *, top_fraction: float = 0.7, round_steps: int = 50, num_samples: int = 4,
                 bootstrap_weight: float = 1.0, sample_kwargs: dict[str, Any] | None = None):
        self.beta = positive("beta", beta)
        self.top_fraction = in_range("top_fraction", top_fraction, 0.0, 1.0)
        if self.top_fraction == 0.0:
            raise ValueError("top_fraction must be > 0 (the fraction of offline pairs kept)")
        for name, value, low in (("round_steps", round_steps, 1), ("num_samples", num_samples, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if num_samples == 1:
            raise ValueError("num_samples must be 0 (no bootstrapping) or >= 2 (a best and a worst to pair)")
        self.round_steps, self.num_samples = int(round_steps), int(num_samples)
        self.bootstrap_weight = in_range("bootstrap_weight", bootstrap_weight, 0.0)
        self.sample_kwargs = dict(sample_kwargs or {})
        self.snapshot = PolicySnapshot()
        self.round = 0

    def __call__(self, adapter: Adapter, rows: Sequence[dict], ctx: StepContext):
        batch = pairwise_batch(adapter, rows).to(draws.device(adapter))
        keep = self.select(adapter, batch, ctx)
        chosen, rejected = adapter.score_pairs(batch, generator=ctx.generator)
        offline = objectives.dpo(chosen.policy[keep], rejected.policy[keep], chosen.reference[keep],
                                 rejected.reference[keep], beta=self.beta)
        metrics = objectives.pairwise_metrics(chosen.policy, rejected.policy, chosen.reference, rejected.reference,
                                              beta=self.beta)
        metrics.update({"sera/round": float(self.round), "sera/kept": float(keep.numel())})
        losses = [offline]
        if self.round > 0 and self.num_samples:
            boot, boot_metrics = self.bootstrap(adapter, draws.prompts(rows), ctx)
            losses.append(self.bootstrap_weight * boot)
            metrics.update(boot_metrics)
        return global_share(torch.cat(losses), ctx.shard), metrics

    # ------------------------------------------------------------------------------------------ the two reviews
    @torch.no_grad()
    def select(self, adapter: Adapter, batch, ctx: StepContext) -> torch.Tensor:
        """Indices (into this process's share) of the kept offline pairs: all in round 0, else the top ⌈k·B⌉ of the
        *global* batch of B pairs by π_t's implicit margin, so W processes keep exactly the one-process run's pairs."""
        if self.round == 0:
            return torch.arange(batch.size)
        with self.snapshot.swapped(adapter), rewound(ctx.generator):
            chosen, rejected = adapter.score_pairs(batch, generator=ctx.generator)
        margin = self.beta * ((chosen.policy - chosen.reference) - (rejected.policy - rejected.reference))
        margins = torch.tensor(ctx.shard.gather(margin.float().cpu().tolist()))
        start = sum(ctx.shard.gather([batch.size])[: ctx.shard.index])
        count = max(1, math.ceil(self.top_fraction * margins.numel()))
        kept = torch.sort(margins, descending=True, stable=True).indices[:count]
        return kept[(kept >= start) & (kept < start + batch.size)] - start

    def bootstrap(self, adapter: Adapter, prompts: list[Any], ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """DPO losses of the current policy on (best, worst) of K samples of π_t per prompt, ranked by r_t (the
        samples the one-process run draws for these prompts, :func:`global_batch.draw`)."""
        n, k, generator = len(prompts), self.num_samples, ctx.generator
        with self.snapshot.swapped(adapter), torch.no_grad():
            samples = global_batch.draw(adapter, prompts, k, ctx, **self.sample_kwargs)
            with rewound(generator):
                judged = adapter.score(samples, groups=torch.arange(n).repeat_interleave(k), generator=generator)
        implicit = (judged.policy - judged.reference).view(n, k).float().cpu()
        loss, metrics = best_worst_dpo(adapter, samples, implicit, beta=self.beta, generator=generator,
                                       prefix="sera/bootstrap")
        if not metrics["sera/bootstrap/pairs"]:
            loss = loss[:0]  # no pair: nothing joins the offline losses
        return loss, {k: v for k, v in metrics.items() if k.startswith("sera/")}

    # ------------------------------------------------------------------------------------------ trainer hooks
    def on_optimizer_step(self, adapter: Adapter, global_step: int) -> None:
        """End of a round every ``round_steps`` steps: π_{t+1} ← the current policy."""
        if global_step % self.round_steps == 0:
            self.snapshot.sync(adapter)
            self.round += 1

    def checkpoint_state(self) -> list[Any]:
        return [self]

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "snapshot": self.snapshot.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.snapshot.load_state_dict(state["snapshot"])

