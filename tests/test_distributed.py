"""Two CPU processes (gloo) train exactly like one process with the same global batch: per-step losses, final
weights and the files of the final save (gathered with ``Accelerator.get_state_dict``) agree to 1e-5 for DPO and KTO
on the tabular adapter, Diffusion-KTO and Diffusion-DRO on the tiny pixel UNet (Diffusion-KTO's loss to what its β lets
float32 rounding reach, :func:`tolerances`); KTO's reference point is the
global-batch mean (a per-process mean is shown to differ), Diffusion-DRO's buffer is the one-process buffer on both
processes, and a run interrupted and resumed under two processes matches too.

The two-process runs happen once, in two forked processes (accelerate reads RANK/WORLD_SIZE/MASTER_* and
ACCELERATE_USE_CPU from the environment); rank 0 saves what it saw (rank 1 its buffers and seed), the one-process runs
happen in the test process.
"""

from __future__ import annotations

import math
import os
import pathlib
import socket
import time
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_train import pair_rows
from tiny_pixel import expert_rows, pixel_adapter, tiny_unet

from genalign.adapters.tabular import TabularAdapter
from genalign.distributed import Shard
from genalign.steps import KTOStep, StepContext, build_step
from genalign.train import Trainer, TrainConfig

TOL = 1e-5
GLOBAL_BATCH = 4
F32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp of 1.0


@dataclass(frozen=True)
class Tolerance:
    """How far a scenario's two runs may be apart: the logged loss (absolute), grad_norm (relative), and the fraction
    of weight elements allowed beyond TOL (each by at most ``flip_size``)."""

    loss: float = TOL
    grad_norm: float = 1e-4  # grad_norm (~100 for the UNet) sums squares over all weights: it shows their 1e-6 rounding
    weight_fraction: float = 0.0
    flip_size: float = TOL


def tolerances(name: str) -> Tolerance:
    """Each process runs the UNet on its 2 rows, the one-process run on 4: the kernels (oneDNN / BLAS, chosen per CPU
    and batch shape) round differently, so a denoising error (O(1), a mean of squares) may differ by a few ulp between
    the runs — the forward itself, not a reduction order that could be fixed. Only a loss that scales scores by a
    large β makes that visible. Diffusion-KTO puts u = β(g − z), g = L_ref − L_θ, into a sigmoid: with |Δg|, |Δz| ≤
    4 ulp(1) each, |Δloss| ≤ |Δu|/4 ≤ 2·β·eps (1.2e-4 at β = 500; 1.6e-5 measured on an AMD EPYC, < 1e-5 on Intel),
    and each row's gradient weight σ'(u) moves relatively by |1 − 2σ(u)|·|Δu| ≤ 8·β·eps (4.8e-4), which bounds the
    grad norm's relative change. Adam divides each gradient element by its own magnitude, so an element whose
    gradient is as small as that noise may step the other way: such elements (measured: 1 of 1,152 in one conv
    weight) may differ by Adam's largest move, (1 − β1)/√(1 − β2)·lr per step in each run; at most 1 % of them."""
    if name != "diffusion_kto":
        return Tolerance()
    beta, lr = 500.0, SCENARIOS[name][3]
    return Tolerance(loss=2 * beta * F32_EPS, grad_norm=8 * beta * F32_EPS, weight_fraction=0.01,
                     flip_size=2 * STEPS * lr * (1 - 0.9) / math.sqrt(1 - 0.999))


def assert_weights_close(got: torch.Tensor, expected: torch.Tensor, tol: Tolerance, name: str) -> None:
    diff = (got - expected).abs()
    beyond = (diff > TOL).float().mean().item()
    assert beyond <= tol.weight_fraction, (name, beyond, diff.max().item())
    assert diff.max().item() <= tol.flip_size, (name, diff.max().item())


class LocalMeanKTO(KTOStep):
    """KTO with the reference point z wrongly taken over this process's rows only (negative control)."""

    def __call__(self, adapter, rows, ctx):
        return super().__call__(adapter, rows, StepContext(ctx.generator, shard=ctx.shard))


def labelled_images(n: int) -> list[dict]:
    """Labelled image rows: two in three desirable."""
    return [{**r, "desirable": i % 3 != 1} for i, r in enumerate(expert_rows(n, seed=1))]


def labelled_actions(n: int = 16) -> list[dict]:
    """Tabular thumbs up/down: 3 in 4 samples are the context's preferred action (desirable), so mean(π − ref)
    grows above 0 and the clamped reference point z = max(0, mean) is active."""
    rows = []
    for i in range(n):
        c, desirable = i % 3, i % 4 != 3
        rows.append({"prompt": c, "response": c % 4 if desirable else (c + 1 + i % 3) % 4, "desirable": desirable,
                     "row": i})
    return rows


SCENARIOS = {
    # name: (adapter factory, step factory, rows factory, learning rate)
    "dpo": (lambda: TabularAdapter(3, 4), lambda: build_step("dpo", beta=0.5), lambda: pair_rows(16), 0.05),
    "kto": (lambda: TabularAdapter(3, 4), lambda: build_step("kto", beta=0.5), labelled_actions, 0.05),
    "kto_local_z": (lambda: TabularAdapter(3, 4), lambda: LocalMeanKTO(beta=0.5), labelled_actions, 0.05),
    "diffusion_kto": (lambda: pixel_adapter(prompt_dropout=0.25), lambda: build_step("kto", beta=500.0),
                      lambda: labelled_images(8), 3e-4),
    "diffusion_dro": (lambda: pixel_adapter(prompt_dropout=0.25),
                      lambda: build_step("diffusion_dro", num_inference_steps=4, trajectories_per_prompt=2,
                                         resync_every=2),
                      lambda: expert_rows(8, prompts=("a cat", "a dog", "a fox")), 1e-3),
    "diffusion_dro_ddpm": (lambda: pixel_adapter(),
                           lambda: build_step("diffusion_dro", num_inference_steps=4, scheduler="ddpm", resync_every=2),
                           lambda: expert_rows(8, prompts=("a cat", "a dog", "a fox")), 1e-3),
}
STEPS = 3


def train(name: str, output_dir, max_steps: int = STEPS, scenario: str | None = None) -> dict:
    """Train a scenario; returns the per-step history, the final trainable weights, the tensors of the files the
    final save wrote (main process) and the DRO buffer (if any)."""
    make_adapter, make_step, make_rows, lr = SCENARIOS[scenario or name]
    torch.manual_seed(0)
    adapter, step = make_adapter(), make_step()
    cfg = TrainConfig(output_dir=str(output_dir / name), max_steps=max_steps, batch_size=GLOBAL_BATCH,
                      gradient_accumulation_steps=2, learning_rate=lr, log_every=1, seed=5)
    trainer = Trainer(adapter, step, make_rows(), cfg)
    history = trainer.train()["history"]
    weights = {k: p.detach().clone() for k, p in adapter.unwrapped_policy.named_parameters() if p.requires_grad}
    buffer = getattr(step, "buffer", None)
    final = output_dir / name / "final"
    saved = {f"{path.relative_to(final)}:{key}": value for path in sorted(final.rglob("*.safetensors"))
             for key, value in load_file(path).items()} if trainer.accelerator.is_main_process else None
    return {"history": history, "weights": weights, "saved": saved,
            "buffer": buffer.state_dict() if buffer is not None else None,
            "checkpoint_files": sorted(p.name for c in trainer.checkpoints() for p in c.iterdir())}


def resumed(output_dir) -> dict:
    """DPO stopped after 1 optimizer step and resumed to STEPS in a fresh trainer."""
    train("dpo_resumed", output_dir, max_steps=1, scenario="dpo")
    return train("dpo_resumed", output_dir, scenario="dpo")


def _worker(rank: int, port: int, output_dir, result_file) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)  # forked after the parent used torch: one thread, as DataLoader workers do
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)  # the parent's one-process state came with the fork
    GradientState._reset_state()
    state = PartialState(cpu=True)
    assert state.num_processes == 2 and state.backend == "gloo", (state.num_processes, state.backend)
    results = {name: train(name, output_dir) for name in SCENARIOS}
    results["dpo_resumed"] = resumed(output_dir)
    if rank == 0:
        torch.save({**results, "global_seed": torch.initial_seed()}, result_file)
    else:  # rank 1's buffer must be rank 0's: the test compares both to the one-process buffer
        buffers = {name: r["buffer"] for name, r in results.items()}
        torch.save({**buffers, "global_seed": torch.initial_seed()}, str(result_file) + ".rank1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    result_file = root / "two.pt"
    # fork: the children start with the parent's imports (a spawned child spends seconds importing diffusers)
    processes = mp.start_processes(_worker, args=(_free_port(), root / "two", result_file), nprocs=2, join=False,
                                   start_method="fork")
    deadline = time.monotonic() + 600
    while not processes.join(timeout=5):  # raises with the child's traceback if one fails
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail("the two training processes did not finish within 10 minutes (a collective waiting forever?)")
    two = torch.load(result_file, weights_only=False)
    rank1_buffers = torch.load(str(result_file) + ".rank1", weights_only=False)
    one = {name: train(name, root / "one") for name in SCENARIOS}
    one["dpo_resumed"] = train("dpo_resumed", root / "one", scenario="dpo")  # uninterrupted
    return one, two, rank1_buffers


def assert_same_run(one: dict, two: dict, tol: Tolerance = Tolerance()) -> None:
    assert [h["step"] for h in two["history"]] == list(range(1, STEPS + 1))
    for a, b in zip(one["history"], two["history"]):  # the loss and every logged metric (global-batch means)
        assert set(a) == set(b)
        for key in a:
            rel = tol.grad_norm if key == "grad_norm" else TOL
            assert b[key] == pytest.approx(a[key], abs=tol.loss if key == "loss" else TOL, rel=rel, nan_ok=True), (key, a, b)
        assert b["loss"] == pytest.approx(a["loss"], abs=tol.loss, rel=0)
    for name, w in one["weights"].items():
        assert_weights_close(two["weights"][name], w, tol, name)
    # the final save (gathered through Accelerator.get_state_dict, written by the main process) holds those weights
    assert one["saved"] and set(two["saved"]) == set(one["saved"])
    for name, w in one["saved"].items():
        assert_weights_close(two["saved"][name], w, tol, name)


@pytest.mark.parametrize("name", ["dpo", "kto", "diffusion_kto", "diffusion_dro", "diffusion_dro_ddpm"])
def test_two_processes_equal_one_process(runs, name):
    one, two, _ = runs
    assert_same_run(one[name], two[name], tolerances(name))
    losses = [h["loss"] for h in one[name]["history"]]
    assert max(losses) - min(losses) > 100 * tolerances(name).loss  # training moved the loss: the equality is not trivial


def test_kto_reference_point_is_the_global_batch_mean(runs):
    one, two, _ = runs
    # the global z is what makes the runs equal: a per-process z gives another loss from step 2 on
    assert two["kto_local_z"]["history"][0]["loss"] == pytest.approx(one["kto"]["history"][0]["loss"], abs=TOL)
    later = [abs(a["loss"] - b["loss"]) for a, b in zip(one["kto"]["history"][1:], two["kto_local_z"]["history"][1:])]
    assert max(later) > 100 * TOL


@pytest.mark.parametrize("name", ["diffusion_dro", "diffusion_dro_ddpm"])
def test_dro_buffer_is_the_one_process_buffer_on_every_process(runs, name):
    one, two, rank1 = runs
    expected = one[name]["buffer"]
    assert len(set(expected["prompts"])) >= 2  # M = 2: filled by the last step (with its snapshot), not yet emptied
    for buffer in (two[name]["buffer"], rank1[name]):
        assert buffer["prompts"] == expected["prompts"]
        for key, value in expected["tensors"].items():
            torch.testing.assert_close(buffer["tensors"][key], value, atol=TOL, rtol=0, msg=key)


def test_processes_draw_independent_dropout_masks(runs):
    """The global RNG (dropout) is seeded seed + process index, the shared generator is not (TrainConfig seed 5)."""
    _, two, rank1 = runs
    assert (two["global_seed"], rank1["global_seed"]) == (5, 6)


def test_resume_under_two_processes_matches_uninterrupted_run(runs):
    one, two, _ = runs
    assert_same_run(one["dpo_resumed"], two["dpo_resumed"])
    names = two["dpo_resumed"]["checkpoint_files"]
    assert "random_states_1.pkl" in names and not any(n.endswith(".tmp") for n in names)


def test_shard_rows_split_and_sliced_draws():
    """Process r's rows and random draws are rows [r·d, (r+1)·d) of the one-process batch's."""
    rows = list(range(8))
    assert Shard(1, 2).rows(rows) == [4, 5, 6, 7]
    assert [list(Shard(r, 3).split(7)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="cannot be split evenly over 3"):
        Shard(0, 3).rows(rows)
    full = torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, 100, (6,), generator=full), torch.randn(6, 2, generator=full)
    for r in range(2):
        g, shard = torch.Generator().manual_seed(0), Shard(r, 2)
        with shard.draws(g):
            torch.testing.assert_close(torch.randint(0, 100, (3,), generator=g), t[3 * r : 3 * r + 3])
            torch.testing.assert_close(torch.randn(3, 2, generator=g), eps[3 * r : 3 * r + 3])
            with shard.remap(None):  # as drawn: the one-process draw itself
                replicated = torch.rand(5, generator=g)
            assert torch.rand(2, generator=torch.Generator().manual_seed(1)).shape == (2,)  # other generators untouched
        after = torch.Generator().manual_seed(0)
        after.set_state(full.get_state())
        torch.testing.assert_close(replicated, torch.rand(5, generator=after))


ACCELERATE_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def launch_args(name: str):
    """``accelerate launch --config_file configs/accelerate/<name>.yaml -m genalign.cli ...`` as the launcher
    resolves it (config file merged into the command line)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"), "-m", "genalign.cli", "experiment=text_dpo"]
    return _validate_launch_command(launch_command_parser().parse_args(argv))[0]


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_configs_load_and_launch_genalign_cli(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig) and config.distributed_type.name == kind
    assert config.mixed_precision == "no"  # precision is genalign's train.mixed_precision, passed by the Trainer
    args = launch_args(name)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (kind == "MULTI_GPU", kind == "FSDP", kind == "DEEPSPEED")
    assert args.module and args.training_script == "genalign.cli" and args.training_script_args == ["experiment=text_dpo"]
    assert args.num_processes == 2


def test_fsdp_config_wraps_lm_decoder_layers_and_unet_blocks(monkeypatch):
    """The launcher's environment for fsdp.yaml builds an FSDP2 plugin that wraps each model at its own blocks."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    for key, value in prepare_multi_gpu_env(launch_args("fsdp")).items():
        monkeypatch.setenv(key, value)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    for model, expected in ((lm, {GPT2Block}), (tiny_unet(), {BasicTransformerBlock, ResnetBlock2D})):
        plugin = FullyShardedDataParallelPlugin()
        plugin.set_auto_wrap_policy(model)
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
        wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
        assert expected <= wrapped
        assert all(any(isinstance(m, cls) for m in model.modules()) for cls in wrapped)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs_give_the_zero_stage_and_genalign_defaults(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    args = launch_args(name)
    plugin = DeepSpeedPlugin(zero_stage=args.zero_stage, gradient_clipping=args.gradient_clipping,
                             gradient_accumulation_steps=args.gradient_accumulation_steps,
                             zero3_save_16bit_model=args.zero3_save_16bit_model, zero3_init_flag=args.zero3_init_flag)
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    defaults = TrainConfig()
    assert ds["gradient_clipping"] == defaults.max_grad_norm
    assert ds["gradient_accumulation_steps"] == defaults.gradient_accumulation_steps
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


def test_trainer_tells_deepspeed_the_per_process_micro_batch(tmp_path, monkeypatch):
    """The Trainer prepares no dataloader, so with deepspeed_zero2.yaml's plugin it must set the micro-batch itself
    (accelerate refuses an 'auto' micro-batch without a dataloader). deepspeed itself is not installed here: the
    plugin built from the launcher's arguments is handed to a one-process trainer."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    args = launch_args("deepspeed_zero2")
    plugin = DeepSpeedPlugin(zero_stage=args.zero_stage, gradient_clipping=args.gradient_clipping)
    assert plugin.is_auto("train_micro_batch_size_per_gpu")
    monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", property(lambda self: plugin))
    cfg = TrainConfig(output_dir=str(tmp_path / "ds"), max_steps=1, batch_size=4)
    Trainer(TabularAdapter(3, 4), build_step("dpo"), pair_rows(8), cfg)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4  # one process: the whole global batch
