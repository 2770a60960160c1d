"""``genalign-eval image``: score a text-to-image model against its base on a prompt file.

"after" = the model's samples (``--model`` on ``--base``, or a folder ``--images``), "before" = the base's, drawn
with the same seed, hence the same initial noise per prompt (or a folder ``--base-images``). Writes to ``--out``:

* ``metrics.json``: ``{"before": {scorer: mean}, "after": {...}, "win_rate": {scorer: share of prompts where
  after's median score beats before's}}`` (the Diffusion-DPO protocol, :func:`genalign.eval.image.win_rate`), FID
  per side with ``--inception`` + ``--real-images``, and the settings;
* ``samples/before/`` and ``samples/after/``: every image as ``PPPPP_SS.png`` (the metrics are those of these
  8-bit files);
* ``grid.png``: the first prompts, before | after side by side (same prompt and noise), with each image's score.

Scorers load from local files only (nothing downloads): ``--pickscore`` (a PickScore_v1 CLIP folder),
``--aesthetic`` + ``--aesthetic-clip`` (the LAION v2 MLP and a CLIP ViT-L/14 folder), ``--clip`` (CLIP score),
``--hps`` + ``--hps-tokenizer`` (HPS v2 / v2.1: the ``HPS_v2*_compressed.pt`` file and a CLIP tokenizer folder),
``--inception`` (FID, ``pt_inception-2015-12-05-6726825d.pth``).
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from genalign.eval.image import ClipScorer, RewardScorer, fid_against, reward_scores, win_rate
from genalign.eval.image_files import load_sample_folder, quantise, read_prompts, reference_images, save_sample_folder

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="text-to-image: PickScore, aesthetic, CLIP score, FID, win rate",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    source = parser.add_argument_group("what to evaluate")
    source.add_argument("--model", help="a LoRA final/ folder, a full fine-tune final/ (unet/) or a diffusers folder")
    source.add_argument("--base", help="the base diffusers folder: the 'before' samples (and the model's encoders)")
    source.add_argument("--images", help="a folder of the model's samples, PPPPP.png or PPPPP_SS.png per prompt index")
    source.add_argument("--base-images", help="a folder of the base's samples, named the same way")
    source.add_argument("--prompts", required=True, help="a text file (one prompt per line) or JSONL (field 'prompt')")
    sampling = parser.add_argument_group("sampling (with --base)")
    sampling.add_argument("--per-prompt", type=int, default=1, help="images per prompt (default 1)")
    sampling.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    sampling.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    sampling.add_argument("--scheduler", default="dpmsolver++", choices=("dpmsolver++", "ddpm", "ddim"))
    sampling.add_argument("--seed", type=int, default=0, help="noise seed, the same for base and model (default 0)")
    sampling.add_argument("--batch-size", type=int, default=8, help="prompts sampled at once (default 8)")
    scorers = parser.add_argument_group("metrics (local files)")
    scorers.add_argument("--pickscore", help="PickScore CLIPModel + processor folder (yuvalkirstain/PickScore_v1)")
    scorers.add_argument("--pickscore-processor", help="a separate CLIPProcessor folder for --pickscore")
    scorers.add_argument("--aesthetic", help="LAION aesthetic predictor v2 MLP .pth (needs --aesthetic-clip)")
    scorers.add_argument("--aesthetic-clip", help="CLIP ViT-L/14 folder (openai/clip-vit-large-patch14)")
    scorers.add_argument("--clip", help="a CLIPModel folder for the CLIP score")
    scorers.add_argument("--hps", help="HPS v2 / v2.1 checkpoint file, HPS_v2_compressed.pt (needs --hps-tokenizer)")
    scorers.add_argument("--hps-tokenizer", help="a CLIP tokenizer folder for --hps (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    scorers.add_argument("--inception", help="FID InceptionV3 weights, pt_inception-2015-12-05-6726825d.pth")
    scorers.add_argument("--inception-resize", default="torch-fidelity", choices=("torch-fidelity", "pytorch-fid"),
                         help="preprocessing of the reference FID code to follow (default torch-fidelity = torchmetrics)")
    scorers.add_argument("--real-images", help="FID reference folder (PNG/JPEG)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder")
    output.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in grid.png (default 8)")
    output.add_argument("--grid-samples", type=int, default=2, help="images per prompt and side in grid.png")
    output.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def check_arguments(args: argparse.Namespace) -> None:
    if args.images is not None and args.model is not None:
        raise SystemExit("genalign-eval image: give --model (sampled on --base) or --images (already sampled), not both")
    if args.images is None and args.base is None:
        raise SystemExit("genalign-eval image: give --base (with or without --model) or --images")
    if args.base_images is not None and args.base is not None:
        raise SystemExit("genalign-eval image: the 'before' is --base (sampled) or --base-images, not both")
    if (args.aesthetic is None) != (args.aesthetic_clip is None):
        raise SystemExit("genalign-eval image: --aesthetic (the MLP .pth) and --aesthetic-clip (CLIP ViT-L/14) go together")
    if (args.hps is None) != (args.hps_tokenizer is None):
        raise SystemExit("genalign-eval image: --hps (the HPS v2 checkpoint file) and --hps-tokenizer (a CLIP tokenizer "
                         "folder) go together")  # fmt: skip
    if (args.inception is None) != (args.real_images is None):
        raise SystemExit("genalign-eval image: FID needs both --inception (weights) and --real-images (reference folder)")
    for name in ("per_prompt", "steps", "batch_size", "grid_prompts", "grid_samples"):  # grid: checked before sampling
        if getattr(args, name) < 1:
            raise SystemExit(f"genalign-eval image: --{name.replace('_', '-')} must be at least 1")


def build_scorers(args: argparse.Namespace) -> dict[str, RewardScorer]:
    """The requested scorers by metric name (each loads from its local files, with a clear error when wrong)."""
    scorers: dict[str, RewardScorer] = {}
    if args.pickscore is not None:
        from genalign.rewards.pickscore import PickScorer

        scorers["pickscore"] = PickScorer(args.pickscore, processor_path=args.pickscore_processor, device=args.device)
    if args.aesthetic is not None:
        from genalign.rewards.aesthetic import AestheticScorer

        scorers["aesthetic"] = AestheticScorer(args.aesthetic_clip, args.aesthetic, device=args.device)
    if args.clip is not None:
        scorers["clip_score"] = ClipScorer(args.clip, device=args.device)
    if args.hps is not None:
        from genalign.eval.hps import load_hps

        scorers["hps"] = load_hps(args.hps, args.hps_tokenizer, device=args.device)
    return scorers


def sample_sets(args: argparse.Namespace, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``{"before": [P, N, 3, H, W], "after": ...}`` in [-1, 1], 8-bit quantised ("after" only without a base)."""
    from genalign.eval.image_models import comparison_adapter

    sets: dict[str, torch.Tensor] = {}
    if args.images is not None:
        if args.base_images is not None:
            sets["before"] = load_sample_folder(args.base_images, len(prompts), "--base-images")
        elif args.base is not None:
            sets["before"] = draw(comparison_adapter(None, args.base, args.device), prompts, args, use_reference=False)
        sets["after"] = load_sample_folder(args.images, len(prompts), "--images")
        return sets
    adapter = comparison_adapter(args.model, args.base, args.device)  # policy = model, reference = base
    if args.model is not None:
        sets["before"] = draw(adapter, prompts, args, use_reference=True)
    sets["after"] = draw(adapter, prompts, args, use_reference=False)
    return sets


@torch.no_grad()
def draw(adapter: Any, prompts: list[str], args: argparse.Namespace, *, use_reference: bool) -> torch.Tensor:
    """``[P, N, 3, H, W]`` samples; chunk k of ``--batch-size`` prompts draws its noise from seed + its first
    prompt index, so the base and the model see the same noise for the same prompt."""
    chunks = []
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc="sampling " + ("base" if use_reference else "model"), unit="batch"):
        part = prompts[start : start + args.batch_size]
        out = adapter.sample(part, args.per_prompt, generator=torch.Generator().manual_seed(args.seed + start),
                             use_reference=use_reference, num_inference_steps=args.steps,
                             guidance_scale=args.guidance, scheduler=args.scheduler)  # fmt: skip
        images = out["images"].float().cpu()
        chunks.append(images.view(len(part), args.per_prompt, *images.shape[1:]).expand(-1, -1, 3, -1, -1))
    return quantise(torch.cat(chunks))


def evaluate(sets: dict[str, torch.Tensor], prompts: list[str], scorers: dict[str, RewardScorer],
             fid: Callable[[torch.Tensor], float] | None) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:  # fmt: skip
    """Mean score per scorer and side, FID per side, and the win rate of "after" over "before" per scorer."""
    scores: dict[str, dict[str, torch.Tensor]] = {}
    metrics: dict[str, Any] = {}
    for side, images in sets.items():
        p, n = images.shape[:2]
        flat, flat_prompts = images.flatten(0, 1), [prompt for prompt in prompts for _ in range(n)]
        scores[side] = {name: reward_scores(scorer, flat, flat_prompts).view(p, n) for name, scorer in scorers.items()}
        metrics[side] = {name: s.mean().item() for name, s in scores[side].items()}
        if fid is not None:
            metrics[side]["fid"] = fid(flat)
    if "before" in sets:
        metrics["win_rate"] = {name: win_rate(scores["after"][name], scores["before"][name]) for name in scorers}
    return metrics, scores


def fid_function(args: argparse.Namespace) -> Callable[[torch.Tensor], float] | None:
    if args.inception is None:
        return None
    from genalign.eval.inception import load_fid_inception

    network = load_fid_inception(args.inception, args.inception_resize, args.device)
    real = reference_images(args.real_images)
    if len(real) < 2:
        raise SystemExit(f"genalign-eval image: FID needs at least 2 real images, {args.real_images} has {len(real)}")
    sizes = {tuple(image.shape) for image in real}
    if len(sizes) != 1:  # the network resizes any input to 299, but a batch needs one size
        raise SystemExit(f"genalign-eval image: real images in {args.real_images} come in sizes {sorted(sizes)[:4]}; "
                         "resize them to one size first")  # fmt: skip
    return fid_against(torch.stack(real), network, batch_size=32)  # the real features are computed once, for both sides


def save_grid(sets: dict[str, torch.Tensor], prompts: list[str], scores: dict[str, dict[str, torch.Tensor]],
              path: Path, num_prompts: int, num_samples: int) -> None:  # fmt: skip
    """before | after per row (one prompt), ``num_samples`` images a side, each titled with its first score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = min(num_prompts, len(prompts)), min(num_samples, next(iter(sets.values())).shape[1])
    sides = list(sets)
    figure, axes = plt.subplots(rows, columns * len(sides), figsize=(2.0 * columns * len(sides), 2.3 * rows),
                                squeeze=False)  # fmt: skip
    for r in range(rows):
        for s, side in enumerate(sides):
            for c in range(columns):
                axis = axes[r][s * columns + c]
                axis.imshow(((sets[side][r, c].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
                axis.set_xticks([]), axis.set_yticks([])
                first = next(iter(scores[side].items()), None)
                axis.set_title(f"{side}" + (f"  {first[0]} {first[1][r, c]:.3g}" if first else ""), fontsize=7)
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(prompts[r], 28)[:3]), fontsize=7)
    figure.suptitle("same prompt and noise: " + " | ".join(sides), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    prompts = read_prompts(args.prompts)
    scorers = build_scorers(args)
    fid = fid_function(args)
    if not scorers and fid is None:
        log.warning("no metric requested (--pickscore, --aesthetic, --clip, --hps, --inception): only samples and grid written")
    sets = sample_sets(args, prompts)
    out = Path(args.out)
    for side, images in sets.items():
        save_sample_folder(images, out / "samples" / side)
    metrics, scores = evaluate(sets, prompts, scorers, fid)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    metrics["settings"] = {**settings, "num_prompts": len(prompts), "images_per_prompt": next(iter(sets.values())).shape[1]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_grid(sets, prompts, scores, out / "grid.png", args.grid_prompts, args.grid_samples)
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}, indent=2))
    return 0
