"""Every config in configs/data/ composes with an experiment that fits it and builds its rows through
``genalign.cli.build_rows``, checked against what the data means; ``evaluator=none`` works with every experiment;
and the documented bring-your-own-pairs command trains.

A data config added without a case in ``CASES`` fails ``test_every_data_config_has_a_case``. The sampled sets
(digits_labels/pairs, motion_*) are shrunk to a few prompts and 2 sampler steps: their content (labels from rewards,
best-vs-worst order, lengths) does not depend on how good the samples are.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genalign.cli import CONFIG_DIR, build_rows
from genalign.data.digits import DigitsDataset, parse_digit
from genalign.data.digits_rows import all_captions, classifier_reward
from genalign.data.motion_rows import demonstration_rows, synthetic_motion_root
from genalign.data.humanml3d import HumanML3DDataset
from test_mdm_official import CAPTIONS, CLIP_DIM, official_args, random_official_state, save_official, tiny_clip, write_humanml3d
from test_sd_experiments import NON_TIED, ROWS, write_pickapic
from tiny_sd import write_sd15

DATA_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
SUM = re.compile(r"^(\d+)\+(\d+)=$")
EVALUATOR_REFERENCE = re.compile(r"\$\{[^}]*\bevaluator\.")  # an interpolation reading an evaluator key


def _sum(prompt: str) -> str:
    a, b = SUM.match(prompt).groups()
    return str(int(a) + int(b))


def _write_jsonl(path: Path, objs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


# ------------------------------------------------------------------------------------------------ files the tests write
PAIRS = [{"prompt": "12+7=", "chosen": "19", "rejected": "18"},
         {"prompt": [{"role": "user", "content": "3+4="}], "chosen": [{"role": "assistant", "content": "7"}],
          "rejected": [{"role": "assistant", "content": "8"}]}]
REWARDS = [{"prompt": "1+1=", "completion": "2", "reward": 1.0}, {"prompt": "1+2=", "completion": "4", "reward": 0.25}]
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))


def _ultrafeedback_snapshot(root: Path) -> Path:
    """A two-split UltraFeedback-binarized snapshot folder with the real column names and types."""
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                        ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                        ("score_rejected", pa.float64())])

    def row(q: str, good: str, bad: str, i: int) -> dict:
        chosen = [{"content": q, "role": "user"}, {"content": good, "role": "assistant"}]
        return {"prompt": q, "prompt_id": f"id{i}", "chosen": chosen,
                "rejected": [{"content": q, "role": "user"}, {"content": bad, "role": "assistant"}],
                "messages": chosen, "score_chosen": 8.0, "score_rejected": 4.5}

    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row("2+2=", "4", "5", 0), row("5+5=", "10", "11", 1)], schema=schema),
                   root / "data" / "train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([row("9+9=", "18", "17", 2)], schema=schema),
                   root / "data" / "test_prefs-00000-of-00001.parquet")
    return root


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    experiment: str
    check: Callable[[list[dict], object, Path], None]
    overrides: Callable[[Path], list[str]] = lambda tmp: []


def check_arithmetic_pairs(rows, cfg, tmp):
    assert len(rows) == 2000 and [r["row"] for r in rows] == list(range(2000))
    assert all(r["chosen"] == _sum(r["prompt"]) != r["rejected"] for r in rows)


def check_arithmetic_feedback(rows, cfg, tmp):
    assert len(rows) == 2000
    assert all(r["label"] == (r["completion"] == _sum(r["prompt"])) and r["reward"] == float(r["label"]) for r in rows)
    assert 0.3 < sum(r["label"] for r in rows) / len(rows) < 0.7  # correct or wrong with equal probability


def check_arithmetic_labelled(rows, cfg, tmp):
    assert len(rows) == 2000
    assert all(r["label"] == (r["completion"] == _sum(r["prompt"])) for r in rows)


def check_arithmetic_multiturn(rows, cfg, tmp):
    assert len(rows) > 0
    for r in rows:
        problems = [r["prompt"][0]["content"]] + [m["content"] for m in r["chosen"] if m["role"] == "tool"]
        chosen = [m["content"] for m in r["chosen"] if m["role"] == "assistant"]
        rejected = [m["content"] for m in r["rejected"] if m["role"] == "assistant"]
        assert len(problems) == len(chosen) == len(rejected) == 2
        assert chosen == [_sum(p) for p in problems]  # chosen answers every turn right
        assert sum(a != b for a, b in zip(chosen, rejected)) == 1  # rejected is wrong in exactly one turn


def check_digits_demos(rows, cfg, tmp):
    train = DigitsDataset("train", 16)
    assert len(rows) == len(train)  # digits_dro: top_k per caption above the set size keeps every digit
    assert sorted(r["row"] for r in rows) == list(range(len(train)))
    for r in rows[:: len(rows) // 8]:
        assert r["prompt"] == train.prompts[r["row"]] and torch.equal(r["response"], train.images[r["row"]])
    sample = rows[:: len(rows) // 8]
    recomputed = classifier_reward()([r["prompt"] for r in sample], [r["response"] for r in sample])
    torch.testing.assert_close(recomputed, torch.tensor([r["reward"] for r in sample]), atol=1e-5, rtol=0)  # float32


def check_digits_labels(rows, cfg, tmp):
    captions = all_captions(1)
    assert Counter(r["prompt"] for r in rows) == {c: 2 for c in captions}  # 1 prompt per caption x 2 samples
    assert all(r["response"].shape == (1, 16, 16) and r["desirable"] == (r["reward"] > 0.5) for r in rows)


def check_digits_pairs(rows, cfg, tmp):
    assert 0 < len(rows) <= 50 and len({r["prompt"] for r in rows}) == len(rows)  # one pair per caption, ties dropped
    assert all(r["chosen_score"] > r["rejected_score"] and r["chosen"].shape == (1, 16, 16) for r in rows)
    assert all(parse_digit(r["prompt"]) in range(10) for r in rows)


def check_digits_prompts(rows, cfg, tmp):
    assert Counter(r["prompt"] for r in rows) == {c: 4 for c in all_captions(1)}


def check_jsonl(rows, cfg, tmp):
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == PAIRS
    assert [r["source"] for r in rows] == [f"{tmp / 'pairs.jsonl'}:{i}" for i in (1, 2)]


def check_hf_preference(rows, cfg, tmp):
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ([{"role": "user", "content": "2+2="}], [{"role": "assistant", "content": "4"}],
         [{"role": "assistant", "content": "5"}]),
        ([{"role": "user", "content": "5+5="}], [{"role": "assistant", "content": "10"}],
         [{"role": "assistant", "content": "11"}]),
    ]  # train_prefs only: the test_prefs shard is another split
    assert [(r["prompt_id"], r["score_chosen"], r["score_rejected"]) for r in rows] == [("id0", 8.0, 4.5), ("id1", 8.0, 4.5)]


def check_motion_demos(rows, cfg, tmp):
    train = HumanML3DDataset(synthetic_motion_root(), "train", random_crop=False)
    assert len(rows) == sum(len(clip.captions) for clip in train.clips)
    assert {r["motion_id"] for r in rows} == {clip.id for clip in train.clips}
    for r in rows:
        assert r["response"].ndim == 2 and r["response"].shape[1] == 263 and len(r["response"]) % 4 == 0
        assert torch.isfinite(r["response"]).all()


def check_motion_gt_pairs(rows, cfg, tmp):
    demos = demonstration_rows(synthetic_motion_root(), "train")
    assert len(rows) == 2
    for r in rows:
        assert r["prompt"] == demos[r["row"]]["prompt"] and torch.equal(torch.as_tensor(r["chosen"]), demos[r["row"]]["response"])
        assert torch.as_tensor(r["rejected"]).shape == torch.as_tensor(r["chosen"]).shape  # generated at its length


def check_motion_labels(rows, cfg, tmp):
    threshold = cfg.data.train.threshold
    assert len(rows) == 2 * 4 and all(r["desirable"] == (r["reward"] > threshold) for r in rows)


def check_motion_pairs(rows, cfg, tmp):
    assert 0 < len(rows) <= 2 and all(r["chosen_score"] > r["rejected_score"] for r in rows)


def check_motion_prompts(rows, cfg, tmp):
    train = HumanML3DDataset(synthetic_motion_root(), "train", random_crop=False)
    captions = {c.text for clip in train.clips for c in clip.captions}
    assert len(rows) == 8 and len({r["prompt"] for r in rows}) == 8 and {r["prompt"] for r in rows} <= captions


def check_rewards_jsonl(rows, cfg, tmp):
    assert [(r["prompt"], r["completion"], r["reward"]) for r in rows] == [(o["prompt"], o["completion"], o["reward"])
                                                                         for o in REWARDS]


def _pickapic_overrides(tmp: Path) -> list[str]:
    """A tiny SD 1.5 folder and a Pick-a-Pic v2 snapshot (train shard with ties, a test shard that must stay out)."""
    snapshot = tmp / "pickapic_v2" / "data"
    write_pickapic(snapshot / "train-00000-of-00001-0123abcd.parquet", ROWS)
    write_pickapic(snapshot / "test-00000-of-00001-4567ef01.parquet", [("held out", 1.0, 0.0)])
    (tmp / "sd15").mkdir()
    return [f"adapter.path={write_sd15(tmp / 'sd15')}", f"data.path={snapshot.parent}", "data.resolution=16"]


def _preferred_size(label_0: float) -> tuple[int, int]:
    """(height, width) of the preferred image: write_pickapic's jpg_0 files are 20 wide x 24 high, jpg_1 24 x 20."""
    return (24, 20) if label_0 == 1.0 else (20, 24)


def _check_image(side: dict) -> None:
    assert side["image"].shape == (3, 16, 16) and side["image"].min() >= -1 and side["image"].max() <= 1


def check_pickapic(rows, cfg, tmp):
    assert (len(rows), rows.num_rows, rows.num_ties) == (len(NON_TIED), len(ROWS), 2)  # ties dropped and counted
    for k, (caption, label_0, _) in enumerate(NON_TIED):
        row = rows[k]
        assert row["prompt"] == caption
        assert row["chosen"]["original_size"] == _preferred_size(label_0)
        assert row["rejected"]["original_size"] == _preferred_size(1.0 - label_0)
        _check_image(row["chosen"]), _check_image(row["rejected"])


def check_pickapic_experts(rows, cfg, tmp):
    assert [rows[k]["prompt"] for k in range(len(rows))] == [caption for caption, _, _ in NON_TIED]
    for k, (_, label_0, _) in enumerate(NON_TIED):
        assert rows[k]["response"]["original_size"] == _preferred_size(label_0)
        _check_image(rows[k]["response"])


def check_pickapic_unpaired(rows, cfg, tmp):
    assert len(rows) == 2 * len(NON_TIED)  # both images of every non-tied pair
    for k, (caption, label_0, _) in enumerate(NON_TIED):
        liked, disliked = rows[2 * k], rows[2 * k + 1]
        assert liked["prompt"] == disliked["prompt"] == caption
        assert (liked["desirable"], disliked["desirable"]) == (True, False)
        assert liked["response"]["original_size"] == _preferred_size(label_0)
        assert disliked["response"]["original_size"] == _preferred_size(1.0 - label_0)


def _humanml3d_overrides(tmp: Path) -> list[str]:
    """An official-layout MDM checkpoint with a tiny CLIP text encoder and a HumanML3D folder whose 30- and
    210-frame motions break the length rules."""
    checkpoint = save_official(tmp / "save", random_official_state("trans_enc", CLIP_DIM), official_args())
    return [f"adapter.path={checkpoint}", f"adapter.text_encoder={tiny_clip(tmp / 'clip', CLIP_DIM)}",
            f"data.root={write_humanml3d(tmp / 'HumanML3D')}"]


def check_humanml3d(rows, cfg, tmp):
    root = Path(cfg.data.root)
    assert [r["motion_id"] for r in rows] == ["000000", "000001", "000002", "000003"]  # 30 and 210 frames dropped
    for i, r in enumerate(rows):
        raw = np.load(root / "new_joint_vecs" / f"{r['motion_id']}.npy")  # 48/52/60/44 frames: multiples of 4
        np.testing.assert_allclose(r["response"].numpy(), (raw - 0.1) / 1.5, rtol=1e-6, atol=1e-6)  # Mean 0.1, Std 1.5
        assert r["prompt"] == CAPTIONS[i % 3]


SHRINK_DIGITS = ["data.train.prompts_per_caption=1", "data.train.num_samples=2", "data.train.num_inference_steps=2"]
SHRINK_MOTION = ["data.train.num_prompts=2", "data.train.num_inference_steps=2"]
CASES = {
    "arithmetic": Case("text_dpo", check_arithmetic_pairs),
    "arithmetic_feedback": Case("text_dro", check_arithmetic_feedback),
    "arithmetic_labelled": Case("text_kto", check_arithmetic_labelled),
    "arithmetic_multiturn": Case("text_multiturn_dpo", check_arithmetic_multiturn),
    "digits_demos": Case("digits_dro", check_digits_demos),
    "digits_labels": Case("digits_kto", check_digits_labels, lambda tmp: SHRINK_DIGITS),
    "digits_pairs": Case("digits_dpo", check_digits_pairs, lambda tmp: SHRINK_DIGITS),
    "digits_prompts": Case("digits_oaif", check_digits_prompts),
    "humanml3d": Case("mdm_sopo", check_humanml3d, _humanml3d_overrides),
    "jsonl": Case("text_dpo", check_jsonl, lambda tmp: [f"data.path={_write_jsonl(tmp / 'pairs.jsonl', PAIRS)}"]),
    "hf_preference": Case("text_dpo", check_hf_preference,
                          lambda tmp: [f"data.path={_ultrafeedback_snapshot(tmp / 'uf')}", "data.split=train_prefs"]),
    "motion_demos": Case("motion_sopo", check_motion_demos),
    "motion_gt_pairs": Case("motion_dpo", check_motion_gt_pairs, lambda tmp: SHRINK_MOTION),
    # 8 samples; their rewards lie in ~[0.02, 0.09] at 2 sampler steps, so 0.04 splits them into both kinds
    "motion_labels": Case("motion_kto", check_motion_labels,
                          lambda tmp: [*SHRINK_MOTION, "data.train.num_samples=4", "data.train.threshold=0.04"]),
    "motion_pairs": Case("motion_modipo", check_motion_pairs, lambda tmp: [*SHRINK_MOTION, "data.train.num_samples=2"]),
    "motion_prompts": Case("motion_oaif", check_motion_prompts, lambda tmp: ["data.train.num_prompts=8"]),
    "pickapic": Case("sd15_diffusion_dpo", check_pickapic, _pickapic_overrides),
    "pickapic_experts": Case("sd15_diffusion_dro", check_pickapic_experts, _pickapic_overrides),
    "pickapic_unpaired": Case("sd15_diffusion_kto", check_pickapic_unpaired, _pickapic_overrides),
    "rewards_jsonl": Case("text_dro", check_rewards_jsonl,
                          lambda tmp: [f"data.path={_write_jsonl(tmp / 'rewards.jsonl', REWARDS)}", "data.low=0",
                                       "data.high=1"]),
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_data_config_has_a_case():
    assert sorted(CASES) == DATA_CONFIGS, "a config in configs/data/ has no case in CASES (or a case lost its config)"


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_config_builds_its_rows(name, tmp_path):
    if name not in CASES:
        pytest.fail(f"configs/data/{name}.yaml has no case in tests/test_data_configs.py CASES; add one")
    case = CASES[name]
    cfg = _compose(f"experiment={case.experiment}", f"data={name}", f"output_dir={tmp_path / 'run'}",
                   *case.overrides(tmp_path))
    rows = build_rows(cfg.data.train, instantiate(cfg.adapter))
    assert rows, f"data={name} built no rows"
    case.check(rows, cfg, tmp_path)


# ------------------------------------------------------------------------------------------------ evaluator=none
def _fill_missing(cfg):
    """The config with every mandatory ``???`` value the user gives on the command line (``adapter.path``,
    ``data.path``, ``data.root`` of the real-model experiments) set to a marker, so that it resolves."""
    def missing(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from missing(value, f"{prefix}{key}.")
            elif value == "???":
                yield f"{prefix}{key}"

    for key in list(missing(OmegaConf.to_container(cfg, resolve=False))):
        OmegaConf.update(cfg, key, f"<{key}>")
    return cfg


def test_evaluator_none_changes_nothing_but_the_evaluation():
    """Under ``evaluator=none`` every experiment composes and resolves and its evaluator node is empty (the CLI then
    trains without one). Where a key outside the evaluator takes a value from it (``${...evaluator.KEY...}``), it
    resolves as under the experiment's own evaluator: the fallbacks are that evaluator's defaults."""
    compared = []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for name in EXPERIMENTS:
            base = [f"experiment={name}", "output_dir=/tmp/unused"]
            none_cfg = compose(config_name="config", overrides=[*base, "evaluator=none"])
            none = OmegaConf.to_container(_fill_missing(none_cfg), resolve=True)
            assert none.pop("evaluator") == {}, f"{name}: the experiment sets evaluator keys"
            if not EVALUATOR_REFERENCE.search(OmegaConf.to_yaml(none_cfg)):
                continue
            own = OmegaConf.to_container(_fill_missing(compose(config_name="config", overrides=base)), resolve=True)
            own.pop("evaluator")
            assert none == own, name
            compared.append(name)
    assert "digits_dpo" in compared and "digits_oaif" in compared  # the check above is not vacuous


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_trains_on_a_jsonl_file_without_an_evaluator(tmp_path):
    """The README's bring-your-own-pairs command: data=jsonl, evaluator=none. At step 0 the policy is the
    reference, so the first logged DPO loss is ln 2 (summed over a few characters in float32: 1e-4 is ample)."""
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(8) for b in range(5)]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "genalign.cli", "experiment=text_dpo", "data=jsonl", f"data.path={data}",
         "evaluator=none", "train.max_steps=2", "train.log_every=1", f"output_dir={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"] == {} and metrics["after"] == {}
    assert f"no evaluation (evaluator=none); trained weights in {out / 'final'}" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert math.isclose(log[0]["loss"], math.log(2), abs_tol=1e-4)
