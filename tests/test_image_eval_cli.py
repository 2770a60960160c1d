"""``genalign-eval image`` end to end on tiny models built here: a random SD 1.5 / SDXL folder (tests/tiny_sd.py),
LoRA ``final/`` folders in the format ``ImageDiffusionAdapter.save`` writes, and the tiny PickScore / aesthetic /
CLIP / FID InceptionV3 files of tests/test_image_metrics.py. Every metric in metrics.json is recomputed here from
the PNGs the command wrote, by hand (CLIP towers, the aesthetic MLP's layers, the FID closed form)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict

from genalign.adapters.image import ImageDiffusionAdapter
from genalign.eval_cli import main
from test_image_metrics import (
    PICK_LOGIT_SCALE,
    aesthetic_by_hand,
    reference_features,
    tf1_resize_numpy,
    write_aesthetic_mlp,
    write_inception_file,
    write_pick_folder,
)
from tiny_clip import clip_embeddings_by_hand, write_tiny_clip
from tiny_sd import write_sd15, write_sdxl

PROMPTS = ["a red fox", "a blue whale", "a green frog"]
#: 2 sampler steps; batches of 2 prompts, so the 3 prompts are sampled in two chunks with their own seeds
FAST = ["--steps", "2", "--batch-size", "2"]
SCORERS = ("pickscore", "aesthetic", "clip_score")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: the tiny models' ops are too small to gain from two, and with other
    test runs busy on a 2-core machine, two spinning threads made the file ~7× slower (150 s instead of 20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("image_eval")
    (root / "sd15").mkdir()
    pick, pick_model, pick_tokenizer = write_pick_folder(root / "pickscore")
    clip, clip_model, clip_tokenizer = write_tiny_clip(root / "clip", seed=11)
    aesthetic, aesthetic_state = write_aesthetic_mlp(root)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {
        "root": root, "sd15": write_sd15(root / "sd15"), "prompts": root / "prompts.txt",
        "pickscore": (pick, pick_model, pick_tokenizer), "clip": (clip, clip_model, clip_tokenizer),
        "aesthetic": (aesthetic, aesthetic_state),
    }  # fmt: skip


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory) -> tuple[Path, Path]:
    """The FID InceptionV3 weights and a reference folder of 3 random 16 × 16 PNGs."""
    root = tmp_path_factory.mktemp("fid")
    weights, _ = write_inception_file(root)
    real = root / "real"
    real.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(real / f"real_{i}.png")
    return weights, real


#: the LoRA options of configs/adapter/sd15.yaml, with alpha = 3 · rank (neither peft's default 8 nor the rank,
#: so a loader dropping alpha shows)
LORA = {"r": 4, "lora_alpha": 12, "init_lora_weights": "gaussian", "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}


def write_model(base: Path, folder: Path, kind: str, scale: float, seed: int = 0) -> ImageDiffusionAdapter:
    """A trained-model folder as training writes it (``ImageDiffusionAdapter.save``), and the adapter holding its
    weights in memory. ``"lora"``: :data:`LORA` with B drawn with std ``scale`` (0: the LoRA adds exactly nothing);
    ``"lora_without_metadata"``: a rank-2 LoRA file without the adapter metadata (as other tools write them: alpha
    = rank); ``"unet"``: a full fine-tune's ``final/unet``, every weight moved by ``scale`` · N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "unet":
        adapter = ImageDiffusionAdapter.from_pretrained(base, reference="copy", prompt_dropout=0.0)
        for parameter in adapter.unwrapped_policy.parameters():
            parameter.data += torch.randn(parameter.shape, generator=g) * scale
        adapter.save(str(folder))
        return adapter
    options = LORA if kind == "lora" else {"r": 2, "lora_alpha": 2}
    adapter = ImageDiffusionAdapter.from_pretrained(base, lora=options, prompt_dropout=0.0)
    for name, parameter in adapter.unwrapped_policy.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=g) * scale
    if kind == "lora":
        adapter.save(str(folder))
    else:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(adapter.unwrapped_policy))
        StableDiffusionLoraLoaderMixin.save_lora_weights(str(folder), unet_lora_layers=layers)
    return adapter


def write_lora(base: Path, folder: Path, scale: float) -> Path:
    write_model(base, folder, "lora", scale)
    return folder


@torch.no_grad()
def own_samples(adapter: ImageDiffusionAdapter, per_prompt: int, *, use_reference: bool) -> np.ndarray:
    """``[P, N, H, W, 3]`` uint8 samples of PROMPTS drawn from the adapter in memory with the command's documented
    noise (FAST: chunks of 2 prompts, chunk k seeded with seed 0 + its first prompt index; 7.5 guidance, dpmsolver++)."""
    chunks = []
    for start in range(0, len(PROMPTS), 2):
        part = PROMPTS[start : start + 2]
        images = adapter.sample(part, per_prompt, generator=torch.Generator().manual_seed(start), num_inference_steps=2,
                                use_reference=use_reference)["images"]  # fmt: skip
        chunks.append(images.view(len(part), per_prompt, *images.shape[1:]))
    return ((torch.cat(chunks).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()


def scorer_flags(files: dict) -> list[str]:
    return ["--pickscore", str(files["pickscore"][0]), "--aesthetic", str(files["aesthetic"][0]),
            "--aesthetic-clip", str(files["pickscore"][0]), "--clip", str(files["clip"][0])]  # fmt: skip


def evaluate(files: dict, out: Path, *args: str, prompts: Path | None = None) -> dict:
    assert main(["image", "--prompts", str(prompts or files["prompts"]), "--out", str(out), *args]) == 0
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------------ independent checks
def read_samples(folder: Path) -> np.ndarray:
    """``[P, N, H, W, 3]`` uint8 from ``PPPPP_SS.png`` files, read with PIL and checked to be all there."""
    names = sorted(p.name for p in folder.iterdir())
    prompts, samples = 1 + max(int(n[:5]) for n in names), 1 + max(int(n[6:8]) for n in names)
    assert names == [f"{p:05d}_{s:02d}.png" for p in range(prompts) for s in range(samples)]
    return np.stack([[np.asarray(PIL.Image.open(folder / f"{p:05d}_{s:02d}.png")) for s in range(samples)]
                     for p in range(prompts)])  # fmt: skip


def clip_cosines(clip: tuple, pixels: np.ndarray, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings, cos(image, prompt)) of uint8 ``[M, H, W, 3]`` images: PIL bicubic resize to the tiny
    CLIP's 32 × 32 input (its processor's shortest_edge = crop = 32), then the towers by hand."""
    _, model, tokenizer = clip
    resized = np.stack([np.asarray(PIL.Image.fromarray(p).resize((32, 32), PIL.Image.BICUBIC)) for p in pixels])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 127.5 - 1
    vision, text = clip_embeddings_by_hand(model, tokenizer, x, prompts)
    return vision, (vision * text).sum(-1)


def expected_scores(files: dict, pixels: np.ndarray) -> dict[str, torch.Tensor]:
    """``{scorer: [P, N]}`` for the ``[P, N, H, W, 3]`` samples of PROMPTS: PickScore = logit_scale · cos,
    aesthetic = the MLP on the PickScore folder's image embedding, CLIP score = 100 · max(cos, 0)."""
    p, n = pixels.shape[:2]
    prompts = [prompt for prompt in PROMPTS[:p] for _ in range(n)]
    flat = pixels.reshape(p * n, *pixels.shape[2:])
    vision, pick_cos = clip_cosines(files["pickscore"], flat, prompts)
    _, clip_cos = clip_cosines(files["clip"], flat, prompts)
    scores = {"pickscore": PICK_LOGIT_SCALE * pick_cos, "aesthetic": aesthetic_by_hand(files["aesthetic"][1], vision),
              "clip_score": 100 * clip_cos.clamp(min=0)}  # fmt: skip
    return {name: s.view(p, n) for name, s in scores.items()}


def expected_win_rate(after: torch.Tensor, before: torch.Tensor) -> float:
    """Diffusion-DPO: per prompt the median of the N scores (the lower middle one for even N), ties count ½."""
    wins = 0.0
    for a, b in zip(after.tolist(), before.tolist()):
        ma, mb = sorted(a)[(len(a) - 1) // 2], sorted(b)[(len(b) - 1) // 2]
        wins += 1.0 if ma > mb else 0.5 if ma == mb else 0.0
    return wins / len(after)


def fid_by_hand(state: dict, real: np.ndarray, generated: np.ndarray) -> float:
    """FID of uint8 ``[M, H, W, 3]`` image sets: pool3 features from the weights by hand (test_image_metrics'
    reference_features on the TF-1 resize of the pixels, (x − 128) / 128), then the closed form
    ||μ_r − μ_g||² + Tr Σ_r + Tr Σ_g − 2 Tr (Σ_r Σ_g)^½, where Tr (Σ_r Σ_g)^½ = ‖X_r X_gᵀ‖_* / √((n_r − 1)(n_g − 1))
    for centred feature rows X (the nonzero eigenvalues of Σ_r Σ_g are the squared singular values of
    X_r X_gᵀ / √((n_r − 1)(n_g − 1)))."""
    features = []
    for pixels in (real, generated):
        x = torch.from_numpy((tf1_resize_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float64), 299) - 128) / 128)
        with torch.no_grad():
            features.append(reference_features(state, x.float()).double())
    (a, b), (na, nb) = features, (len(real), len(generated))
    xa, xb = a - a.mean(0), b - b.mean(0)
    trace_root = torch.linalg.svdvals(xa @ xb.T).sum() / math.sqrt((na - 1) * (nb - 1))
    return (((a.mean(0) - b.mean(0)) ** 2).sum() + (xa**2).sum() / (na - 1) + (xb**2).sum() / (nb - 1) - 2 * trace_root).item()


def fid_on_the_range(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """torchmetrics' ``_compute_fid`` (||μ1 − μ2||² + Tr Σ1 + Tr Σ2 − 2 Σ √eig(Σ1 Σ2)) on the range of Σ1: with an
    orthonormal Q whose span holds that range, Σ1 Σ2 = Q (QᵀΣ1Q) QᵀΣ2 has the nonzero eigenvalues of
    (QᵀΣ1Q)(QᵀΣ2Q). torchmetrics' eigvals of the 2048 × 2048 product take 10-30 s a call on this CPU; the
    covariance of n ≤ 6 images has rank ≤ 5, so 32 random probes find its range (checked below)."""
    probes = torch.randn(sigma1.shape[0], 32, dtype=sigma1.dtype, generator=torch.Generator().manual_seed(0))
    q = torch.linalg.qr(sigma1 @ probes).Q
    assert torch.allclose(q @ (q.T @ sigma1), sigma1, atol=1e-9 * sigma1.abs().max().item())  # the range is in span(Q)
    small = (q.T @ sigma1 @ q) @ (q.T @ sigma2 @ q)
    root = torch.linalg.eigvals(small).sqrt().real.sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root


def fast_fid():
    return mock.patch("torchmetrics.image.fid._compute_fid", side_effect=fid_on_the_range)


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("model, sampler", [("base", "dpmsolver++"), ("zero_lora", "ddpm")])
def test_a_model_equal_to_its_base_ties_on_every_metric(files, model, sampler, tmp_path):
    """--model = the base's own diffusers folder (the unet/ path) or a LoRA with B = 0: the same network from the
    same noise (ancestral DDPM: every step's noise too), so the after images are the before images pixel for pixel
    and every win rate is ½ (ties count ½)."""
    folder = files["sd15"] if model == "base" else write_lora(files["sd15"], tmp_path / "final", scale=0.0)
    sampling = [*FAST, "--scheduler", sampler]
    metrics = evaluate(files, tmp_path / "out", "--model", str(folder), "--base", str(files["sd15"]), *sampling,
                       *scorer_flags(files))  # fmt: skip
    before, after = (read_samples(tmp_path / "out" / "samples" / side) for side in ("before", "after"))
    assert before.shape == (3, 1, 16, 16, 3) and np.array_equal(before, after)
    assert before.std() > 10 and not np.array_equal(before[0], before[1])  # real, distinct samples
    assert metrics["before"] == metrics["after"] and set(metrics["before"]) == set(SCORERS)
    assert metrics["win_rate"] == {name: 0.5 for name in SCORERS}
    expected = expected_scores(files, before)
    for name in SCORERS:
        assert metrics["before"][name] == pytest.approx(expected[name].mean().item(), rel=1e-5, abs=1e-5)

    # the base alone (no --model) draws exactly these images as its "after": the before side is the base
    alone = evaluate(files, tmp_path / "alone", "--base", str(files["sd15"]), *sampling,
                     "--pickscore", str(files["pickscore"][0]))  # fmt: skip
    assert np.array_equal(read_samples(tmp_path / "alone" / "samples" / "after"), before)
    assert not (tmp_path / "alone" / "samples" / "before").exists() and "win_rate" not in alone
    assert alone["after"]["pickscore"] == metrics["after"]["pickscore"]


@pytest.mark.parametrize("kind", ["lora", "lora_without_metadata", "unet"])
def test_after_and_before_are_the_models_and_the_bases_own_samples(files, kind, tmp_path):
    """The model folder loads as the weights that were saved (LoRA rank, alpha and targets from the file; a full
    fine-tune's unet/), the base as the reference: the PNGs equal the in-memory adapter's samples from the same noise."""
    adapter = write_model(files["sd15"], tmp_path / "final", kind, scale=0.5 if kind != "unet" else 0.05)
    evaluate(files, tmp_path / "out", "--model", str(tmp_path / "final"), "--base", str(files["sd15"]), *FAST)
    after, before = (read_samples(tmp_path / "out" / "samples" / side) for side in ("after", "before"))
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 1  # the model moved
    assert np.array_equal(after, own_samples(adapter, 1, use_reference=False))
    assert np.array_equal(before, own_samples(adapter, 1, use_reference=True))


@pytest.fixture(scope="module")
def moved(files, fid_files):
    """One sampled run of a LoRA that moved (B ≠ 0), 2 images per prompt, every scorer and FID."""
    out = files["root"] / "moved"
    lora = write_lora(files["sd15"], files["root"] / "moved_final", scale=0.5)
    weights, real = fid_files
    with fast_fid() as fid:
        metrics = evaluate(files, out, "--model", str(lora), "--base", str(files["sd15"]), *FAST, "--per-prompt", "2",
                           *scorer_flags(files), "--inception", str(weights), "--real-images", str(real))  # fmt: skip
    assert fid.call_count == 2  # one FID per side, through torchmetrics' accumulation
    return out, metrics


def test_a_moved_lora_is_scored_as_recomputed_from_its_pngs(files, fid_files, moved):
    out, metrics = moved
    before, after = (read_samples(out / "samples" / side) for side in ("before", "after"))
    assert before.shape == after.shape == (3, 2, 16, 16, 3)
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 1  # the LoRA changed the images
    assert not np.array_equal(before[:, 0], before[:, 1])  # 2 samples per prompt: 2 noises
    scores = {"before": expected_scores(files, before), "after": expected_scores(files, after)}
    for side in ("before", "after"):
        for name in SCORERS:
            assert metrics[side][name] == pytest.approx(scores[side][name].mean().item(), rel=1e-5, abs=1e-5), (side, name)
    assert metrics["before"]["pickscore"] != metrics["after"]["pickscore"]
    assert max(metrics[side]["clip_score"] for side in ("before", "after")) > 0  # the max(cos, 0) is not all zero
    for name in SCORERS:
        assert metrics["win_rate"][name] == expected_win_rate(scores["after"][name], scores["before"][name]), name

    weights, real = fid_files
    state = torch.load(weights, weights_only=True)
    real_pixels = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(real.iterdir())])
    for side, pixels in (("before", before), ("after", after)):
        assert metrics[side]["fid"] == pytest.approx(fid_by_hand(state, real_pixels, pixels.reshape(-1, 16, 16, 3)), rel=1e-3)
    assert metrics["settings"]["num_prompts"] == 3 and metrics["settings"]["images_per_prompt"] == 2


def test_sample_folders_give_the_metrics_of_the_sampled_run(files, fid_files, moved, tmp_path):
    """--images / --base-images on the PNGs the sampled run wrote: the same metrics, FID included; --images with
    --base draws the same before images as the sampled run."""
    out, metrics = moved
    weights, real = fid_files
    with fast_fid():
        folders = evaluate(files, tmp_path / "folders", "--images", str(out / "samples" / "after"), "--base-images",
                           str(out / "samples" / "before"), *scorer_flags(files), "--inception", str(weights),
                           "--real-images", str(real), "--grid-prompts", "2", "--grid-samples", "1")  # fmt: skip
    for key in ("before", "after", "win_rate"):
        assert folders[key] == pytest.approx(metrics[key], rel=1e-6), key
    for side in ("before", "after"):
        assert np.array_equal(read_samples(tmp_path / "folders" / "samples" / side), read_samples(out / "samples" / side))
    with PIL.Image.open(tmp_path / "folders" / "grid.png") as grid:  # 2 prompts × (1 before | 1 after)
        assert grid.size == (2 * 200, 2 * 230)

    half = evaluate(files, tmp_path / "half", "--images", str(out / "samples" / "after"), "--base", str(files["sd15"]),
                    *FAST, "--per-prompt", "2", *scorer_flags(files))  # fmt: skip
    assert np.array_equal(read_samples(tmp_path / "half" / "samples" / "before"), read_samples(out / "samples" / "before"))
    for key in ("before", "after", "win_rate"):
        expected = {k: v for k, v in metrics[key].items() if k != "fid"}
        assert half[key] == pytest.approx(expected, rel=1e-6), key

    jsonl = tmp_path / "prompts.jsonl"  # the same prompts as JSONL; --images alone: an "after" side only
    jsonl.write_text("".join(json.dumps({"caption": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    alone = evaluate(files, tmp_path / "alone", "--images", str(out / "samples" / "after"), *scorer_flags(files),
                     prompts=jsonl)  # fmt: skip
    assert set(alone) == {"after", "settings"} and not (tmp_path / "alone" / "samples" / "before").exists()
    assert alone["after"] == pytest.approx({k: v for k, v in metrics["after"].items() if k != "fid"}, rel=1e-6)
    with PIL.Image.open(tmp_path / "alone" / "grid.png") as grid:  # 3 prompts × 2 after images
        assert grid.size == (2 * 200, 3 * 230)


def test_grid_shows_each_prompt_before_and_after(moved):
    out, _ = moved
    with PIL.Image.open(out / "grid.png") as grid:
        # 3 prompts (rows) × 2 samples a side, before | after: 2.0 inches a column, 2.3 a row, at 100 dpi
        assert grid.size == (2 * 2 * 200, 3 * 230)
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.std() > 10  # images drawn, not a blank canvas


def test_sdxl_lora_is_sampled_and_scored(files, tmp_path):
    """An SDXL base (two text encoders, text_time conditions) and a LoRA of it: the PNGs are the in-memory
    adapter's samples, PickScore and the win rate those recomputed from them."""
    (tmp_path / "sdxl").mkdir()
    sdxl = write_sdxl(tmp_path / "sdxl")
    adapter = write_model(sdxl, tmp_path / "final", "lora", scale=0.5)
    metrics = evaluate(files, tmp_path / "out", "--model", str(tmp_path / "final"), "--base", str(sdxl), *FAST,
                       "--pickscore", str(files["pickscore"][0]))  # fmt: skip
    before, after = (read_samples(tmp_path / "out" / "samples" / side) for side in ("before", "after"))
    assert before.shape == after.shape == (3, 1, 16, 16, 3)
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 1
    scores = {side: expected_scores(files, pixels)["pickscore"] for side, pixels in (("before", before), ("after", after))}
    for side in ("before", "after"):
        assert metrics[side]["pickscore"] == pytest.approx(scores[side].mean().item(), rel=1e-5, abs=1e-5)
    assert metrics["win_rate"]["pickscore"] == expected_win_rate(scores["after"], scores["before"])
    assert np.array_equal(after, own_samples(adapter, 1, use_reference=False))
    assert np.array_equal(before, own_samples(adapter, 1, use_reference=True))


# ------------------------------------------------------------------------------------------------ bad input
BAD_ARGUMENTS = {  # each fails in the argument check, before any file is read
    "model and images": (["--model", "m", "--base", "b", "--images", "i"], r"give --model \(sampled on --base\) or --images \(already sampled\), not both"),
    "model without base": (["--model", "m"], r"give --base \(with or without --model\) or --images"),
    "base and base images": (["--base", "b", "--base-images", "i"], r"the 'before' is --base \(sampled\) or --base-images, not both"),
    "aesthetic without its clip": (["--base", "b", "--aesthetic", "a.pth"], r"--aesthetic \(the MLP \.pth\) and --aesthetic-clip \(CLIP ViT-L/14\) go together"),
    "inception without real images": (["--base", "b", "--inception", "i.pth"], r"FID needs both --inception \(weights\) and --real-images"),
    "no grid": (["--base", "b", "--grid-prompts", "0"], r"--grid-prompts must be at least 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_conflicting_or_incomplete_flags_exit_naming_them(case, tmp_path):
    args, message = BAD_ARGUMENTS[case]
    with pytest.raises(SystemExit, match=rf"^genalign-eval image: {message}"):
        main(["image", "--prompts", "p.txt", "--out", str(tmp_path), *args])
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_files_are_named_with_the_fix(files, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"prompt file {re.escape(str(empty))} holds no prompts; give one prompt per line"):
        main(["image", "--prompts", str(empty), "--base", str(files["sd15"]), "--out", str(tmp_path / "out")])

    full, gap = tmp_path / "full", tmp_path / "gap"  # PPPPP.png: one image per prompt; gap lacks prompt 1's
    for folder, indices in ((full, (0, 1, 2)), (gap, (0, 2))):
        folder.mkdir()
        for i in indices:
            PIL.Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i:05d}.png")
    with pytest.raises(ValueError, match=rf"--images folder {re.escape(str(gap))} has no image for prompt index \[1\] of the prompt "
                                         r"file's 3 prompts; name each prompt's images PPPPP.png or PPPPP_SS.png"):
        evaluate(files, tmp_path / "out", "--images", str(gap))
    with pytest.raises(ValueError, match=rf"--base-images folder {re.escape(str(gap))} has no image for prompt index \[1\]"):
        evaluate(files, tmp_path / "out", "--images", str(full), "--base-images", str(gap))
    with pytest.raises(FileNotFoundError, match=rf"--base folder {re.escape(str(tmp_path / 'absent'))} does not exist; pass the base "
                                                r"model's diffusers folder"):
        evaluate(files, tmp_path / "out", "--base", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=rf"--model folder {re.escape(str(gap))} holds neither pytorch_lora_weights.safetensors "
                                                r"nor unet/config.json; pass a LoRA folder"):
        evaluate(files, tmp_path / "out", "--model", str(gap), "--base", str(files["sd15"]))
