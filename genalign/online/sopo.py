"""SoPo: semi-online preference optimisation for text-to-motion diffusion (Tan et al. 2025, "SoPo: Text-to-Motion
Generation Using Semi-Online Preference Optimization").

The preferred motion is *offline* (the dataset's ground truth x_w for caption c); the unpreferred one is *online*:
each step draws K motions from the current policy (no gradients, same length as x_w) and keeps the worst::

    x^1..x^K ~ π_θ(· | c),  r_k = reward(c, x^k) ∈ [0, 1],  x_l = x^{argmin_k r_k}
    mask = [r(x_l) < τ],  S = min_k sim(x_w, x^k) ∈ [0, 1],  β_w = β(C − S)
    loss = −log σ(β_w·(s_θ(x_w) − s_ref(x_w)) − mask·β·(s_θ(x_l) − s_ref(x_l)))

with s the adapter's negative masked denoising error (``genalign.objectives.sopo``); x_w and x_l of a caption share
one timestep, noise and condition drop, and the reference sees the very same noisy inputs. A rejected sample whose
reward already reaches τ (0.45) is not pushed down; a policy sample close to the ground truth (large S) lowers the
weight on x_w. Defaults: K = 4, β = 1, τ = 0.45, C = 2 (the paper uses K = 2–4).

Samples are drawn with the policy in eval mode (``MotionAdapter.sample`` switches it for the duration): the negatives
must be what the policy generates at inference, the distribution the reward judges and SoPo improves, not a
dropout-perturbed sub-network; in training mode the sampled motion, its reward and hence the choice of x_l and the
mask would carry dropout noise that no inference-time sample has. All sampling randomness comes from the step's
``ctx.generator`` (the trainer checkpoints it), so a resumed run draws the same negatives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from genalign import objectives
from genalign.adapters.diffusion_scores import SAMPLERS
from genalign.adapters.motion import MotionAdapter
from genalign.objectives._checks import in_range, positive
from genalign.steps import Step, StepContext
from genalign.types import PairwiseBatch

#: ``reward(captions [N], motions [N, T, D], lengths [N]) -> [N]`` in [0, 1] (e.g. ``TextMotionRetrievalReward``)
Reward = Callable[[list[str], torch.Tensor, torch.Tensor], torch.Tensor]
#: ``similarity(a [N, T, D], lengths_a [N], b [N, T, D], lengths_b [N]) -> [N]`` in [0, 1] (e.g. ``MotionSimilarity``)
Similarity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SoPoStep(Step):
    """The SoPo loss step on rows ``{"prompt": caption, "response": normalised ground-truth motion [T, D], "row"}``.

    Args:
        reward: text-motion reward in [0, 1] (see :data:`Reward`); picks x_l and sets the mask.
        similarity: motion-motion similarity in [0, 1] (see :data:`Similarity`); gives S.
        evaluator: instead of ``reward``/``similarity``, a :class:`~genalign.models.t2m_evaluator.TextMotionEvaluator`
            (or a folder written by its ``save``) whose co-embeddings give both (``genalign.rewards.motion``); it must
            take motions in the adapter's normalisation.
        num_samples: K policy samples per caption.
        beta, threshold, c: β, τ and C of the loss.
        num_inference_steps, guidance_scale, scheduler: how the negatives are sampled (``MotionAdapter.sample``);
            the defaults are small enough for a CPU.
    """

    def __init__(
        self,
        reward: Reward | None = None,
        similarity: Similarity | None = None,
        *,
        evaluator=None,
        num_samples: int = 4,
        beta: float = 1.0,
        threshold: float = 0.45,
        c: float = 2.0,
        num_inference_steps: int = 10,
        guidance_scale: float = 2.5,
        scheduler: str = "ddim",
    ):
        if evaluator is not None:
            if reward is not None or similarity is not None:
                raise ValueError("give either evaluator= or reward=/similarity=, not both")
            reward, similarity = _evaluator_judges(evaluator)
        if reward is None or similarity is None:
            raise ValueError("SoPo needs a text-motion reward and a motion-motion similarity: pass reward= and "
                             "similarity= callables, or evaluator= (a TextMotionEvaluator or its saved folder)")
        if int(num_samples) != num_samples or num_samples < 1 or int(num_inference_steps) != num_inference_steps \
                or num_inference_steps < 1:
            raise ValueError(f"num_samples and num_inference_steps must be positive integers, got {num_samples} "
                             f"and {num_inference_steps}")
        if scheduler not in SAMPLERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SAMPLERS}")
        self.reward, self.similarity = reward, similarity
        self.num_samples, self.num_inference_steps = int(num_samples), int(num_inference_steps)
        self.beta, self.threshold, self.c = positive("beta", beta), float(threshold), in_range("c", c, 1.0)
        self.guidance_scale, self.scheduler = float(guidance_scale), scheduler

    def __call__(self, adapter: MotionAdapter, rows: Sequence[dict], ctx: StepContext):
        if not isinstance(adapter, MotionAdapter):
            raise TypeError(f"SoPo trains text-to-motion diffusion: it needs a MotionAdapter, got {type(adapter).__name__}")
        preferred = adapter.collate([{"prompt": r.get("prompt"), "response": r.get("response"), "row": r.get("row")}
                                     for r in rows])
        lengths = preferred["mask"].sum(1)
        samples = self.draw(adapter, preferred["prompt"], lengths, ctx.generator)
        k, n = self.num_samples, len(rows)
        device = samples["motion"].device
        sample_lengths = lengths.repeat_interleave(k).to(device)
        reward = _unit_scores("reward", self.reward(samples["prompt"], samples["motion"], sample_lengths), n * k, device)
        sim = _unit_scores("similarity", self.similarity(
            preferred["motion"].to(device).repeat_interleave(k, 0), sample_lengths, samples["motion"], sample_lengths
        ), n * k, device)
        rejected_reward, worst = reward.view(n, k).min(1)
        similarity = sim.view(n, k).amin(1)
        pick = torch.arange(n, device=device) * k + worst
        rejected = {"motion": samples["motion"][pick], "mask": samples["mask"][pick], "cond": samples["cond"][pick],
                    "prompt": [samples["prompt"][i] for i in pick.tolist()]}
        batch = PairwiseBatch(chosen=preferred, rejected=rejected, size=n).to(device)
        chosen, rejected_scores = adapter.score_pairs(batch, generator=ctx.generator)
        loss = objectives.sopo(chosen.policy, rejected_scores.policy, chosen.reference, rejected_scores.reference,
                               rejected_reward=rejected_reward, similarity=similarity, beta=self.beta,
                               threshold=self.threshold, c=self.c)
        metrics = objectives.pairwise_metrics(chosen.policy, rejected_scores.policy, chosen.reference,
                                              rejected_scores.reference, beta=self.beta)
        metrics.update({
            "sopo/mask_rate": (rejected_reward < self.threshold).float().mean(),
            "sopo/rejected_reward": rejected_reward.mean(),
            "sopo/sample_reward": reward.mean(),
            "sopo/similarity": similarity.mean(),
        })
        return loss, metrics

    def draw(self, adapter: MotionAdapter, prompts: list[str], lengths: torch.Tensor, generator: torch.Generator):
        """K motions per caption from the current policy (eval mode, no gradients), caption-major, each as long as
        its caption's preferred motion."""
        return adapter.sample(prompts, self.num_samples, generator=generator, lengths=lengths,
                              num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                              scheduler=self.scheduler, **adapter.online_sample_kwargs)


def _unit_scores(name: str, values, size: int, device: torch.device) -> torch.Tensor:
    """The judge's output as a float ``[size]`` tensor of constants in [0, 1] on ``device``; anything else raises."""
    if not isinstance(values, torch.Tensor) or values.shape != (size,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"SoPo {name} must return a tensor with one value per sampled motion ([{size}]), got {shape}")
    values = values.detach().float().to(device)
    if bool(((values < 0) | (values > 1) | values.isnan()).any()):
        raise ValueError(f"SoPo {name} must lie in [0, 1] (the threshold and β(C − S) assume it), got {values.tolist()}")
    return values


def _evaluator_judges(evaluator) -> tuple[Reward, Similarity]:
    """Retrieval reward and motion similarity on a T2M evaluator (an instance or a saved folder)."""
    from genalign.models.t2m_evaluator import TextMotionEvaluator
    from genalign.rewards.motion import MotionSimilarity, TextMotionRetrievalReward

    if isinstance(evaluator, (str, Path)):
        evaluator = TextMotionEvaluator.load(evaluator)
    return TextMotionRetrievalReward(evaluator), MotionSimilarity(evaluator)
