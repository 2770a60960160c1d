"""The training core on the exact tabular adapter: learning direction, exact resume, atomic checkpoints,
non-finite losses, metrics files."""

import json
import math

import pytest
import torch

from genalign.adapters.tabular import TabularAdapter
from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig


def pair_rows(n=32, actions=4, seed=0):
    """Context c prefers action (c mod actions) over a random other action."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        c = i % 3
        good = c % actions
        bad = (good + 1 + int(torch.randint(actions - 1, (1,), generator=g))) % actions
        rows.append({"prompt": c, "chosen": good, "rejected": bad, "row": i})
    return rows


def make_trainer(tmp_path, max_steps, name="run", objective="dpo", accumulation=2, save_every=0, evaluate=None, **params):
    adapter = TabularAdapter(3, 4)
    cfg = TrainConfig(
        output_dir=str(tmp_path / name), max_steps=max_steps, batch_size=4, gradient_accumulation_steps=accumulation,
        learning_rate=0.05, save_every=save_every, log_every=1, seed=3,
    )
    step = build_step(objective, beta=params.pop("beta", 0.5), **params)
    return Trainer(adapter, step, pair_rows(), cfg, evaluate=evaluate)


def test_dpo_training_moves_probability_to_chosen_and_starts_at_ln2(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=30)
    metrics = trainer.train()
    history = metrics["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert history[0]["rewards/accuracy"] == 0.0  # ties count as wrong
    assert history[-1]["loss"] < 0.5 * math.log(2)
    assert history[-1]["rewards/accuracy"] == 1.0 and history[-1]["rewards/margin"] > 0
    probs = trainer.adapter.probs()
    for c in range(3):
        assert probs[c, c % 4] > 0.5  # each context's preferred action now dominates (uniform start: 0.25)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, objective):
    straight = make_trainer(tmp_path, max_steps=6, name="straight", objective=objective).train()["history"]
    make_trainer(tmp_path, max_steps=3, name="split", objective=objective).train()
    resumed_trainer = make_trainer(tmp_path, max_steps=6, name="split", objective=objective)
    resumed = resumed_trainer.train()["history"]
    assert [h["step"] for h in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    torch.testing.assert_close(resumed_trainer.adapter.probs(), make_probs_after(tmp_path, "straight"), atol=1e-6, rtol=0)


def make_probs_after(tmp_path, name):
    return TabularAdapter.load(str(tmp_path / name / "final")).probs()


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, save_every=2)
    trainer.train()
    names = [p.name for p in trainer.checkpoints()]
    assert names == ["step-00000004", "step-00000006"]  # keep_checkpoints=2
    # a crash mid-save leaves only a .tmp folder: it is never taken for a checkpoint
    (trainer.checkpoint_root / "step-00000008.tmp").mkdir()
    resumed = make_trainer(tmp_path, max_steps=6)
    assert resumed.checkpoints()[-1].name == "step-00000006"
    assert resumed._resume() and resumed.global_step == 6


def test_metrics_json_has_before_and_after(tmp_path):
    def evaluate(adapter):
        return {"p_preferred": float(adapter.probs()[0, 0])}

    trainer = make_trainer(tmp_path, max_steps=10, evaluate=evaluate)
    trainer.train()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["before"]["p_preferred"] == pytest.approx(0.25)
    assert saved["after"]["p_preferred"] > 0.25
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/margin", "rewards/accuracy", "lr", "grad_norm"} <= set(logged[0])


def test_non_finite_loss_stops_with_step_and_rows(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    with torch.no_grad():
        trainer.adapter.unwrapped_policy.logits[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"optimizer step 0.*dataset rows \["):
        trainer.train()


def test_unknown_objective_and_parameter_are_named():
    with pytest.raises(ValueError, match="unknown objective 'dpoo'"):
        build_step("dpoo")
    with pytest.raises(ValueError, match="has no training step yet"):
        build_step("direct_reward")
    with pytest.raises(ValueError, match=r"does not take \['betta'\]"):
        build_step("dpo", betta=0.1)
    with pytest.raises(ValueError, match=r"'diffusion_dro' does not take \['beta'\]"):
        build_step("diffusion_dro", beta=0.1)


def test_missing_field_names_row_and_field(tmp_path):
    adapter = TabularAdapter(3, 4)
    cfg = TrainConfig(output_dir=str(tmp_path / "bad"), max_steps=1, batch_size=2, learning_rate=0.1)
    rows = [{"prompt": 0, "chosen": 1, "rejected": 2, "row": 0}, {"prompt": 1, "chosen": 2, "row": 1}]
    with pytest.raises(ValueError, match=r"row 1 has no field 'rejected'"):
        Trainer(adapter, build_step("dpo"), rows, cfg).train()


def test_bf16_mixed_precision_trains_in_a_fresh_process(tmp_path):
    """accelerate's bf16 autocast on CPU: same ln 2 start, the loss still falls (own process: accelerate's
    state is a per-process singleton)."""
    import subprocess
    import sys

    script = tmp_path / "bf16.py"
    script.write_text(
        "import math, pathlib, sys\n"
        f"sys.path.insert(0, {str(pathlib_root())!r})\n"
        "from genalign.adapters.tabular import TabularAdapter\n"
        "from genalign.steps import build_step\n"
        "from genalign.train import Trainer, TrainConfig\n"
        "from tests.test_train import pair_rows\n"
        f"cfg = TrainConfig(output_dir={str(tmp_path / 'bf16')!r}, max_steps=20, batch_size=4, learning_rate=0.05, mixed_precision='bf16')\n"
        "h = Trainer(TabularAdapter(3, 4), build_step('dpo', beta=0.5), pair_rows(), cfg).train()['history']\n"
        "assert abs(h[0]['loss'] - math.log(2)) < 1e-6, h[0]\n"
        "assert h[-1]['loss'] < 0.8 * math.log(2), h[-1]\n"
        "print('ok', h[0]['loss'], h[-1]['loss'])\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def pathlib_root():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[1]


def test_evaluator_taking_tag_and_output_dir_gets_them(tmp_path):
    seen = []

    def evaluate(adapter, *, tag, output_dir):
        seen.append(tag)
        (output_dir / f"grid-{tag}.txt").write_text(tag)
        return {"p": float(adapter.probs()[0, 0])}

    trainer = make_trainer(tmp_path, max_steps=4, evaluate=evaluate)
    trainer.cfg.eval_every = 2
    trainer.train()
    assert seen == ["before", "step-00000002", "after"]
    assert (tmp_path / "run" / "grid-after.txt").read_text() == "after"
