"""Text-to-image diffusion adapter over a ``diffusers`` UNet2DConditionModel (SD 1.x/2.x, SDXL, small pixel models).

The score of an image x0 under a prompt c is the negative denoising error at a timestep and noise shared by its
group (see :mod:`genalign.adapters.diffusion_scores`)::

    s(x0) = −mean_dims ‖f_θ(x_t, t, c) − target‖²,   x_t = add_noise(x0, eps, t)

so Diffusion-DPO (Wallace et al. 2023) is ``genalign.objectives.dpo`` on these scores with β = 2500 (the paper's
β = 5000 times its −0.5 factor), and Diffusion-KTO (Li et al. 2024) is ``kto``. x0 is the scaled VAE latent
(latent models) or the pixels in [−1, 1] (pixel-space models, ``vae=None``).

Sample batches are dicts ``{"x0": [N, C, h, w], "cond": [N, L, D], "pooled": [N, D] | None, "time_ids": [N, 6] |
None}``; the VAE and the prompt encoder run in :meth:`collate` (optionally through an on-disk cache), never in the
training step. The reference is either the same UNet with its LoRA adapters disabled (no second copy in memory)
or a frozen copy of the initial UNet.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import PIL.Image
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from genalign.adapters.base import Adapter
from genalign.adapters.clip_prompt import CLIPPromptEncoder
from genalign.adapters.diffusion_sampling import (DiffusionSampling, row_wise_grids, run_sampler, sampler_groups,
                                                  sampler_start)
from genalign.adapters.diffusion_scores import (
    TrajectoryState,
    check_prediction_type,
    denoising_score,
    denoising_target,
    draw_noise,
)
from genalign.adapters.encoding_cache import EncodingCache
from genalign.types import Scores

PromptEncoder = Callable[[list[str]], Any]  # -> (hidden [N, L, D], pooled [N, D] | None) or TextEmbeddings
ImageBatch = dict[str, torch.Tensor | None]
BATCH_KEYS = ("x0", "cond", "pooled", "time_ids")
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SAMPLE_IDS = ("original_size", "crop_top_left")  # SDXL micro-conditions a sample record carries
ARCHITECTURES = {"sd15": "SD 1.x/2.x", "sdxl": "SDXL"}  # adapter configs: one CLIP text encoder / two + text_time


class ImageDiffusionAdapter(Adapter, DiffusionSampling):
    """Diffusion scores, sampling and export for a text-conditioned UNet.

    Args:
        unet: the policy network (trained in place: LoRA layers are added to it, or all its weights train).
        noise_scheduler: the training scheduler (DDPM family); its ``prediction_type`` picks the target.
        prompt_encoder: ``encode(prompts) -> (hidden_states [N, L, D], pooled [N, D] | None)``, or an object with
            ``.tokens`` and ``.pooled`` (e.g. ``SentenceEncoder.encode``'s ``TextEmbeddings``); L must be fixed.
        vae: an ``AutoencoderKL`` for latent models, ``None`` for pixel space.
        reference: ``"lora"`` (adapters disabled; the default with ``lora``) or ``"copy"`` (a frozen copy).
        lora: ``peft.LoraConfig`` keyword arguments (``target_modules`` defaults to the attention projections),
            or ``None`` for full fine-tuning.
        prompt_dropout: fraction of groups scored with the empty prompt while the policy is in training mode.
        timestep_range: ``(lo, hi)``, timesteps drawn uniformly from ``lo … hi−1`` (default all).
        ema_decay: keep an ``EMAModel`` of the trainable weights (call :meth:`ema_step` after each optimizer step);
            :meth:`save` then writes the EMA weights. diffusers' warm-up caps the decay at step s at
            ``(1 + s) / (10 + s)``, or, with ``ema_power`` p, at ``1 − (1 + s)^−p`` (Karras et al. 2022's
            power-law averaging; p = 2/3 ~ the last third of the run), so short runs average over a longer window.
        cache_dir / cache_namespace: cache VAE latents and prompt encodings on disk, keyed by content and by
            ``cache_namespace`` (a name for the frozen VAE + prompt encoder, e.g. the model folder);
            ``cache_memory_bytes`` of them also stay in memory (least recently used out; default 0: disk only).
    """

    sample_key = "x0"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        prompt_encoder: PromptEncoder,
        *,
        vae: AutoencoderKL | None = None,
        reference: str | None = None,
        lora: dict[str, Any] | None = None,
        prompt_dropout: float = 0.2,
        timestep_range: tuple[int, int] | None = None,
        ema_decay: float | None = None,
        ema_power: float | None = None,
        cache_dir: str | Path | None = None,
        cache_namespace: str | None = None,
        cache_memory_bytes: int = 0,
    ):
        if ema_power is not None and (ema_decay is None or ema_power <= 0):
            raise ValueError(f"ema_power={ema_power!r} needs ema_decay=... and must be > 0")
        self.prediction_type = check_prediction_type(noise_scheduler)
        self.noise_scheduler = noise_scheduler
        num_timesteps = noise_scheduler.config.num_train_timesteps
        lo, hi = timestep_range if timestep_range is not None else (0, num_timesteps)
        if not 0 <= lo < hi <= num_timesteps:
            raise ValueError(f"timestep_range {(lo, hi)} must satisfy 0 <= lo < hi <= {num_timesteps} (num_train_timesteps)")
        self.timestep_range = (int(lo), int(hi))
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        self.prompt_dropout = prompt_dropout
        reference = reference or ("lora" if lora is not None else "copy")
        if reference not in ("lora", "copy"):
            raise ValueError(f"reference must be 'lora' or 'copy', got {reference!r}")
        if reference == "lora" and lora is None:
            raise ValueError("reference='lora' disables LoRA adapters, so it needs lora={...}; use reference='copy' "
                             "for full fine-tuning")
        if cache_dir is not None and not cache_namespace:
            raise ValueError("cache_dir needs cache_namespace= (a name for the VAE and prompt encoder, e.g. the model "
                             "folder) so cached encodings of different models never mix")
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self._check_channels(unet)
        self.encode = prompt_encoder
        self.cache = EncodingCache(cache_dir, cache_namespace or "", memory_bytes=cache_memory_bytes)
        self.reference = copy.deepcopy(unet).requires_grad_(False).eval() if reference == "copy" else None
        if lora is not None:
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(**{"target_modules": list(DEFAULT_LORA_TARGETS), **lora}))
        else:
            unet.requires_grad_(True)
        self.lora = lora is not None
        self._lora_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.policy = unet.train()
        self.ema = None if ema_decay is None else EMAModel(
            self.trainable_parameters(), decay=ema_decay, use_ema_warmup=ema_power is not None, power=ema_power or 2 / 3)
        self.text_time = unet.config.addition_embed_type == "text_time"
        self._empty: ImageBatch | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        lora: dict[str, Any] | None = None,
        reference: str | None = None,
        prompt_encoder: PromptEncoder | None = None,
        pixel_space: bool = False,
        architecture: str | None = None,
        cache_dir: str | Path | None = None,
        cache_namespace: str | None = None,
        **options: Any,
    ) -> "ImageDiffusionAdapter":
        """Load a local diffusers folder: ``unet/``, ``scheduler/``, ``vae/`` (unless ``pixel_space``) and, without a
        ``prompt_encoder``, ``text_encoder/`` + ``tokenizer/`` (+ ``text_encoder_2/`` + ``tokenizer_2/`` for SDXL,
        recognised by the UNet's ``addition_embed_type="text_time"``). The training scheduler is a DDPMScheduler
        built from ``scheduler/``'s config. ``options`` go to the constructor.

        ``architecture`` (``"sd15"``: SD 1.x/2.x, one CLIP text encoder; ``"sdxl"``: two encoders and the
        ``text_time`` added conditions) is checked against the folder before any weights load, so an SDXL folder
        given to the SD 1.5 config (or the reverse) fails naming the folder and the config to use. The text
        encoders' token features must add up to the UNet's ``cross_attention_dim``."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist; adapter.path=... must be a local diffusers "
                                    "folder (model_index.json, unet/, vae/, scheduler/, text_encoder/, tokenizer/)")
        subfolders = ("unet", "scheduler") + (() if pixel_space else ("vae",))
        for sub in subfolders:
            if not (path / sub).is_dir():
                hint = " (pass pixel_space=True for a model without a VAE)" if sub == "vae" else ""
                raise FileNotFoundError(f"{path / sub} is missing: {path} is not a complete diffusers folder{hint}; "
                                        f"copy the {sub}/ subfolder of the same model into it")
        for sub in subfolders:
            if not any((path / sub / name).is_file() for name in ("config.json", "scheduler_config.json")):
                raise FileNotFoundError(f"{path / sub} has no config.json (scheduler_config.json for scheduler/); "
                                        f"copy the complete {sub}/ subfolder of the same model into {path}")
        _check_architecture(path, architecture)
        unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
        vae = None if pixel_space else AutoencoderKL.from_pretrained(str(path), subfolder="vae")
        if prompt_encoder is None:
            prompt_encoder = CLIPPromptEncoder.from_pretrained(path, sdxl=unet.config.addition_embed_type == "text_time")
            features = prompt_encoder.token_features
            if features != unet.config.cross_attention_dim:
                raise ValueError(f"the text encoder(s) of {path} give {features} features per token but "
                                 f"{path / 'unet'} has cross_attention_dim={unet.config.cross_attention_dim}: they are "
                                 "not from the same model; copy the text_encoder/ folders of the UNet's model")
            cache_namespace = cache_namespace or str(path.resolve())
        return cls(unet, scheduler, prompt_encoder, vae=vae, reference=reference, lora=lora, cache_dir=cache_dir,
                   cache_namespace=cache_namespace, **options)

    def _check_channels(self, unet: UNet2DConditionModel) -> None:
        if self.vae is not None and self.vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels but the UNet takes "
                             f"{unet.config.in_channels}; they are not from the same model")
        self.image_channels = self.vae.config.in_channels if self.vae is not None else unet.config.in_channels
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def to(self, device: torch.device | str) -> "ImageDiffusionAdapter":
        """Move the policy, the reference copy, the VAE and the prompt encoder (when it has ``.to``)."""
        for module in (self.policy, self.reference, self.vae, self.encode):
            if module is not None and hasattr(module, "to"):
                module.to(device)
        return self

    # ------------------------------------------------------------------------------------------ batches
    def collate(self, records: Sequence[dict[str, Any]]) -> ImageBatch:
        """Records ``{"prompt": str, "response": image, "row": int[, "original_size": (h, w),
        "crop_top_left": (top, left)]}``; an image is a float tensor ``[C, H, W]`` in [−1, 1], a PIL image, or a
        sample record ``{"image", "original_size", "crop_top_left"}`` (:mod:`genalign.data.image_pairs`, e.g. a
        Pick-a-Pic pair's ``chosen``) whose ids are used. The SDXL size/crop conditions default to the image size
        and (0, 0)."""
        if not records:
            raise ValueError("collate needs at least one record")
        records = [_unpack_sample(record, i) for i, record in enumerate(records)]
        prompts, pixels = [], []
        for i, record in enumerate(records):
            label = _label(record, i)
            prompt = record.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"{label}: field 'prompt' must be a string, got {type(prompt).__name__}")
            prompts.append(prompt)
            pixels.append(self._image_tensor(record["response"], label))
        sizes = {tuple(p.shape[-2:]) for p in pixels}
        if len(sizes) > 1:
            listed = ", ".join(f"{_label(r, i)}: {tuple(p.shape[-2:])}" for i, (r, p) in enumerate(zip(records, pixels)))
            raise ValueError(f"images in one batch must share a size; got {listed}. Resize them in the dataset")
        pixels = torch.stack(pixels)
        batch = {"x0": self.encode_images(pixels), **self.encode_prompts(prompts), "time_ids": None}
        if self.text_time:
            batch["time_ids"] = _time_ids(records, tuple(pixels.shape[-2:]))
        return batch

    def _image_tensor(self, image: Any, label: str) -> torch.Tensor:
        c = self.image_channels
        if isinstance(image, PIL.Image.Image):
            modes = {1: "L", 3: "RGB"}
            if c not in modes:
                raise ValueError(f"{label}: the model takes {c}-channel images; pass a tensor, not a PIL image")
            array = VaeImageProcessor.pil_to_numpy(image.convert(modes[c]))
            image = VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(array)[0])
        elif not isinstance(image, torch.Tensor):
            raise ValueError(f"{label}: 'response' must be a PIL image or a [C, H, W] tensor, got {type(image).__name__}")
        elif not image.is_floating_point():
            raise ValueError(f"{label}: image tensor has dtype {image.dtype}; convert it to float in [-1, 1] (x / 127.5 - 1)")
        if image.ndim != 3 or image.shape[0] != c:
            raise ValueError(f"{label}: image has shape {tuple(image.shape)}, expected [{c}, H, W] ({c} channels)")
        h, w = image.shape[-2:]
        if h % self.vae_scale or w % self.vae_scale:
            raise ValueError(f"{label}: image size {(h, w)} is not divisible by the VAE factor {self.vae_scale}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"{label}: image values span [{lo:.3f}, {hi:.3f}]; expected [-1, 1] (x / 127.5 - 1 for 0..255)")
        return image.detach().float().cpu()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[N, C, H, W]`` in [−1, 1] → x0: ``(mean of the VAE posterior − shift) · scaling_factor`` for
        latent models (the posterior mean is deterministic, hence cacheable), the pixels themselves otherwise."""
        if self.vae is None:
            return pixels.float()

        def compute(indices: list[int]) -> list[dict[str, torch.Tensor]]:
            param = next(self.vae.parameters())
            with torch.no_grad():
                mean = self.vae.encode(pixels[indices].to(param.device, param.dtype)).latent_dist.mean
            return [{"latent": m} for m in mean]

        contents = [_tensor_bytes(p) for p in pixels]
        raw = torch.stack([item["latent"] for item in self.cache.lookup("latent", contents, compute)])
        config = self.vae.config
        return (raw - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor | None]:
        """``{"cond": [N, L, D], "pooled": [N, D] | None}`` from the prompt encoder (through the cache)."""

        def compute(indices: list[int]) -> list[dict[str, torch.Tensor]]:
            result = self.encode([prompts[i] for i in indices])
            hidden, pooled = (result.tokens, result.pooled) if hasattr(result, "tokens") else result
            if hidden.ndim != 3 or hidden.shape[0] != len(indices):
                raise ValueError(f"the prompt encoder returned hidden states of shape {tuple(hidden.shape)} for "
                                 f"{len(indices)} prompts; expected [N, L, D]")
            if pooled is None:
                return [{"cond": h} for h in hidden]
            return [{"cond": h, "pooled": p} for h, p in zip(hidden, pooled)]

        items = self.cache.lookup("prompt", [p.encode() for p in prompts], compute)
        lengths = {tuple(item["cond"].shape) for item in items}
        if len(lengths) > 1:
            raise ValueError(f"the prompt encoder returned hidden states of different shapes {sorted(lengths)}; "
                             "pad every prompt to a fixed length")
        pooled = torch.stack([item["pooled"] for item in items]) if "pooled" in items[0] else None
        if self.text_time and pooled is None:
            raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs pooled prompt embeddings, "
                             "but the prompt encoder returned None")
        return {"cond": torch.stack([item["cond"] for item in items]), "pooled": pooled}

    def concat(self, parts: Sequence[ImageBatch]) -> ImageBatch:
        """Concatenate sample batches along the sample axis (the scoring keys ``x0, cond, pooled, time_ids``)."""
        out = {}
        for key in BATCH_KEYS:
            values = [part.get(key) for part in parts]
            present = [v is not None for v in values]
            if any(present) and not all(present):
                raise ValueError(f"cannot concatenate sample batches: {key!r} is set in some and missing in others")
            shapes = sorted({tuple(v.shape[1:]) for v in values if v is not None})
            if len(shapes) > 1:
                hint = ""
                if key == "x0":
                    size = self.unwrapped_policy.config.sample_size
                    hint = (f"; images scored with the model's own samples (Diffusion-DRO, online pairs) must have "
                            f"the sampler's size, sample_size {size} x VAE factor {self.vae_scale}: set "
                            f"data.resolution to {size * self.vae_scale if isinstance(size, int) else size}")
                raise ValueError(f"cannot concatenate sample batches: {key!r} has shapes {shapes}{hint}")
            out[key] = torch.cat(values) if all(present) else None
        return out

    # ------------------------------------------------------------------------------------------ scores
    def score(
        self,
        samples: ImageBatch,
        *,
        groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        with_reference: bool = True,
    ) -> Scores:
        """Negative denoising errors at one ``(t, eps)`` per group, policy (with grad) and reference (no grad).

        While the policy is in training mode, a fraction ``prompt_dropout`` of the groups is scored with the empty
        prompt (same draw for every member of a group). Draws follow :func:`draw_noise`.
        """
        x0 = samples["x0"]
        n = x0.shape[0]
        groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape [{n}] (one id per sample), got {tuple(groups.shape)}")
        dropout = self.prompt_dropout if self.unwrapped_policy.training else 0.0
        draw = draw_noise(groups, tuple(x0.shape[1:]), self.timestep_range, generator, dropout)
        t, eps = draw.t.to(x0.device), draw.eps.to(x0.device, x0.dtype)
        if draw.drop.any():
            samples = self.drop_prompts(samples, draw.drop)
        x_t = self.noise_scheduler.add_noise(x0, eps, t)
        target = denoising_target(self.noise_scheduler, x0, eps, t, self.prediction_type)
        return self.score_at(samples, x_t, t, target, with_reference=with_reference)

    def score_at(
        self, samples: ImageBatch, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, *, with_reference: bool = True
    ) -> Scores:
        """Scores at given noisy inputs and targets: ``−mean_dims ‖f(x_t, t, c) − target‖²`` for the policy and, on
        the very same inputs, the reference. :meth:`score` is this at fresh ``(t, eps)``; online methods call it
        with sampler states (e.g. Diffusion-DRO's ``target = eps_hat``)."""
        policy = denoising_score(self._predict(self.policy, x_t, t, samples), target)
        reference = None
        if with_reference:
            with torch.no_grad(), self.reference_unet() as unet:
                reference = denoising_score(self._predict(unet, x_t, t, samples), target)
        return Scores(policy=policy, reference=reference, lengths=torch.ones(len(policy), dtype=torch.long, device=policy.device))

    def drop_prompts(self, samples: ImageBatch, drop: torch.Tensor) -> ImageBatch:
        """A copy of ``samples`` whose conditioning is the empty prompt's where ``drop`` is True."""
        empty, out = self._empty_prompt(), dict(samples)
        for key in ("cond", "pooled"):
            if samples[key] is None:
                continue
            if empty[key].shape[1:] != samples[key].shape[1:]:
                raise ValueError(f"the empty prompt's {key} has shape {tuple(empty[key].shape[1:])} but the batch's is "
                                 f"{tuple(samples[key].shape[1:])}; the prompt encoder must pad to a fixed length")
            mask = drop.to(samples[key].device).view(-1, *([1] * (samples[key].ndim - 1)))
            out[key] = torch.where(mask, empty[key].to(samples[key]), samples[key])
        return out

    def _empty_prompt(self) -> ImageBatch:
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    def _predict(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, samples: ImageBatch) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        kwargs = {}
        if self.text_time:
            kwargs["added_cond_kwargs"] = {"text_embeds": samples["pooled"].to(x_t.device, dtype),
                                           "time_ids": samples["time_ids"].to(x_t.device, dtype)}
        cond = samples["cond"].to(x_t.device, dtype)
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond, return_dict=False, **kwargs)[0]

    @contextmanager
    def reference_unet(self) -> Iterator[torch.nn.Module]:
        """The reference network: the policy with its LoRA adapters disabled, or the frozen copy (moved to the
        policy's device on first use)."""
        if self.reference is None:
            # what diffusers' disable_adapters()/enable_adapters() do, on the LoRA layers found once: walking the
            # UNet's modules twice per step took ~7 % of a small model's Diffusion-DPO step
            for layer in self._lora_layers:
                layer.enable_adapters(False)
            try:
                yield self.unwrapped_policy
            finally:
                for layer in self._lora_layers:
                    layer.enable_adapters(True)
        else:
            yield self.reference_copy_on_policy_device(self.reference)

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        conditions: Sequence[str] | str,
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        use_reference: bool = False,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        scheduler: str = "dpmsolver++",
        return_trajectory: bool = False,
        timesteps: torch.Tensor | None = None,
        decode: bool = True,
        start: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Draw ``num_samples`` images per prompt (condition-major) with classifier-free guidance
        ``f = f(∅) + w·(f(c) − f(∅))`` (off for ``guidance_scale <= 1``).

        Returns a sample batch (``x0`` = the sampler's final latent or pixels, ``cond``, ``pooled``, ``time_ids``:
        scoreable as is) plus ``images`` ``[N, C, H, W]`` in [−1, 1] (unless ``decode=False``) and, with
        ``return_trajectory``, a list of :class:`TrajectoryState` ``(x_t, t, eps_hat)``, one per sampler step
        (eps_hat from the guided prediction).

        ``timesteps`` replaces the sampler's grid (and ``num_inference_steps``) with custom descending timesteps:
        ``[S]`` for every sample or ``[N, S]`` per returned sample (e.g. Diffusion-DRO's randomly offset grids);
        samples sharing a grid step together through one scheduler (``dpmsolver++`` or ``ddpm``).

        ``start`` ``[N, C, H, W]`` replaces the initial noise: the state x_t at the grid's first timestep (e.g. a
        data sample noised to that t, DR-PO's dataset resets); pass ``timesteps`` beginning at that t with it.
        """
        prompts = [conditions] if isinstance(conditions, str) else list(conditions)
        if not prompts or num_samples < 1 or num_inference_steps < 1:
            raise ValueError(f"sample needs prompts, num_samples >= 1 and num_inference_steps >= 1; got {len(prompts)} "
                             f"prompts, num_samples={num_samples}, num_inference_steps={num_inference_steps}")
        prompts = [p for p in prompts for _ in range(num_samples)]
        n = len(prompts)
        policy = self.unwrapped_policy
        device = next(policy.parameters()).device
        config = policy.config
        h, w = (config.sample_size,) * 2 if isinstance(config.sample_size, int) else tuple(config.sample_size)
        batch = {k: v.to(device) if v is not None else None for k, v in self.encode_prompts(prompts).items()}
        size = (h * self.vae_scale, w * self.vae_scale)
        batch["time_ids"] = torch.tensor([[*size, 0, 0, *size]] * n, dtype=torch.float32, device=device) if self.text_time else None
        guided = guidance_scale > 1
        if guided:
            empty = {k: v.to(device).expand(n, *v.shape[1:]) if v is not None else None for k, v in self._empty_prompt().items()}
            model_batch = self.concat([{**batch, **empty}, batch])
        else:
            model_batch = batch
        groups = sampler_groups(scheduler, self.noise_scheduler.config, n, device, num_inference_steps, timesteps)
        x = sampler_start(groups, (n, config.in_channels, h, w), generator, device, start)
        with self._sampling_model(use_reference) as unet:
            def predict(model_in: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
                if not guided:
                    return self._predict(unet, model_in, t_batch, model_batch).float()
                uncond, cond = self._predict(unet, model_in.repeat(2, 1, 1, 1), t_batch.repeat(2), model_batch).float().chunk(2)
                return uncond + guidance_scale * (cond - uncond)

            record = (self.noise_scheduler, self.prediction_type) if return_trajectory else None
            x, states = run_sampler(groups, x, predict, generator, record=record)
        out = {**batch, "x0": x}
        if decode:
            out["images"] = self.decode(x)
        if return_trajectory:
            out["trajectory"] = states
        return out

    def row_wise_draws(self, *, timesteps: torch.Tensor | None = None, scheduler: str = "dpmsolver++",
                       **sample_kwargs: Any) -> bool:
        """:meth:`Adapter.row_wise_draws`: images have one shape, so the initial noise ``[N, C, H, W]`` is row-wise,
        and so are the sampler's draws on its grids (:func:`~genalign.adapters.diffusion_sampling.row_wise_grids`)."""
        return row_wise_grids(scheduler, self.noise_scheduler.config, timesteps)

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
        """:meth:`DiffusionSampling.trajectories`: undecoded :meth:`sample` trajectories and the prompt encodings."""
        out = self.sample(prompts, num_samples, generator=generator, timesteps=timesteps, guidance_scale=guidance_scale,
                          scheduler=scheduler, return_trajectory=True, decode=False)
        return {key: out[key] for key in BATCH_KEYS[1:] if out[key] is not None}, out["trajectory"]

    def start_state(self, batch: ImageBatch, noise: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """``{"start": add_noise(x0, noise, t)}`` (:meth:`DiffusionSampling.start_state`)."""
        x0 = batch["x0"]
        return {"start": self.noise_scheduler.add_noise(x0, noise.to(x0.device, x0.dtype), t.to(x0.device))}

    @contextmanager
    def _sampling_model(self, use_reference: bool) -> Iterator[torch.nn.Module]:
        """The network to sample from, in eval mode (no LoRA dropout) for the duration."""
        with self.reference_unet() if use_reference else nullcontext(self.unwrapped_policy) as unet:
            was_training = unet.training
            unet.eval()
            try:
                yield unet
            finally:
                unet.train(was_training)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 → images in [−1, 1]: through the VAE (``x0 / scaling_factor + shift``) for latent models."""
        if self.vae is None:
            return x0.float().clamp(-1, 1)
        config, param = self.vae.config, next(self.vae.parameters())
        z = x0 / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        with torch.no_grad():
            images = self.vae.decode(z.to(param.device, param.dtype), return_dict=False)[0]
        return images.float().clamp(-1, 1).to(x0.device)

    # ------------------------------------------------------------------------------------------ weights
    def on_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema_step()

    def checkpoint_state(self) -> list[Any]:
        return [self.ema] if self.ema is not None else []

    def ema_step(self) -> None:
        """Update the EMA of the trainable weights (call after each optimizer step; needs ``ema_decay``)."""
        if self.ema is None:
            raise RuntimeError("ema_step() needs the adapter to be built with ema_decay=...")
        self.ema.step(self.trainable_parameters())

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights into the policy for the duration (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def save(self, directory: str) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` that diffusers pipelines load with ``load_lora_weights``.
        Full fine-tune: ``directory/unet`` (``UNet2DConditionModel.from_pretrained``). EMA weights when enabled."""
        unet = self.unwrapped_policy
        with self.ema_weights():
            if self.lora:
                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
                StableDiffusionLoraLoaderMixin.save_lora_weights(
                    directory, unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
                )
            else:
                unet.save_pretrained(str(Path(directory) / "unet"))


def _check_architecture(path: Path, architecture: str | None) -> None:
    """Refuse a folder of the other family before loading weights: SDXL is recognised by ``unet/config.json``'s
    ``addition_embed_type="text_time"`` and by a ``text_encoder_2/`` folder."""
    if architecture is None:
        return
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is not one of {sorted(ARCHITECTURES)}")
    embed = UNet2DConditionModel.load_config(str(path), subfolder="unet").get("addition_embed_type")
    second = (path / "text_encoder_2").is_dir()
    found = "sdxl" if embed == "text_time" or second else "sd15"
    if found == architecture:
        return
    signs = f"unet/config.json addition_embed_type={embed!r}, text_encoder_2/ {'present' if second else 'absent'}"
    raise ValueError(f"{path} holds an {ARCHITECTURES[found]} model ({signs}), but adapter={architecture} expects "
                     f"{ARCHITECTURES[architecture]}; use adapter={found} (experiments {found}_*)")


def _unpack_sample(record: dict[str, Any], i: int) -> dict[str, Any]:
    """The record with a sample-record response (``{"image", "original_size", "crop_top_left"}``) replaced by its
    image and the sample's SDXL ids lifted onto the record."""
    response = record.get("response")
    if response is None:
        raise ValueError(f"{_label(record, i)}: missing field 'response' (the image)")
    if not isinstance(response, dict):
        return record
    if "image" not in response:
        raise ValueError(f"{_label(record, i)}: 'response' is a dict without 'image' (fields: {sorted(response)})")
    return {**record, **{k: response[k] for k in SAMPLE_IDS if k in response}, "response": response["image"]}


def _label(record: dict[str, Any], i: int) -> str:
    row = record.get("row")
    return f"row {row}" if row is not None else f"record {i}"


def _tensor_bytes(x: torch.Tensor) -> bytes:
    return str(tuple(x.shape)).encode() + x.detach().float().contiguous().cpu().numpy().tobytes()


def _time_ids(records: Sequence[dict[str, Any]], size: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditions ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` per record."""
    rows = []
    for i, record in enumerate(records):
        original = _int_pair(record, i, "original_size", size)
        crop = _int_pair(record, i, "crop_top_left", (0, 0))
        rows.append([*original, *crop, *size])
    return torch.tensor(rows, dtype=torch.float32)


def _int_pair(record: dict[str, Any], i: int, field: str, default: tuple[int, int]) -> tuple[int, int]:
    value = record.get(field)
    if value is None:
        return default
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{_label(record, i)}: field {field!r} must be two integers, got {value!r}") from None
    return a, b
