"""What a user looks at after sampling motions: per-sample skeleton animations (GIF, plus MP4 when ffmpeg is on the
PATH) and, given a local SMPL model folder, the fitted SMPL meshes as per-frame OBJ files with their parameters.

:func:`export_samples` takes un-normalised HumanML3D features ``[T, 263]`` (what the protocol's generators return),
recovers the joints with :func:`~genalign.data.motion_repr.features_to_joints` and writes, for sample i of
``tag``::

    <out>/<tag>_<i>.gif  (.mp4)        skeleton animation, caption as title
    <out>/<tag>_<i>_smpl/frame_*.obj   SMPL meshes fitted to the 22 joints (genalign.render.smpl)
    <out>/<tag>_<i>_smpl/smpl_params.npz
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from genalign.data.motion_repr import features_to_joints
from genalign.render.skeleton import save_animations


def joints_of(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Joints ``[T, 22, 3]`` of un-normalised features ``[T, 263]``."""
    return np.asarray(features_to_joints(torch.as_tensor(np.asarray(features), dtype=torch.float64)))


def export_samples(
    motions: Sequence[np.ndarray],
    captions: Sequence[str],
    out_dir: str | Path,
    tag: str,
    *,
    smpl_model: str | Path | None = None,
    fps: float = 20.0,
) -> list[Path]:
    """Write the animations (and SMPL meshes with ``smpl_model``) of ``motions`` (see the module doc)."""
    if len(motions) != len(captions):
        raise ValueError(f"{len(motions)} motions for {len(captions)} captions")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for i, (features, caption) in enumerate(zip(motions, captions)):
        joints = joints_of(features)
        written += save_animations(joints, out_dir / f"{tag}_{i}", caption=caption, fps=fps)
        if smpl_model is not None:
            from genalign.render.smpl import export_meshes, fit_smpl_to_joints, save_smpl_parameters

            fit = fit_smpl_to_joints(joints, smpl_model)
            mesh_dir = out_dir / f"{tag}_{i}_smpl"
            written += export_meshes(fit.vertices, fit.faces, mesh_dir)
            written.append(save_smpl_parameters(fit, mesh_dir / "smpl_params.npz"))
    return written
