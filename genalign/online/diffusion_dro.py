"""Diffusion-DRO: preference learning from expert demonstrations and the policy's own samples (Wu et al. 2025,
"Diffusion-DRO", NeurIPS 2025; inverse reinforcement learning in the denoising-error space).

Data are expert demonstrations only: rows ``{"prompt", "response": image or motion, "row"}`` (e.g. the reward
model's top-K images, :func:`genalign.online.pairs.demonstration_set`, or ground-truth motions). Any adapter with
:class:`~genalign.adapters.diffusion_sampling.DiffusionSampling` trains: text-to-image and text-to-motion. A frozen **sampler snapshot** θ_s of the policy samples
trajectories for the batch's prompts and a **trajectory buffer** keeps every sampler state
``(x_t, t, ε̂ = ε_θs(x_t, t, c))`` with the trajectory's conditioning (prompt encoding; a motion's frame mask). Per row, the loss compares

    expert ("chosen"):    x̄_t = add_noise(x0_expert, ε, t), fresh ε ~ N(0, I), target ε
    own sample ("rejected"): a buffer state (x_t, t) of the same prompt, target ε̂ (the snapshot's own prediction)

at the same t, for the policy θ and the frozen reference, with L = ‖f(x_t, t, c) − target‖² (mean over dims; for
motions the masked mean over real frames, as the motion adapter's score)::

    loss = relu([(Le_θ − Le_ref) − (Lp_θ − Lp_ref)] + m),  m = 1e-3       (``genalign.objectives.diffusion_dro``)

which pushes the policy's error on experts down relative to its error on its own samples.

Sampling follows the paper: DPM-Solver++ with ``num_inference_steps`` S = 20 steps, no classifier-free guidance,
and a **random per-trajectory offset** o ~ U{0, …, r − 1}, r = ⌊T / S⌋ (50 for T = 1000), on the grid
``t_k = k·r + o`` (k = S−1 … 0): the sampler really runs on the shifted grid (the adapter's
``trajectories``, i.e. ``sample`` with custom ``timesteps``), so every recorded state is a real point of the snapshot's trajectory, every timestep
0 … S·r − 1 is visited, and ε̂ is the snapshot's prediction at exactly that (x_t, t). Samples use the snapshot in
eval mode.

Prediction types: ε̂ is stored in its epsilon form. For v- or x0-predicting models the policy-side target is ε̂
converted back to the model's own parameterisation at (x_t, t) — x̂0 = (x_t − σ_t·ε̂)/α_t, then v = α_t·ε̂ − σ_t·x̂0
or x̂0 — i.e. exactly the snapshot's raw output, and the expert side uses the usual v / x0 target, so both errors are
measured in the space the model predicts (x0 for MDM-style motion models). Motion trajectories get one frame count
each, drawn like the motion adapter's sample lengths; expert and own sample are padded to one length and scored over
their own real frames.

**Snapshot.** Only trainable weights differ between θ_s and θ (LoRA weights with LoRA, everything in a full
fine-tune), so the snapshot is a copy of those tensors. To sample, they are swapped into the policy's parameters by
pointer (``param.data``), no copy, and swapped back afterwards. With ``resync_every`` M = 1 (the paper) the snapshot
is by construction the current policy whenever the buffer is (re)filled, so no copy is kept at all.

**Buffer.** Trajectories are keyed by the prompt they were sampled for (the empty prompt for condition-dropped rows:
the adapter's ``prompt_dropout``, 20 % in the paper, drops the condition of expert and own sample alike). A row's
own sample is drawn from its prompt's trajectories; a prompt without any is sampled then
(``trajectories_per_prompt`` K trajectories). Every M optimizer steps :meth:`DiffusionDROStep.on_optimizer_step`
re-syncs the snapshot with the policy and empties the buffer; in between, trajectories are reused (a repeated
prompt draws another state of its stored trajectories) and new prompts are sampled with the lagging snapshot.

**Randomness** (all from ``ctx.generator``, which the trainer checkpoints) is drawn per call in this order: condition
drop ``u [B]`` (only when dropout is active), then for prompts missing from the buffer the offsets ``[N]`` (for
motion then the frame counts ``[N]``, and the noise at the model's ``max_frames``) and the sampler's noise, then the buffer draw (:meth:`TrajectoryBuffer.draw`), then the expert noise ε ``[B, ...]``.
:meth:`checkpoint_state` returns the step itself: its state dict holds the snapshot and the buffer, so a resumed run
continues exactly. With several processes the buffer is the same on every process (:meth:`DiffusionDROStep.fill`
gathers the sampled shares) and the generator stays in lockstep (:mod:`genalign.distributed`), so accelerate's copy
from the main process restores every process.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from genalign.adapters.diffusion_sampling import DiffusionSampling
from genalign.adapters.diffusion_scores import SAMPLERS, denoising_target
from genalign.distributed import Shard
from genalign.objectives import diffusion_dro
from genalign.objectives._checks import in_range
from genalign.online.self_pairs import PolicySnapshot
from genalign.steps import Step, StepContext
from genalign.types import DemonstrationBatch

STATE_KEYS = ("x_t", "t", "eps_hat")


class TrajectoryBuffer:
    """Sampler trajectories keyed by prompt: ``x_t``/``eps_hat`` ``[N, S, ...]``, ``t [N, S]`` and their
    conditioning (the adapter's per-sample tensors, e.g. the prompt encoding ``cond, pooled, time_ids`` or a
    motion's ``cond, mask``, ``[N, ...]``) of N trajectories with S states each, on the CPU. Entries whose trailing
    sizes differ between additions (motions of different lengths) are zero-padded (False for masks) to the longest."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def clear(self) -> None:
        self.prompts, self.tensors = [], {}

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts that have no trajectory yet, in first-seen order."""
        present = set(self.prompts)
        return list(dict.fromkeys(p for p in prompts if p not in present))

    def add(self, prompts: Sequence[str], tensors: dict[str, torch.Tensor]) -> None:
        """Append trajectories: one prompt and one entry along dim 0 of every tensor each."""
        if any(len(v) != len(prompts) for v in tensors.values()):
            raise ValueError(f"buffer entries must have {len(prompts)} trajectories each, got "
                             f"{ {k: len(v) for k, v in tensors.items()} }")
        if self.tensors and set(tensors) != set(self.tensors):
            raise ValueError(f"buffer entries hold {sorted(self.tensors)}, got {sorted(tensors)}")
        cpu = {k: v.detach().cpu() for k, v in tensors.items()}
        self.tensors = {k: _cat_padded(self.tensors[k], v) for k, v in cpu.items()} if self.tensors else cpu
        self.prompts.extend(prompts)

    def draw(self, prompts: Sequence[str], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """One state per prompt: a trajectory of that prompt uniformly (``u ~ U[0, 1) [B]``, the ⌊u·n⌋-th of its
        n trajectories), then a step uniformly (``k ~ U{0, …, S−1} [B]``). Returns ``x_t, t, eps_hat [B, ...]`` and
        the trajectories' conditioning."""
        by_prompt: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            by_prompt.setdefault(p, []).append(i)
        absent = [p for p in prompts if p not in by_prompt]
        if absent:
            raise KeyError(f"no buffered trajectory for prompts {absent[:5]}; sample them first")
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(len(prompts), generator=generator, device=device).cpu()
        steps = self.tensors["t"].shape[1]
        k = torch.randint(0, steps, (len(prompts),), generator=generator, device=device).cpu()
        counts = torch.tensor([len(by_prompt[p]) for p in prompts])
        pick = (u * counts).long().clamp(max=counts - 1)
        j = torch.tensor([by_prompt[p][int(i)] for p, i in zip(prompts, pick)], dtype=torch.long)
        out = {key: self.tensors[key][j, k] for key in STATE_KEYS}
        out.update({key: value[j] for key, value in self.tensors.items() if key not in STATE_KEYS})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "tensors": dict(self.tensors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts, self.tensors = list(state["prompts"]), dict(state["tensors"])


class DiffusionDROStep(Step):
    """The Diffusion-DRO loss step for a diffusion adapter with trajectories
    (:class:`~genalign.adapters.diffusion_sampling.DiffusionSampling`: image and motion; see the module docstring
    for the procedure).

    Args:
        margin: the hinge margin m (1e-3 in the paper).
        resync_every: M, re-sync the sampler snapshot with the policy (and empty the buffer) every M optimizer
            steps (1 in the paper).
        trajectories_per_prompt: K trajectories sampled for each prompt missing from the buffer.
        num_inference_steps: S sampler steps per trajectory (20).
        guidance_scale: classifier-free guidance while sampling (1 = none, the paper's setting).
        scheduler: the sampler, ``"dpmsolver++"`` (the paper) or ``"ddpm"`` (both take offset grids).
    """

    def __init__(
        self,
        margin: float = 1e-3,
        resync_every: int = 1,
        trajectories_per_prompt: int = 1,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        scheduler: str = "dpmsolver++",
    ):
        for name, value in (("resync_every", resync_every), ("trajectories_per_prompt", trajectories_per_prompt),
                            ("num_inference_steps", num_inference_steps)):
            if int(value) != value or value < 1:
                raise ValueError(f"Diffusion-DRO {name} must be a positive integer, got {value!r}")
        if scheduler not in ("dpmsolver++", "ddpm"):
            raise ValueError(f"Diffusion-DRO samples on offset timestep grids, which {scheduler!r} cannot follow; "
                             f"use 'dpmsolver++' or 'ddpm' (samplers: {SAMPLERS})")
        self.margin = in_range("margin", margin, 0.0)
        self.resync_every, self.num_samples = int(resync_every), int(trajectories_per_prompt)
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.scheduler = scheduler
        self.buffer = TrajectoryBuffer()
        #: θ_s; empty (``tensors is None``) = the live policy, always so when M = 1
        self.snapshot = PolicySnapshot()

    # ------------------------------------------------------------------------------------------ the loss
    def __call__(self, adapter: DiffusionSampling, rows: Sequence[dict], ctx: StepContext):
        if not isinstance(adapter, DiffusionSampling):
            raise TypeError(f"Diffusion-DRO trains diffusion models on their own sampler trajectories: it needs an "
                            f"ImageDiffusionAdapter or a MotionAdapter (DiffusionSampling), got {type(adapter).__name__}")
        if self.resync_every > 1 and self.snapshot.tensors is None:
            self.snapshot.sync(adapter)
        generator, key = ctx.generator, adapter.sample_key
        batch = DemonstrationBatch(adapter.collate(_demonstrations(rows)), size=len(rows)).to(_device(adapter))
        expert = batch.demonstrations
        drop = self._draw_drop(adapter, batch.size, generator)
        keys = ["" if d else r["prompt"] for r, d in zip(rows, drop.tolist())]
        self.fill(adapter, keys, generator, ctx.shard)
        own = {k: v.to(expert[key].device) for k, v in self.buffer.draw(keys, generator).items()}
        x0, t = expert[key], own["t"]
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
        sched = adapter.noise_scheduler
        own_batch = {**{k: v for k, v in own.items() if k not in STATE_KEYS}, "prompt": keys}
        parts = [(expert, sched.add_noise(x0, eps, t), denoising_target(sched, x0, eps, t, adapter.prediction_type)),
                 (own_batch, own["x_t"].to(x0.dtype), own_target(adapter, own))]
        inputs = adapter.concat([{**part, key: x_t} for part, x_t, _ in parts])  # pads motions to one length
        target = adapter.concat([{**part, key: target} for part, _, target in parts])[key]
        if drop.any():
            inputs = adapter.drop_prompts(inputs, drop.repeat(2).to(x0.device))
        scores = adapter.score_at(inputs, inputs[key], torch.cat([t, t]), target)
        chosen, rejected = scores.split([batch.size, batch.size])
        loss = diffusion_dro(chosen.policy, rejected.policy, chosen.reference, rejected.reference, margin=self.margin)
        expert_gap = (chosen.reference - chosen.policy).detach()  # Le_θ − Le_ref (errors are −scores)
        sample_gap = (rejected.reference - rejected.policy).detach()  # Lp_θ − Lp_ref
        metrics = {
            "dro/active_fraction": (self.margin + expert_gap - sample_gap > 0).float().mean(),
            "dro/expert_gap": expert_gap.mean(),
            "dro/sample_gap": sample_gap.mean(),
            "dro/buffer_trajectories": torch.tensor(float(len(self.buffer))),
        }
        return loss, metrics

    def _draw_drop(self, adapter: DiffusionSampling, size: int, generator: torch.Generator) -> torch.Tensor:
        """Rows whose condition is dropped (expert and own sample both use the empty prompt), in training mode."""
        p = adapter.prompt_dropout if adapter.unwrapped_policy.training else 0.0
        if p <= 0:
            return torch.zeros(size, dtype=torch.bool)
        return torch.rand(size, generator=generator, device=generator.device).cpu() < p

    # ------------------------------------------------------------------------------------------ sampling
    def fill(self, adapter: DiffusionSampling, prompts: Sequence[str], generator: torch.Generator | None,
             shard: Shard | None = None) -> None:
        """Sample K snapshot trajectories on offset grids for every prompt of the global batch that has none in
        the buffer.

        With several processes (``shard``), the missing prompts are those of all processes' ``prompts`` and every
        process ends with the buffer the one-process run builds: the offsets and the initial noise are drawn for all
        N·K trajectories on every process (the one-process draws), each process samples a contiguous share of the
        prompts with its slice of them, and the shares are gathered. DPM-Solver++ is deterministic given those, and
        the ``ddpm`` sampler draws one row-wise noise tensor per step over all grids
        (:mod:`genalign.adapters.multi_grid_ddpm`), so the trajectories are the one-process ones; a sampler whose
        draws are not row-wise (``adapter.row_wise_draws``) has every process sample all N·K trajectories itself."""
        shard = shard or Shard()
        missing = self.buffer.missing(shard.gather(prompts))
        if not missing:
            return
        k, total = self.num_samples, len(missing) * self.num_samples
        with shard.remap(None):
            grids = self.offset_grids(adapter, total, generator)
        split = shard.count > 1 and adapter.row_wise_draws(timesteps=grids, scheduler=self.scheduler,
                                                           **adapter.online_sample_kwargs)
        share = shard.split(len(missing)) if split else range(len(missing))
        first = share.start * k
        entries = {}
        if share:
            with shard.remap((lambda d: (total, first)) if split else None), self._snapshot_weights(adapter):
                condition, states = adapter.trajectories(
                    missing[share.start : share.stop], k, generator=generator, timesteps=grids[first : share.stop * k],
                    guidance_scale=self.guidance_scale, scheduler=self.scheduler)
            entries = {key: torch.stack([getattr(s, key) for s in states], dim=1) for key in STATE_KEYS}
            entries.update(condition)
            entries = {key: value.cpu() for key, value in entries.items()}
        if split:  # every share, in process order; the generator continues from process 0's (which sampled)
            parts = shard.gather([(entries, generator.get_state() if generator is not None else None)])
            entries = {key: torch.cat([part[key] for part, _ in parts if part]) for key in parts[0][0]}
            if generator is not None:
                generator.set_state(parts[0][1])
        self.buffer.add([p for p in missing for _ in range(k)], entries)

    def offset_grids(self, adapter: DiffusionSampling, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``[n, S]`` descending grids ``t_k = k·r + o``, r = ⌊T / S⌋, one offset ``o ~ U{0, …, r−1}`` per row."""
        num_train, steps = adapter.noise_scheduler.config.num_train_timesteps, self.num_inference_steps
        if steps > num_train:
            raise ValueError(f"num_inference_steps={steps} exceeds the model's {num_train} training timesteps")
        ratio = num_train // steps
        device = generator.device if generator is not None else torch.device("cpu")
        offsets = torch.randint(0, ratio, (n, 1), generator=generator, device=device).cpu()
        return torch.arange(steps - 1, -1, -1).unsqueeze(0) * ratio + offsets

    @contextmanager
    def _snapshot_weights(self, adapter: DiffusionSampling) -> Iterator[None]:
        """Sample with θ_s (swapped in by pointer), or with the live policy while the snapshot is empty (M = 1)."""
        if self.snapshot.tensors is None:
            yield
            return
        with self.snapshot.swapped(adapter):
            yield

    # ------------------------------------------------------------------------------------------ trainer hooks
    def on_optimizer_step(self, adapter: DiffusionSampling, global_step: int) -> None:
        """Every M optimizer steps: θ_s ← θ and the buffer is emptied (refilled by the next call's prompts)."""
        if global_step % self.resync_every == 0:
            self.buffer.clear()
            if self.resync_every > 1:
                self.snapshot.sync(adapter)

    def checkpoint_state(self) -> list[Any]:
        return [self]

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot.state_dict()["tensors"], "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot.load_state_dict({"tensors": state["snapshot"]})
        self.buffer.load_state_dict(state["buffer"])


def own_target(adapter: DiffusionSampling, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The snapshot's raw prediction at a buffer state, in the model's parameterisation, from its epsilon form ε̂:
    ε̂ itself, or x̂0 = (x_t − σ_t·ε̂)/α_t and v = α_t·ε̂ − σ_t·x̂0 (see the module docstring)."""
    x_t, t, eps_hat = state["x_t"], state["t"], state["eps_hat"]
    if adapter.prediction_type == "epsilon":
        return eps_hat.to(x_t.dtype)
    alphas_cumprod = adapter.noise_scheduler.alphas_cumprod.to(x_t.device, torch.float32)[t.long()]
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    alpha, sigma = alphas_cumprod.sqrt().view(shape), (1 - alphas_cumprod).sqrt().view(shape)
    x0_hat = (x_t.float() - sigma * eps_hat.float()) / alpha
    return denoising_target(adapter.noise_scheduler, x0_hat, eps_hat.float(), t, adapter.prediction_type).to(x_t.dtype)


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b])`` along dim 0, zero-padding the end of every other dim to the larger size."""
    size = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def pad(x: torch.Tensor) -> torch.Tensor:
        widths = [w for have, want in zip(reversed(x.shape[1:]), reversed(size)) for w in (0, want - have)]
        return torch.nn.functional.pad(x, widths) if any(widths) else x

    return torch.cat([pad(a), pad(b)])


def _demonstrations(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Rows as collate records; pairwise rows are refused with a pointer to the demonstration builder."""
    records = []
    for i, r in enumerate(rows):
        if "response" not in r and "chosen" in r:
            raise ValueError(f"row {r.get('row', i)}: Diffusion-DRO trains on expert demonstrations "
                             "{prompt, response}, got a preference pair; pick experts with genalign.online.pairs.demonstration_set or map "
                             "'chosen' to 'response'")
        records.append({"prompt": r.get("prompt"), "response": r.get("response"), "row": r.get("row", i)})
    return records


def _device(adapter: DiffusionSampling) -> torch.device:
    return next(adapter.policy.parameters()).device
