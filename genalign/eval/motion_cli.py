"""``genalign-eval motion``: the HumanML3D protocol (:mod:`genalign.eval.motion_protocol`) for a motion checkpoint
or a folder of generated motions, with a before/after comparison and rendered samples.

    genalign-eval motion --checkpoint runs/motion_sopo/final --base assets/motion-mdm \\
        --data-root assets/synthetic-motion --evaluator assets/motion-evaluator --out outputs/motion_eval
    genalign-eval motion --checkpoint model000475000.pt --data-root HumanML3D --evaluator t2m --glove glove \\
        --text-encoder clip-vit-b-32 --out outputs/mdm                      # an official MDM checkpoint
    genalign-eval motion --motions generated/ --data-root HumanML3D --evaluator t2m --glove glove --out outputs/x

``--checkpoint``: a genalign motion ``final/`` folder (``MotionDenoiser.save_pretrained`` layout, what training
writes) or an official MDM ``.pt`` file (read by ``genalign.models.mdm_official.load_official_adapter``). Its
samples are taken to be normalised with ``--data-root``'s ``Mean.npy``/``Std.npy`` (the statistics it was trained
with). ``--motions``: ``<test id>.npy`` files of un-normalised features ``[T, 263]``; they are fixed, so their
replications re-draw captions, crops and batches only. ``--evaluator``: genalign's evaluator folder
(``TextMotionEvaluator.save``, e.g. ``assets/motion-evaluator``) or the official ``t2m`` folder
(``text_mot_match/model/finest.tar`` + ``meta/mean.npy``, ``std.npy``) with ``--glove``.

Writes into ``--out``: ``metrics.json`` (``after``: the checkpoint or folder, ``before``: ``--base``,
``ground_truth``: the real motions on the same draws; each metric with ``<name>_ci95``, plus the protocol
settings), ``comparison.png`` (``--strip`` captions of the test set: base row, checkpoint row, real row), and with
``--render N`` the first N of those captions (their first ``--render-frames`` frames) as ``render/<row>_<i>.gif`` (``.mp4`` too when ffmpeg is on the
PATH) and, with ``--smpl-model``, their SMPL meshes ``render/<row>_<i>_smpl/frame_*.obj``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from genalign.eval.motion_protocol import (
    MotionProtocol,
    ProtocolResult,
    ProtocolTestSet,
    adapter_generator,
    folder_motions,
)
from genalign.models.t2m_evaluator import load_evaluator
from genalign.render.outputs import export_samples, joints_of
from genalign.render.skeleton import save_comparison

ROWS = ("before", "after", "ground_truth")
LABELS = {"before": "base", "after": "trained", "ground_truth": "real"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("motion", help="text-to-motion protocol (R-precision, FID, ...) of a checkpoint",
                                   description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="genalign motion final/ folder or official MDM .pt file")
    source.add_argument("--motions", type=Path, help="folder of generated <test id>.npy features [T, 263]")
    parser.add_argument("--base", type=Path, help="a second checkpoint (the model before training) to compare with")
    parser.add_argument("--data-root", type=Path, required=True, help="HumanML3D-layout folder (test split)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--evaluator", type=Path, required=True, help="genalign evaluator folder or official t2m folder")
    parser.add_argument("--glove", type=Path, help="folder of our_vab_data.npy, our_vab_words.pkl, our_vab_idx.pkl")
    parser.add_argument("--text-encoder", help="text encoder folder for the checkpoint (default: its own)")
    parser.add_argument("--out", type=Path, required=True)
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--replications", type=int, default=20)
    protocol.add_argument("--seed", type=int, default=0)
    protocol.add_argument("--num-samples", type=int, default=1000, help="generated per replication (MDM: 1000)")
    protocol.add_argument("--diversity-pairs", type=int, default=300)
    protocol.add_argument("--mm-captions", type=int, default=0, help="MultiModality captions (protocol: 100; 0 = off)")
    protocol.add_argument("--mm-generations", type=int, default=30)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=50, help="sampler steps")
    sampling.add_argument("--guidance", type=float, default=2.5, help="classifier-free guidance scale")
    sampling.add_argument("--scheduler", default="ddpm", choices=("ddpm", "ddim", "dpmsolver++"))
    sampling.add_argument("--batch-size", type=int, default=64)
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--strip", type=int, default=4, help="captions in comparison.png")
    outputs.add_argument("--render", type=int, default=0, help="animate (and mesh) the first N strip captions")
    outputs.add_argument("--render-frames", type=int, help="animate (and mesh) only the first F frames of each")
    outputs.add_argument("--smpl-model", type=Path, help="local SMPL folder (<dir>/smpl/SMPL_NEUTRAL.pkl) for meshes")
    parser.set_defaults(func=run)
    return parser


def load_adapter(checkpoint: Path, text_encoder: str | None):
    """A :class:`~genalign.adapters.motion.MotionAdapter` for a genalign ``final/`` folder or an MDM ``.pt``."""
    from genalign.adapters.motion import MotionAdapter
    from genalign.models.text_condition import TextCondition

    if checkpoint.is_file() and checkpoint.suffix == ".pt":
        from genalign.models.mdm_official import load_official_adapter  # the official MDM checkpoint reader

        return load_official_adapter(checkpoint, text_encoder=text_encoder)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: expected a genalign motion final/ folder (config.json, "
                                f"model.safetensors) or an official MDM .pt checkpoint")
    return MotionAdapter(checkpoint, TextCondition(text_encoder) if text_encoder else None)


def run(args: argparse.Namespace) -> int:
    if args.base is not None and args.checkpoint is None:
        raise SystemExit("--base compares two checkpoints: give --checkpoint too")
    if args.render > args.strip:
        raise SystemExit(f"--render {args.render} renders strip captions: raise --strip to at least {args.render}")
    evaluator = load_evaluator(args.evaluator, glove_dir=args.glove)
    test_set = ProtocolTestSet(args.data_root, args.split)
    protocol = MotionProtocol(evaluator, test_set, replications=args.replications, seed=args.seed,
                              num_samples=args.num_samples, diversity_pairs=args.diversity_pairs,
                              mm_captions=args.mm_captions, mm_generations=args.mm_generations)
    strip_rows = test_set.draw(args.seed)[: args.strip]
    captions, lengths = [r.caption for r in strip_rows], [r.length for r in strip_rows]
    results: dict[str, ProtocolResult] = {}
    samples: dict[str, list[np.ndarray]] = {}
    for row, checkpoint in (("before", args.base), ("after", args.checkpoint)):
        if checkpoint is None:
            continue
        adapter = load_adapter(checkpoint, args.text_encoder)
        generate = adapter_generator(adapter, test_set.dataset.mean, test_set.dataset.std,
                                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                                     scheduler=args.scheduler, batch_size=args.batch_size)
        results[row] = protocol.run(generate)
        samples[row] = generate(captions, lengths, args.seed)
    if args.motions is not None:
        fixed = folder_motions(args.motions, test_set.ids, evaluator.config.motion_dim)
        results["after"] = protocol.run(motions=fixed)
        samples["after"] = [fixed[r.id] for r in strip_rows]
    samples["ground_truth"] = [r.motion for r in strip_rows]

    payload = _payload(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    rows = [(LABELS[row], [joints_of(m) for m in samples[row]]) for row in ROWS if row in samples]
    save_comparison(rows, captions, args.out / "comparison.png")
    for row in ROWS:
        if args.render and row in samples:
            clips = [m[: args.render_frames] for m in samples[row][: args.render]]
            export_samples(clips, captions[: args.render], args.out / "render", LABELS[row], smpl_model=args.smpl_model)
    print(format_table(payload))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'comparison.png'}")
    return 0


def _payload(results: dict[str, ProtocolResult], args: argparse.Namespace) -> dict:
    after = results["after"].to_json()
    payload = {row: results[row].to_json()["generated"] for row in ("before", "after") if row in results}
    payload["ground_truth"] = after["ground_truth"]
    payload["protocol"] = {**after["protocol"], "seed": args.seed, "diversity_pairs": args.diversity_pairs,
                           "mm_captions": args.mm_captions, "evaluator": str(args.evaluator),
                           "data_root": str(args.data_root), "split": args.split}
    payload["sources"] = {"after": str(args.checkpoint or args.motions), "before": None if args.base is None else str(args.base)}
    if args.checkpoint is not None:
        payload["sampling"] = {"steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler}
    return payload


def format_table(payload: dict) -> str:
    """``metric | real | base | trained`` with mean ± 95 % half-width."""
    columns = [row for row in ("ground_truth", "before", "after") if row in payload]
    names = [k for k in payload["after"] if not k.endswith("_ci95")]
    lines = [" | ".join(["metric", *(LABELS[c] for c in columns)])]
    for name in names:
        cells = [f"{payload[c][name]:.3f} ± {payload[c][name + '_ci95']:.3f}" if name in payload[c] else "-" for c in columns]
        lines.append(" | ".join([name, *cells]))
    return "\n".join(lines)
