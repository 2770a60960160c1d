"""HPS v2 loader (genalign.eval.hps): a tiny random open_clip-layout CLIP saved as an HPS checkpoint, scored through
``load_hps`` and checked against open_clip's forward re-written here from the raw state dict with plain torch ops."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genalign.eval.hps import HPSScorer, clip_config, default_heads, hps_pixels, load_hps
from genalign.eval.image import RewardScorer
from tiny_sd import tiny_tokenizer

VISION_WIDTH, VISION_HEADS, PATCH, IMAGE = 32, 2, 14, 28
TEXT_WIDTH, TEXT_HEADS, CONTEXT, EMBED = 16, 2, 12, 8
ATOL = 1e-4  # scores are 100 · cosine: float32 against float32, different op order (sdpa, fused q/k/v)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
PROMPTS = ["a red cat", "two dogs on grass", "a very long prompt that the context must cut", "x"]


def block_weights(prefix: str, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    return {
        f"{prefix}ln_1.weight": 1 + rand(width), f"{prefix}ln_1.bias": rand(width),
        f"{prefix}attn.in_proj_weight": rand(3 * width, width), f"{prefix}attn.in_proj_bias": rand(3 * width),
        f"{prefix}attn.out_proj.weight": rand(width, width), f"{prefix}attn.out_proj.bias": rand(width),
        f"{prefix}ln_2.weight": 1 + rand(width), f"{prefix}ln_2.bias": rand(width),
        f"{prefix}mlp.c_fc.weight": rand(4 * width, width), f"{prefix}mlp.c_fc.bias": rand(4 * width),
        f"{prefix}mlp.c_proj.weight": rand(width, 4 * width), f"{prefix}mlp.c_proj.bias": rand(width),
    }  # fmt: skip


def open_clip_state(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random open_clip CLIP state dict (the key names and shapes of ``open_clip.CLIP`` with a ViT tower)."""
    g = torch.Generator().manual_seed(seed)
    grid = IMAGE // PATCH
    state = {
        "visual.conv1.weight": torch.randn(VISION_WIDTH, 3, PATCH, PATCH, generator=g) * 0.05,
        "visual.class_embedding": torch.randn(VISION_WIDTH, generator=g) * 0.3,
        "visual.positional_embedding": torch.randn(grid * grid + 1, VISION_WIDTH, generator=g) * 0.3,
        "visual.ln_pre.weight": 1 + 0.1 * torch.randn(VISION_WIDTH, generator=g),
        "visual.ln_pre.bias": 0.1 * torch.randn(VISION_WIDTH, generator=g),
        "visual.ln_post.weight": 1 + 0.1 * torch.randn(VISION_WIDTH, generator=g),
        "visual.ln_post.bias": 0.1 * torch.randn(VISION_WIDTH, generator=g),
        "visual.proj": torch.randn(VISION_WIDTH, EMBED, generator=g) * 0.3,
        "token_embedding.weight": torch.randn(vocab_size, TEXT_WIDTH, generator=g) * 0.3,
        "positional_embedding": torch.randn(CONTEXT, TEXT_WIDTH, generator=g) * 0.3,
        "ln_final.weight": 1 + 0.1 * torch.randn(TEXT_WIDTH, generator=g),
        "ln_final.bias": 0.1 * torch.randn(TEXT_WIDTH, generator=g),
        "text_projection": torch.randn(TEXT_WIDTH, EMBED, generator=g) * 0.3,
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(2):
        state.update(block_weights(f"visual.transformer.resblocks.{i}.", VISION_WIDTH, g))
        state.update(block_weights(f"transformer.resblocks.{i}.", TEXT_WIDTH, g))
    return state


# ---- open_clip's forward, from the raw state dict ------------------------------------------------------------


def layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def attention(x, state, prefix, heads, mask=None):
    """nn.MultiheadAttention(batch_first) with in_proj = [W_q; W_k; W_v], written out."""
    n, length, width = x.shape
    q, k, v = (x @ state[f"{prefix}in_proj_weight"].T + state[f"{prefix}in_proj_bias"]).split(width, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    return out @ state[f"{prefix}out_proj.weight"].T + state[f"{prefix}out_proj.bias"]


def transformer(x, state, prefix, heads, mask=None):
    i = 0
    while f"{prefix}{i}.ln_1.weight" in state:
        block = f"{prefix}{i}."
        x = x + attention(layer_norm(x, state, block + "ln_1"), state, block + "attn.", heads, mask)
        hidden = F.gelu(layer_norm(x, state, block + "ln_2") @ state[block + "mlp.c_fc.weight"].T + state[block + "mlp.c_fc.bias"])
        x = x + hidden @ state[block + "mlp.c_proj.weight"].T + state[block + "mlp.c_proj.bias"]
        i += 1
    return x


def encode_image(state, pixels):
    """open_clip VisionTransformer: conv1 patches, class token, positions, ln_pre, blocks, ln_post(CLS) @ proj."""
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = transformer(layer_norm(x, state, "visual.ln_pre"), state, "visual.transformer.resblocks.", VISION_HEADS)
    return layer_norm(x[:, 0], state, "visual.ln_post") @ state["visual.proj"]


def encode_text(state, tokens):
    """open_clip CLIP.encode_text: causal mask, ln_final, the state at argmax(token ids) @ text_projection."""
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    x = layer_norm(transformer(x, state, "transformer.resblocks.", TEXT_HEADS, mask), state, "ln_final")
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ state["text_projection"]


def open_clip_tokens(vocab: dict[str, int], prompts) -> torch.Tensor:
    """open_clip's tokenize for the tiny character vocabulary (no merges): sot + characters (the last of each word
    with </w>) + eot, truncated to the context with eot last, zero-padded."""
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    result = torch.zeros(len(prompts), CONTEXT, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = [sot]
        for word in prompt.lower().split():
            ids += [vocab[c] for c in word[:-1]] + [vocab[word[-1] + "</w>"]]
        ids = (ids + [eot])[:CONTEXT]
        ids[-1] = eot
        result[row, : len(ids)] = torch.tensor(ids)
    return result


def reference_scores(state, vocab, images_pm1, prompts):
    """100 · cos, open_clip style, for images already IMAGE × IMAGE in [-1, 1] (8-bit quantised, no resize)."""
    pixels = ((images_pm1.expand(-1, 3, -1, -1) + 1) * 127.5).round() / 255
    image = F.normalize(encode_image(state, (pixels - MEAN) / STD), dim=-1)
    text = F.normalize(encode_text(state, open_clip_tokens(vocab, prompts)), dim=-1)
    return 100 * (image * text).sum(-1)


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    (root / "tokenizer").mkdir()
    tokenizer = tiny_tokenizer(root / "tokenizer")
    state = open_clip_state(len(tokenizer))
    torch.save({"state_dict": {k: v.half() if k.startswith("visual.transformer") else v for k, v in state.items()}},
               root / "HPS_v2_compressed.pt")  # fmt: skip (fp16 parts, as the compressed release)
    state = {k: v.half().float() if k.startswith("visual.transformer") else v for k, v in state.items()}
    return root / "HPS_v2_compressed.pt", root / "tokenizer", state, tokenizer.get_vocab()


@pytest.fixture(scope="module")
def scorer(hps_files):
    checkpoint, tokenizer, _, _ = hps_files
    return load_hps(checkpoint, tokenizer, vision_heads=VISION_HEADS, text_heads=TEXT_HEADS)


def images_pm1(n=4, size=IMAGE, seed=3):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- tests ------------------------------------------------------------------------------------------------------


def test_scores_match_open_clip_forward(hps_files, scorer):
    """load_hps scores = 100 · cos of open_clip's forward written from the raw state dict, to ATOL."""
    _, _, state, vocab = hps_files
    images = images_pm1()
    scores = scorer(images, PROMPTS)
    expected = reference_scores(state, vocab, images, PROMPTS)
    assert isinstance(scorer, RewardScorer) and scores.shape == (4,) and scores.dtype == torch.float32
    assert scores.abs().max() > 1  # not degenerate
    torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)


def test_features_match_unnormalised_towers(hps_files, scorer):
    """Each tower separately (before normalisation too): image = ln_post(CLS) @ proj, text = EOT state @ proj."""
    _, _, state, vocab = hps_files
    images = images_pm1(2, seed=5)
    pixels = ((images + 1) * 127.5).round() / 255
    with torch.no_grad():
        ours_image = scorer.model.visual_projection(scorer.model.vision_model(pixel_values=(pixels - MEAN) / STD).pooler_output)
        tokens = scorer.tokenizer(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
        ours_text = scorer.model.get_text_features(**tokens)
        ours_text = getattr(ours_text, "pooler_output", ours_text)  # transformers 5 returns an output object
    torch.testing.assert_close(ours_image, encode_image(state, (pixels - MEAN) / STD), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_text, encode_text(state, open_clip_tokens(vocab, PROMPTS)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.text_features(PROMPTS),
                               F.normalize(encode_text(state, open_clip_tokens(vocab, PROMPTS)), dim=-1), atol=1e-6, rtol=0)  # fmt: skip


def test_image_inputs_agree(scorer):
    """[-1, 1] floats, uint8 tensors and PIL images of the same pixels score the same."""
    images = images_pm1(3, seed=7)
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    pil = [Image.fromarray(u.permute(1, 2, 0).numpy()) for u in uint8]
    reference = scorer(images, PROMPTS[:3])
    torch.testing.assert_close(scorer(uint8, PROMPTS[:3]), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(scorer(pil, PROMPTS[:3]), reference, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(images, PROMPTS[:2])


def test_preprocessing_resizes_shortest_side_and_center_crops():
    """hps_pixels ≈ PIL bicubic resize of the shortest side + center crop, then CLIP mean / std. HPSv2 resizes the
    float tensor (torchvision's antialiased bicubic, PIL's filter without PIL's 8-bit rounding and clamping between
    its two passes), so on random noise a few pixels differ by up to ~5/255, the mean by ~0.3/255 (a bilinear
    filter or a crop off by one pixel differ by more than 10/255)."""
    generator = torch.Generator().manual_seed(0)
    for height, width in ((56, 84), (90, 60), (28, 28), (100, 100), (512, 768)):
        image = (torch.rand(3, height, width, generator=generator) * 255).round().to(torch.uint8)
        size = (IMAGE, int(IMAGE * width / height)) if height <= width else (int(IMAGE * height / width), IMAGE)
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.BICUBIC)
        left, top = round((pil.width - IMAGE) / 2), round((pil.height - IMAGE) / 2)
        expected = torch.from_numpy(np.array(pil.crop((left, top, left + IMAGE, top + IMAGE)))).permute(2, 0, 1) / 255
        ours = hps_pixels(image, IMAGE) * STD + MEAN
        assert ours.shape == (3, IMAGE, IMAGE), (height, width)
        assert (ours - expected).abs().max() < 6 / 255 and (ours - expected).abs().mean() < 0.5 / 255, (height, width)


def test_config_of_vit_h_14_shapes():
    """The transformers config derived from ViT-H-14's shapes (meta tensors): the HPS v2 architecture."""
    shapes = {"visual.conv1.weight": (1280, 3, 14, 14), "visual.positional_embedding": (257, 1280),
              "visual.proj": (1280, 1024), "ln_final.weight": (1024,), "text_projection": (1024, 1024),
              "token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
              "visual.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
              "transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024)}  # fmt: skip
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    state.update({f"visual.transformer.resblocks.{i}.ln_1.weight": torch.empty(1280, device="meta") for i in range(32)})
    state.update({f"transformer.resblocks.{i}.ln_1.weight": torch.empty(1024, device="meta") for i in range(24)})
    config = clip_config(state)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
            vision.image_size, vision.intermediate_size, vision.hidden_act) == (1280, 32, 16, 14, 224, 5120, "gelu")  # fmt: skip
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size,
            text.max_position_embeddings, text.intermediate_size, text.hidden_act) == (1024, 24, 16, 49408, 77, 4096, "gelu")  # fmt: skip
    assert config.projection_dim == 1024
    assert [default_heads(w, True) for w in (768, 1024, 1280, 1664)] == [12, 16, 16, 16]
    assert [default_heads(w, False) for w in (512, 768, 1024, 1280)] == [8, 12, 16, 20]


def test_errors_name_the_file_and_the_fix(hps_files, tmp_path):
    checkpoint, tokenizer, state, _ = hps_files
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt does not exist.*HPS_v2_compressed\.pt"):
        load_hps(tmp_path / "nowhere.pt", tokenizer)
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"text\.pt is not a torch file"):
        load_hps(tmp_path / "text.pt", tokenizer)
    torch.save({"state_dict": {"vision_model.embeddings.class_embedding": torch.zeros(4)}}, tmp_path / "hf.pt")
    with pytest.raises(ValueError, match=r"hf\.pt is not an open_clip CLIP ViT state dict: missing \['visual\.conv1\.weight'"):
        load_hps(tmp_path / "hf.pt", tokenizer)
    broken = {k: v for k, v in state.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}
    torch.save({"state_dict": broken}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing \['transformer\.resblocks\.1\.attn\.in_proj_bias'\]"):
        load_hps(tmp_path / "broken.pt", tokenizer, vision_heads=VISION_HEADS, text_heads=TEXT_HEADS)
    torch.save({"state_dict": {**state, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VISION_WIDTH)}},
               tmp_path / "layer_scale.pt")  # fmt: skip
    with pytest.raises(ValueError, match=r"does not handle.*ls_1\.gamma"):
        load_hps(tmp_path / "layer_scale.pt", tokenizer)
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder .*missing does not exist; pass a local CLIP tokenizer"):
        load_hps(checkpoint, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no tokenizer\.json or vocab\.json \+ merges\.txt"):
        load_hps(checkpoint, tmp_path / "empty")
    with pytest.raises(ValueError, match="not divisible by 3 heads; pass vision_heads="):
        load_hps(checkpoint, tokenizer, vision_heads=3)


def test_bare_state_dict_and_module_prefix(hps_files, tmp_path, scorer):
    """A bare state dict with DDP's 'module.' prefix loads to the same scores."""
    _, tokenizer, state, _ = hps_files
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "bare.pt")
    other = load_hps(tmp_path / "bare.pt", tokenizer, vision_heads=VISION_HEADS, text_heads=TEXT_HEADS)
    assert isinstance(other, HPSScorer)
    images = images_pm1(2, seed=9)
    torch.testing.assert_close(other(images, PROMPTS[:2]), scorer(images, PROMPTS[:2]), atol=1e-6, rtol=0)


def test_image_cli_flags(hps_files, tmp_path):
    """genalign-eval image --hps FILE --hps-tokenizer FOLDER builds an 'hps' scorer (default head counts: the
    plumbing is checked here, not the scores) reported per side and as a win rate; --hps alone is refused."""
    from genalign.eval import image_cli

    checkpoint, tokenizer, _, _ = hps_files
    parser = argparse.ArgumentParser()
    image_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["image", "--prompts", "p.txt", "--out", str(tmp_path), "--base", "b",
                              "--hps", str(checkpoint), "--hps-tokenizer", str(tokenizer)])  # fmt: skip
    image_cli.check_arguments(args)
    scorers = image_cli.build_scorers(args)
    assert list(scorers) == ["hps"] and isinstance(scorers["hps"], HPSScorer)
    metrics, _ = image_cli.evaluate({"before": images_pm1(2, seed=1)[:, None], "after": images_pm1(2, seed=2)[:, None]},
                                    PROMPTS[:2], scorers, None)  # fmt: skip
    assert set(metrics["before"]) == {"hps"} and 0 <= metrics["win_rate"]["hps"] <= 1
    json.dumps(metrics)
    args = parser.parse_args(["image", "--prompts", "p.txt", "--out", str(tmp_path), "--base", "b", "--hps", "x.pt"])
    with pytest.raises(SystemExit, match="--hps .* --hps-tokenizer"):
        image_cli.check_arguments(args)
