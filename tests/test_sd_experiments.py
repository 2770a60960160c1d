"""The Stable Diffusion experiments (sd15_* / sdxl_*) end to end on tiny random SD 1.5 / SDXL folders in the exact
diffusers layout and a tiny Pick-a-Pic v2 snapshot with the real column schema (ties included): two optimizer steps
each, the loss at step 0 against its known value, final/ loaded in the diffusers pipelines, and the bad inputs."""

from __future__ import annotations

import datetime
import io
import json
import math
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

import genalign.cli as cli
from genalign.adapters.image import ImageDiffusionAdapter
from genalign.data import pickapic
from genalign.data.batching import pairwise_batch
from genalign.data.pickapic_views import pickapic_experts, pickapic_pairs, pickapic_unpaired, split_files
from tiny_sd import tiny_tokenizer, write_sd15, write_sdxl

# (caption, label_0, label_1): 4 preferences and 2 ties
ROWS = [("a red fox", 1.0, 0.0), ("a tie", 0.5, 0.5), ("a blue whale", 0.0, 1.0), ("a green frog", 0.0, 1.0),
        ("another tie", 0.5, 0.5), ("a yellow sun", 1.0, 0.0)]  # fmt: skip
NON_TIED = [r for r in ROWS if r[1] != 0.5]


def jpeg(seed: int, size=(20, 24)) -> bytes:
    """A random-noise RGB JPEG of ``size`` (width, height): every image differs."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def write_pickapic(path: Path, rows, *, jpg_0=None, drop=()) -> Path:
    """A shard with Pick-a-Pic v2's 18 columns and their types (uids, urls, timestamps, counts)."""
    n = len(rows)
    uid = [[f"{i:08d}-0000-4000-8000-00000000000{side}" for side in (0, 1)] for i in range(n)]
    columns = {
        "caption": pa.array([r[0] for r in rows], pa.string()),
        "jpg_0": pa.array(jpg_0 if jpg_0 is not None else [jpeg(2 * i) for i in range(n)], pa.binary()),
        "jpg_1": pa.array([jpeg(2 * i + 1, size=(24, 20)) for i in range(n)], pa.binary()),
        "label_0": pa.array([r[1] for r in rows], pa.float64()),
        "label_1": pa.array([r[2] for r in rows], pa.float64()),
        "best_image_uid": pa.array([u[0] if r[1] == 1.0 else u[1] if r[2] == 1.0 else "" for u, r in zip(uid, rows)]),
        "image_0_uid": pa.array([u[0] for u in uid]),
        "image_1_uid": pa.array([u[1] for u in uid]),
        "are_different": pa.array([True] * n),
        "has_label": pa.array([True] * n),
        "ranking_id": pa.array(range(100, 100 + n), pa.int64()),
        "user_id": pa.array([7] * n, pa.int64()),
        "num_example_per_prompt": pa.array([1] * n, pa.int64()),
        "model_0": pa.array(["sdxl"] * n),
        "model_1": pa.array(["sd-2.1"] * n),
        "created_at": pa.array([datetime.datetime(2023, 5, 1, 12, i) for i in range(n)], pa.timestamp("ns")),
        "image_0_url": pa.array([f"https://example.invalid/{u[0]}.png" for u in uid]),
        "image_1_url": pa.array([f"https://example.invalid/{u[1]}.png" for u in uid]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: v for k, v in columns.items() if k not in drop}), path, row_group_size=3)
    return path


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A pickapic_v2 snapshot: data/train-* (ROWS) and data/test-* (one pair that must not be trained on)."""
    root = tmp_path_factory.mktemp("pickapic_v2")
    write_pickapic(root / "data" / "train-00000-of-00001-0123abcd.parquet", ROWS)
    write_pickapic(root / "data" / "test-00000-of-00001-4567ef01.parquet", [("held out", 1.0, 0.0)])
    return root


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    return write_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    return write_sdxl(tmp_path_factory.mktemp("sdxl"))


# ---------------------------------------------------------------------------------------------- data views
def test_split_selection_ties_and_lazy_views(snapshot):
    assert [p.name for p in split_files(snapshot)] == ["train-00000-of-00001-0123abcd.parquet"]
    assert [p.name for p in split_files(snapshot / "data", "test")] == ["test-00000-of-00001-4567ef01.parquet"]
    with pytest.raises(FileNotFoundError, match=r"no validation-\*\.parquet shards \(splits found: \['test', 'train'\]\)"):
        split_files(snapshot, "validation")
    with pytest.raises(ValueError, match="not a Pick-a-Pic v2 split"):
        split_files(snapshot, "dev")

    with mock.patch.object(pickapic, "open_image", wraps=pickapic.open_image) as decoded:
        pairs = pickapic_pairs(snapshot, resolution=16)
        experts, unpaired = pickapic_experts(snapshot, resolution=16), pickapic_unpaired(snapshot, resolution=16)
        assert decoded.call_count == 0  # opening reads captions and labels only
        first = experts[0]
        assert decoded.call_count == 2  # one item decodes its own pair, nothing else
    assert (pairs.num_rows, pairs.num_ties, len(pairs), len(experts), len(unpaired)) == (6, 2, 4, 4, 8)
    assert [experts[i]["prompt"] for i in range(4)] == [r[0] for r in NON_TIED]
    assert torch.equal(first["response"]["image"], pairs[0]["chosen"]["image"])
    assert first["response"]["image"].shape == (3, 16, 16)
    for k in range(4):
        liked, disliked = unpaired[2 * k], unpaired[2 * k + 1]
        assert (liked["desirable"], disliked["desirable"]) == (True, False)
        assert torch.equal(liked["response"]["image"], pairs[k]["chosen"]["image"])
        assert torch.equal(disliked["response"]["image"], pairs[k]["rejected"]["image"])
    # label (0, 1) rows prefer jpg_1, whose files are 24 wide and 20 high: their original size travels with them
    assert pairs[1]["chosen"]["original_size"] == (20, 24) and pairs[0]["chosen"]["original_size"] == (24, 20)
    with pytest.raises(IndexError):
        unpaired[8]


def test_pair_records_collate_with_their_own_sdxl_ids(sdxl, snapshot):
    adapter = ImageDiffusionAdapter.from_pretrained(sdxl, architecture="sdxl", prompt_dropout=0.0)
    pairs = pickapic_pairs(snapshot, resolution=16)
    rows = [pairs[0], pairs[1]]
    batch = pairwise_batch(adapter, rows)
    for side in ("chosen", "rejected"):
        expected = [[*r[side]["original_size"], *r[side]["crop_top_left"], 16, 16] for r in rows]
        assert getattr(batch, side)["time_ids"].tolist() == expected
        pixels = torch.stack([r[side]["image"] for r in rows])
        assert torch.allclose(getattr(batch, side)["x0"], adapter.encode_images(pixels))
    # pair 0 prefers jpg_0, 20 wide and 24 high: resized to 16 x 19 (w x h), cropped 1 row from the top
    assert batch.chosen["time_ids"].tolist()[0] == [24, 20, 1, 0, 16, 16]
    assert batch.rejected["time_ids"].tolist()[0] == [20, 24, 0, 1, 16, 16]  # jpg_1: 24 x 20 -> 19 x 16, 1 column off


# ---------------------------------------------------------------------------------------------- experiments
SHORT = ["train.max_steps=2", "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.mixed_precision=no",
         "train.gradient_checkpointing=false", "train.save_every=0", "train.log_every=1", "train.warmup_steps=0",
         "data.resolution=16"]  # fmt: skip
#: what each experiment needs on the tiny models besides SHORT: few sampler steps for DRO, a visible LoRA step
EXTRA = {
    "sd15_diffusion_dpo": ["train.learning_rate=1e-3"],
    "sdxl_diffusion_dpo": ["train.learning_rate=1e-3"],
    "sd15_diffusion_dro": ["objective.num_inference_steps=2", "train.learning_rate=1e-3"],
    "sdxl_diffusion_dro": ["objective.num_inference_steps=2", "train.learning_rate=1e-3"],
    "sd15_diffusion_kto": ["train.learning_rate=1e-3"],
}
# At step 0 the policy is the reference (LoRA B = 0, or an exact copy), so every margin is 0: ln 2 for Diffusion-DPO,
# sigma(0) = 0.5 (weights 1) for Diffusion-KTO, relu(0 + m) = m for Diffusion-DRO's hinge. rel=1e-4 leaves room for a
# margin of ~1 float32 ulp of the ~1-sized denoising errors times beta (2500 x 6e-8 = 1.5e-4 in the logit, 1e-4 rel.).
LOSS_AT_INIT = {"sd15_diffusion_dpo": math.log(2), "sdxl_diffusion_dpo": math.log(2), "sd15_diffusion_kto": 0.5,
                "sd15_diffusion_dro": 1e-3, "sdxl_diffusion_dro": 1e-3}  # fmt: skip


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", *overrides])


def run_capturing_trainer(cfg):
    """``cli.run(cfg)``, keeping the Trainer so the test can compare the saved weights with the trained ones."""
    made, real = [], cli.Trainer

    def trainer(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    with mock.patch.object(cli, "Trainer", side_effect=trainer):
        metrics = cli.run(cfg)
    return metrics, made[0]


def unet_inputs(adapter: ImageDiffusionAdapter, prompts=("a red fox", "a green frog")):
    batch = adapter.encode_prompts(list(prompts))
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = {"encoder_hidden_states": batch["cond"]}
    if adapter.text_time:
        kwargs["added_cond_kwargs"] = {"text_embeds": batch["pooled"],
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * len(prompts))}
    return x, torch.tensor([7, 60]), kwargs


@pytest.mark.parametrize("experiment", list(EXTRA))
def test_experiment_trains_two_steps_and_final_loads_in_the_pipeline(experiment, sd15, sdxl, snapshot, tmp_path):
    model = sdxl if experiment.startswith("sdxl") else sd15
    out = tmp_path / "run"
    cfg = compose_experiment(experiment, f"adapter.path={model}", f"data.path={snapshot}", f"output_dir={out}",
                             *SHORT, *EXTRA[experiment])
    assert not cfg.get("evaluator")  # evaluator=none: the image evaluation is `genalign-eval image`'s job
    metrics, trainer = run_capturing_trainer(cfg)
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][0]["loss"] == pytest.approx(LOSS_AT_INIT[experiment], rel=1e-4)
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])

    adapter = trainer.adapter
    pipeline_class = StableDiffusionXLPipeline if experiment.startswith("sdxl") else StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(model)
    x, t, kwargs = unet_inputs(adapter)
    with torch.no_grad():
        base = pipe.unet(x, t, **kwargs).sample
        if adapter.lora:
            assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
            pipe.load_lora_weights(str(out / "final"))
        else:
            pipe = pipeline_class.from_pretrained(model, unet=UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet"))
        loaded = pipe.unet(x, t, **kwargs).sample
        with adapter.ema_weights():  # saved weights are the EMA's where the experiment keeps one (Diffusion-DRO)
            trained = adapter.unwrapped_policy.eval()(x, t, **kwargs).sample
            if not adapter.lora:
                saved = dict(pipe.unet.named_parameters())
                for name, p in adapter.unwrapped_policy.named_parameters():
                    assert torch.equal(saved[name], p), name
    assert (trained - base).abs().max() > 1e-6  # two steps moved the policy
    # same weights; LoRA merges as W x + B A x vs the policy's unmerged path: float32 rounding only
    assert torch.allclose(loaded, trained, atol=1e-6)


def test_the_readme_command_line_runs(sd15, snapshot, tmp_path):
    """The `genalign-train` entry point itself (hydra's command-line parsing), in this process: a fresh
    interpreter would spend most of the test importing torch and diffusers."""
    out = tmp_path / "cli"
    argv = ["genalign-train", "experiment=sd15_diffusion_dpo", f"adapter.path={sd15}", f"data.path={snapshot}",
            f"output_dir={out}", *SHORT]
    with mock.patch.object(sys, "argv", argv):
        cli.train_main()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    saved = OmegaConf.load(out / "config.yaml")  # the resolved config, as the command line set it
    assert (saved.adapter.path, saved.adapter.architecture, saved.data.path) == (str(sd15), "sd15", str(snapshot))


# ---------------------------------------------------------------------------------------------- bad input
def test_model_folder_errors_name_the_path_and_the_fix(sd15, sdxl, tmp_path):
    cfg = compose_experiment("sd15_diffusion_dpo", f"adapter.path={sdxl}", "data.path=unused")
    with pytest.raises(InstantiationException, match=rf"{sdxl} holds an SDXL model .*text_encoder_2/ present\), "
                                                     r"but adapter=sd15 expects SD 1.x/2.x; use adapter=sdxl"):
        instantiate(cfg.adapter)
    cfg = compose_experiment("sdxl_diffusion_dpo", f"adapter.path={sd15}", "data.path=unused")
    with pytest.raises(InstantiationException, match=rf"{sd15} holds an SD 1.x/2.x model \(unet/config.json "
                                                     r"addition_embed_type=None.*use adapter=sd15"):
        instantiate(cfg.adapter)

    no_vae = tmp_path / "no_vae"
    shutil.copytree(sd15, no_vae, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match=rf"{no_vae / 'vae'} is missing.*copy the vae/ subfolder"):
        ImageDiffusionAdapter.from_pretrained(no_vae, architecture="sd15")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(sd15, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(FileNotFoundError, match=rf"{no_tokenizer} has no tokenizer/ subfolder.*copy tokenizer/"):
        ImageDiffusionAdapter.from_pretrained(no_tokenizer, architecture="sd15")

    other = tmp_path / "other_tokenizer"  # another model's tokenizer: 10 tokens more than the text encoder embeds
    shutil.copytree(sd15, other)
    shutil.rmtree(other / "tokenizer")
    tokenizer = tiny_tokenizer(tmp_path)
    tokenizer.add_tokens([f"extra{i}" for i in range(10)])
    tokenizer.save_pretrained(other / "tokenizer")
    with pytest.raises(ValueError, match=rf"{other / 'tokenizer'} has {len(tokenizer)} tokens but "
                                         rf"{other / 'text_encoder'} embeds only {len(tokenizer) - 10}.*does not match"):
        ImageDiffusionAdapter.from_pretrained(other, architecture="sd15")

    narrow = tmp_path / "narrow_text_encoder"  # a text encoder 8 wide for a UNet that cross-attends to 16 features
    shutil.copytree(sd15, narrow)
    config = CLIPTextConfig.from_pretrained(narrow / "text_encoder")
    config.hidden_size, config.intermediate_size, config.projection_dim = 8, 16, 8
    CLIPTextModel(config).save_pretrained(narrow / "text_encoder")
    with pytest.raises(ValueError, match=rf"text encoder\(s\) of {narrow} give 8 features per token but "
                                         rf"{narrow / 'unet'} has cross_attention_dim=16"):
        ImageDiffusionAdapter.from_pretrained(narrow, architecture="sd15")


def test_experts_at_another_size_than_the_sampler_are_refused(sd15, snapshot, tmp_path):
    cfg = compose_experiment("sd15_diffusion_dro", f"adapter.path={sd15}", f"data.path={snapshot}",
                             f"output_dir={tmp_path}", *SHORT, "data.resolution=32", *EXTRA["sd15_diffusion_dro"])
    with pytest.raises(ValueError, match=r"'x0' has shapes \[\(4, 8, 8\), \(4, 16, 16\)\].*set data.resolution to 16"):
        cli.run(cfg)


def test_bad_shards_name_the_file_row_and_field(tmp_path):
    missing = write_pickapic(tmp_path / "a" / "train-00000-of-00001-aa.parquet", ROWS, drop=("label_1", "jpg_1"))
    with pytest.raises(ValueError, match=rf"{missing}: missing column\(s\) \['jpg_1', 'label_1'\]"):
        pickapic_pairs(tmp_path / "a")
    corrupt = write_pickapic(tmp_path / "b" / "train-00000-of-00001-bb.parquet", ROWS,
                             jpg_0=[jpeg(i) if i != 5 else b"\xff\xd8 not a jpeg" for i in range(len(ROWS))])
    experts = pickapic_experts(corrupt, resolution=16)
    assert experts[0]["response"]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=rf"{corrupt} row group \d+ row 5, column 'jpg_0': cannot decode"):
        experts[3]  # the 4th non-tied pair is file row 5, label (1, 0): its chosen image is the corrupt jpg_0
    with pytest.raises(FileNotFoundError, match="data.path=... takes a parquet file"):
        pickapic_pairs(tmp_path / "absent")
