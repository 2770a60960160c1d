"""The hydra entry point end to end on the shipped tiny arithmetic LM: configs compose, runs write their files,
and preference training raises held-out accuracy."""

import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from omegaconf import OmegaConf

from genalign.cli import CONFIG_DIR, check_resumable, run


def compose_experiment(name, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", f"output_dir={tmp_path / name}", *overrides])


@pytest.mark.parametrize("experiment", ["text_dpo", "text_ipo", "text_kto"])
def test_experiment_raises_heldout_accuracy_and_writes_run_files(tmp_path, experiment):
    cfg = compose_experiment(
        experiment, tmp_path,
        "train.max_steps=40", "train.learning_rate=1e-3", "train.eval_every=0", "train.save_every=20",
        "evaluator.n=200",
    )
    metrics = run(cfg)
    out = tmp_path / experiment
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["before"] == metrics["before"] and saved["after"] == metrics["after"]
    assert saved["before"]["implicit_reward_accuracy"] == 0.5  # policy == reference before training
    assert saved["after"]["accuracy"] > saved["before"]["accuracy"] + 0.1
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["output_dir"] == str(out) and resolved["train"]["max_steps"] == 40
    assert "${" not in (out / "config.yaml").read_text()  # interpolations resolved
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000020", "step-00000040"]
    assert (out / "final" / "model.safetensors").exists() and (out / "training_curve.png").exists()


def test_unknown_objective_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "genalign.cli", "experiment=text_dpo", "objective.name=dpoo", f"output_dir={tmp_path}"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "unknown objective 'dpoo'" in result.stderr


def test_unknown_config_group_option_lists_the_choices(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "genalign.cli", "experiment=text_dpo", "objective=dpoo", f"output_dir={tmp_path}"],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "objective" in result.stderr and "ipo" in result.stderr  # hydra lists the available options


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "objective").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_objective_config_builds_its_step(path):
    from genalign.steps import build_step

    params = yaml.safe_load(path.read_text())
    required = [k for k, v in params.items() if v == "???"]  # fields the user must point at (a judge, an evaluator)
    if required:
        with pytest.raises(ValueError, match="needs"):
            build_step(**{k: v for k, v in params.items() if k not in required})
        return
    step = build_step(**params)
    assert callable(step)


def test_a_run_folder_resumes_only_under_its_own_config(tmp_path):
    """A folder with checkpoints refuses another config (naming the changed key and the way out); a longer
    max_steps, train.resume=false, or a folder without checkpoints pass."""
    started = compose_experiment("text_dpo", tmp_path)
    out = tmp_path / "text_dpo"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(started, resolve=True))
    check_resumable(out, started)
    check_resumable(out, compose_experiment("text_dpo", tmp_path, "train.max_steps=1000"))
    changed = compose_experiment("text_dpo", tmp_path, "train.learning_rate=0.001")
    with pytest.raises(ValueError, match=r"train\.learning_rate: 0\.0003 -> 0\.001.*train\.resume=false"):
        check_resumable(out, changed)
    check_resumable(out, compose_experiment("text_dpo", tmp_path, "train.learning_rate=0.001", "train.resume=false"))
    (out / "checkpoints" / "step-00000001").rmdir()
    check_resumable(out, changed)
