"""The issue-5 experiment configs (text, digits, motion) of DRO, PMPO, SeRA, OSP, DR-PO, inverse alignment and
multi-turn DPO/KTO compose and build their steps, text rows fit their objective, and a short text_dro run writes
its before/after metrics."""

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genalign.cli import CONFIG_DIR, run
from genalign.steps import build_step

TEXT = ["text_dro", "text_pmpo", "text_sera", "text_osp", "text_drpo", "text_inverse_alignment",
        "text_multiturn_dpo", "text_multiturn_kto"]
DIFFUSION = ["digits_pmpo", "digits_sera", "digits_drpo", "motion_dro", "motion_pmpo", "motion_sera", "motion_drpo",
             "motion_diffusion_dro", "digits_ipo_md", "motion_ipo_md", "digits_reward_dro"]


def composed(name, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", f"output_dir={tmp_path / name}",
                                                        *overrides])


@pytest.mark.parametrize("name", TEXT + DIFFUSION)
def test_experiment_builds_its_step(tmp_path, name):
    cfg = composed(name, tmp_path)
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    step = build_step(**objective)
    assert callable(step) and cfg.train.max_steps >= 50


@pytest.mark.parametrize("name", TEXT)
def test_text_experiment_rows_fit_their_objective(tmp_path, name):
    rows = instantiate(composed(name, tmp_path).data.train)
    fields = set(rows[0])
    needed = {"text_dro": {"reward"}, "text_pmpo": {"label"}, "text_multiturn_kto": {"label"}}.get(name, {"chosen"})
    assert needed <= fields and len(rows) >= 1000
    if name.startswith("text_multiturn"):
        response = rows[0].get("chosen", rows[0].get("completion"))
        assert {m["role"] for m in response} == {"assistant", "tool"}


def test_short_text_dro_run_writes_before_and_after(tmp_path):
    cfg = composed("text_dro", tmp_path, "train.max_steps=2", "train.save_every=2", "train.eval_every=0",
                   "evaluator.n=20")
    metrics = run(cfg)
    saved = json.loads((tmp_path / "text_dro" / "metrics.json").read_text())
    assert saved["before"]["implicit_reward_accuracy"] == 0.5  # policy == reference
    assert saved["after"] == metrics["after"] and "dro/value" in saved["history"][-1]
