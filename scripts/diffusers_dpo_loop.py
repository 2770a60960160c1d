"""A Diffusion-DPO training loop that does per step what the diffusers research-project Diffusion-DPO script does
(written here from its public description; the benchmark's peer for ``genalign-bench --suite image``).

Per optimizer step, on a batch of B preference pairs (chosen and rejected images stacked on the channel axis, as that
script's data loader delivers them):

1. split the pixels into ``[chosen; rejected]`` (2B images) and VAE-encode all of them (a posterior *sample*, times
   the scaling factor);
2. one noise draw and one timestep per pair, shared by its chosen and rejected; ``x_t = add_noise(latents, eps, t)``;
3. run the CLIP text encoder on the prompts and repeat the states for both halves;
4. policy forward of the LoRA UNet on the 2B noisy latents; per-sample error ``L = mean (pred − target)²``;
5. reference forward of the same UNet with its LoRA adapters disabled, under ``no_grad`` (full fine-tune,
   ``lora=None``: of a frozen copy of the initial UNet, the ``ref_unet`` of the Diffusion-DPO authors' script);
6. ``inside = −β/2 · [(Lθ_w − Lθ_l) − (Lref_w − Lref_l)]``, ``loss = −mean log σ(inside)`` (Wallace et al. 2023,
   β = 5000 for SD 1.5); backward, gradient clipping, AdamW.

Run as a script it trains a few steps of a randomly initialised tiny SD-1.5-shaped component set (or ``--size sd15``
for the full SD 1.5 shapes, GPU-sized; ``--train full`` for a full fine-tune) on random image pairs and prints the
losses and the throughput.
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig


class DiffusersDPOLoop:
    """The per-step work of the diffusers research-project Diffusion-DPO script (see the module docstring).

    ``lora``: ``peft.LoraConfig`` keywords, or None to train every UNet weight against a frozen copy (``ref_unet``).
    ``vae_sample=False`` encodes with the posterior mean instead of a sample (only to compare losses with a
    trainer that caches mean latents on the very same noise); ``mixed_precision="bf16"`` autocasts on CUDA.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, noise_scheduler, *, lora: dict[str, Any] | None,
                 beta_dpo: float = 5000.0, learning_rate: float = 1e-5, max_grad_norm: float = 1.0,
                 vae_sample: bool = True, mixed_precision: str = "no"):
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer, self.noise_scheduler = tokenizer, noise_scheduler
        self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval() if lora is None else None
        unet.requires_grad_(lora is None)
        if lora is not None:
            unet.add_adapter(LoraConfig(**lora))
        self.unet = unet.train()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate)
        self.beta_dpo, self.max_grad_norm, self.vae_sample = beta_dpo, max_grad_norm, vae_sample
        self.autocast = mixed_precision == "bf16" and torch.cuda.is_available()

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``pixel_values [B, 2C, H, W]`` (chosen ‖ rejected) and the padded prompt ``input_ids [B, L]``."""
        pixels = torch.stack([torch.cat([r["chosen"], r["rejected"]]) for r in rows])
        ids = self.tokenizer([r["prompt"] for r in rows], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return {"pixel_values": pixels, "input_ids": ids}

    def loss(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The Diffusion-DPO loss of one batch; ``noise [B, ...]`` / ``timesteps [B]`` (one per pair) may be given."""
        device = next(self.unet.parameters()).device
        pixels = batch["pixel_values"].to(device)
        feed = torch.cat(pixels.chunk(2, dim=1))  # [chosen; rejected]
        half = feed.shape[0] // 2
        with torch.no_grad(), self._autocast():
            posterior = self.vae.encode(feed).latent_dist
            latents = posterior.sample(generator) if self.vae_sample else posterior.mean
            latents = latents.float() * self.vae.config.scaling_factor
            states = self.text_encoder(batch["input_ids"].to(device))[0].repeat(2, 1, 1)
        if noise is None:
            noise = torch.randn(latents[:half].shape, generator=generator, device=device)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (half,), generator=generator,
                                      device=device)
        noise, timesteps = noise.to(device).repeat(2, 1, 1, 1), timesteps.to(device).long().repeat(2)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self._autocast():
            pred = self.unet(noisy, timesteps, states).sample
        model_losses = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        model_w, model_l = model_losses.chunk(2)
        with torch.no_grad(), self._autocast():
            if self.ref_unet is None:
                self.unet.disable_adapters()
                ref_pred = self.unet(noisy, timesteps, states).sample
                self.unet.enable_adapters()
            else:
                ref_pred = self.ref_unet(noisy, timesteps, states).sample
        ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        ref_w, ref_l = ref_losses.chunk(2)
        inside = -0.5 * self.beta_dpo * ((model_w - model_l) - (ref_w - ref_l))
        return -F.logsigmoid(inside).mean()

    def step(self, batch: dict[str, torch.Tensor], **draw: Any) -> float:
        """One optimizer step; returns the loss."""
        loss = self.loss(batch, **draw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()


def main(argv: Sequence[str] | None = None) -> None:
    from genalign.bench import image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--train", choices=image.TRAIN_MODES, default="lora",
                        help="LoRA (adapters disabled = reference) or every UNet weight (frozen reference copy)")
    args = parser.parse_args(argv)
    config = image.ImageConfig() if args.size == "tiny" else image.ImageConfig.for_cuda()
    config = replace(config, train=args.train)
    components = image.make_components(config)
    loop = image.peer_loop(components, config)
    rows = image.make_rows(config)
    g = torch.Generator(next(loop.unet.parameters()).device).manual_seed(0)
    for k in range(args.steps):
        batch = loop.collate(rows[k * config.batch_size % len(rows):][: config.batch_size])
        start = time.perf_counter()
        loss = loop.step(batch, generator=g)
        print(f"step {k}: loss {loss:.5f}, {config.batch_size / (time.perf_counter() - start):.2f} pairs/s")


if __name__ == "__main__":
    main()
