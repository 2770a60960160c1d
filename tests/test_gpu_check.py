"""scripts/gpu_check.sh and what it runs: the image suite's full fine-tune trains every UNet weight on both sides
(LoRA trains only the LoRA), and the script's plumbing (tiny CPU sizes under GPU_CHECK_ALLOW_CPU=1) writes one
genalign-bench JSON per part and a summary table; without CUDA and without that variable it refuses to run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from genalign.bench import cli, image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HAS_TRL = importlib.util.find_spec("trl") is not None
TRL_MISSING = "trl is not installed: pip install -e '.[bench]' to run the text part (TRL comparison)"


def run_script(out: Path | None, **env: str) -> subprocess.CompletedProcess:
    """The script with CUDA hidden, this interpreter, one CPU thread and ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    base.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    args = ["bash", str(SCRIPT)] + ([str(out)] if out is not None else [])
    return subprocess.run(args, capture_output=True, text=True, env=base, timeout=300, cwd=ROOT)


def unet_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unet.named_parameters()}


@pytest.mark.parametrize("train", image.TRAIN_MODES)
def test_image_sides_train_the_lora_or_every_unet_weight_against_the_matching_reference(train):
    config = cli.suite_config(image, "tiny", train)
    assert config.train == train and (config.lora is None) == (train == "full")
    sides = image.build(config)
    adapter, loop = sides["genalign"].trainer.adapter, sides["diffusers-loop"].loop
    for unet, trainable in ((adapter.unwrapped_policy, adapter.trainable_parameters()), (loop.unet, loop.params)):
        names = {name for name, p in unet.named_parameters() if any(p is q for q in trainable)}
        lora = {name for name, _ in unet.named_parameters() if "lora_" in name}
        if train == "full":
            assert not lora and names == {name for name, _ in unet.named_parameters()}
        else:
            assert lora and names == lora
    optimized = {id(p) for group in sides["genalign"].trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in adapter.trainable_parameters()}
    for reference in (adapter.reference, loop.ref_unet):  # a frozen copy for the full fine-tune, none with LoRA
        if train == "full":
            assert reference is not adapter.unwrapped_policy and reference is not loop.unet
            assert not any(p.requires_grad for p in reference.parameters())
        else:
            assert reference is None

    before = {"genalign": unet_weights(adapter.unwrapped_policy), "diffusers-loop": unet_weights(loop.unet)}
    reference_before = None if train == "lora" else (unet_weights(adapter.reference), unet_weights(loop.ref_unet))
    for side in sides.values():
        assert math.isfinite(side.step())
    for name, unet in (("genalign", adapter.unwrapped_policy), ("diffusers-loop", loop.unet)):
        moved = {k for k, p in unet.named_parameters() if not torch.equal(p.detach(), before[name][k])}
        base_moved = {k for k in moved if "lora_" not in k}
        if train == "full":  # the optimizer step moved weights outside any LoRA (AdamW moves every weight with a grad)
            assert len(base_moved) > len(before[name]) // 2, name
        else:
            assert not base_moved and moved, name
    if reference_before is not None:
        for reference, weights in zip((adapter.reference, loop.ref_unet), reference_before):
            for k, p in reference.named_parameters():
                assert torch.equal(p, weights[k]), k


def test_full_fine_tune_sides_give_the_same_loss_and_gradients_on_the_same_draw():
    """As test_bench_image's LoRA check, for the full fine-tune: the same loss and the same gradient on every UNet
    weight, with the policy moved away from the frozen reference copy on both sides."""
    from genalign.adapters.diffusion_scores import draw_noise
    from genalign.steps import StepContext, build_step

    config = replace(image.ImageConfig.tiny(), train="full", beta_dpo=50.0)
    components = image.make_components(config)
    ours = image.genalign_adapter(components, config, cache_dir=None)
    peer = image.peer_loop(components, config, vae_sample=False)
    g = torch.Generator().manual_seed(3)
    peer_weights = dict(peer.unet.named_parameters())
    with torch.no_grad():
        for name, p in ours.unwrapped_policy.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            peer_weights[name].copy_(p)
    rows = image.make_rows(config)[: config.batch_size]
    generator = torch.Generator().manual_seed(11)
    shared = torch.Generator().set_state(generator.get_state())
    n = len(rows)
    draw = draw_noise(torch.arange(n).repeat(2), (4, 8, 8), ours.timestep_range, shared)
    loss_ours = build_step("dpo", beta=config.beta_dpo / 2)(ours, rows, StepContext(generator=generator))[0].mean()
    loss_peer = peer.loss(peer.collate(rows), noise=draw.eps[:n], timesteps=draw.t[:n])
    assert abs(loss_ours.item() - math.log(2)) > 1e-3
    assert loss_ours.item() == pytest.approx(loss_peer.item(), abs=1e-5)
    loss_ours.backward()
    loss_peer.backward()
    for name, p in ours.unwrapped_policy.named_parameters():
        torch.testing.assert_close(p.grad, peer_weights[name].grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One run of the script on tiny CPU sizes: every part when trl is installed, else the two image parts."""
    out = tmp_path_factory.mktemp("gpu_check")
    parts = "image-lora text image-full" if HAS_TRL else "image-lora image-full"
    done = run_script(out, GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_PARTS=parts)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.parametrize("part, train", [("image-lora", "lora"), ("image-full", "full")])
def test_cpu_run_writes_each_image_part_with_both_sides(cpu_run, part, train):
    out, stdout = cpu_run
    results = json.loads((out / f"{part}.json").read_text())
    suite = results["suites"]["image"]
    assert results["device"] == "cpu" and suite["config"]["train"] == train and suite["config"]["image_size"] == 64
    assert results["settings"]["image_train"] == train and results["settings"]["image_shape"] == "tiny"
    assert set(suite["sides"]) == {"genalign", "diffusers-loop"}
    assert all(entry["samples_per_s_median"] > 0 for entry in suite["sides"].values())
    assert suite["comparisons"]["diffusers-loop"]["ratio_median"] > 0
    assert (out / f"{part}.md").is_file() and (out / f"{part}.log").is_file()
    assert any(line.startswith(part) and "diffusers-loop" in line for line in stdout.splitlines())


def test_cpu_run_writes_the_text_part_against_trl(cpu_run):
    if not HAS_TRL:
        pytest.skip(TRL_MISSING)
    out, stdout = cpu_run
    suite = json.loads((out / "text.json").read_text())["suites"]["text"]
    assert set(suite["sides"]) == {"genalign", "trl", "trl+precompute"}
    assert all(entry["samples_per_s_median"] > 0 for entry in suite["sides"].values())
    assert any(line.startswith("text") and "trl+precompute" in line for line in stdout.splitlines())


def test_cpu_run_ends_with_the_summary_table(cpu_run):
    out, stdout = cpu_run
    summary = (out / "summary.txt").read_text()
    assert summary in stdout
    header = next(line for line in summary.splitlines() if line.startswith("run"))
    assert header.split() == ["run", "side", "pairs/s", "genalign/side", "[IQR]", "TFLOP/s", "MFU"]
    assert "gpu_check: all parts done" in stdout


def test_without_cuda_the_script_refuses_unless_cpu_is_allowed(tmp_path):
    done = run_script(tmp_path / "out")
    assert done.returncode == 2
    assert "no CUDA device visible to torch" in done.stderr and "GPU_CHECK_ALLOW_CPU=1" in done.stderr
    assert not (tmp_path / "out").exists()


def test_text_part_without_trl_says_how_to_install_it(tmp_path):
    if HAS_TRL:
        pytest.skip("trl is installed here, so the missing-trl message cannot be shown")
    done = run_script(tmp_path / "out", GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_PARTS="text")
    assert done.returncode == 2
    assert "trl is not installed" in done.stderr and "[bench]" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_part_is_named():
    done = run_script(None, GPU_CHECK_PARTS="image-lora video")
    assert done.returncode == 2 and "unknown part 'video'" in done.stderr
