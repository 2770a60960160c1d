"""ImageDiffusionAdapter: denoising scores against an independent computation, shared noise, Diffusion-DPO at
init, LoRA reference/export, sampling, the encoding cache and the SDXL layout. Tiny models built here, no downloads."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from genalign.adapters.diffusion_scores import denoising_score
from genalign.adapters.image import ImageDiffusionAdapter
from genalign.data.batching import pairwise_batch
from genalign.objectives import dpo, kto
from tiny_sd import T, tiny_unet, write_sd15, write_sdxl

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_sd15(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return write_sdxl(tmp_path_factory.mktemp("sdxl"))


class BytePrompts:
    """A deterministic toy prompt encoder: byte embeddings padded to 6 tokens; counts its calls."""

    def __init__(self, dim: int = 16):
        self.table = torch.randn(257, dim, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        ids = torch.full((len(prompts), 6), 256)
        for i, p in enumerate(prompts):
            raw = list(p.encode()[:6])
            ids[i, : len(raw)] = torch.tensor(raw, dtype=torch.long)
        return self.table[ids], None


def pixel_adapter(prediction_type: str = "epsilon", **options) -> ImageDiffusionAdapter:
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    return ImageDiffusionAdapter(tiny_unet(1, 16), scheduler, BytePrompts(), **{"prompt_dropout": 0.0, **options})


def images(n: int, channels: int = 1, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(channels, size, size, generator=g) * 2 - 1 for _ in range(n)]


def records(n: int, channels: int = 1, size: int = 8, seed: int = 0) -> list[dict]:
    return [{"prompt": f"digit {i % 3}", "response": im, "row": i} for i, im in enumerate(images(n, channels, size, seed))]


def pair_rows(n: int, channels: int = 1, size: int = 8) -> list[dict]:
    chosen, rejected = images(n, channels, size, seed=1), images(n, channels, size, seed=2)
    return [{"prompt": f"digit {i}", "chosen": c, "rejected": r, "row": i} for i, (c, r) in enumerate(zip(chosen, rejected))]


def expected_scores(unet, scheduler, batch, groups, seed, prediction_type, added=None):
    """−mean((unet(x_t, t, c) − target)²) with the documented draw order: t per group, then eps per group."""
    x0 = batch["x0"]
    g = torch.Generator().manual_seed(seed)
    unique, inverse = torch.unique(groups, return_inverse=True)
    t = torch.randint(0, T, (len(unique),), generator=g)[inverse]
    eps = torch.randn((len(unique), *x0.shape[1:]), generator=g)[inverse]
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(x_t, scheduler.add_noise(x0, eps, t), atol=1e-6)
    target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=batch["cond"], added_cond_kwargs=added).sample
    return -((pred - target) ** 2).mean((1, 2, 3))


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_score_is_negative_denoising_error_for_each_prediction_type(prediction_type):
    adapter = pixel_adapter(prediction_type)
    batch = adapter.collate(records(4))
    groups = torch.tensor([5, 1, 5, 2])
    scores = adapter.score(batch, groups=groups, generator=torch.Generator().manual_seed(3))
    expected = expected_scores(adapter.reference, adapter.noise_scheduler, batch, groups, 3, prediction_type)
    assert torch.allclose(scores.policy, expected, atol=1e-5)
    assert torch.allclose(scores.reference, expected, atol=1e-5)
    assert scores.policy.requires_grad and not scores.reference.requires_grad
    assert scores.lengths.tolist() == [1, 1, 1, 1]


def test_same_group_shares_t_and_noise():
    adapter = pixel_adapter()
    one = adapter.collate(records(1))
    batch = adapter.concat([one, one, one])
    scores = adapter.score(batch, groups=torch.tensor([0, 0, 1]), generator=torch.Generator().manual_seed(0))
    assert scores.policy[0] == scores.policy[1]  # identical sample, shared draw: identical score
    assert scores.policy[0] != scores.policy[2]  # another group: another (t, eps)


def test_masked_denoising_score_averages_valid_entries_only():
    pred, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[:, :, 2:] = 5.0  # padded frames with a large error
    mask = torch.zeros(2, 1, 4)
    mask[:, :, :2] = 1
    assert torch.allclose(denoising_score(pred, target, mask), torch.tensor([-1.0, -1.0]))
    assert torch.allclose(denoising_score(pred, target), torch.tensor([-13.0, -13.0]))


def test_prompt_dropout_uses_empty_prompt_in_training_mode_only():
    dropped = pixel_adapter(prompt_dropout=1.0)
    keep = pixel_adapter(prompt_dropout=0.0)  # same seed: same weights
    rows = records(3)
    batch = dropped.collate(rows)
    empty_batch = keep.collate([{**r, "prompt": ""} for r in rows])
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    on = dropped.score(batch, generator=seed()).policy
    assert torch.allclose(on, keep.score(empty_batch, generator=seed()).policy, atol=1e-6)
    dropped.policy.eval()
    off = dropped.score(batch, generator=seed()).policy
    assert torch.allclose(off, keep.score(batch, generator=seed()).policy, atol=1e-6)
    assert not torch.allclose(on, off)


# ---------------------------------------------------------------------------------------------- Diffusion-DPO / KTO at init
def test_diffusion_dpo_and_kto_at_init_copy_reference():
    adapter = pixel_adapter(prompt_dropout=0.2)
    batch = pairwise_batch(adapter, pair_rows(4))
    chosen, rejected = adapter.score_pairs(batch, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(chosen.policy, rejected.policy)  # different images, so the test is not vacuous
    loss = dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=2500)
    assert torch.allclose(loss, torch.full((4,), math.log(2)), atol=1e-6)
    k = kto(chosen.policy, chosen.reference, torch.ones(4, dtype=torch.bool), beta=1000)
    assert torch.allclose(k, torch.full((4,), 0.5), atol=1e-6)


def test_lora_reference_step_export_and_reference_sampling(sd_folder, tmp_path):
    adapter = ImageDiffusionAdapter.from_pretrained(sd_folder, lora={"r": 4, "lora_alpha": 8}, prompt_dropout=0.0)
    assert adapter.reference is None  # adapters disabled, no second copy
    trainable = adapter.trainable_parameters()
    assert trainable and all("lora" in n for n, p in adapter.policy.named_parameters() if p.requires_grad)
    batch = pairwise_batch(adapter, pair_rows(2, channels=3, size=16))
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    before_sample = adapter.sample(["a cat"], generator=torch.Generator().manual_seed(0), num_inference_steps=3)

    chosen, rejected = adapter.score_pairs(batch, generator=gen())
    loss = dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=2500)
    assert torch.allclose(loss, torch.full((2,), math.log(2)), atol=1e-6)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss.mean().backward()
    optimizer.step()

    chosen2, rejected2 = adapter.score_pairs(batch, generator=gen())
    assert torch.equal(chosen2.reference, chosen.reference) and torch.equal(rejected2.reference, rejected.reference)
    assert not torch.allclose(chosen2.policy, chosen.policy, rtol=0, atol=1e-9)
    margin = (chosen2.policy - chosen2.reference) - (rejected2.policy - rejected2.reference)
    assert (margin > 0).all()  # one step along −∇(−log σ(βΔ)) raises Δ from 0

    # LoRA export loads in a diffusers pipeline and reproduces the trained UNet
    adapter.save(str(tmp_path / "lora"))
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 60]), batch.chosen["cond"]
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(str(tmp_path / "lora"))
        loaded = pipe.unet(x, t, encoder_hidden_states=cond).sample
        trained = adapter.unwrapped_policy(x, t, encoder_hidden_states=cond).sample
    assert (trained - base).abs().max() > 1e-5
    assert torch.allclose(loaded, trained, atol=1e-6)

    # sampling from the reference (adapters disabled) reproduces the pre-training policy; the policy moved
    ref_sample = adapter.sample(["a cat"], generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                                use_reference=True)
    policy_sample = adapter.sample(["a cat"], generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    assert ref_sample["images"].shape == (1, 3, 16, 16)
    assert torch.allclose(ref_sample["images"], before_sample["images"], atol=1e-6)
    assert not torch.allclose(policy_sample["x0"], before_sample["x0"], rtol=0, atol=1e-7)


# diffusers EMAModel: decay 0 at its first step; at the second min(ema_decay, (1 + 1) / (10 + 1)), or with the
# power-law warm-up min(ema_decay, 1 - (1 + 1)^-power)
@pytest.mark.parametrize("ema, d", [({"ema_decay": 0.5}, 2 / 11), ({"ema_decay": 0.9, "ema_power": 1.0}, 0.5),
                                    ({"ema_decay": 0.9, "ema_power": 0.5}, 1 - 2 ** -0.5)])
def test_full_finetune_ema_save_writes_ema_weights(tmp_path, ema, d):
    adapter = pixel_adapter(**ema)
    batch = pairwise_batch(adapter, pair_rows(2))
    params = adapter.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.05)
    snapshots = []
    for step in range(2):
        chosen, _ = adapter.score_pairs(batch, generator=torch.Generator().manual_seed(step))
        (-chosen.policy.mean()).backward()  # plain denoising loss on the chosen images
        optimizer.step()
        optimizer.zero_grad()
        adapter.ema_step()
        snapshots.append([p.detach().clone() for p in params])
    adapter.save(str(tmp_path / "out"))
    saved = dict(UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").named_parameters())
    names = [n for n, p in adapter.policy.named_parameters() if p.requires_grad]
    moved = [i for i, (a, b) in enumerate(zip(*snapshots)) if not torch.equal(a, b)]
    assert moved
    for i, name in enumerate(names):
        assert torch.allclose(saved[name], d * snapshots[0][i] + (1 - d) * snapshots[1][i], atol=1e-6), name
    for p, s in zip(params, snapshots[1]):  # the live weights are restored after saving
        assert torch.equal(p, s)


def test_ema_power_needs_an_ema():
    with pytest.raises(ValueError, match="ema_power"):
        pixel_adapter(ema_power=0.75)


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "ddpm"])
def test_pixel_sampling_shapes_and_reproducibility(sampler):
    adapter = pixel_adapter()
    draw = lambda seed: adapter.sample(["digit 1", "digit 2"], num_samples=2,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed), num_inference_steps=4,
                                       guidance_scale=3.0, scheduler=sampler)
    first, again, other = draw(0), draw(0), draw(1)
    assert first["images"].shape == (4, 1, 8, 8) and first["x0"].shape == (4, 1, 8, 8)
    assert first["images"].min() >= -1 and first["images"].max() <= 1
    assert torch.equal(first["images"], again["images"])
    assert not torch.allclose(first["images"], other["images"])
    cond = adapter.encode_prompts(["digit 1", "digit 2"])["cond"]
    assert torch.equal(first["cond"], cond.repeat_interleave(2, dim=0))  # condition-major
    scores = adapter.score(first, generator=torch.Generator().manual_seed(0))
    assert scores.policy.shape == (4,)


def test_trajectory_eps_hat_is_the_epsilon_equivalent_prediction():
    adapter = pixel_adapter("v_prediction")
    out = adapter.sample(["digit 3"], num_samples=2, generator=torch.Generator().manual_seed(0),
                         num_inference_steps=5, guidance_scale=1.0, scheduler="ddim", return_trajectory=True)
    states = out["trajectory"]
    assert len(states) == 5
    assert states[0].t[0] > states[-1].t[0]
    x_t, t, eps_hat = states[2]
    with torch.no_grad():
        v = adapter.policy(x_t, t, encoder_hidden_states=out["cond"]).sample
    a = adapter.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(eps_hat, a.sqrt() * v + (1 - a).sqrt() * x_t, atol=1e-5)
    # consistency: x_t = α·x0_hat + σ·eps_hat with x0_hat = α·x_t − σ·v
    x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * v
    assert torch.allclose(x_t, a.sqrt() * x0_hat + (1 - a).sqrt() * eps_hat, atol=1e-5)

    guided = adapter.sample(["digit 3"], generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                            guidance_scale=3.0, scheduler="ddim", return_trajectory=True)
    x_t, t, eps_hat = guided["trajectory"][1]
    empty = adapter.encode_prompts([""])["cond"]
    with torch.no_grad():
        v_cond = adapter.policy(x_t, t, encoder_hidden_states=guided["cond"]).sample
        v_uncond = adapter.policy(x_t, t, encoder_hidden_states=empty).sample
    v = v_uncond + 3.0 * (v_cond - v_uncond)  # classifier-free guidance
    a = adapter.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(eps_hat, a.sqrt() * v + (1 - a).sqrt() * x_t, atol=1e-5)


# ---------------------------------------------------------------------------------------------- SD layouts and cache
def test_clip_prompt_encoders_match_the_pipelines(sd_folder, sdxl_folder):
    prompts = ["a red cat", "two dogs"]
    sd = ImageDiffusionAdapter.from_pretrained(sd_folder)
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert torch.allclose(sd.encode_prompts(prompts)["cond"], embeds, atol=1e-6)
    xl = ImageDiffusionAdapter.from_pretrained(sdxl_folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    ours = xl.encode_prompts(prompts)
    assert ours["cond"].shape == (2, 12, 32)
    assert torch.allclose(ours["cond"], embeds, atol=1e-6) and torch.allclose(ours["pooled"], pooled, atol=1e-6)


def test_sdxl_scores_use_pooled_text_and_time_ids_and_lora_export_loads(sdxl_folder, tmp_path):
    adapter = ImageDiffusionAdapter.from_pretrained(sdxl_folder, lora={"r": 2, "lora_alpha": 4}, prompt_dropout=0.0)
    rows = records(2, channels=3, size=16)
    rows[1].update(original_size=(64, 48), crop_top_left=(4, 2))
    batch = adapter.collate(rows)
    assert batch["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16], [64, 48, 4, 2, 16, 16]]
    groups = torch.tensor([0, 1])
    scores = adapter.score(batch, groups=groups, generator=torch.Generator().manual_seed(5))
    added = {"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}
    expected = expected_scores(adapter.policy, adapter.noise_scheduler, batch, groups, 5, "v_prediction", added)
    assert torch.allclose(scores.policy, expected, atol=1e-5) and torch.allclose(scores.reference, expected, atol=1e-5)
    moved = adapter.score({**batch, "time_ids": batch["time_ids"] + 100}, groups=groups,
                          generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(moved.policy, scores.policy)

    with torch.no_grad():
        for name, p in adapter.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    adapter.save(str(tmp_path / "lora"))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 50])
    with torch.no_grad():
        loaded = pipe.unet(x, t, encoder_hidden_states=batch["cond"], added_cond_kwargs=added).sample
        trained = adapter.policy(x, t, encoder_hidden_states=batch["cond"], added_cond_kwargs=added).sample
        with adapter.reference_unet() as base:
            assert (base(x, t, encoder_hidden_states=batch["cond"], added_cond_kwargs=added).sample - trained).abs().max() > 1e-3
    assert torch.allclose(loaded, trained, atol=1e-6)


def test_cached_encodings_equal_fresh_ones_and_skip_the_encoders(sd_folder, tmp_path):
    rows = records(3, channels=3, size=16)

    def counted(adapter):
        calls = {"vae": 0, "text": 0}
        vae_encode, text_encode = adapter.vae.encode, adapter.encode

        def count_vae(*a, **k):
            calls["vae"] += 1
            return vae_encode(*a, **k)

        def count_text(prompts):
            calls["text"] += 1
            return text_encode(prompts)

        adapter.vae.encode, adapter.encode = count_vae, count_text
        return calls

    fresh = ImageDiffusionAdapter.from_pretrained(sd_folder).collate(rows)
    first = ImageDiffusionAdapter.from_pretrained(sd_folder, cache_dir=tmp_path / "cache")
    calls = counted(first)
    cached = first.collate(rows)
    assert calls == {"vae": 1, "text": 1}
    assert len(list((tmp_path / "cache").glob("latent-*.safetensors"))) == 3
    assert len(list((tmp_path / "cache").glob("prompt-*.safetensors"))) == 3
    second = ImageDiffusionAdapter.from_pretrained(sd_folder, cache_dir=tmp_path / "cache")
    calls = counted(second)
    again = second.collate(rows)
    assert calls == {"vae": 0, "text": 0}
    for batch in (cached, again):
        assert torch.allclose(batch["x0"], fresh["x0"], atol=1e-6) and torch.equal(batch["cond"], fresh["cond"])
    vae = second.vae
    with torch.no_grad():
        direct = vae.encode(torch.stack([r["response"] for r in rows])).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(fresh["x0"], direct, atol=1e-6)


def test_prompt_encoder_may_return_text_embeddings():
    from genalign.data.text_encoder import TextEmbeddings

    tuple_encoder = BytePrompts()

    def embeddings(prompts):
        hidden, _ = tuple_encoder(prompts)
        return TextEmbeddings(tokens=hidden, mask=torch.ones(hidden.shape[:2]), pooled=hidden.mean(1))

    adapter = ImageDiffusionAdapter(tiny_unet(1, 16), DDPMScheduler(num_train_timesteps=T), embeddings)
    batch = adapter.collate(records(2))
    hidden, _ = tuple_encoder(["digit 0", "digit 1"])
    assert torch.equal(batch["cond"], hidden) and torch.equal(batch["pooled"], hidden.mean(1))


def test_pil_images_are_scaled_to_unit_range():
    from PIL import Image

    adapter = pixel_adapter()
    array = torch.arange(64, dtype=torch.uint8).view(8, 8) * 4
    batch = adapter.collate([{"prompt": "x", "response": Image.fromarray(array.numpy(), mode="L"), "row": 0}])
    assert torch.allclose(batch["x0"][0, 0], array.float() / 127.5 - 1, atol=1e-6)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_naming_the_row_or_folder(sdxl_folder, tmp_path):
    adapter = pixel_adapter()
    good = images(1)[0]
    cases = [
        ({"prompt": "a", "response": torch.rand(3, 8, 8), "row": 17}, r"row 17.*\[1, H, W\]"),
        ({"prompt": "a", "response": (good * 127).to(torch.uint8), "row": 4}, "row 4.*uint8"),
        ({"prompt": "a", "response": good * 3, "row": 9}, r"row 9.*\[-1, 1\]"),
        ({"prompt": 5, "response": good, "row": 2}, "row 2.*prompt"),
    ]
    for record, message in cases:
        with pytest.raises(ValueError, match=message):
            adapter.collate([record])
    with pytest.raises(ValueError, match="row 1: \\(8, 16\\)"):
        adapter.collate([{"prompt": "a", "response": good, "row": 0},
                         {"prompt": "b", "response": torch.zeros(1, 8, 16), "row": 1}])
    with pytest.raises(ValueError, match="cache_namespace"):
        pixel_adapter(cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="reference='lora'"):
        pixel_adapter(reference="lora")
    (tmp_path / "bare" / "unet").mkdir(parents=True)
    (tmp_path / "bare" / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match="vae/"):
        ImageDiffusionAdapter.from_pretrained(tmp_path / "bare")
    shutil.copytree(sdxl_folder, tmp_path / "xl", ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(FileNotFoundError, match="text_encoder_2/"):
        ImageDiffusionAdapter.from_pretrained(tmp_path / "xl")
