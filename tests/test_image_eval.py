"""FID with pluggable feature networks, reward/accuracy metrics, win rates and the CLIP score."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from genalign.data.digits import DigitsDataset, caption
from genalign.eval.image import (
    ClipScorer,
    FeatureNetwork,
    RewardScorer,
    fid_metric,
    frechet_distance,
    mean_reward,
    prompt_accuracy,
    reward_scores,
    win_rate,
)
from genalign.rewards.digit_classifier import DigitPromptReward, load_digit_classifier
from tiny_clip import clip_embeddings_by_hand, write_tiny_clip


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def held_out():
    return DigitsDataset("held_out", 16)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Reference Fréchet distance of two feature sets, computed independently with numpy/scipy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def noised(images: torch.Tensor, scale: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + scale * noise).clamp(-1, 1)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units make the covariances singular
def test_fid_with_classifier_features_matches_scipy(classifier, held_out):
    real, fake = held_out.images, noised(held_out.images, 0.5)
    with torch.no_grad():
        a, b = classifier.features(real).double().numpy(), classifier.features(fake).double().numpy()
    ours = frechet_distance(real, fake, classifier, method="features", batch_size=100)
    assert ours == pytest.approx(scipy_fid(a, b), rel=1e-6)


def test_fid_accepts_any_network_given_its_width(held_out):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(256, 12), nn.Tanh())
    real, fake = held_out.images, torch.roll(held_out.images, shifts=2, dims=-1)
    with torch.no_grad():
        a, b = network(real).double().numpy(), network(fake).double().numpy()
    assert frechet_distance(real, fake, network, num_features=12) == pytest.approx(scipy_fid(a, b), rel=1e-6)
    with pytest.raises(ValueError, match="num_features"):
        FeatureNetwork(network)
    with pytest.raises(ValueError, match=r"expected \[N, 7\]"):
        frechet_distance(real, fake, network, num_features=7)
    with pytest.raises(AttributeError, match="no method 'features'"):
        FeatureNetwork(network, method="features", num_features=12)


def test_fid_is_zero_for_the_same_set_and_grows_with_corruption(classifier, held_out):
    train = DigitsDataset("train", 16)
    real = held_out.images
    same = frechet_distance(real, real, classifier, method="features")
    other_real = frechet_distance(real, train.images, classifier, method="features")
    shifted = frechet_distance(real, torch.roll(real, shifts=3, dims=-1), classifier, method="features")
    light, heavy = (frechet_distance(real, noised(real, s), classifier, method="features") for s in (0.3, 1.0))
    assert abs(same) < 1e-6 * other_real
    assert other_real < shifted and other_real < light < heavy


def test_streaming_metric_equals_one_shot_and_splits_count(classifier, held_out):
    metric = fid_metric(classifier, "features")
    real, fake = held_out.images, noised(held_out.images, 0.5)
    for chunk in real.split(7):
        metric.update(chunk, real=True)
    metric.update(fake, real=False)
    assert metric.real_features_num_samples.item() == len(real)
    assert metric.compute().item() == pytest.approx(frechet_distance(real, fake, classifier, method="features"), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 generated"):
        frechet_distance(real, fake[:1], classifier, method="features")


def test_prompt_accuracy_and_mean_reward_follow_the_prompts(classifier, held_out):
    images = held_out.images
    right = held_out.prompts
    wrong = [caption((d + 1) % 10) for d in held_out.digits.tolist()]
    assert prompt_accuracy(classifier, images, right, batch_size=50) >= 0.95
    assert prompt_accuracy(classifier, images, wrong) <= 0.05
    scorer = DigitPromptReward(classifier)
    assert isinstance(scorer, RewardScorer)
    scores = reward_scores(scorer, images, right, batch_size=50)
    with torch.no_grad():
        expected = classifier.prompt_reward(images, held_out.digits)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert mean_reward(scorer, images, right) == pytest.approx(expected.mean().item(), abs=1e-6)
    assert mean_reward(scorer, images, wrong) < 0.05
    with pytest.raises(ValueError, match="one prompt per image"):
        reward_scores(scorer, images, right[:-1])


def test_win_rate_known_cases():
    # one image per prompt: win, tie, loss
    assert win_rate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])) == pytest.approx(0.5)
    # the per-prompt median, not the mean, decides: new has a better mean but a worse median on prompt 0
    new = torch.tensor([[0.0, 0.1, 100.0], [5.0, 6.0, 7.0]])
    base = torch.tensor([[0.2, 0.2, 0.2], [1.0, 1.0, 1.0]])
    assert win_rate(new, base) == pytest.approx(0.5)
    assert win_rate(base, new) == pytest.approx(0.5)
    assert win_rate(new, new) == pytest.approx(0.5)  # all ties
    # even N: the lower middle value (a real image's score) is the median; different N per model is allowed
    assert win_rate(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[2.0, 2.0]])) == pytest.approx(0.5)
    assert win_rate(torch.tensor([[1.0, 3.0, 3.0, 4.0]]), torch.tensor([[2.0, 2.0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same P"):
        win_rate(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same P"):
        win_rate([1.0, 2.0], torch.zeros(2, 0))


def test_win_rate_prefers_the_model_that_draws_the_prompted_digit(classifier, held_out):
    scorer = DigitPromptReward(classifier)
    images, prompts = held_out.images[:40], held_out.prompts[:40]
    good = reward_scores(scorer, images, prompts).view(10, 4)
    bad = reward_scores(scorer, noised(images, 1.5), prompts).view(10, 4)
    assert win_rate(good, bad) >= 0.9 and win_rate(bad, good) <= 0.1


# ------------------------------------------------------------------------------------------------ CLIP score
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_score_matches_an_independent_computation(tiny_clip):
    folder, model, tokenizer = tiny_clip
    scorer = ClipScorer(folder)
    assert isinstance(scorer, RewardScorer)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a red cat", "the digit 7", "a drawing of a tree", "two dogs"]
    vision, text = clip_embeddings_by_hand(model, tokenizer, images, prompts)  # quantise, normalise, towers
    expected = (100 * (vision * text).sum(-1)).clamp(min=0)
    scores = scorer(images, prompts)
    assert scores.shape == (4,)
    assert torch.allclose(scores, expected, atol=1e-3)
    # each score depends only on its own image and prompt
    assert torch.allclose(scorer(images[2:3], prompts[2:3]), scores[2:3], atol=1e-4)


def test_clip_score_takes_grey_images_and_other_sizes(tiny_clip):
    folder, _, _ = tiny_clip
    scorer = ClipScorer(folder)
    grey = DigitsDataset("held_out", 16).images[:3]
    assert torch.allclose(scorer(grey, ["a seven"] * 3), scorer(grey.expand(-1, 3, -1, -1), ["a seven"] * 3))
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(grey, ["a seven"])
    with pytest.raises(FileNotFoundError, match="CLIP folder"):
        ClipScorer(folder / "absent")
