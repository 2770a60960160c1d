"""Fit SMPL to a motion and write its meshes (genalign.render.smpl).

The motion is either joints ``[T, 22, 3]`` (HumanML3D's ``new_joints``) or HumanML3D features ``[T, 263]``
(``new_joint_vecs``, or a model's output together with the ``Mean.npy``/``Std.npy`` it was normalised with).
SMPL itself is licensed: download it from https://smpl.is.tue.mpg.de and pass its folder
(``<dir>/smpl/SMPL_NEUTRAL.pkl``) or the file.

    python scripts/export_smpl.py --joints new_joints/012314.npy --model-path ~/body_models --out meshes/012314
    python scripts/export_smpl.py --features sample.npy --mean Mean.npy --std Std.npy --model-path ~/body_models \\
        --out meshes/sample --format npz

Writes ``frame_<t>.obj`` per frame (or ``meshes.npz``) and ``smpl_params.npz`` (the fitted parameters) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from genalign.data.motion_repr import HUMANML3D, features_to_joints
from genalign.render.smpl import GENDERS, export_meshes, fit_smpl_to_joints, save_smpl_parameters


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (expected {what} as .npy)")
    return np.load(path).astype(np.float32)


def load_joints(args: argparse.Namespace) -> np.ndarray:
    """``--joints`` as given, or ``--features`` (denormalised with ``--mean``/``--std`` when both are given)."""
    if args.joints is not None:
        return _load(args.joints, "joints [T, 22, 3]")
    features = _load(args.features, f"HumanML3D features [T, {HUMANML3D.feature_dim}]")
    if features.ndim != 2 or features.shape[1] != HUMANML3D.feature_dim:
        raise SystemExit(f"{args.features}: expected features [T, {HUMANML3D.feature_dim}], got {features.shape}")
    if (args.mean is None) != (args.std is None):
        raise SystemExit("--mean and --std go together (the statistics the features were normalised with)")
    if args.mean is not None:
        stats = {name: _load(path, f"the feature {name}") for name, path in (("mean", args.mean), ("std", args.std))}
        for name, value in stats.items():
            if value.shape != (features.shape[1],):
                raise SystemExit(f"--{name}: expected shape ({features.shape[1]},), got {value.shape}")
        features = features * stats["std"] + stats["mean"]
    return features_to_joints(features)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--joints", type=Path, help="joints [T, 22, 3] .npy (metres, Y up)")
    source.add_argument("--features", type=Path, help=f"HumanML3D features [T, {HUMANML3D.feature_dim}] .npy")
    parser.add_argument("--mean", type=Path, help="Mean.npy to denormalise --features with")
    parser.add_argument("--std", type=Path, help="Std.npy to denormalise --features with")
    parser.add_argument("--model-path", type=Path, required=True,
                        help="SMPL folder (<dir>/smpl/SMPL_NEUTRAL.pkl) or the model file")
    parser.add_argument("--gender", choices=GENDERS, default="neutral")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--format", choices=("obj", "npz"), default="obj")
    parser.add_argument("--iterations", type=int, default=10, help="LBFGS iterations per frame after the first")
    parser.add_argument("--fit-betas", action="store_true", help="fit one body shape to the motion's bone lengths")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    joints = load_joints(args)
    fit = fit_smpl_to_joints(joints, args.model_path, gender=args.gender, iterations=args.iterations,
                             fit_betas=args.fit_betas, device=args.device)
    written = export_meshes(fit.vertices, fit.faces, args.out, format=args.format)
    save_smpl_parameters(fit, args.out / "smpl_params.npz")
    print(f"{len(joints)} frames: mean joint error {100 * fit.mean_error:.2f} cm, worst "
          f"{100 * fit.joint_error.max():.2f} cm; wrote {len(written)} mesh file(s) and smpl_params.npz to {args.out}")


if __name__ == "__main__":
    main()
