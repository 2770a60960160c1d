"""Train a small T2M text-motion evaluator on the synthetic motion set and ship it with its measured figures.

Two shipped models come from this script (both ``TextMotionEvaluator.save`` folders, < 5 MB):

    # the metric network: train split, seed 0 -> assets/motion-evaluator/
    python scripts/train_motion_evaluator.py
    # SoPo's judge: train + val splits, seed 1 -> assets/motion-reward/ (not the exact metric network)
    python scripts/train_motion_evaluator.py --splits train val --seed 1 --out assets/motion-reward

Training is the two T2M stages of ``genalign.models.t2m_training.train_evaluator`` (movement autoencoder, then the
contrastive text-motion matching) with smaller sizes than the official ones. Measured on the test split, written
to ``<out>/README.md`` and ``config.json``:

* the protocol's "real motion" row (``genalign.eval.motion``): top-1/2/3 R-precision and MM-Dist of the real test
  motions with their captions, FID of the real motions against an independent draw of the real motions (other
  captions and crops), and Diversity; each replication redraws captions and crops and reshuffles the batches of
  32, summarised over ``--replications`` as mean +- 1.96 std / sqrt(n). Diversity uses min(300, N) pairs.
* the same R-precision with the motions shuffled against the captions (chance is k/32);
* the retrieval reward ``exp(-d / 5)`` (``genalign.rewards.motion``): ROC AUC of matched caption/motion pairs
  against pairs from different action families, and the fraction of such mismatched pairs that score below the
  caption's own motion.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import ConcatDataset

from genalign.data.humanml3d import HumanML3DDataset
from genalign.data.synthetic_motion import ensure_dataset
from genalign.eval.motion import evaluate_embeddings, r_precision, replicate
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator
from genalign.models.t2m_training import embed_dataset, train_evaluator
from genalign.rewards.motion import TextMotionRetrievalReward

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets" / "synthetic-motion"
ROW_METRICS = ("top1", "top2", "top3", "mm_dist", "fid", "diversity")


def families(root: Path, ids) -> np.ndarray:
    """The action family of each motion id, from the set's ``labels.json``."""
    labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))["motions"]
    unknown = sorted(set(ids) - set(labels))
    if unknown:
        raise ValueError(f"{root / 'labels.json'} has no entry for motion ids {unknown[:5]}; regenerate the set")
    return np.array([labels[i]["family"] for i in ids])


def real_motion_row(evaluator: TextMotionEvaluator, test: HumanML3DDataset, replications: int) -> dict:
    """The protocol's ground-truth row and the shuffled-pairs R-precision, replicated (see the module doc)."""
    shuffled = []

    def one(i: int) -> dict:
        draw = embed_dataset(evaluator, test, seed=2 * i)
        reference = embed_dataset(evaluator, test, seed=2 * i + 1)
        n = len(test)
        rng = np.random.default_rng(i)
        shuffled.append(r_precision(draw["text_emb"], draw["motion_emb"][rng.permutation(n)], generator=rng))
        return evaluate_embeddings(
            draw["text_emb"], draw["motion_emb"], reference["motion_emb"], generator=rng, diversity_pairs=min(300, n)
        )

    row = {name: {"mean": round(v.mean, 4), "ci95": round(v.half_width, 4)} for name, v in replicate(one, replications).items()}
    chance = np.mean(shuffled, axis=0)
    row["shuffled_top1"], row["shuffled_top3"] = round(float(chance[0]), 4), round(float(chance[2]), 4)
    return row


def reward_ranking(evaluator: TextMotionEvaluator, test: HumanML3DDataset, root: Path, seed: int = 0) -> dict:
    """How the retrieval reward separates each caption's own motion from motions of other families."""
    draw = embed_dataset(evaluator, test, seed=seed)
    reward = TextMotionRetrievalReward(evaluator)
    matrix = reward.kernel(draw["text_emb"][:, None], draw["motion_emb"][None]).numpy()  # [caption, motion]
    direct = reward(draw["tokens"], draw["motion"], draw["length"]).numpy()
    if not np.allclose(direct, np.diag(matrix), atol=1e-5):
        raise RuntimeError("the reward's direct call disagrees with its kernel on the embeddings")
    family = families(root, draw["id"])
    other = family[:, None] != family[None]
    matched, mismatched = np.diag(matrix), matrix[other]
    labels = np.r_[np.ones(len(matched)), np.zeros(len(mismatched))]
    return {
        "auc_matched_vs_other_family": round(float(roc_auc_score(labels, np.r_[matched, mismatched])), 4),
        "pairwise_accuracy": round(float((np.diag(matrix)[:, None] > matrix)[other].mean()), 4),
        "matched_reward_mean": round(float(matched.mean()), 4),
        "mismatched_reward_mean": round(float(mismatched.mean()), 4),
        "pairs": {"matched": int(len(matched)), "mismatched": int(len(mismatched))},
    }


def readme(out: Path, training: dict) -> str:
    real, rank = training["test_real_motions"], training["test_reward_ranking"]
    lines = [
        f"# {out.name}",
        "",
        "A small T2M text-motion evaluator (`genalign.models.t2m_evaluator.TextMotionEvaluator`; load with",
        f"`TextMotionEvaluator.load(\"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}\")`), trained by",
        "`scripts/train_motion_evaluator.py` on the synthetic motion set (`assets/synthetic-motion`, regenerated by",
        "`scripts/make_synthetic_motions.py`), word vectors from the packaged MiniLM. `config.json` holds the sizes and",
        "every training setting.",
        "",
        "Two such models are shipped: `assets/motion-evaluator` (train split, seed 0) computes the protocol metrics;",
        "`assets/motion-reward` (train + val splits, seed 1) is the judge that SoPo, MoDiPO and the KTO labels use",
        "(`evaluator:` in their configs), so a policy is not optimised against the exact metric network.",
        "",
        f"Command: `{training['command']}`",
        "",
        f"Trained on the `{'+'.join(training['splits'])}` split(s) ({training['train_clips']} clips), seed "
        f"{training['seed']}: {training['movement_steps']} movement-autoencoder steps, {training['steps']} matching steps, "
        f"batch {training['batch_size']}, lr {training['lr']}; {training['train_seconds']:.0f} s wall time on CPU with one "
        "thread (on a 2-core machine shared with other jobs).",
        "",
        f"## Test split ({training['test_clips']} real motions, {training['replications']} replications, 95% intervals)",
        "",
        "| top-1 | top-2 | top-3 | MM-Dist | FID (real vs real) | Diversity |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(f"{real[k]['mean']:.3f} ± {real[k]['ci95']:.3f}" for k in ROW_METRICS) + " |",
        "",
        f"Shuffled caption/motion pairs: top-1 {real['shuffled_top1']:.3f}, top-3 {real['shuffled_top3']:.3f} "
        "(chance 1/32 = 0.031, 3/32 = 0.094).",
        "",
        "R-precision over batches of 32 with Euclidean distances; each replication redraws the captions and crops",
        "and reshuffles the batches. FID compares the real motions with an independent draw of the same real",
        f"motions (other crops); Diversity uses min(300, N) = {min(300, training['test_clips'])} pairs.",
        "",
        "## Retrieval reward `exp(-d / 5)` on the test split",
        "",
        f"Matched caption/motion pairs against pairs from different action families ({rank['pairs']['matched']} vs "
        f"{rank['pairs']['mismatched']}): ROC AUC {rank['auc_matched_vs_other_family']:.4f}; a caption's own motion "
        f"scores above a motion of another family in {100 * rank['pairwise_accuracy']:.1f}% of the pairs; mean reward "
        f"{rank['matched_reward_mean']:.3f} matched vs {rank['mismatched_reward_mean']:.3f} mismatched.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="synthetic set root (written if missing)")
    parser.add_argument("--splits", nargs="+", default=["train"], help="training split(s) of the set")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "motion-evaluator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000, help="text-motion matching steps")
    parser.add_argument("--movement-steps", type=int, default=300, help="movement autoencoder steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--movement-size", type=int, default=64, help="movement encoder hidden and latent size")
    parser.add_argument("--hidden", type=int, default=128, help="motion and text GRU hidden size")
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--replications", type=int, default=20)
    args = parser.parse_args()

    root = ensure_dataset(args.data)
    torch.manual_seed(args.seed)  # weight init and the datasets' caption/crop draws
    train = ConcatDataset([HumanML3DDataset(root, split) for split in args.splits])
    test = HumanML3DDataset(root, "test")
    config = EvaluatorConfig(
        movement_hidden=args.movement_size, movement_latent=args.movement_size, motion_hidden=args.hidden,
        text_hidden=args.hidden, embed_dim=args.embed_dim,
    )
    evaluator = TextMotionEvaluator(config, mean=test.mean, std=test.std)
    print(f"training on {len(train)} clips of {args.splits}; {sum(p.numel() for p in evaluator.parameters())} parameters")

    start = time.time()
    history = train_evaluator(
        evaluator, train, steps=args.steps, movement_steps=args.movement_steps, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed,
    )  # fmt: skip
    seconds = time.time() - start
    print(f"trained in {seconds:.0f} s; final losses: movement {history['movement'][-1]:.4f}, "
          f"matching {np.mean(history['matching'][-50:]):.4f} (mean of the last 50)")  # fmt: skip

    real = real_motion_row(evaluator, test, args.replications)
    ranking = reward_ranking(evaluator, test, root)
    for name, value in {**real, **ranking}.items():
        print(f"  {name}: {value}")
    training = {
        "command": "python scripts/train_motion_evaluator.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("data", "out")
        ),  # fmt: skip
        "splits": args.splits,
        "train_clips": len(train),
        "test_clips": len(test),
        "seed": args.seed,
        "steps": args.steps,
        "movement_steps": args.movement_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "replications": args.replications,
        "train_seconds": round(seconds, 1),
        "final_matching_loss": round(float(np.mean(history["matching"][-50:])), 4),
        "test_real_motions": real,
        "test_reward_ranking": ranking,
        "dataset_generator_version": json.loads((root / "labels.json").read_text())["generator_version"],
    }
    evaluator.save(args.out, training)
    (args.out / "README.md").write_text(readme(args.out.resolve(), training), encoding="utf-8")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"saved to {args.out} ({size / 1e6:.2f} MB); config {asdict(config)}")


if __name__ == "__main__":
    main()
