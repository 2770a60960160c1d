"""SMPL meshes for motions given as joint positions: fit SMPL (Loper et al. 2015, "SMPL: A Skinned Multi-Person
Linear Model") through the ``smplx`` package to HumanML3D's 22 joints, then write per-frame OBJ files or one NPZ.

Model files. SMPL is licensed: download it yourself from https://smpl.is.tue.mpg.de (genalign cannot ship it) and
pass either the file itself or a folder in smplx's layout, ``<model_path>/smpl/SMPL_NEUTRAL.pkl`` (``SMPL_MALE`` /
``SMPL_FEMALE``; ``.pkl`` or ``.npz``; ``<model_path>/SMPL_NEUTRAL.pkl`` is also accepted).

Frames. HumanML3D's joints and SMPL's template share one frame: Y up, metres, the body facing +Z with its left at +X
(HumanML3D turned AMASS's Z-up world into it with ``(x, y, z) -> (-x, z, y)``, a proper rotation, and its first
frame faces +Z). So joints are fitted as given, ``global_orient`` absorbs each frame's heading, and the meshes come
out in the same Y-up frame, which is also the OBJ convention (Blender's OBJ importer turns Y up into its Z up).

Fit. SMPL joint ``j < 22`` is HumanML3D joint ``j``. The shape ``beta`` is zero or, with ``fit_betas``, one vector for
the whole motion fitted first to the pose-independent bone lengths,
``sum_bones (|J_c(beta) - J_p(beta)| - mean_t |x_tc - x_tp|)^2 + w_shape |beta|^2``. Then for each frame t the
parameters ``theta_t = (global_orient, body_pose [23 x 3 axis-angle], transl)`` minimise

    L_t = sum_{j<22} |J_j(theta_t, beta) - x_tj|^2 + w_pose |body_pose_t|^2 + w_smooth |theta_t - theta_{t-1}|^2

with LBFGS (strong Wolfe line search) in coordinates whitened by the Gauss-Newton matrix (see ``_fit_frame``),
starting from ``theta_{t-1}`` (warm start) so a few iterations suffice.
Frame 0 (and every frame when ``warm_start=False``) starts cold: the rest pose turned by the rotation that best
aligns its torso with the target's (Kabsch, ``scipy``'s ``Rotation.align_vectors``), pelvis on the target's pelvis.
The pose prior settles the rotations the 22 joints do not see (wrists, feet, head, twists); the smoothness term
(``theta_{t-1}``: the previous frame's solution, held fixed) keeps those from jumping between frames. Joints come
from smplx's own kinematics (``batch_rigid_transform``), the vertices from its ``lbs``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import smplx
import torch
from scipy.spatial.transform import Rotation
from smplx.lbs import batch_rigid_transform, batch_rodrigues, blend_shapes, lbs, vertices2joints
from smplx.utils import Struct

GENDERS = ("neutral", "male", "female")
SMPL_JOINTS = 24
FIT_JOINTS = 22  # HumanML3D's joints are SMPL joints 0..21
_POSE = 3 * SMPL_JOINTS  # global_orient + body_pose, axis-angle
_REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
_TORSO = [1, 2, 3, 6, 9, 12, 13, 14, 16, 17]  # hips, spine, neck, collars, shoulders: barely move with the limbs
_VERTEX_CHUNK = 64  # frames skinned at once
_DAMPING = 0.1  # m^2/rad^2 added to the Gauss-Newton matrix: caps the step along directions the joints barely see
_REFRESH = 10  # LBFGS iterations between recomputations of the preconditioner
_EVALS_PER_ITERATION = 4  # LBFGS function evaluations allowed per iteration (the line search needs a few)


class SmplModelNotFoundError(FileNotFoundError):
    """No SMPL model file where one was expected (the files are licensed and must come from the user)."""


# ------------------------------------------------------------------------------------------------- model files
def _check_gender(gender: str) -> str:
    if gender.lower() not in GENDERS:
        raise ValueError(f"gender must be one of {GENDERS}, got {gender!r}")
    return gender.lower()


def find_smpl_model_file(model_path: str | Path, gender: str = "neutral") -> Path:
    """The model file: ``model_path`` itself when it is a file, else ``SMPL_<GENDER>.pkl|.npz`` in
    ``model_path/smpl/`` (smplx's layout) or in ``model_path/``."""
    gender = _check_gender(gender)
    path = Path(model_path).expanduser()
    if path.is_file():
        return path
    stem = f"SMPL_{gender.upper()}"
    candidates = [folder / f"{stem}{ext}" for folder in (path / "smpl", path) for ext in (".pkl", ".npz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = "does not exist" if not path.exists() else "holds none of " + ", ".join(str(c) for c in candidates)
    raise SmplModelNotFoundError(
        f"no SMPL model ({gender}) at {path}: it {where}. Put the model file where smplx looks for it, "
        f"<model_path>/smpl/{stem}.pkl (or .npz; SMPL_NEUTRAL / SMPL_MALE / SMPL_FEMALE), or pass the file's own path. "
        "SMPL is licensed: register at https://smpl.is.tue.mpg.de and download it yourself; genalign cannot ship it."
    )


def _read_model_data(file: Path) -> dict:
    """The arrays of a SMPL model file (a latin-1 pickle as distributed, or an ``.npz`` with the same keys)."""
    try:
        if file.suffix.lower() == ".npz":
            with np.load(file, allow_pickle=True) as npz:  # a scipy-sparse J_regressor is stored as an object
                data = {key: npz[key].item() if npz[key].dtype == object and npz[key].ndim == 0 else npz[key]
                        for key in npz.files}
        else:
            with open(file, "rb") as handle:
                data = pickle.load(handle, encoding="latin1")
    except ModuleNotFoundError as err:
        raise RuntimeError(
            f"{file}: unpickling needs the module {err.name!r}. The original SMPL .pkl files keep some arrays as "
            "chumpy objects: install chumpy, or re-save the model with plain numpy arrays (smplx's tools/clean_ch.py)."
        ) from err
    except Exception as err:
        raise ValueError(f"{file}: could not read it as a SMPL model (.pkl pickle or .npz): {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file}: a SMPL model file holds a dict of arrays, got {type(data).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{file}: not a SMPL model, missing {missing} (a SMPL model has {list(_REQUIRED_KEYS)})")
    shapes = {key: np.shape(data[key]) for key in ("J_regressor", "kintree_table", "weights")}
    expected = (SMPL_JOINTS, (2, SMPL_JOINTS), SMPL_JOINTS)
    if (shapes["J_regressor"][0], shapes["kintree_table"], shapes["weights"][1]) != expected:
        raise ValueError(f"{file}: expected the {SMPL_JOINTS}-joint SMPL skeleton, got shapes {shapes}")
    return data


def load_smpl_model(
    model_path: str | Path, *, gender: str = "neutral", num_betas: int = 10, device: str | torch.device = "cpu"
) -> smplx.SMPL:
    """``smplx.SMPL`` holding only the model's buffers (no pose parameters), read from :func:`find_smpl_model_file`.

    The arrays go in as ``data_struct``, which also lets smplx take ``.npz`` files and gives clear errors."""
    file = find_smpl_model_file(model_path, gender)
    model = smplx.SMPL(
        str(file), data_struct=Struct(**_read_model_data(file)), gender=_check_gender(gender), num_betas=num_betas,
        create_betas=False, create_global_orient=False, create_body_pose=False, create_transl=False,
    )
    return model.to(device)


# ------------------------------------------------------------------------------------------------------- fitting
@dataclass
class SmplFit:
    """SMPL parameters fitted to a motion, the meshes they give, and how well their joints match the targets."""

    global_orient: np.ndarray  # [T, 3] axis-angle
    body_pose: np.ndarray  # [T, 69] axis-angle of joints 1..23
    transl: np.ndarray  # [T, 3]
    betas: np.ndarray  # [num_betas], shared by all frames
    vertices: np.ndarray  # [T, V, 3] float32
    faces: np.ndarray  # [F, 3] int64, 0-based
    joints: np.ndarray  # [T, 22, 3] the fitted model's joints
    joint_error: np.ndarray  # [T, 22] metres, |fitted - target|
    iterations: np.ndarray  # [T] LBFGS iterations used per frame

    @property
    def mean_error(self) -> float:
        """Mean per-joint position error in metres."""
        return float(self.joint_error.mean())


def _as_target(joints, device) -> torch.Tensor:
    j = joints.detach().cpu().numpy() if isinstance(joints, torch.Tensor) else np.asarray(joints)
    if j.ndim != 3 or j.shape[1:] != (FIT_JOINTS, 3) or len(j) < 1:
        raise ValueError(f"joints must be [T, {FIT_JOINTS}, 3] (HumanML3D's SMPL joints 0..21, metres, Y up), "
                         f"got {j.shape}")
    if not np.isfinite(j).all():
        raise ValueError("joints contain NaN or inf")
    return torch.as_tensor(j, dtype=torch.float64, device=device)


def _rest_joints(model: smplx.SMPL, betas: torch.Tensor) -> torch.Tensor:
    """The 24 rest-pose joints ``J_regressor (v_template + shapedirs beta)`` as ``[1, 24, 3]`` float64."""
    shaped = model.v_template.double() + blend_shapes(betas[None], model.shapedirs.double())
    return vertices2joints(model.J_regressor.double(), shaped)


def _posed_joints(rest: torch.Tensor, parents: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Joints ``[B, 24, 3]`` of ``params [B, 75]`` = (global_orient, body_pose, transl) on ``rest [1, 24, 3]``."""
    rotations = batch_rodrigues(params[:, :_POSE].reshape(-1, 3)).reshape(len(params), SMPL_JOINTS, 3, 3)
    posed, _ = batch_rigid_transform(rotations, rest.expand(len(params), -1, -1), parents)
    return posed + params[:, None, _POSE:]


def _lbfgs(x: torch.Tensor, loss_fn: Callable, iterations: int) -> tuple[torch.Tensor, int, bool]:
    """Minimise ``loss_fn`` from ``x`` with at most ``iterations`` LBFGS iterations (strong Wolfe line search).

    Returns the minimiser, the iterations used and whether LBFGS stopped on its own tolerances before the budget."""
    x = x.detach().clone().requires_grad_(True)
    max_eval = _EVALS_PER_ITERATION * iterations
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=iterations, max_eval=max_eval, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-10)

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[x]
    used = int(state.get("n_iter", 0))
    return x.detach(), used, used < iterations and state.get("func_evals", 0) < max_eval


def _fit_betas(model: smplx.SMPL, target: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """One ``beta`` whose rest bone lengths match the motion's mean bone lengths (see the module docstring)."""
    child = torch.arange(1, FIT_JOINTS, device=target.device)
    parent = model.parents[1:FIT_JOINTS]
    lengths = (target[:, child] - target[:, parent]).norm(dim=-1).mean(0)

    def loss(betas: torch.Tensor) -> torch.Tensor:
        rest = _rest_joints(model, betas)[0]
        bones = (rest[child] - rest[parent]).norm(dim=-1)
        return ((bones - lengths) ** 2).sum() + shape_weight * (betas**2).sum()

    betas, _, _ = _lbfgs(torch.zeros(model.num_betas, dtype=torch.float64, device=target.device), loss, 100)
    return betas


def _cold_start(rest: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rest pose turned so its torso best matches the target's (Kabsch), pelvis on the target pelvis: ``[75]``."""
    r, x = rest[0].cpu().numpy(), target.cpu().numpy()
    rotation, _ = Rotation.align_vectors(x[_TORSO] - x[0], r[_TORSO] - r[0])
    params = np.zeros(_POSE + 3)
    params[:3] = rotation.as_rotvec()
    params[_POSE:] = x[0] - r[0]  # SMPL's global rotation pivots about the pelvis joint
    return torch.as_tensor(params, dtype=torch.float64, device=target.device)


def _fit_frame(rest, parents, x_t, start, previous, iterations, pose_weight, smooth_weight):
    """Minimise ``L_t`` from ``start`` with LBFGS in Gauss-Newton-whitened coordinates; returns (theta_t, iterations).

    At the current point, ``H = J^T J + diag(prior weights + damping) = L L^T`` (``J``: Jacobian of the 66 joint
    residuals); LBFGS runs on ``z`` with ``theta = point + L^{-T} z``. There ``L_t`` curves about equally in every
    direction, instead of from ~40 (translation) down to the pose prior's 1e-5 (rotations no joint sees), so a few
    iterations converge. ``H`` is recomputed every ``_REFRESH`` iterations; the objective itself is unchanged.
    """

    def residual(params: torch.Tensor) -> torch.Tensor:
        return (_posed_joints(rest, parents, params[None])[0, :FIT_JOINTS] - x_t).flatten()

    prior = torch.zeros_like(start)
    prior[3:_POSE] = pose_weight
    if previous is not None:
        prior += smooth_weight

    def loss_at(base: torch.Tensor, whiten: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def loss(z: torch.Tensor) -> torch.Tensor:
            params = base + torch.linalg.solve_triangular(whiten, z[:, None], upper=True)[:, 0]
            value = (residual(params) ** 2).sum() + pose_weight * (params[3:_POSE] ** 2).sum()
            if previous is not None:
                value = value + smooth_weight * ((params - previous) ** 2).sum()
            return value
        return loss

    params, total = start, 0
    while total < iterations:
        budget = min(_REFRESH, iterations - total)
        jacobian = torch.autograd.functional.jacobian(residual, params, vectorize=True)
        whiten = torch.linalg.cholesky(jacobian.T @ jacobian + torch.diag(prior + _DAMPING)).T  # upper L^T
        z, n_iter, converged = _lbfgs(torch.zeros_like(params), loss_at(params, whiten), budget)
        params = params + torch.linalg.solve_triangular(whiten, z[:, None], upper=True)[:, 0]
        total += n_iter
        if converged:
            break
    return params.detach(), total


def fit_smpl_to_joints(
    joints: np.ndarray | torch.Tensor,
    model_path: str | Path,
    *,
    gender: str = "neutral",
    iterations: int = 10,
    first_iterations: int = 100,
    warm_start: bool = True,
    fit_betas: bool = False,
    num_betas: int = 10,
    pose_weight: float = 1e-5,
    smooth_weight: float = 1e-4,
    shape_weight: float = 1e-4,
    device: str | torch.device = "cpu",
) -> SmplFit:
    """Fit SMPL to joints ``[T, 22, 3]`` (HumanML3D's frame, see the module docstring) and skin its meshes.

    Frame 0 gets ``first_iterations`` LBFGS iterations from the cold start, every later frame ``iterations`` from
    frame t-1's solution (or from its own cold start when ``warm_start=False``). The weights are those of ``L_t``.
    """
    for name, value in (("iterations", iterations), ("first_iterations", first_iterations)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    target = _as_target(joints, device)
    model = load_smpl_model(model_path, gender=gender, num_betas=num_betas, device=device)
    if fit_betas:
        betas = _fit_betas(model, target, shape_weight)
    else:
        betas = torch.zeros(model.num_betas, dtype=torch.float64, device=device)
    rest = _rest_joints(model, betas)

    solutions, used = [], []
    for t, x_t in enumerate(target):
        previous = solutions[-1] if solutions else None
        start = previous if warm_start and previous is not None else _cold_start(rest, x_t)
        budget = first_iterations if t == 0 else iterations
        solution, n_iter = _fit_frame(rest, model.parents, x_t, start, previous, budget, pose_weight, smooth_weight)
        solutions.append(solution)
        used.append(n_iter)

    params = torch.stack(solutions)
    vertices, fitted = _skin(model, betas, params)
    error = (fitted.double() - target).norm(dim=-1)
    params = params.cpu().numpy()
    return SmplFit(
        global_orient=params[:, :3].astype(np.float32),
        body_pose=params[:, 3:_POSE].astype(np.float32),
        transl=params[:, _POSE:].astype(np.float32),
        betas=betas.cpu().numpy().astype(np.float32),
        vertices=vertices.cpu().numpy(),
        faces=np.asarray(model.faces, dtype=np.int64),
        joints=fitted.cpu().numpy(),
        joint_error=error.cpu().numpy(),
        iterations=np.asarray(used),
    )


@torch.no_grad()
def _skin(model: smplx.SMPL, betas: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """smplx's ``lbs`` in chunks of frames: vertices ``[T, V, 3]`` and the first 22 joints ``[T, 22, 3]`` (float32)."""
    vertices, joints = [], []
    for chunk in params.float().split(_VERTEX_CHUNK):
        pose, transl = chunk[:, :_POSE].contiguous(), chunk[:, None, _POSE:]
        v, j = lbs(betas.float().expand(len(chunk), -1), pose, model.v_template, model.shapedirs, model.posedirs,
                   model.J_regressor, model.parents, model.lbs_weights)
        vertices.append(v + transl)
        joints.append(j[:, :FIT_JOINTS] + transl)
    return torch.cat(vertices), torch.cat(joints)


# ------------------------------------------------------------------------------------------------------- export
def _atomic_write(path: Path, write: Callable) -> Path:
    """``write(handle)`` into a temporary file next to ``path``, then rename it over ``path`` (never half a file)."""
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def _write_obj(handle, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Wavefront OBJ: ``v x y z`` lines then ``f i j k`` lines with 1-based vertex indices."""
    np.savetxt(handle, vertices, fmt="v %.9g %.9g %.9g")  # 9 significant digits round-trip float32 exactly
    np.savetxt(handle, faces + 1, fmt="f %d %d %d")


def _as_mesh(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    v = vertices.detach().cpu().numpy() if isinstance(vertices, torch.Tensor) else np.asarray(vertices)
    f = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    if v.ndim != 3 or v.shape[-1] != 3 or len(v) < 1:
        raise ValueError(f"vertices must be [T, V, 3], got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vertices contain NaN or inf")
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"faces must be integer [F, 3] (0-based vertex indices), got {f.dtype} {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= v.shape[1]):
        raise ValueError(f"faces index vertices {f.min()}..{f.max()}, but there are only {v.shape[1]} vertices")
    return v.astype(np.float32), f.astype(np.int64)


def export_meshes(vertices, faces, out_dir: str | Path, format: str = "obj") -> list[Path]:
    """Write meshes ``vertices [T, V, 3]`` with ``faces [F, 3]`` (0-based) into ``out_dir``; returns the paths.

    ``"obj"``: one ``frame_<t:05d>.obj`` per frame. ``"npz"``: one ``meshes.npz`` with ``vertices`` (float32) and
    ``faces`` (int64, 0-based). Every file is written to a temporary name and renamed, so none is ever partial.
    """
    v, f = _as_mesh(vertices, faces)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if format == "obj":
        return [_atomic_write(out / f"frame_{t:05d}.obj", lambda h, t=t: _write_obj(h, v[t], f)) for t in range(len(v))]
    if format == "npz":
        return [_atomic_write(out / "meshes.npz", lambda h: np.savez(h, vertices=v, faces=f))]
    raise ValueError(f"format must be 'obj' or 'npz', got {format!r}")


def save_smpl_parameters(fit: SmplFit, path: str | Path) -> Path:
    """The fitted SMPL parameters (``global_orient``, ``body_pose``, ``transl``, ``betas``) and ``joint_error`` as
    one ``.npz`` (written atomically), for loading into other SMPL tools."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(fit, name) for name in ("global_orient", "body_pose", "transl", "betas", "joint_error")}
    return _atomic_write(path, lambda h: np.savez(h, **arrays))
