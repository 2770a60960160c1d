"""DR-PO: dataset reset policy optimisation (Chang et al. 2024, "Dataset Reset Policy Optimization for RLHF").

Online rollouts do not all start from the prompt: they start from states of the offline *preferred* responses.
For text a state is a prefix: with y_w = (y_1 … y_T) tokenised, a reset point h ~ U{0, …, T−1} is drawn per row
and K continuations are sampled from the policy given x ⊕ y_w[:h]. A reward model scores each full response
y_w[:h] ⊕ continuation; the best and the worst continuation form a pair, trained with DPO on the continuation
tokens (the reset prefix is context). h = 0 is an ordinary rollout from the prompt; later resets let the policy
practise finishing good responses it would rarely reach from scratch.

For diffusion a state is the preferred sample noised to an intermediate step of the sampler's grid t_S > … > t_1:
per step one index j ~ U{0, …, S−1} is drawn, x_{t_j} = √ᾱ·x_w + √(1−ᾱ)·ε (fresh ε per rollout), and the sampler
runs t_j → … → t_1 from there (the adapter's ``start_state`` gives ``sample``'s ``start=`` and, for motions, the
preferred motion's frame count); j = 0 is almost pure noise. Image and motion adapters alike
(:class:`~genalign.adapters.diffusion_sampling.DiffusionSampling`). The K
rollouts of a prompt are scored on one shared timestep and noise, so each (best, worst) pair is Diffusion-DPO's.

Rows whose K rewards all tie are skipped and counted; a rollout that hits the length limit without an end token
gets the lowest reward of its group minus one (it loses to every finished one) and is counted. Under several
processes (text) the reset points and rollouts are the one-process run's (one uniform draw per row, rollouts drawn
for the global batch, :mod:`genalign.online.global_batch`) and the loss is the mean over every process's pairs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from genalign import objectives
from genalign.adapters.diffusion_sampling import DiffusionSampling
from genalign.adapters.diffusion_scores import sampling_scheduler
from genalign.adapters.text import TextAdapter
from genalign.objectives._checks import positive
from genalign.online import draws, global_batch
from genalign.online.judges import RewardJudge
from genalign.online.self_pairs import best_worst_dpo
from genalign.steps import Step, StepContext, _global_masked_mean


class DRPOStep(Step):
    """DR-PO on rows ``{"prompt", "chosen", ...}`` (pairwise) or ``{"prompt", "response"}`` (demonstrations): text
    strings for a :class:`TextAdapter`, images or motions for a diffusion adapter (:class:`DiffusionSampling`).

    Args:
        reward: ``reward(prompts, responses) -> [N]`` (higher is better), a callable, an import path
            ("module.function") or a hydra spec.
        num_samples: K continuations per reset state (>= 2).
        beta: β of DPO.
        reward_range: ``[low, high]``; a reward outside raises naming the prompt.
        num_inference_steps, scheduler: the diffusion sampler grid the resets are drawn on (unused for text).
        sample_kwargs: extra keyword arguments of ``adapter.sample`` (e.g. ``max_new_tokens``, ``guidance_scale``).
    """

    def __init__(self, reward: Any, num_samples: int = 2, beta: float = 0.1, *,
                 reward_range: Sequence[float] | None = None, num_inference_steps: int = 20,
                 scheduler: str = "dpmsolver++", sample_kwargs: dict[str, Any] | None = None):
        if int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2 (continuations to compare), got {num_samples}")
        self.reward = RewardJudge(_callable(reward), reward_range=reward_range)
        self.num_samples, self.beta = int(num_samples), positive("beta", beta)
        if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
        self.num_inference_steps, self.scheduler = int(num_inference_steps), scheduler
        self.sample_kwargs = dict(sample_kwargs or {})

    def __call__(self, adapter, rows: Sequence[dict], ctx: StepContext):
        prompts, n, k = draws.prompts(rows), len(rows), self.num_samples
        if isinstance(adapter, TextAdapter):
            prompts, prefixes = self.reset_states(adapter, rows, ctx.generator)
            starts = [p + h for p, h in zip(prompts, prefixes)]
            samples = global_batch.draw(adapter, starts, k, ctx, **self.sample_kwargs)
            responses = [prefixes[q // k] + text for q, text in enumerate(draws.responses(samples))]
            depth = sum(len(h) > 0 for h in prefixes) / n  # rows reset past the prompt
        elif isinstance(adapter, DiffusionSampling):
            start, grid = self.noised_states(adapter, rows, ctx.generator)
            samples = draws.draw(adapter, prompts, k, ctx.generator, timesteps=grid, scheduler=self.scheduler,
                                 **start, **self.sample_kwargs)
            responses = draws.responses(samples)
            depth = 1.0 - float(grid[0] + 1) / adapter.noise_scheduler.config.num_train_timesteps  # 0 = from noise
        else:
            raise TypeError(f"DR-PO resets to states of preferred text or images (and motions); {type(adapter).__name__} "
                            "has none")
        reward = self.reward.rewards([p for p in prompts for _ in range(k)], responses).float().view(n, k)
        ended = draws.ended(adapter, samples).view(n, k)
        loss, metrics = best_worst_dpo(adapter, samples, reward, beta=self.beta, generator=ctx.generator, prefix="drpo")
        loss, metrics = self.global_pairs(loss, metrics, ctx)
        ended = ended.to(reward.device)
        metrics.update({"drpo/reward": _global_masked_mean(reward, ended, ctx.global_mean),
                        "drpo/reset_depth": float(depth)})
        return loss, metrics

    def global_pairs(self, loss: torch.Tensor, metrics: dict, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """The per-pair losses weighted so the processes' mean is the mean over every process's pairs (their number
        varies: tied rows are skipped), counts summed and reward metrics averaged over all pairs."""
        pairs = int(metrics["drpo/pairs"])
        share = ctx.global_mean(torch.tensor(float(pairs)))
        loss = loss * (pairs / share.to(loss.device)) if pairs else loss  # no pair: best_worst_dpo's zero
        counts = global_batch.global_sums({k: metrics[k] for k in ("drpo/pairs", "drpo/ties", "drpo/unfinished")}, ctx)
        keys = objectives.pairwise_metrics(*[torch.zeros(1)] * 4, beta=self.beta)  # the same keys on every process
        means = {key: metrics.get(key, float("nan")) for key in keys}
        return loss, {**counts, **global_batch.global_kept_means(means, pairs, ctx)}

    def reset_states(self, adapter: TextAdapter, rows: Sequence[dict], generator: torch.Generator):
        """Per row the prompt and a prefix y_w[:h] of its preferred response, h ~ U{0, …, T−1} over its tokens."""
        prompts, prefixes = draws.prompts(rows), []
        uniform = torch.rand(len(rows), generator=generator, device=generator.device).tolist()  # one draw per row
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            preferred = row.get("chosen", row.get("response"))
            where = row.get("source") or f"row {row.get('row', i)}"
            if not isinstance(prompt, str) or not isinstance(preferred, str) or not preferred:
                raise ValueError(f"{where}: DR-PO needs a string 'prompt' and a non-empty string preferred response "
                                 "('chosen' or 'response') to reset from; chat-message rows are not supported")
            ids = adapter.tokenizer(preferred, add_special_tokens=False)["input_ids"]
            h = min(int(uniform[i] * len(ids)), len(ids) - 1)
            prefixes.append(adapter.tokenizer.decode(ids[:h]))
        return prompts, prefixes

    def noised_states(self, adapter: DiffusionSampling, rows: Sequence[dict], generator: torch.Generator):
        """K copies of each row's preferred sample noised to one grid step t_j (fresh noise each), as ``sample``
        keyword arguments (``start``, and ``lengths`` for motions), and the rest of the grid ``[t_j, …, t_1]``."""
        preferred = adapter.collate([{"prompt": r.get("prompt"), "response": r.get("chosen", r.get("response")),
                                      "row": r.get("row")} for r in rows])
        preferred = draws.take(preferred, torch.arange(len(rows)).repeat_interleave(self.num_samples))
        sched = sampling_scheduler(self.scheduler, adapter.noise_scheduler.config)
        sched.set_timesteps(self.num_inference_steps)
        grid = sched.timesteps.long().cpu()
        j = int(torch.randint(len(grid), (), generator=generator))  # a scalar: one j for the global batch on every process
        x0 = preferred[adapter.sample_key]
        eps = torch.randn(x0.shape, generator=generator, device=generator.device)
        return adapter.start_state(preferred, eps, grid[j].expand(x0.shape[0])), grid[j:]


def _callable(spec: Any):
    """A reward function from a callable, an import path or a hydra spec."""
    if callable(spec):
        return spec
    from hydra.utils import get_object, instantiate

    if isinstance(spec, str):
        return get_object(spec)
    if isinstance(spec, dict) and "_target_" in spec:
        return instantiate(spec)
    raise ValueError(f"reward must be a callable (prompts, responses) -> [N], an import path or a config with "
                     f"_target_, got {spec!r}")
