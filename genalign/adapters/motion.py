"""Text-to-motion diffusion adapter over a :class:`~genalign.models.mdm.MotionDenoiser` (MDM, Tevet et al. 2023).

The score of a normalised motion x0 ``[T, D]`` under a caption c is the negative denoising error over its *real*
frames, at a timestep and noise shared by its group (see :mod:`genalign.adapters.diffusion_scores`)::

    s(x0) = −Σ_{f,d} m_f (f_θ(x_t, t, c, m) − target)²_{f,d} / (D·Σ_f m_f),   x_t = add_noise(x0, eps, t)

with ``m`` the frame mask and ``target`` = x0 (MDM predicts the clean motion) or eps. Diffusion-DPO is then
``genalign.objectives.dpo`` on these scores; SoPo's "masked x0 error" is exactly ``−s``.

Condition dropout (classifier-free guidance training) is applied while the policy is in training mode, once per
group and identically for the policy and the reference: a pair is always compared under one condition, and the
reference sees the very inputs the policy sees. Training the unconditional branch too keeps the guided prediction
``u + w·(c − u)`` that sampling uses (w = 2.5) consistent with the fine-tuned conditional one.

Sample batches are dicts ``{"motion": [N, T, D], "mask": bool [N, T] (True = real frame), "cond": [N, Dc],
"prompt": list[str]}``; motions are padded with zeros to the batch's longest. Captions are encoded in
:meth:`MotionAdapter.collate` (cached per caption), never in the training step.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, get_peft_model
from torch import nn

from genalign.adapters.base import Adapter
from genalign.adapters.diffusion_sampling import (DiffusionSampling, row_wise_grids, run_sampler, sampler_groups,
                                                  sampler_start)
from genalign.adapters.diffusion_scores import TrajectoryState, denoising_score, denoising_target, draw_noise
from genalign.models.mdm import MotionDenoiser
from genalign.models.text_condition import TextCondition
from genalign.types import Scores

MotionBatch = dict[str, Any]
DEFAULT_LORA_TARGETS = ["self_attn", "linear1", "linear2"]
DEFAULT_LENGTH_RANGE = (60, 196)


class MotionAdapter(Adapter, DiffusionSampling):
    """Masked diffusion scores, guided sampling and export for a motion denoiser.

    Args:
        model: the policy denoiser, or a folder written by ``MotionDenoiser.save_pretrained``.
        text: ``encode(captions) -> [N, cond_dim]`` (default: :class:`TextCondition` on the packaged MiniLM).
        reference: ``"copy"`` (a frozen copy of the initial model; full fine-tuning) or ``"lora"`` (the policy with
            its LoRA adapters disabled: no second copy in memory). Default: ``"lora"`` when ``lora`` is given.
        lora: ``peft.LoraConfig`` keyword arguments (``target_modules`` defaults to every attention block and the
            feed-forward layers); ``{}`` uses peft's defaults (rank 8).
        cond_drop_prob: fraction of groups scored with the null condition while the policy trains (default: the
            model's ``cond_drop_prob``, 0.1 as MDM).
        num_train_timesteps / beta_schedule: the DDPM training schedule (MDM: 1000 steps, cosine).
        trained_betas: explicit betas ``[num_train_timesteps]`` instead of ``beta_schedule`` (the official MDM's
            schedule, :func:`genalign.models.mdm_official.official_betas`).
        pad_frames: pad every batch (collated rows, samples, trajectories) to at least this many frames: a model
            trained on motions padded to a fixed length without frame masking (the official MDM without
            ``mask_frames``: 196) then sees padded frames as in training; scores still count real frames only.
        timestep_range: ``(lo, hi)``: timesteps are drawn uniformly from ``lo … hi−1`` (default all).
        disable_dropout: set every dropout of the policy to 0 (as TRL's DPO trainer does), so the policy and the
            reference agree exactly at initialisation and scores carry no dropout noise.
    """

    sample_key = "motion"
    #: online draws take their noise row-wise, so they can be sharded over processes (:meth:`sample`)
    online_sample_kwargs = MappingProxyType({"row_wise_noise": True})

    def __init__(
        self,
        model: nn.Module | str | Path,
        text: Callable[[list[str]], torch.Tensor] | None = None,
        *,
        reference: str | None = None,
        lora: dict[str, Any] | None = None,
        cond_drop_prob: float | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        timestep_range: tuple[int, int] | None = None,
        disable_dropout: bool = True,
        trained_betas: Sequence[float] | None = None,
        pad_frames: int | None = None,
    ):
        if isinstance(model, (str, Path)):
            model = MotionDenoiser.from_pretrained(model)
        self.config = model.config
        reference = reference or ("lora" if lora is not None else "copy")
        if reference not in ("lora", "copy"):
            raise ValueError(f"reference must be 'lora' or 'copy', got {reference!r}")
        if reference == "copy" and lora is not None:
            raise ValueError("lora=... trains adapters whose disabled state is the reference: use reference='lora' "
                             "(or drop lora= to fine-tune the whole model against a frozen copy)")
        self.lora = reference == "lora"
        self.cond_drop_prob = self.config.cond_drop_prob if cond_drop_prob is None else float(cond_drop_prob)
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=self.config.prediction_type,
            clip_sample=False,  # normalised motion features are not bounded to [-1, 1]
            trained_betas=None if trained_betas is None else list(trained_betas),
        )
        if pad_frames is not None and not 1 <= pad_frames <= self.config.max_frames:
            raise ValueError(f"pad_frames={pad_frames} must be in [1, {self.config.max_frames}] (the model's max_frames)")
        self.pad_frames = pad_frames
        lo, hi = timestep_range if timestep_range is not None else (0, num_train_timesteps)
        if not 0 <= lo < hi <= num_train_timesteps:
            raise ValueError(f"timestep_range {(lo, hi)} must satisfy 0 <= lo < hi <= {num_train_timesteps}")
        self.timestep_range = (int(lo), int(hi))
        self.text = text if text is not None else TextCondition()
        text_dim = getattr(self.text, "dim", self.config.cond_dim)
        if text_dim != self.config.cond_dim:
            raise ValueError(f"the text encoder gives {text_dim}-d embeddings but the denoiser takes cond_dim="
                             f"{self.config.cond_dim}; build the denoiser with cond_dim={text_dim}")
        if disable_dropout:
            _disable_dropout(model)
        self.reference = None
        if self.lora:
            options = {"target_modules": list(DEFAULT_LORA_TARGETS), **(lora or {})}
            model = get_peft_model(model, LoraConfig(**options))
        else:
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
            model.requires_grad_(True)
        self.policy = model.train()

    def to(self, device: torch.device | str) -> "MotionAdapter":
        """Move the policy and the reference copy (the caption encoder stays where it is: collate runs on CPU)."""
        for module in (self.policy, self.reference):
            if module is not None:
                module.to(device)
        return self

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``"sample"`` (x0, MDM) or ``"epsilon"``."""
        return self.config.prediction_type

    @property
    def prompt_dropout(self) -> float:
        """The condition-drop probability while training (``cond_drop_prob``)."""
        return self.cond_drop_prob

    # ------------------------------------------------------------------------------------------ batches
    def collate(self, records: Sequence[dict[str, Any]]) -> MotionBatch:
        """Records ``{"prompt": caption, "response": normalised motion [T, D] (tensor or array), "row"}``."""
        if not records:
            raise ValueError("collate needs at least one record")
        prompts, motions = [], []
        for i, record in enumerate(records):
            label = _label(record, i)
            prompt = record.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"{label}: field 'prompt' must be a caption string, got {type(prompt).__name__}")
            if record.get("response") is None:
                raise ValueError(f"{label}: missing field 'response' (a normalised motion [T, {self.config.feature_dim}])")
            prompts.append(prompt)
            motions.append(self._motion_tensor(record["response"], label))
        return {**pad_motions(motions, self.pad_frames), "cond": self.encode_captions(prompts), "prompt": prompts}

    def _motion_tensor(self, motion: Any, label: str) -> torch.Tensor:
        if isinstance(motion, np.ndarray):
            motion = torch.from_numpy(motion)
        if not isinstance(motion, torch.Tensor) or not motion.is_floating_point():
            kind = motion.dtype if isinstance(motion, torch.Tensor) else type(motion).__name__
            raise ValueError(f"{label}: 'response' must be a float tensor or array [T, D], got {kind}")
        d, max_frames = self.config.feature_dim, self.config.max_frames
        if motion.ndim != 2 or motion.shape[1] != d or not 1 <= motion.shape[0] <= max_frames:
            raise ValueError(f"{label}: motion has shape {tuple(motion.shape)}, expected [T, {d}] with 1 <= T <= "
                             f"{max_frames} (the model's max_frames); crop longer motions in the dataset")
        if not torch.isfinite(motion).all():
            raise ValueError(f"{label}: motion contains NaN or inf")
        return motion.detach().float().cpu()

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Caption embeddings ``[N, cond_dim]`` from the text encoder."""
        cond = torch.as_tensor(self.text(captions)).float()
        if tuple(cond.shape) != (len(captions), self.config.cond_dim):
            raise ValueError(f"the text encoder returned shape {tuple(cond.shape)} for {len(captions)} captions; "
                             f"expected [N, {self.config.cond_dim}] (the denoiser's cond_dim)")
        return cond

    def concat(self, parts: Sequence[MotionBatch]) -> MotionBatch:
        """Concatenate sample batches, re-padding every motion to the longest of all parts (and carrying the
        condition drops of :meth:`drop_prompts`)."""
        frames = max(part["motion"].shape[1] for part in parts)
        out = {"motion": [], "mask": []}
        for part in parts:
            extra = frames - part["motion"].shape[1]
            out["motion"].append(nn.functional.pad(part["motion"], (0, 0, 0, extra)))
            out["mask"].append(nn.functional.pad(part["mask"], (0, extra), value=False))
        out = {k: torch.cat(v) for k, v in out.items()}
        if any("drop" in part for part in parts):
            out["drop"] = torch.cat([part.get("drop", torch.zeros(len(part["motion"]), dtype=torch.bool,
                                                                  device=part["motion"].device)) for part in parts])
        return {**out, "cond": torch.cat([p["cond"] for p in parts]), "prompt": [c for p in parts for c in p["prompt"]]}

    def drop_prompts(self, samples: MotionBatch, drop: torch.Tensor) -> MotionBatch:
        """A copy of ``samples`` scored with the null condition where ``drop [N]`` is True (kept as its ``drop``
        field, which the denoiser applies)."""
        drop = drop.to(samples["motion"].device, torch.bool)
        return {**samples, "drop": drop | samples["drop"] if "drop" in samples else drop}

    # ------------------------------------------------------------------------------------------ scores
    def score(
        self,
        samples: MotionBatch,
        *,
        groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        with_reference: bool = True,
    ) -> Scores:
        """Negative masked denoising errors at one ``(t, eps)`` (and condition drop) per group; see the module
        docstring. Draws follow :func:`~genalign.adapters.diffusion_scores.draw_noise`."""
        x0, mask = samples["motion"], samples["mask"]
        n = x0.shape[0]
        groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape [{n}] (one id per sample), got {tuple(groups.shape)}")
        dropout = self.cond_drop_prob if self.unwrapped_policy.training else 0.0
        draw = draw_noise(groups, tuple(x0.shape[1:]), self.timestep_range, generator, dropout)
        t, eps = draw.t.to(x0.device), draw.eps.to(x0.device, x0.dtype)
        x_t = self.noise_scheduler.add_noise(x0, eps, t)
        target = denoising_target(self.noise_scheduler, x0, eps, t, self.config.prediction_type)
        drop = draw.drop.to(x0.device) if draw.drop.any() else None
        return self.score_at(samples, x_t, t, target, drop=drop, with_reference=with_reference)

    def score_at(
        self,
        samples: MotionBatch,
        x_t: torch.Tensor,
        t: torch.Tensor,
        target: torch.Tensor,
        *,
        drop: torch.Tensor | None = None,
        with_reference: bool = True,
    ) -> Scores:
        """Scores at given noisy motions and targets, for the policy and, on the very same inputs, the reference.
        :meth:`score` is this at fresh ``(t, eps)``; online methods call it with sampler states."""
        mask = samples["mask"].to(x_t.device)
        policy = denoising_score(_predict(self.policy, x_t, t, samples, drop), target, mask.unsqueeze(-1))
        reference = None
        if with_reference:
            with torch.no_grad(), self.reference_model() as model:
                reference = denoising_score(_predict(model, x_t, t, samples, drop), target, mask.unsqueeze(-1))
        ones = torch.ones(len(policy), dtype=torch.long, device=policy.device)
        return Scores(policy=policy, reference=reference, lengths=ones)

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The reference: the policy with its LoRA adapters disabled, or the frozen copy (moved to the policy's
        device on first use)."""
        if self.reference is None:
            with self.unwrapped_policy.disable_adapter():
                yield self.unwrapped_policy
            return
        yield self.reference_copy_on_policy_device(self.reference)

    def some_parameters_skip_batches(self) -> bool:
        """:meth:`Adapter.some_parameters_skip_batches`: a trainable null-condition embedding (``null_cond``) is used
        only by batches in which a caption is dropped."""
        return any(p.requires_grad for name, p in self.unwrapped_policy.named_parameters() if name.endswith("null_cond"))

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        conditions: Sequence[str] | str,
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        use_reference: bool = False,
        lengths: Sequence[int] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.5,
        scheduler: str = "ddpm",
        timesteps: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        return_trajectory: bool = False,
        null_condition: Sequence[bool] | None = None,
        row_wise_noise: bool = False,
    ) -> MotionBatch:
        """Draw ``num_samples`` motions per caption (condition-major) with classifier-free guidance
        ``f = f(∅) + w·(f(c) − f(∅))`` (off for ``w = 1``).

        ``lengths`` gives the frame counts, one per caption or one per returned motion; by default each caption's
        length is drawn uniformly from 60…196 frames (capped at the model's ``max_frames``) with ``generator``
        (with ``start``: every motion has ``start``'s frame count). ``scheduler`` is ``"ddpm"`` (ancestral),
        ``"ddim"`` (η = 0) or ``"dpmsolver++"``. Returns a sample batch (scoreable as is) whose padded frames are zero.

        As :meth:`ImageDiffusionAdapter.sample <genalign.adapters.image.ImageDiffusionAdapter.sample>`:
        ``timesteps`` (``[S]`` or ``[N, S]``, ``dpmsolver++`` or ``ddpm``) replaces the grid, ``start``
        ``[N, T, D]`` the initial noise (the state at the grid's first timestep), and ``return_trajectory`` adds
        ``trajectory``, one :class:`TrajectoryState` ``(x_t, t, eps_hat)`` per sampler step. ``null_condition``
        (one bool per caption) samples those captions from the null condition, i.e. unconditionally.

        ``row_wise_noise`` draws the noise at ``max_frames`` (the initial noise, and DDPM's at every step, with the
        state held at ``max_frames``; the network sees the batch's frames): a motion's draws then do not depend on
        the other motions' lengths, so a batch can be sampled in shards (:meth:`row_wise_draws`). Online draws use
        it (:attr:`online_sample_kwargs`); the default draws at the batch's longest motion, as the evaluations and
        the offline pair builders always have.
        """
        prompts = [conditions] if isinstance(conditions, str) else list(conditions)
        if not prompts or num_samples < 1:
            raise ValueError(f"sample needs at least one caption and num_samples >= 1, got {len(prompts)} captions "
                             f"and num_samples={num_samples}")
        if lengths is None and start is not None:
            lengths = [start.shape[1]] * (len(prompts) * num_samples)
        frame_counts = self._sample_lengths(len(prompts), num_samples, lengths, generator)
        drop = None
        if null_condition is not None:
            if len(null_condition) != len(prompts):
                raise ValueError(f"null_condition needs one bool per caption ({len(prompts)}), got {len(null_condition)}")
            drop = torch.as_tensor(list(null_condition), dtype=torch.bool).repeat_interleave(num_samples)
        prompts = [p for p in prompts for _ in range(num_samples)]
        device = next(self.unwrapped_policy.parameters()).device
        cond = self.encode_captions(prompts).to(device)
        n, frames = len(prompts), max(int(frame_counts.max()), self.pad_frames or 0)
        mask = (torch.arange(frames) < frame_counts.unsqueeze(1)).to(device)
        groups = sampler_groups(scheduler, self.noise_scheduler.config, n, device, num_inference_steps, timesteps)
        held = self.config.max_frames if row_wise_noise else frames  # the frames the sampler state holds
        if start is not None:
            start = _pad_frames(start, held)
        x = sampler_start(groups, (n, held, self.config.feature_dim), generator, device, start)
        with self._sampling_model(use_reference) as model:
            dtype = next(model.parameters()).dtype
            model_cond = cond if drop is None else torch.where(drop.to(device).unsqueeze(-1), model.null_cond, cond)

            def predict(model_in: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
                model_in, c = model_in[:, :frames].to(dtype), model_cond.to(dtype)
                if guidance_scale != 1:
                    return _pad_frames(model.guided(model_in, t_batch, c, mask, guidance_scale).float(), held)
                return _pad_frames(model(model_in, t_batch, c, mask).float(), held)

            record = (self.noise_scheduler, self.prediction_type) if return_trajectory else None
            x, states = run_sampler(groups, x, predict, generator, record=record)
        out = {"motion": x[:, :frames] * mask.unsqueeze(-1), "mask": mask, "cond": cond, "prompt": prompts}
        if return_trajectory:
            out["trajectory"] = [TrajectoryState(s.x_t[:, :frames], s.t, s.eps_hat[:, :frames]) for s in states]
        return out

    def row_wise_draws(self, *, timesteps: torch.Tensor | None = None, row_wise_noise: bool = False,
                       scheduler: str = "ddpm", **sample_kwargs: Any) -> bool:
        """:meth:`Adapter.row_wise_draws`: the frame counts are one draw per caption; the noise is row-wise with
        ``row_wise_noise`` or when every batch is padded to ``max_frames`` anyway (``pad_frames``, e.g. the
        official MDM trained without ``--mask_frames``), and the sampler's draws on its grids are
        (:func:`~genalign.adapters.diffusion_sampling.row_wise_grids`)."""
        padded = row_wise_noise or self.pad_frames == self.config.max_frames
        return padded and row_wise_grids(scheduler, self.noise_scheduler.config, timesteps)

    def trajectories(
        self,
        prompts: Sequence[str],
        num_samples: int,
        *,
        generator: torch.Generator | None,
        timesteps: torch.Tensor,
        guidance_scale: float,
        scheduler: str,
    ) -> tuple[dict[str, torch.Tensor], list[TrajectoryState]]:
        """:meth:`DiffusionSampling.trajectories`: one frame count per trajectory (``U{60, …, 196}`` capped at
        ``max_frames``, ``[N·K]``), then the initial noise ``[N·K, max_frames, D]`` cut to the longest count (so a
        trajectory's draws do not depend on the others', as sharded sampling needs; ``init_noise_sigma`` is 1 for
        DDPM and DPM-Solver++), then :meth:`sample` from it with ``row_wise_noise`` (DDPM's per-step noise at
        ``max_frames`` too). The empty caption samples the null condition.
        Returns ``{"cond", "mask"}`` and the states."""
        n = len(prompts) * num_samples
        lengths = self._sample_lengths(n, 1, None, generator)
        device = next(self.unwrapped_policy.parameters()).device
        noise = randn_tensor((n, self.config.max_frames, self.config.feature_dim), generator=generator, device=device)
        frames = max(int(lengths.max()), self.pad_frames or 0)
        out = self.sample(prompts, num_samples, generator=generator, lengths=lengths, timesteps=timesteps,
                          start=noise[:, :frames], guidance_scale=guidance_scale, scheduler=scheduler,
                          return_trajectory=True, null_condition=[p == "" for p in prompts], row_wise_noise=True)
        return {"cond": out["cond"], "mask": out["mask"]}, out["trajectory"]

    def start_state(self, batch: MotionBatch, noise: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """``{"start": add_noise(motion, noise, t), "lengths": the real frame counts}``
        (:meth:`DiffusionSampling.start_state`)."""
        x0 = batch["motion"]
        start = self.noise_scheduler.add_noise(x0, noise.to(x0.device, x0.dtype), t.to(x0.device))
        return {"start": start, "lengths": batch["mask"].sum(1).cpu()}

    def _sample_lengths(self, num_conditions: int, num_samples: int, lengths, generator) -> torch.Tensor:
        max_frames = self.config.max_frames
        if lengths is None:
            lo, hi = min(DEFAULT_LENGTH_RANGE[0], max_frames), min(DEFAULT_LENGTH_RANGE[1], max_frames)
            device = generator.device if generator is not None else "cpu"
            lengths = torch.randint(lo, hi + 1, (num_conditions,), generator=generator, device=device).cpu()
        lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
        if len(lengths) == num_conditions:
            lengths = lengths.repeat_interleave(num_samples)
        elif len(lengths) != num_conditions * num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries; give one per caption ({num_conditions}) or one per "
                             f"motion ({num_conditions * num_samples})")
        if lengths.min() < 1 or lengths.max() > max_frames:
            raise ValueError(f"lengths must be frame counts in [1, {max_frames}] (the model's max_frames), got {lengths.tolist()}")
        return lengths

    @contextmanager
    def _sampling_model(self, use_reference: bool) -> Iterator[nn.Module]:
        """The network to sample from, in eval mode for the duration."""
        with self.reference_model() if use_reference else nullcontext(self.unwrapped_policy) as model:
            was_training = model.training
            model.eval()
            try:
                yield model
            finally:
                model.train(was_training)

    # ------------------------------------------------------------------------------------------ weights
    def save(self, directory: str) -> None:
        """``MotionDenoiser.save_pretrained(directory)`` of the policy (LoRA merged in); with LoRA, the adapter
        weights alone also go to ``directory/lora`` (peft's ``adapter_model.safetensors``)."""
        policy = self.unwrapped_policy
        if self.lora:
            copy.deepcopy(policy).merge_and_unload().save_pretrained(directory)
            policy.save_pretrained(str(Path(directory) / "lora"))
        else:
            policy.save_pretrained(directory)


def pad_motions(motions: Sequence[torch.Tensor], min_frames: int | None = None) -> dict[str, torch.Tensor]:
    """``{"motion": [N, T_max, D] zero-padded, "mask": bool [N, T_max]}`` from motions ``[T_i, D]``; T_max is at
    least ``min_frames`` when given."""
    lengths = torch.tensor([len(m) for m in motions])
    motion = nn.utils.rnn.pad_sequence(list(motions), batch_first=True)
    if min_frames is not None and motion.shape[1] < min_frames:
        motion = nn.functional.pad(motion, (0, 0, 0, min_frames - motion.shape[1]))
    return {"motion": motion, "mask": torch.arange(motion.shape[1]) < lengths.unsqueeze(1)}


def unpad_motions(batch: MotionBatch) -> list[torch.Tensor]:
    """The real frames of each motion of a sample batch, ``[T_i, D]`` each (e.g. to make records of samples)."""
    return [motion[mask] for motion, mask in zip(batch["motion"], batch["mask"])]


def _predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, samples: MotionBatch, drop: torch.Tensor | None):
    """The denoiser's output; captions dropped by ``drop`` or by the batch's own ``drop`` field use the null
    condition."""
    dtype = next(model.parameters()).dtype
    cond, mask = samples["cond"].to(x_t.device, dtype), samples["mask"].to(x_t.device)
    if "drop" in samples:
        drop = samples["drop"].to(x_t.device) | (drop.to(x_t.device) if drop is not None else False)
    return model(x_t.to(dtype), t, cond, mask, drop)


def _pad_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``x [N, T, D]`` zero-padded to ``frames`` along T (as is when T already is ``frames``)."""
    return x if x.shape[1] == frames else nn.functional.pad(x, (0, 0, 0, frames - x.shape[1]))


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0


def _label(record: dict[str, Any], i: int) -> str:
    row = record.get("row")
    return f"row {row}" if row is not None else f"record {i}"
