"""The image benchmark's two loops optimise the same objective: genalign's Diffusion-DPO step (cached mean latents,
dpo with β/2 on negative denoising errors) and scripts/diffusers_dpo_loop.py (VAE + text encoder every step, the
script's −β/2 · [(Lθ_w − Lθ_l) − (Lref_w − Lref_l)] form) give the same loss and the same LoRA gradients on the same
pairs, timesteps and noise."""

from __future__ import annotations

import math

import pytest
import torch

from genalign.adapters.diffusion_scores import draw_noise
from genalign.bench import image
from genalign.steps import StepContext, build_step

TINY = image.ImageConfig(unet_channels=(8, 16, 16, 16), vae_channels=(4, 8, 8, 8), text_hidden=16, text_length=12,
                         image_size=64, attention_head_dim=4, norm_groups=4, rows=6, batch_size=3, beta_dpo=50.0)


def lora_parameters(unet):
    return {name: p for name, p in unet.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    components = image.make_components(TINY)
    ours = image.genalign_adapter(components, TINY, cache_dir=str(tmp_path_factory.mktemp("cache")))
    peer = image.peer_loop(components, TINY, vae_sample=False)
    ours_lora, peer_lora = lora_parameters(ours.policy), lora_parameters(peer.unet)
    assert ours_lora.keys() == peer_lora.keys() and ours_lora
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a LoRA away from zero, so policy and reference differ
        for name, p in ours_lora.items():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            peer_lora[name].copy_(p)
    return ours, peer, image.make_rows(TINY)[: TINY.batch_size]


def test_both_loops_give_the_same_loss_and_gradients_on_the_same_draw(loops):
    ours, peer, rows = loops
    step = build_step("dpo", beta=TINY.beta_dpo / 2)
    generator = torch.Generator().manual_seed(11)
    shared = torch.Generator().set_state(generator.get_state())
    n = len(rows)
    # genalign draws t then eps once per pair (groups = pair index for chosen and rejected)
    draw = draw_noise(torch.arange(n).repeat(2), (4, 8, 8), ours.timestep_range, shared)
    loss_ours = step(ours, rows, StepContext(generator=generator))[0].mean()
    loss_peer = peer.loss(peer.collate(rows), noise=draw.eps[:n], timesteps=draw.t[:n])
    assert abs(loss_ours.item() - math.log(2)) > 1e-3  # a real comparison, not the step-0 ln 2
    assert loss_ours.item() == pytest.approx(loss_peer.item(), abs=1e-5)
    loss_ours.backward()
    loss_peer.backward()
    peer_lora = lora_parameters(peer.unet)
    for name, p in lora_parameters(ours.policy).items():
        torch.testing.assert_close(p.grad, peer_lora[name].grad, rtol=1e-3, atol=1e-6, msg=name)
