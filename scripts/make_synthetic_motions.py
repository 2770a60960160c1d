"""Write the procedural text-to-motion set (genalign.data.synthetic_motion) in the HumanML3D folder layout.

The output is deterministic for a given --seed and --n-per-family (motion i of a family depends only on the seed,
the family and i). The default 11 families x 40 motions take about 70 MB of float32 features and joints, too much
to ship, so the set is regenerated on demand (about half a minute on one core); ``ensure_dataset`` does the same
from Python and skips the work when the folder already holds the requested set.

    python scripts/make_synthetic_motions.py                       # -> assets/synthetic-motion/
    python scripts/make_synthetic_motions.py --out /tmp/motions --n-per-family 10 --previews
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from genalign.data.motion_repr import canonicalize
from genalign.data.synthetic_motion import FAMILIES, generate, write_dataset


def folder_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def render_previews(out: Path, seed: int) -> None:
    """A filmstrip PNG and an animation (GIF, and MP4 when ffmpeg exists) of motion 0 of every family."""
    from genalign.render.skeleton import save_animations, save_filmstrip

    for motion in generate(1, seed):
        joints = canonicalize(motion.joints)
        stem = out / "previews" / motion.family
        save_filmstrip(joints, stem.with_suffix(".png"), caption=motion.captions[0])
        save_animations(joints, stem, caption=motion.captions[0])
        print(f"  {motion.family}: {len(joints)} frames, '{motion.captions[0]}'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/synthetic-motion"))
    parser.add_argument("--n-per-family", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--previews", action="store_true", help="also render one filmstrip + GIF per family")
    args = parser.parse_args()

    start = time.perf_counter()
    splits = write_dataset(args.out, args.n_per_family, args.seed)
    elapsed = time.perf_counter() - start
    frames = [np.load(p, mmap_mode="r").shape[0] for p in sorted((args.out / "new_joint_vecs").glob("*.npy"))]
    print(f"wrote {len(frames)} motions ({len(FAMILIES)} families x {args.n_per_family}) to {args.out} in {elapsed:.1f} s")
    print("splits: " + ", ".join(f"{name} {len(ids)}" for name, ids in splits.items()))
    print(f"frames per motion: min {min(frames)}, mean {np.mean(frames):.1f}, max {max(frames)} (20 fps)")
    print(f"size on disk: {folder_size(args.out) / 2**20:.1f} MiB")
    if args.previews:
        render_previews(args.out, args.seed)


if __name__ == "__main__":
    main()
