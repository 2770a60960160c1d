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


def test_cached_reference_lever_skips_the_reference_forward_on_its_own_rows(monkeypatch):
    """The lever's step runs the policy UNet only (its trainer holds reference scores by row index); the rows, shared
    with the peer and the default side, are not modified, and the default side's step still runs the reference."""
    sides = image.build(TINY, ("genalign", "genalign-cached-reference"))
    default, cached = sides["genalign"], sides["genalign-cached-reference"]
    scores = cached.trainer.reference_scores
    assert scores is not None and scores.shape == (len(cached.trainer.rows), 2) and bool(scores.isfinite().all())
    assert default.trainer.reference_scores is None
    assert not any("reference_chosen" in r for r in [*cached.trainer.rows, *default.trainer.rows])
    calls = {name: 0 for name in sides}
    for name, side in sides.items():
        adapter, enter = side.trainer.adapter, side.trainer.adapter.reference_unet

        def counted(name=name, enter=enter):
            calls[name] += 1
            return enter()

        monkeypatch.setattr(adapter, "reference_unet", counted)
        assert math.isfinite(side.step())
    assert calls == {"genalign": 1, "genalign-cached-reference": 0}


def test_compiled_side_wraps_a_separately_built_policy_and_the_report_gives_the_gain():
    from genalign.bench import cli, report

    sides = cli.build_sides(image, TINY, ["genalign", "genalign-compiled"])
    eager, compiled = sides["genalign"].trainer.adapter, sides["genalign-compiled"].trainer.adapter
    assert isinstance(compiled.policy, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.policy, torch._dynamo.eval_frame.OptimizedModule) and compiled is not eager
    compiled_weights = compiled.unwrapped_policy._orig_mod.state_dict()
    for name, a in eager.unwrapped_policy.state_dict().items():
        if "lora_" not in name:  # the same base UNet (LoRA A is drawn per side, as for every side of the suite)
            torch.testing.assert_close(compiled_weights[name], a, atol=0, rtol=0, msg=name)
    # genalign / compiled = 0.8 per repetition -> compiled runs 1.25x eager
    comparison = {"ratio_median": 0.8, "ratio_q1": 0.75, "ratio_q3": 0.9}
    lines = report._findings({"text": {"sides": {}, "comparisons": {"genalign-compiled": comparison}}}, "cuda")
    assert any("text, `torch.compile`" in line and "1.25x eager" in line and "[IQR 1.11-1.33]" in line
               for line in lines)


def test_sd15_shape_is_the_published_sd15_config_with_the_adapter_configs_lora():
    """``--image-shape sd15`` builds SD 1.5's published UNet / VAE / CLIP ViT-L/14 text shapes (on the meta device:
    nothing is allocated) and trains the LoRA that configs/adapter/sd15.yaml trains, one pair per micro-batch."""
    from pathlib import Path

    import yaml

    from genalign.bench import cli

    config = cli.suite_config(image, "sd15")
    assert config == image.ImageConfig.sd15()
    assert (config.batch_size, config.mixed_precision, config.lora_rank, config.image_size) == (1, "no", 8, 512)
    components = image.make_components(config, "meta")
    unet, vae, text = components["unet"], components["vae"], components["text_encoder"]
    assert unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet.config.up_block_types == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (unet.config.cross_attention_dim, unet.config.attention_head_dim, unet.config.layers_per_block,
            unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (768, 8, 2, 64, 4, 4)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert vae.config.block_out_channels == (128, 256, 512, 512) and vae.config.scaling_factor == 0.18215
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert (text.config.hidden_size, text.config.num_hidden_layers, text.config.num_attention_heads,
            text.config.intermediate_size, text.config.max_position_embeddings) == (768, 12, 12, 3072, 77)
    adapter = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/adapter/sd15.yaml").read_text())
    assert config.lora["r"] == adapter["lora"]["r"] and config.lora["lora_alpha"] == adapter["lora"]["lora_alpha"]
    assert sorted(config.lora["target_modules"]) == sorted(adapter["lora"]["target_modules"])
