"""The embedded digits set, its captions, the sentence encoder and the shipped digit classifier."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

from genalign.data.digits import (
    CAPTION_TEMPLATES,
    DigitsDataset,
    caption,
    load_digit_images,
    parse_digit,
    split_indices,
)
from genalign.data.text_encoder import SentenceEncoder
from genalign.rewards.digit_classifier import DEFAULT_PATH, DigitClassifier, DigitPromptReward, load_digit_classifier


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return SentenceEncoder(cache_dir=tmp_path_factory.mktemp("text-cache"))


def test_images_are_the_sklearn_digits_rescaled_to_minus_one_one():
    images, labels = load_digit_images(resolution=8)
    raw = load_digits()
    assert images.shape == (1797, 1, 8, 8) and labels.tolist() == raw.target.tolist()
    np.testing.assert_allclose(images[:, 0].numpy(), raw.images / 16.0 * 2 - 1, atol=1e-6)


def test_resized_images_keep_range_shape_and_mean_intensity():
    small, _ = load_digit_images(8)
    big, _ = load_digit_images(16)
    assert big.shape == (1797, 1, 16, 16)
    assert big.min() >= -1 and big.max() <= 1
    # bilinear upsampling preserves each image's mean brightness up to border effects
    assert torch.allclose(big.mean((1, 2, 3)), small.mean((1, 2, 3)), atol=0.05)


def test_split_is_disjoint_complete_stratified_and_seeded():
    _, labels = load_digit_images(16)
    train, held_out = split_indices(labels, 0.2, seed=0)
    assert set(train.tolist()).isdisjoint(held_out.tolist())
    assert sorted(train.tolist() + held_out.tolist()) == list(range(1797))
    assert len(held_out) == 360
    full = torch.bincount(labels, minlength=10).float() / len(labels)
    part = torch.bincount(labels[held_out], minlength=10).float() / len(held_out)
    assert (part - full).abs().max() < 0.01  # every digit keeps its share (stratified)
    again, _ = split_indices(labels, 0.2, seed=0)
    other, _ = split_indices(labels, 0.2, seed=1)
    assert torch.equal(again, train) and not torch.equal(other, train)


def test_captions_name_the_right_digit_and_parse_back():
    assert caption(7) == "a handwritten digit seven"
    assert caption(7, 1) == "a drawing of the number 7"
    for digit, template in itertools.product(range(10), range(len(CAPTION_TEMPLATES))):
        assert parse_digit(caption(digit, template)) == digit
    with pytest.raises(ValueError, match="names no digit"):
        parse_digit("a cat on a mat")
    with pytest.raises(ValueError, match="several digits"):
        parse_digit("a three next to a 5")
    with pytest.raises(ValueError, match="template must be in"):
        caption(3, len(CAPTION_TEMPLATES))


def test_dataset_items_match_their_labels_and_prompts():
    data = DigitsDataset("held_out", 16)
    images, labels = load_digit_images(16)
    _, held_out = split_indices(labels)
    assert len(data) == len(held_out)
    for i in (0, 17, len(data) - 1):
        item = data[i]
        assert torch.equal(item["image"], images[held_out[i]])
        assert item["digit"] == labels[held_out[i]].item() == parse_digit(item["prompt"])
    assert len(set(data.templates.tolist())) == len(CAPTION_TEMPLATES)  # paraphrases are all used
    assert DigitsDataset("held_out", 16).prompts == data.prompts  # deterministic
    assert all(p.startswith("a hand-drawn") for p in DigitsDataset("train", 16, template=3).prompts)


def test_encoder_shapes_padding_and_pooled_is_the_masked_mean(encoder):
    texts = [caption(7), "a drawing of the number 3"]
    out = encoder.encode(texts)
    assert out.tokens.shape == (2, 16, 384) and out.pooled.shape == (2, 384) and out.mask.shape == (2, 16)
    assert out.mask[:, 0].all() and not out.mask[:, -1].any()  # short captions are padded to 16
    m = out.mask[0].bool()
    expected = out.tokens[0][m].mean(0)
    assert torch.allclose(out.pooled[0], expected / expected.norm(), atol=1e-5)
    # each text is encoded independently of the batch it came in
    assert torch.allclose(encoder.encode(texts[1:]).pooled[0], out.pooled[1], atol=1e-5)


def test_encoder_cache_is_written_once_and_read_back(encoder):
    texts = ["a cache probe", "another cache probe"]  # texts no other test encodes (the cache is shared)
    first = encoder.encode(texts)
    files = list(encoder.cache_dir.glob("text-*.safetensors"))
    cache = encoder.cache_dir / f"text-{encoder.cache_key(texts)}.safetensors"
    assert cache in files and torch.equal(load_file(str(cache))["pooled"], first.pooled)
    # a changed cache file is what comes back: the model is not run again
    stored = load_file(str(cache))
    save_file({**stored, "pooled": stored["pooled"] * 0 + 1}, str(cache))
    assert torch.equal(encoder.encode(texts).pooled, torch.ones_like(first.pooled))
    assert encoder.cache_key(texts) != encoder.cache_key(texts[::-1])


def test_encoder_paraphrases_of_a_digit_are_closer_than_other_digits(encoder):
    embeddings = torch.stack([encoder.encode([caption(d, t) for d in range(10)]).pooled for t in range(len(CAPTION_TEMPLATES))])
    same, other, hits = [], [], []
    for a, b in itertools.permutations(range(len(CAPTION_TEMPLATES)), 2):
        sim = embeddings[a] @ embeddings[b].T  # [10 digits under template a, 10 digits under template b]
        same.append(sim.diagonal().mean())
        other.append(sim[~torch.eye(10, dtype=torch.bool)].mean())
        hits.append((sim.argmax(1) == torch.arange(10)).float().mean())
    # across two different phrasings, a caption is nearer the same digit's caption than other digits' captions
    assert all(s > o for s, o in zip(same, other))
    assert torch.stack(hits).mean() > 0.85


def test_shipped_classifier_is_small_and_accurate_on_the_held_out_split():
    assert (DEFAULT_PATH / "model.safetensors").stat().st_size < 1_000_000
    model = load_digit_classifier()
    data = DigitsDataset("held_out", model.resolution)
    with torch.no_grad():
        predicted = model(data.images).argmax(-1)
    assert (predicted == data.digits).float().mean().item() >= 0.95


def test_prompt_reward_is_the_probability_of_the_prompted_digit():
    model = load_digit_classifier()
    data = DigitsDataset("held_out", 16)
    images, digits = data.images[:64], data.digits[:64]
    with torch.no_grad():
        probs = model(images).softmax(-1)
        right = model.prompt_reward(images, digits)
        wrong = model.prompt_reward(images, (digits + 1) % 10)
    assert torch.allclose(right, probs[torch.arange(64), digits])
    assert right.mean() > 0.9 and wrong.mean() < 0.05
    scorer = DigitPromptReward(model)
    assert torch.allclose(scorer(images, data.prompts[:64]), right)
    # a 32x32 image of the same digit is resized to the classifier's input and scores the same digit highly
    assert DigitPromptReward(model)(load_digit_images(32)[0][:1], [caption(0)]).item() > 0.9


def test_features_are_the_penultimate_layer_and_reload_round_trips(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(16)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    feats = model.features(x)
    assert feats.shape == (5, model.num_features)
    assert torch.allclose(model(x), model.head(feats))
    model.save(tmp_path, {"note": "test"})
    again = load_digit_classifier(tmp_path)
    assert torch.allclose(again(x), model(x))
    with pytest.raises(FileNotFoundError, match="train_digit_classifier"):
        load_digit_classifier(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        model(torch.zeros(2, 3, 16, 16))
