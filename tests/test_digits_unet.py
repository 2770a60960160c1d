"""The shipped digits diffusion model (assets/digits-unet) and the digits evaluation protocol (genalign.eval.digits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from genalign.adapters.image import ImageDiffusionAdapter
from genalign.data.digits import DigitsDataset, parse_digit
from genalign.data.text_encoder import SentenceEncoder
from genalign.eval.digits import DigitsEvaluator, save_sample_grid
from genalign.rewards.digit_classifier import load_digit_classifier

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits-unet"


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator(per_digit=10, seed=0)


@pytest.fixture(scope="module")
def record():
    return json.loads((ASSET / "genalign.json").read_text())


def per_digit_images(dataset: DigitsDataset, per_digit: int) -> torch.Tensor:
    """``per_digit`` images of each digit 0..9 from ``dataset``, digit-major (the evaluator's prompt order)."""
    return torch.cat([dataset.images[dataset.digits == d][:per_digit] for d in range(10)])


def fid_by_hand(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of the classifier features, with numpy/scipy (independent of torchmetrics)."""
    classifier = load_digit_classifier()
    with torch.no_grad():
        a, b = (classifier.features(x).double().numpy() for x in (real, fake))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


# ------------------------------------------------------------------------------------------------ the shipped model
def test_shipped_unet_and_scheduler_load(record):
    unet = UNet2DConditionModel.from_pretrained(str(ASSET), subfolder="unet")
    config = unet.config
    assert (config.in_channels, config.out_channels, config.sample_size, config.cross_attention_dim) == (1, 1, 16, 384)
    assert (ASSET / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size <= 4.2e6
    assert sum(p.numel() for p in unet.parameters()) == record["parameters"]
    scheduler = DDPMScheduler.from_pretrained(str(ASSET), subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    # the recorded headline numbers are in the intended band: above chance, well below a faithful model
    headline = record["evaluation"][f"guidance_{record['evaluation']['recommended_guidance_scale']:g}"]
    assert 0.3 <= headline["prompt_accuracy"] <= 0.6


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_shipped_model_draws_digits_but_follows_prompts_only_partly(evaluator, record):
    torch.set_num_threads(1)
    adapter = ImageDiffusionAdapter.from_pretrained(ASSET, pixel_space=True, prompt_encoder=SentenceEncoder().encode)
    guidance = record["evaluation"]["recommended_guidance_scale"]
    images = evaluator.generate(lambda prompts, g: adapter.sample(prompts, generator=g, guidance_scale=guidance)["images"])
    metrics = evaluator.metrics(images)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert 0.2 < metrics["prompt_accuracy"] < 0.9  # clearly above chance (0.1), room left for alignment
    assert 0.15 < metrics["reward"] < 0.9
    assert metrics["fid"] < 0.25 * evaluator.metrics(noise)["fid"]


# ------------------------------------------------------------------------------------------------ the evaluator
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_metrics_equal_independent_computations_on_real_digits(evaluator):
    held_out = DigitsDataset("held_out", 16)
    images = per_digit_images(held_out, 10)
    digits = torch.tensor([parse_digit(p) for p in evaluator.prompts])
    assert digits.tolist() == [d for d in range(10) for _ in range(10)]
    classifier = load_digit_classifier()
    with torch.no_grad():
        probabilities = classifier(images).softmax(-1)
    metrics = evaluator.metrics(images)
    assert metrics["reward"] == pytest.approx(probabilities[torch.arange(100), digits].mean().item(), abs=1e-6)
    assert metrics["prompt_accuracy"] == pytest.approx((probabilities.argmax(-1) == digits).float().mean().item())
    assert metrics["fid"] == pytest.approx(fid_by_hand(held_out.images, images), rel=1e-5)
    assert metrics["prompt_accuracy"] >= 0.95
    # real digits from the other split are close to the held-out set; digits drawn for the wrong prompt score ~0
    train = evaluator.metrics(per_digit_images(DigitsDataset("train", 16), 10))
    shuffled = evaluator.metrics(torch.roll(images, 10, dims=0))  # every image now sits under the next digit's prompt
    noise = evaluator.metrics(torch.rand(100, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert train["prompt_accuracy"] >= 0.95 and train["fid"] < 0.1 * noise["fid"]
    assert shuffled["prompt_accuracy"] <= 0.05 and shuffled["fid"] == pytest.approx(metrics["fid"], rel=1e-6)


def test_generate_uses_fixed_prompts_and_seed_and_checks_the_samples(evaluator):
    calls = []

    def sample_fn(prompts, generator):
        calls.append(list(prompts))
        return torch.rand(len(prompts), 1, 16, 16, generator=generator) * 2 - 1

    first, second = evaluator.generate(sample_fn), evaluator.generate(sample_fn)
    assert torch.equal(first, second) and calls[0] == calls[1] == evaluator.prompts
    expected = torch.rand(100, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(first, expected)
    assert DigitsEvaluator(per_digit=3, seed=5).generate(sample_fn).shape == (30, 1, 16, 16)
    with pytest.raises(ValueError, match=r"expected one grey image per prompt, \[100, 1, H, W\]"):
        evaluator.generate(lambda prompts, g: torch.zeros(len(prompts), 3, 16, 16))
    with pytest.raises(ValueError, match="non-finite"):
        evaluator.generate(lambda prompts, g: torch.full((len(prompts), 1, 16, 16), float("nan")))
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]"):
        evaluator.metrics(torch.zeros(100, 1, 16, 16) + 2)
    with pytest.raises(ValueError, match="per_digit"):
        DigitsEvaluator(per_digit=0)


def test_sample_grid_has_one_row_per_digit(tmp_path):
    held_out = DigitsDataset("held_out", 16)
    images, prompts = held_out.images[:60], held_out.prompts[:60]
    canvas = save_sample_grid(images, prompts, tmp_path / "grid.png", columns=4)
    assert PIL.Image.open(tmp_path / "grid.png").format == "PNG"
    assert canvas.shape == (10 * 17 + 1, 4 * 17 + 1)
    digits = [parse_digit(p) for p in prompts]
    for d in range(10):
        mine = [i for i, e in enumerate(digits) if e == d][:4]
        for c, i in enumerate(mine):  # row d holds digit d's images in prompt order
            assert torch.equal(canvas[1 + 17 * d : 17 * (d + 1), 1 + 17 * c : 17 * (c + 1)], images[i, 0])
    # only the digits present get rows, in ascending order
    few = [i for i, d in enumerate(digits) if d in (7, 3)]
    canvas = save_sample_grid(images[few], [prompts[i] for i in few], tmp_path / "two.png")
    threes = [i for i in few if digits[i] == 3]
    assert canvas.shape[0] == 2 * 17 + 1 and torch.equal(canvas[1:17, 1:17], images[threes[0], 0])
    with pytest.raises(ValueError, match="one prompt each"):
        save_sample_grid(images[:5], prompts[:4], tmp_path / "bad.png")
