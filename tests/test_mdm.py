"""MotionDenoiser: padding isolation, condition dropout, classifier-free guidance, LoRA in eval mode, save/load."""

import copy
import json

import peft
import pytest
import torch

from genalign.models.mdm import MotionDenoiser, MotionDenoiserConfig

TINY = dict(feature_dim=12, cond_dim=8, d_model=32, num_layers=2, num_heads=2, ff_dim=64, dropout=0.0, max_frames=20)


def tiny(**overrides) -> MotionDenoiser:
    torch.manual_seed(0)
    return MotionDenoiser(MotionDenoiserConfig(**{**TINY, **overrides})).eval()


def inputs(batch=3, frames=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, TINY["feature_dim"], generator=g)
    cond = torch.randn(batch, TINY["cond_dim"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, 3:] = False
    return x, t, cond, mask


def test_padded_frames_do_not_affect_real_frames():
    model = tiny()
    x, t, cond, mask = inputs()
    garbage = x.clone()
    garbage[~mask] = 1000.0 * torch.randn(int((~mask).sum()), TINY["feature_dim"])
    with torch.no_grad():
        out, out_garbage = model(x, t, cond, mask), model(garbage, t, cond, mask)
        unmasked = model(garbage, t, cond)  # without the mask the padded frames are attended to
    assert out.shape == x.shape
    assert torch.allclose(out[mask], out_garbage[mask], atol=1e-5)
    assert not torch.allclose(out[0, :6], unmasked[0, :6], atol=1e-3)
    # sample 2 has no padding: the same output with and without a mask
    assert torch.allclose(out[2], unmasked[2], atol=1e-5)


def test_condition_and_timestep_both_reach_the_output():
    model = tiny()
    x, t, cond, mask = inputs()
    with torch.no_grad():
        base = model(x, t, cond, mask)
        assert not torch.allclose(base, model(x, t, cond + 1.0, mask), atol=1e-4)
        assert not torch.allclose(base, model(x, (t + 300) % 1000, cond, mask), atol=1e-4)


def test_condition_drop_rate_and_reproducibility():
    model = tiny(cond_drop_prob=0.1)
    draws = model.drop_condition(200_000, torch.Generator().manual_seed(3))
    assert draws.dtype == torch.bool
    assert abs(draws.float().mean().item() - 0.1) < 0.004  # ~6 standard errors
    assert torch.equal(draws, model.drop_condition(200_000, torch.Generator().manual_seed(3)))


def test_dropped_samples_ignore_their_caption_and_use_the_null_embedding():
    model = tiny()
    with torch.no_grad():
        model.null_cond.normal_()
    x, t, cond, mask = inputs()
    drop = torch.tensor([True, False, True])
    other = torch.randn_like(cond)
    with torch.no_grad():
        out, out_other = model(x, t, cond, mask, drop), model(x, t, other, mask, drop)
        explicit = model(x, t, model.null_cond.expand_as(cond), mask)
    assert torch.allclose(out[drop], out_other[drop], atol=1e-6)
    assert not torch.allclose(out[1], out_other[1], atol=1e-4)
    assert torch.allclose(out[drop], explicit[drop], atol=1e-6)


def test_guidance_is_uncond_plus_scale_times_difference():
    model = tiny()
    with torch.no_grad():
        model.null_cond.normal_()
    x, t, cond, mask = inputs()
    drop_all = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        conditional = model(x, t, cond, mask)
        unconditional = model(x, t, cond, mask, drop_all)
        assert torch.allclose(model.guided(x, t, cond, mask, scale=1.0), conditional, atol=1e-5)
        assert torch.allclose(model.guided(x, t, cond, mask, scale=0.0), unconditional, atol=1e-5)
        expected = unconditional + 2.5 * (conditional - unconditional)
        assert torch.allclose(model.guided(x, t, cond, mask, scale=2.5), expected, atol=1e-4)


def test_lora_update_is_used_in_eval_mode_without_grad():
    """torch's fused transformer inference path would bypass peft's wrappers; the denoiser switches it off."""
    model = tiny()
    base = copy.deepcopy(model)
    x, t, cond, mask = inputs()
    config = peft.LoraConfig(r=4, target_modules=["self_attn", "linear1", "linear2"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        lora_out, base_out = wrapped(x, t, cond, mask), base(x, t, cond, mask)
        with wrapped.disable_adapter():
            disabled_out = wrapped(x, t, cond, mask)
        merged_out = copy.deepcopy(wrapped).merge_and_unload()(x, t, cond, mask)
    assert not torch.allclose(lora_out[mask], base_out[mask], atol=1e-3)
    assert torch.allclose(lora_out[mask], merged_out[mask], atol=1e-4)
    assert torch.allclose(disabled_out, base_out, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = tiny(prediction_type="epsilon")
    model.save_pretrained(tmp_path / "m")
    loaded = MotionDenoiser.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config and loaded.prediction_type == "epsilon"
    x, t, cond, mask = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond, mask), loaded(x, t, cond, mask))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MotionDenoiser.from_pretrained(tmp_path / "nowhere")
    tiny().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(ValueError, match="n_layers"):
        MotionDenoiser.from_pretrained(tmp_path / "m")


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="prediction_type"):
        MotionDenoiserConfig(prediction_type="x0")
    with pytest.raises(ValueError, match="num_heads"):
        MotionDenoiserConfig(d_model=30, num_heads=4)
    model = tiny()
    x, t, cond, mask = inputs(frames=21)
    with pytest.raises(ValueError, match="max_frames=20"):
        model(x, t, cond, mask)
    x, t, cond, mask = inputs()
    with pytest.raises(ValueError, match="cond must be"):
        model(x, t, cond[:, :4], mask)
    with pytest.raises(ValueError, match="mask must be"):
        model(x, t, cond, mask[:, :5])


def test_mdm_default_sizes():
    config = MotionDenoiserConfig()
    assert (config.feature_dim, config.d_model, config.num_layers, config.num_heads, config.ff_dim) == (263, 512, 8, 4, 1024)
    assert config.prediction_type == "sample" and config.cond_drop_prob == 0.1


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    x, t, cond, mask = inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(x, t, cond, mask)
        (out[mask] ** 2).mean().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (plain, plain_grads), (ckpt, ckpt_grads) = grads
    assert torch.allclose(plain, ckpt, atol=1e-6)
    assert len(plain_grads) == len(ckpt_grads) == len(list(tiny().parameters())) - 1  # all but the unused null_cond
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, ckpt_grads))
