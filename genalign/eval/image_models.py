"""The model under evaluation and its base as one :class:`ImageDiffusionAdapter`: the policy is the model, the
reference the base, so "before" and "after" are drawn by the same sampler from the same noise.

``model`` may be:

* a genalign ``final/`` LoRA folder (``pytorch_lora_weights.safetensors``, as ``ImageDiffusionAdapter.save``
  writes and diffusers' ``load_lora_weights`` reads): the base with LoRA layers of the file's rank / alpha /
  targets; the reference is the base with the adapters disabled;
* a full fine-tune: a ``final/`` folder holding ``unet/``, or a whole diffusers folder; its UNet replaces the
  policy's, the reference is a frozen copy of the base's. The text encoder, tokenizer and VAE come from ``base``
  (alignment trains the UNet only);
* ``None``: the base alone (only "after" = the base is drawn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from genalign.adapters.image import ImageDiffusionAdapter

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_OPTIONS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora")
MODEL_LAYOUTS = (f"a LoRA folder with {LORA_FILE} (genalign's final/ or any diffusers SD LoRA), a folder with a "
                 "unet/ subfolder (a full fine-tune's final/ or a diffusers pipeline folder)")  # fmt: skip


def model_kind(model: str | Path) -> str:
    """``"lora"`` or ``"unet"``; otherwise an error naming the folder and the layouts accepted."""
    model = Path(model)
    if not model.is_dir():
        raise FileNotFoundError(f"--model folder {model} does not exist; pass {MODEL_LAYOUTS}")
    if (model / LORA_FILE).is_file():
        return "lora"
    if (model / "unet" / "config.json").is_file():
        return "unet"
    raise FileNotFoundError(f"--model folder {model} holds neither {LORA_FILE} nor unet/config.json; pass {MODEL_LAYOUTS} "
                            "(training checkpoints/step-N folders hold optimizer state: evaluate the run's final/)")  # fmt: skip


def lora_options(model: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The LoraConfig options and the peft-named UNet weights of a diffusers SD LoRA file."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(model), return_lora_metadata=True)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state or len(unet_state) != len(state):
        raise ValueError(f"{model / LORA_FILE}: expected UNet LoRA weights only (keys 'unet.*'); found "
                         f"{len(unet_state)} UNet keys of {len(state)} (text-encoder LoRAs are not evaluated here)")  # fmt: skip
    peft_state = convert_unet_state_dict_to_peft(unet_state)
    if metadata:
        options = {k.removeprefix("unet."): v for k, v in metadata.items() if k.removeprefix("unet.") in LORA_OPTIONS}
    else:  # a file without metadata: rank from the weights, the LoRA'd layers by their full names, alpha = rank
        downs = {k.removesuffix(".lora_A.weight"): v for k, v in peft_state.items() if k.endswith(".lora_A.weight")}
        rank = next(iter(downs.values())).shape[0]
        options = {"r": rank, "lora_alpha": rank, "target_modules": sorted(downs)}
    if alphas:
        raise ValueError(f"{model / LORA_FILE}: per-module network alphas (kohya format) are not supported; export the "
                         "LoRA with diffusers' save_lora_weights")  # fmt: skip
    return options, peft_state


def comparison_adapter(model: str | Path | None, base: str | Path, device: str | torch.device = "cpu") -> ImageDiffusionAdapter:
    """One adapter: policy = ``model`` (or the base when ``model`` is None), reference = ``base``."""
    from peft import set_peft_model_state_dict

    base = Path(base)
    if not base.is_dir():  # checked here: the adapter's own message names the training option adapter.path
        raise FileNotFoundError(f"--base folder {base} does not exist; pass the base model's diffusers folder "
                                "(model_index.json, unet/, vae/, scheduler/, text_encoder/, tokenizer/)")
    if model is None:
        return ImageDiffusionAdapter.from_pretrained(base, prompt_dropout=0.0).to(device)
    model = Path(model)
    kind = model_kind(model)
    if kind == "lora":
        options, peft_state = lora_options(model)
        adapter = ImageDiffusionAdapter.from_pretrained(base, lora=options, prompt_dropout=0.0)
        result = set_peft_model_state_dict(adapter.unwrapped_policy, peft_state)
        if result.unexpected_keys:
            raise ValueError(f"{model / LORA_FILE} does not fit the base {base}: {len(result.unexpected_keys)} LoRA "
                             f"weights match no layer (e.g. {result.unexpected_keys[:2]})")  # fmt: skip
    else:
        adapter = ImageDiffusionAdapter.from_pretrained(base, reference="copy", prompt_dropout=0.0)
        trained = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
        try:
            adapter.unwrapped_policy.load_state_dict(trained.state_dict())
        except RuntimeError as error:
            raise ValueError(f"{model}/unet does not fit the base {base}'s UNet ({str(error)[:300]})") from error
    return adapter.to(device)
