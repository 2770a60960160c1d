"""Hydra entry points: ``genalign-train experiment=NAME [key=value ...]``.

Config groups live in ``configs/{adapter,objective,data,experiment}``. Every run writes into ``output_dir`` its
resolved ``config.yaml``, checkpoints, ``log.jsonl``, ``training_curve.png`` and ``metrics.json``.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from accelerate import PartialState
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def asset_path(name: str) -> str:
    """Path of a shipped asset: ``$GENALIGN_ASSETS/name`` if set, else ``<repo>/assets/name``."""
    root = Path(os.environ.get("GENALIGN_ASSETS", REPO_ROOT / "assets"))
    path = root / name
    if not path.exists():
        raise FileNotFoundError(f"asset {name!r} not found at {path}; set GENALIGN_ASSETS to the folder holding it")
    return str(path)


if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", asset_path)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build adapter, data, objective step and evaluator from ``cfg`` and train; returns the metrics."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the progress
    out = Path(cfg.output_dir)
    main_process = PartialState().is_main_process  # under `accelerate launch` only process 0 writes and prints
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out, cfg)
    if main_process:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    step = build_step(**objective)
    adapter = instantiate(cfg.adapter)
    rows = build_rows(cfg.data.train, adapter)
    evaluator = instantiate(cfg.evaluator) if cfg.get("evaluator") else None
    train_cfg = TrainConfig(output_dir=str(out), **OmegaConf.to_container(cfg.train, resolve=True))
    metrics = Trainer(adapter, step, rows, train_cfg, evaluate=evaluator).train()
    if main_process:
        print(format_before_after(metrics) if evaluator is not None else
              f"no evaluation (evaluator=none); trained weights in {out / 'final'}")
    return metrics


#: what may differ when a run resumes: a longer run continues from its last checkpoint, and how rows are loaded
#: never changes which rows a step reads (genalign.data.loader)
RESUMABLE_CHANGES = ("train.max_steps", "train.num_workers", "train.prefetch_factor", "train.pin_memory")


def check_resumable(out: Path, cfg: DictConfig) -> None:
    """A run folder with checkpoints resumes (``train.resume``, the default) only under the resolved config it was
    started with, up to :data:`RESUMABLE_CHANGES`; anything else would continue one run's weights, optimizer and
    sampler state under another's settings."""
    saved = out / "config.yaml"
    if not (cfg.train.get("resume", True) and saved.exists() and any((out / "checkpoints").glob("step-*"))):
        return
    old, new = (_flat(c) for c in (OmegaConf.load(saved), OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in changed[:8])
        more = "; ..." if len(changed) > 8 else ""
        raise ValueError(f"{out} holds checkpoints of a run with another config ({diff}{more}); pass "
                         f"train.resume=false to start over there, or choose another output_dir")


def _flat(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> leaf value of a resolved config."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg), "")
    return out


def build_rows(data_cfg: DictConfig, adapter: Any) -> list[dict[str, Any]]:
    """Instantiate the training rows; a builder whose signature takes ``adapter`` gets the adapter about to be
    trained (still the base model), e.g. to draw the base model's samples for AI feedback."""
    builder = get_object(data_cfg._target_) if "_target_" in data_cfg else None
    if callable(builder) and "adapter" in inspect.signature(builder).parameters:
        return instantiate(data_cfg, adapter=adapter)
    return instantiate(data_cfg)


def format_before_after(metrics: dict[str, Any]) -> str:
    """A markdown table of the before/after evaluation."""
    before, after = metrics.get("before", {}), metrics.get("after", {})
    lines = ["| metric | before | after |", "|---|---|---|"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key, float("nan")), after.get(key, float("nan"))
        lines.append(f"| {key} | {b:.4f} | {a:.4f} |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def train_main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    train_main()
