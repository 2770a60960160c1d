"""``docs/BENCHMARKS.md`` from the results of a ``genalign-bench`` run (everything in it comes from the JSON)."""

from __future__ import annotations

from typing import Any

#: (suite, peer) -> minimum genalign/peer samples/s ratio, and the image memory bound (genalign/peer peak growth)
SPEED_TARGETS = {("text", "trl"): 1.3, ("text", "trl+precompute"): 1.3, ("image", "diffusers-loop"): 1.5}
IMAGE_MEMORY_TARGET = 0.8
DRO_SHARE_TARGET = 0.5

METHOD = """\
Each speed suite builds every side on copies of the same randomly initialised model, the same rows, the same
micro-batch order and the same precision, then runs `reps` repetitions; in each repetition every side runs `warmup`
untimed and `steps` timed optimizer steps, and the side that goes first alternates. A side's figure is the median
over repetitions of its samples/s (pairs/s); the ratio genalign/peer is computed per repetition and reported as
median [inter-quartile range]. Peak memory is the growth of the peak resident set size (Linux `VmHWM`, reset through
`/proc/self/clear_refs` before the first step) of a fresh process running that side alone for `memory_steps` steps
(on CUDA: `torch.cuda.max_memory_allocated` growth); it counts activations, gradients, optimizer state and allocator
caches, not the weights loaded before. FLOPs per step are counted by `torch.utils.flop_counter.FlopCounterMode` on
one step of each side."""

SIDES = {
    "genalign": "genalign `Trainer` optimizer step",
    "trl": "TRL `DPOTrainer` (reference forward every step, its default)",
    "trl+precompute": "TRL `DPOTrainer`, `precompute_ref_log_probs=True`",
    "diffusers-loop": "`scripts/diffusers_dpo_loop.py` (VAE + text encoder every step)",
    "genalign-no-cache": "lever off: genalign recomputing reference scores every step",
    "genalign-full-softmax": "lever off: genalign scoring with logits at every position and a full log-softmax",
    "genalign-channels-last": "lever on: genalign with a channels-last UNet",
    "genalign-cached-reference": "lever on: genalign with reference scores cached per row (policy forward only; "
                                 "timing only, see findings)",
    "genalign-compiled": "genalign with `train.compile` (`torch.compile` of the prepared policy; no memory row: "
                         "compiling again in a fresh process takes many minutes on the CPU)",
}


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Benchmarks", "", "Produced by `genalign-bench`; re-run it to regenerate this file and "
             "`docs/benchmarks.json`.", "", f"Command: `{results['command']}`  ", f"Date (UTC): {results['date_utc']}  ",
             f"Device: {results['device']}", ""]
    if results.get("note"):
        lines += [f"> {results['note']}", ""]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in results["machine"].items()] + [""]
    lines += ["## Method", "", METHOD, "", "Settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items()), ""]
    suites = results["suites"]
    for name in ("text", "image"):
        if name in suites:
            lines += _speed_section(name, suites[name])
    if "online" in suites:
        lines += _online_section(suites["online"])
    lines += _targets(suites)
    lines += _findings(suites, results["device"])
    return "\n".join(lines) + "\n"


def _speed_section(name: str, suite: dict[str, Any]) -> list[str]:
    config = suite["config"]
    title = {"text": "Text: DPO vs TRL", "image": "Image: Diffusion-DPO vs the diffusers-style loop"}[name]
    lines = [f"## {title}", "", f"Model: {config['model']}; batch {config['batch_size']} pairs, "
             f"{config['mixed_precision']} mixed precision.", "",
             "| side | what runs | pairs/s (median) | genalign / side [IQR] | peak memory growth (MiB) | "
             "GFLOP/step | setup (s) |", "|---|---|---|---|---|---|---|"]
    for side, entry in suite["sides"].items():
        comparison = suite["comparisons"].get(side)
        ratio = "—" if comparison is None else (f"{comparison['ratio_median']:.2f}x "
                                                f"[{comparison['ratio_q1']:.2f}, {comparison['ratio_q3']:.2f}]")
        memory = entry.get("peak_memory_growth_mib")
        mfu = f" (MFU {entry['mfu']:.1%})" if "mfu" in entry else ""
        lines.append(f"| {side} | {SIDES.get(side, side)} | {entry['samples_per_s_median']:.2f} | {ratio} | "
                     f"{'—' if memory is None else f'{memory:.0f}'} | {entry['flops_per_step'] / 1e9:.1f}{mfu} | "
                     f"{entry['setup_seconds']:.1f} |")
    lines.append("")
    setup = {"text": "Setup: genalign's reference-score cache / TRL's precompute pass (one-off, not in pairs/s).",
             "image": "Setup: genalign's one pass filling the latent / text-embedding cache (one-off, not in pairs/s)."}
    return lines + [setup[name], ""]


def _online_section(suite: dict[str, Any]) -> list[str]:
    lines = ["## Online: share of step time spent sampling", "",
             "| case | settings | step (s, median) | sampling (s/step) | sampling share |", "|---|---|---|---|---|"]
    for case in suite["cases"]:
        lines.append(f"| {case['case']} | {case['note']} | {case['step_seconds_median']:.2f} | "
                     f"{case['sampling_seconds_per_step']:.2f} | {case['sampling_share']:.0%} |")
    return lines + [""]


def _targets(suites: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for (suite, peer), bound in SPEED_TARGETS.items():
        comparison = suites.get(suite, {}).get("comparisons", {}).get(peer)
        if comparison is not None:
            value = comparison["ratio_median"]
            lines.append(f"| {suite}: genalign >= {bound}x {peer} samples/s | {value:.2f}x | {_yes(value >= bound)} |")
    sides = suites.get("image", {}).get("sides", {})
    if "peak_memory_growth_mib" in sides.get("genalign", {}) and "peak_memory_growth_mib" in sides.get("diffusers-loop", {}):
        share = sides["genalign"]["peak_memory_growth_mib"] / sides["diffusers-loop"]["peak_memory_growth_mib"]
        lines.append(f"| image: genalign peak memory <= {IMAGE_MEMORY_TARGET}x the loop's | {share:.2f}x | "
                     f"{_yes(share <= IMAGE_MEMORY_TARGET)} |")
    for case in suites.get("online", {}).get("cases", []):
        if case["case"] == "dro-paper":
            lines.append(f"| Diffusion-DRO sampling <= {DRO_SHARE_TARGET:.0%} of step time (paper settings) | "
                         f"{case['sampling_share']:.0%} | {_yes(case['sampling_share'] <= DRO_SHARE_TARGET)} |")
    return lines + [""]


def _findings(suites: dict[str, Any], device: str) -> list[str]:
    """What the levers measured, computed from this run's numbers."""
    lines = ["## Levers and findings", ""]
    text = suites.get("text")
    if text:
        sides, comparisons = text["sides"], text["comparisons"]
        if "genalign-no-cache" in comparisons:
            lines.append(f"- text, cached reference scores: genalign with the cache is "
                         f"{comparisons['genalign-no-cache']['ratio_median']:.2f}x genalign recomputing them.")
        if "genalign-full-softmax" in comparisons:
            lines.append(f"- text, log-probs as target logit − float32 `logsumexp` on the kept positions (LM head from "
                         f"the first completion token on) instead of a full log-softmax over every position: "
                         f"{comparisons['genalign-full-softmax']['ratio_median']:.2f}x.")
        if "trl+precompute" in sides:
            lines.append(f"- text vs TRL with precomputed reference: about the same counted FLOPs "
                         f"({sides['genalign']['flops_per_step'] / 1e9:.1f} vs "
                         f"{sides['trl+precompute']['flops_per_step'] / 1e9:.1f} GFLOP/step), yet in a CPU profile "
                         f"most of TRL's step is its chunked log-prob function (LM head, log-softmax and their backward "
                         f"recomputed chunk by chunk in element-wise passes over tokens x vocabulary); genalign takes "
                         f"the target logit minus one float32 `logsumexp` and leaves the backward to autograd.")
        lines.append("- text, padding-free packing: not needed for the target; TRL 1.16 disables its own `padding_free`.")
    img = suites.get("image")
    if img:
        sides, comparisons = img["sides"], img["comparisons"]
        removed = 1 - sides["genalign"]["flops_per_step"] / sides["diffusers-loop"]["flops_per_step"]
        lines.append(f"- image, cached latents and text embeddings: remove {removed:.0%} of the loop's FLOPs at the CPU "
                     f"size; the wall-clock gain is smaller because the tiny UNet is bound by per-op overhead and "
                     f"attention, not by the convolutions the VAE spends its FLOPs on.")
        if "sd15_flops" in img:
            f = img["sd15_flops"]
            lines.append(f"- image at SD 1.5's real shapes (512 px, counted on the meta device): the loop spends "
                         f"{f['step_tflops_per_pair']:.2f} TFLOP per pair per step, {f['cached_share']:.0%} of it in the "
                         f"VAE and text encoder, so caching alone is worth at most {f['caching_speedup_ceiling']:.2f}x "
                         f"when compute-bound: the 1.5x target needs more than the encoding cache.")
        if "genalign-channels-last" in comparisons:
            gain = 1 / comparisons["genalign-channels-last"]["ratio_median"]
            lines.append(f"- image, channels-last UNet: {gain:.2f}x genalign's default layout "
                         f"({sides['genalign-channels-last']['samples_per_s_median'] / sides['diffusers-loop']['samples_per_s_median']:.2f}x "
                         f"the loop in medians).")
        if img["config"].get("train") == "full":
            lines.append("- image, full fine-tune: every UNet weight trains on both sides; the reference forward is a "
                         "frozen copy of the initial UNet under `no_grad` (a second UNet in memory on each side), one "
                         "call on the concatenated chosen + rejected; SDPA is diffusers' default attention on both "
                         "sides.")
        else:
            lines.append("- image, reference forward: LoRA-disabled under `no_grad` on both sides (no second UNet in "
                         "memory), one call on the concatenated chosen + rejected; SDPA is diffusers' default "
                         "attention on both sides.")
        if "genalign-cached-reference" in comparisons:
            gain = 1 / comparisons["genalign-cached-reference"]["ratio_median"]
            loop = sides["genalign-cached-reference"]["samples_per_s_median"] / sides["diffusers-loop"]["samples_per_s_median"]
            lines.append(f"- image, reference scores cached per (row, t, noise): skipping the reference forward is "
                         f"{gain:.2f}x genalign's default ({loop:.2f}x the loop in medians). Such a cache only hits when "
                         f"each row's (t, eps) is fixed (e.g. drawn from a per-row seed), which changes "
                         f"Diffusion-DPO's fresh draw every step; the variant times the step with the cache filled "
                         f"once, its cached values are not at the step's (t, eps), so it is not a training option.")
    for name, suite in suites.items():
        comparison = suite.get("comparisons", {}).get("genalign-compiled") if isinstance(suite, dict) else None
        if comparison is not None:
            lines.append(f"- {name}, `torch.compile` (`train.compile`, same run): the compiled policy runs "
                         f"{1 / comparison['ratio_median']:.2f}x eager genalign's pairs/s "
                         f"[IQR {1 / comparison['ratio_q3']:.2f}-{1 / comparison['ratio_q1']:.2f}]; compile time is "
                         f"in the untimed warm-up.")
    online = {case["case"]: case for case in suites.get("online", {}).get("cases", [])}
    if "dro-paper" in online:
        lines.append(f"- Diffusion-DRO at the paper's settings spends {online['dro-paper']['sampling_share']:.0%} of a "
                     f"step sampling: with M = 1 every step samples a 20-step trajectory per prompt (20 forwards of B "
                     f"samples) against about 8B forward-equivalents of training (policy forward + backward and a "
                     f"reference forward on 2B inputs), so about 70% is inherent to the setting. Trajectories are "
                     f"already collected in one batched sampler call per step.")
        for name, label in (("dro-10-steps", "10 solver steps"), ("dro-M4", "buffer reuse across M = 4"),
                            ("dro-10-steps-M4", "both")):
            if name in online:
                lines.append(f"  - {label}: {online[name]['sampling_share']:.0%} of the step.")
    if device == "cpu":
        lines.append("- GPU (SD-1.5-shaped UNet and ~0.5B LM in bf16, MFU, `--compile` on CUDA): supported by the "
                     "suites, not measured in this run (no GPU).")
    return lines + [""]


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"
