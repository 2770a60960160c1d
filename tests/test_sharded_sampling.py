"""Sharded sampling (genalign.online.global_batch.draw): a sampler whose draws are row-wise samples only this
process's rows under ``Shard.draws`` and still draws the one-process run's samples for them.

* Unit level, no processes: sampling a global batch in one call equals sampling its two halves, each under
  ``Shard(r, 2).draws`` (the draws of the global batch, sliced), for a language model (plain, top-k and
  geometric-mixture sampling), the tabular adapter (plain and mixture), the image sampler (DDPM noise at every step)
  and for a motion model padded to ``max_frames`` or drawing its noise at ``max_frames`` (``row_wise_noise``, what
  online draws use); a motion model padded to each batch's longest motion without it is not row-wise (negative
  control) and says so.
* End to end: OAIF and Nash-MD (geometric-mixture samples) on a pixel diffusion model, and SoPo on variable-length
  motions, two gloo processes vs one with the same global batch: every logged value and the final weights agree,
  while each process sampled only its half of the rows.

Tolerance: the halves go through the networks as smaller batches, whose float32 sums may be ordered differently
(different GEMM blocking), so samples agree to a few float32 ulps of their ~1-sized values (1e-5 here, ~100 ulp),
not bit for bit; the losses below agree to 1e-5 (DPO at beta 5 on ~1-sized scores moves the loss by < beta * the
score change).
"""

from __future__ import annotations

import pytest
import torch
import test_sopo as sopo_case
from test_motion_experiment import FakeText
from tiny_pixel import pixel_adapter
from test_distributed import Tolerance, assert_weights_close
from two_processes import run_two_processes

from genalign.adapters.motion import MotionAdapter
from genalign.adapters.tabular import TabularAdapter
from genalign.adapters.text import TextAdapter
from genalign.distributed import Shard
from genalign.models.mdm import MotionDenoiser, MotionDenoiserConfig
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2
from genalign.online import draws
from genalign.online.judges import RewardJudge
from genalign.online.nash_md import NashMDStep
from genalign.online.oaif import OAIFStep
from genalign.online.sopo import SoPoStep
from genalign.train import Trainer, TrainConfig

SAMPLE_TOL = 1e-5
TOL = 1e-5
PROMPTS = ["a cat", "a dog", "a fox", "an owl"]


def halves_under_shards(adapter, key: str, prompts=PROMPTS, lengths=None, grids=None,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(the global batch sampled in one call, its two halves each sampled under its shard's draws); ``lengths``:
    one frame count per prompt (motion), ``grids``: one timestep grid per sample ``[2·prompts, S]``, both split with
    the prompts. Motions of a half padded to fewer frames than the whole batch's are zero-padded to them (padded
    frames are zero in both)."""

    def extra(part: slice) -> dict:
        out = {} if lengths is None else {"lengths": lengths[part]}
        if grids is not None:
            out["timesteps"] = grids[slice(None) if part.start is None else slice(2 * part.start, 2 * part.stop)]
        return out

    whole = adapter.sample(prompts, 2, generator=torch.Generator().manual_seed(7), **extra(slice(None)), **kwargs)[key]
    parts = []
    for rank in (0, 1):
        generator = torch.Generator().manual_seed(7)
        half = slice(2 * rank, 2 * rank + 2)
        with Shard(rank, 2).draws(generator):
            parts.append(adapter.sample(prompts[half], 2, generator=generator, **extra(half), **kwargs)[key])
    if not isinstance(whole, torch.Tensor):
        return whole, [x for part in parts for x in part]
    if whole.ndim == 3:
        parts = [torch.nn.functional.pad(p, (0, 0, 0, whole.shape[1] - p.shape[1])) for p in parts]
    return whole, torch.cat(parts)


def test_language_model_draws_are_row_wise():
    """One seed per sequence from the shared generator, then the sequence's own stream; the halves are padded to
    their own longest prompt, so their logits differ from the whole batch's by rounding only."""
    tokenizer = char_tokenizer("0123456789+= abcdefghijklmnopqrstuvwxyz")
    adapter = TextAdapter(tiny_gpt2(tokenizer, n_positions=64, seed=1), tokenizer, reference="copy", max_length=40,
                          max_prompt_length=20)
    prompts = ["1+2=", "a long prompt here", "77+", "x"]
    assert adapter.row_wise_draws()
    for kwargs in ({"max_new_tokens": 8, "temperature": 1.5}, {"max_new_tokens": 8, "top_k": 5}):
        whole, halves = halves_under_shards(adapter, "texts", prompts, **kwargs)
        assert halves == whole and len(set(whole)) > 4
    whole, halves = halves_under_shards(DrawsAdapter(adapter, mixture=0.5), "texts", prompts, max_new_tokens=8)
    assert halves == whole  # the geometric mixture's tokens too


def test_tabular_draws_are_row_wise():
    adapter = TabularAdapter(4, 6)
    with torch.no_grad():
        adapter.policy.logits.copy_(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    assert adapter.row_wise_draws()
    for view in (adapter, DrawsAdapter(adapter, mixture=0.3)):
        whole, halves = halves_under_shards(view, "action", [3, 0, 2, 1])
        assert torch.equal(halves, whole) and len(set(whole.tolist())) > 2


class DrawsAdapter:
    """``sample`` as the online steps draw: from the geometric mixture of policy and reference."""

    def __init__(self, adapter, mixture: float):
        self.adapter, self.mixture = adapter, mixture

    def sample(self, prompts, num_samples, generator, **kwargs):
        return draws.draw(self.adapter, prompts, num_samples, generator, mixture=self.mixture, **kwargs)


def test_image_sampler_draws_are_row_wise():
    adapter = pixel_adapter()
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "scheduler": "ddpm"}  # DDPM: fresh noise every step
    assert adapter.row_wise_draws(**kwargs)
    whole, halves = halves_under_shards(adapter, "x0", **kwargs)
    torch.testing.assert_close(halves, whole, atol=SAMPLE_TOL, rtol=0)
    grids = torch.tensor([[30, 10], [31, 11]]).repeat(4, 1)  # per-sample grids: one noise draw per step for all
    assert adapter.row_wise_draws(timesteps=grids, scheduler="ddpm")
    whole, halves = halves_under_shards(adapter, "x0", grids=grids, **kwargs)
    torch.testing.assert_close(halves, whole, atol=SAMPLE_TOL, rtol=0)


def motion_adapter(pad_frames: int | None) -> MotionAdapter:
    torch.manual_seed(0)
    model = MotionDenoiser(MotionDenoiserConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, max_frames=24))
    return MotionAdapter(model, FakeText(), num_train_timesteps=50, pad_frames=pad_frames)


def test_motion_sampler_draws_are_row_wise_when_padded_to_max_frames():
    kwargs = {"num_inference_steps": 3, "guidance_scale": 1.0, "scheduler": "ddpm"}
    padded = motion_adapter(pad_frames=24)
    assert padded.row_wise_draws(**kwargs)
    whole, halves = halves_under_shards(padded, "motion", **kwargs)
    torch.testing.assert_close(halves, whole, atol=SAMPLE_TOL, rtol=0)
    # padded to each batch's longest motion: a half's noise has another shape (next test), so it is not row-wise
    assert not motion_adapter(pad_frames=None).row_wise_draws(**kwargs)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_motion_sampler_with_row_wise_noise_is_row_wise_for_any_lengths(scheduler):
    """Noise drawn at max_frames (DDPM's at every step too, the state held at max_frames): each half, padded to its
    own longest motion, samples the whole batch's motions; online draws ask for it."""
    adapter = motion_adapter(pad_frames=None)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "scheduler": scheduler, "row_wise_noise": True}
    assert adapter.row_wise_draws(**kwargs) and adapter.online_sample_kwargs == {"row_wise_noise": True}
    # the first half's longest motion (9 frames) is shorter than the batch's (20)
    whole, halves = halves_under_shards(adapter, "motion", lengths=[5, 9, 20, 7], **kwargs)
    torch.testing.assert_close(halves, whole, atol=SAMPLE_TOL, rtol=0)
    assert whole[:4, :5].abs().amax((1, 2)).min() > 0.1  # real frames, not padding, are compared


def test_motion_without_fixed_padding_would_draw_other_samples():
    """Why row_wise_draws is False there: the same halves-under-shards sampling gives other motions."""
    kwargs = {"num_inference_steps": 3, "guidance_scale": 1.0, "scheduler": "ddpm"}
    # the first half's longest motion (9) is shorter than the batch's (20)
    whole, halves = halves_under_shards(motion_adapter(pad_frames=None), "motion", lengths=[5, 9, 20, 7], **kwargs)
    assert (halves[:4, :9] - whole[:4, :9]).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------ two processes
def brightness(prompts, images):
    """A continuous reward (mean pixel value): no ties between two samples."""
    return torch.stack([image.float().mean() for image in images])


def prompt_rows() -> list[dict]:
    return [{"prompt": PROMPTS[i % 4], "row": i} for i in range(16)]


def motion_rows() -> list[dict]:
    """Ground-truth motions of 8 … 29 frames: every global batch mixes lengths, so halves pad differently."""
    return [{"prompt": sopo_case.CAPTIONS[i % 4], "response": sopo_case.motion(8 + (7 * i) % 22, i), "row": i}
            for i in range(16)]


SAMPLE = {"num_inference_steps": 3, "guidance_scale": 1.0, "scheduler": "ddpm"}
SCENARIOS = {  # name: (adapter, step, rows, samples per row and step)
    "oaif": (pixel_adapter, lambda: OAIFStep(RewardJudge(brightness), beta=5.0, sample=SAMPLE), prompt_rows, 2),
    "nash_md": (pixel_adapter, lambda: NashMDStep(RewardJudge(brightness), beta=5.0, mixture=0.5, sample=SAMPLE),
                prompt_rows, 1),
    # SoPo on variable-length motions (noise row-wise, DDIM with guidance): K = 2 negatives per caption
    "sopo": (lambda: sopo_case.make_adapter(model={"dropout": 0.0}), lambda: SoPoStep(**SOPO), motion_rows, 2),
    "sopo_batch_noise": (lambda: sopo_case.make_adapter(model={"dropout": 0.0}), lambda: BatchNoiseSoPo(**SOPO),
                         motion_rows, 2),
}
SOPO = {"reward": sopo_case.reward, "similarity": sopo_case.similarity, "num_samples": 2, "num_inference_steps": 3,
        "beta": 5.0}


class BatchNoiseSoPo(SoPoStep):
    """SoPo drawing its negatives' noise at its own batch's longest motion: negative control."""

    def draw(self, adapter, prompts, lengths, generator):
        return adapter.sample(prompts, self.num_samples, generator=generator, lengths=lengths,
                              num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                              scheduler=self.scheduler)
GLOBAL_BATCH, STEPS, LR = 8, 3, 1e-3
#: Adam divides each gradient element by its own magnitude: an element whose gradient is as small as the samples'
#: rounding noise may step the other way, by at most Adam's largest move (1 − β1)/√(1 − β2)·lr per step in each run;
#: at most 1 % of the elements (as tests/test_distributed.py bounds it for Diffusion-KTO)
WEIGHTS = Tolerance(weight_fraction=0.01, flip_size=2 * STEPS * LR * (1 - 0.9) / (1 - 0.999) ** 0.5)


def train(name: str, output_dir) -> dict:
    make_adapter, make_step, make_rows, _ = SCENARIOS[name]
    torch.manual_seed(0)
    adapter = make_adapter()
    sampled = []
    sample = adapter.sample

    def counting_sample(conditions, num_samples=1, **kwargs):
        sampled.append(len(conditions) * num_samples)
        return sample(conditions, num_samples, **kwargs)

    adapter.sample = counting_sample
    cfg = TrainConfig(output_dir=str(output_dir / name), max_steps=STEPS, batch_size=GLOBAL_BATCH,
                      gradient_accumulation_steps=1, learning_rate=LR, log_every=1, save_every=0, seed=3)
    history = Trainer(adapter, make_step(), make_rows(), cfg).train()["history"]
    weights = {k: p.detach().clone() for k, p in adapter.unwrapped_policy.named_parameters() if p.requires_grad}
    return {"history": history, "weights": weights, "sampled": sampled}


def _worker(rank: int, output_dir, result_file) -> None:
    results = {name: train(name, output_dir) for name in SCENARIOS}
    torch.save(results, f"{result_file}.{rank}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_sampling")
    run_two_processes(_worker, root / "two", root / "two.pt")
    two = [torch.load(f"{root / 'two.pt'}.{rank}", weights_only=False) for rank in (0, 1)]
    one = {name: train(name, root / "one") for name in SCENARIOS}
    return one, two


def assert_each_process_sampled_half(one: dict, two: list, name: str) -> None:
    per_call = SCENARIOS[name][3]  # OAIF: two responses per prompt; Nash-MD: one policy, one mixture draw; SoPo: K
    calls = 2 if name == "nash_md" else 1
    assert one[name]["sampled"] == [GLOBAL_BATCH * per_call] * (STEPS * calls)
    for rank in (0, 1):  # each process sampled only its own rows
        assert two[rank][name]["sampled"] == [GLOBAL_BATCH // 2 * per_call] * len(one[name]["sampled"])


@pytest.mark.parametrize("name", ["oaif", "nash_md"])
def test_two_processes_sampling_half_each_equal_one_process(runs, name):
    one, two = runs
    assert_each_process_sampled_half(one, two, name)
    for a, b in zip(one[name]["history"], two[0][name]["history"]):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=TOL, rel=TOL, nan_ok=True), (key, a, b)
    for key, w in one[name]["weights"].items():
        assert_weights_close(two[0][name]["weights"][key], w, WEIGHTS, key)
        torch.testing.assert_close(two[1][name]["weights"][key], two[0][name]["weights"][key], atol=0, rtol=0)
    losses = [h["loss"] for h in one[name]["history"]]
    assert max(losses) - min(losses) > 100 * TOL  # training moved the loss: the equality is not trivial


SOPO_SAMPLE_METRICS = ("sopo/sample_reward", "sopo/rejected_reward", "sopo/similarity", "sopo/mask_rate")


def test_sopo_processes_draw_the_one_process_negatives_of_their_captions(runs):
    """Step 1 (the initial policy on both sides): each process drew K negatives for its own captions only, and their
    rewards, similarities, worst-of-K choice and mask agree with the one-process run's, though each half pads its
    motions to its own longest. Later steps are not compared draw for draw: the embedded motion model's scoring
    noise is drawn at each batch's padded length, so its training agrees across process counts in distribution
    only (a model padded to max_frames, as the official MDM, scores row-wise too). Negative control: noise drawn
    at each batch's longest motion gives other negatives."""
    one, two = runs
    assert_each_process_sampled_half(one, two, "sopo")
    first, sharded, control = one["sopo"]["history"][0], two[0]["sopo"]["history"][0], two[0]["sopo_batch_noise"]["history"][0]
    for key in (*SOPO_SAMPLE_METRICS, "loss"):
        assert sharded[key] == pytest.approx(first[key], abs=TOL, rel=TOL), key
    assert abs(control["sopo/sample_reward"] - first["sopo/sample_reward"]) > 100 * TOL
    assert 0 < first["sopo/similarity"] < 1  # the judges saw real samples, not padding
