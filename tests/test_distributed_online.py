"""Online steps on two CPU processes (gloo) train exactly like one process with the same global batch: per-step
losses, every logged metric and the final weights agree to 1e-5 for OAIF, Nash-MD, HyPO, SELM, PMPO (reference
samples for its KL) and DRO (with its value network) on the tabular adapter, and Nash-MD and DR-PO on the embedded
tiny arithmetic LM (policy, per-token mixture and reset-prefix answers sampled with generate(), judged by the
arithmetic verifier).

What makes them equal (genalign.online.global_batch): each process samples only its rows, from the random numbers
the one-process run draws for them (tabular: inverse-CDF uniforms ``[rows, K]``; text: one seed per generated
sequence, then a stream of its own), rows the judge leaves out (OAIF ties) are weighted so the loss is the mean over
the global batch's kept rows, PMPO's accepted/rejected normalisation uses the global accepted fraction, and counts
are summed over the processes. Two negative controls show the first and the third matter: OAIF drawing its rows'
numbers as if it were alone (so both processes draw the same ones), and PMPO normalising by its own share's accepted
fraction, both differ from the one-process run.
"""

from __future__ import annotations

import pytest
import torch
from test_train import pair_rows
from two_processes import run_two_processes

from genalign.adapters.tabular import TabularAdapter
from genalign.adapters.text import TextAdapter
from genalign.data.arithmetic import TINY_LM_PATH
from genalign.online.dro import DROStep
from genalign.online.drpo import DRPOStep
from genalign.online.hypo import HyPOStep
from genalign.online.judges import PreferenceMatrixJudge, RewardJudge, arithmetic_correctness
from genalign.online.nash_md import NashMDStep
from genalign.online.oaif import OAIFStep
from genalign.online.pmpo import PMPOStep
from genalign.online.selm import SELMStep
from genalign.steps import StepContext
from genalign.train import Trainer, TrainConfig

TOL = 1e-5
STEPS = 3
GLOBAL_BATCH = 8
#: reward of action a in context c: two actions share the best reward, so equal-reward pairs (ties) are common
REWARD = torch.tensor([[1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.2], [0.3, 0.0, 1.0, 1.0]])
#: a cyclic preference over 4 actions (no Condorcet winner)
CYCLE = torch.tensor([[0.5, 0.8, 0.3, 0.6], [0.2, 0.5, 0.9, 0.4], [0.7, 0.1, 0.5, 0.7], [0.4, 0.6, 0.3, 0.5]])


def table_reward(prompts, responses):
    return REWARD[torch.as_tensor(prompts), torch.as_tensor(responses)]


class LocalDrawsOAIF(OAIFStep):
    """OAIF drawing its share's random numbers as if it were alone (not sliced out of the global batch's):
    negative control."""

    def __call__(self, adapter, rows, ctx):
        with ctx.shard.remap(None):
            return super().__call__(adapter, rows, ctx)


class LocalFractionPMPO(PMPOStep):
    """PMPO normalising by this process's accepted fraction (and logging local means): negative control."""

    def __call__(self, adapter, rows, ctx):
        return super().__call__(adapter, rows, StepContext(ctx.generator, shard=ctx.shard))


def prompt_rows(n: int = 24) -> list[dict]:
    return [{"prompt": i % 3, "row": i} for i in range(n)]


def sum_rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"{7 * i % 50}+{13 * i % 40}=", "row": i} for i in range(n)]


def sum_pairs(n: int = 24) -> list[dict]:
    """Prompts with their correct sum preferred over sum + 1 (DR-PO resets to prefixes of the preferred one)."""
    rows = []
    for row in sum_rows(n):
        total = sum(map(int, row["prompt"][:-1].split("+")))
        rows.append({**row, "chosen": str(total), "rejected": str(total + 1)})
    return rows


def tabular():
    return TabularAdapter(3, 4)


def tiny_lm():
    """The embedded arithmetic LM (no dropout). Its attention's query/key/value bias stays frozen: the key bias has an
    analytically zero gradient (softmax is shift-invariant), so Adam would turn its rounding noise, which depends
    on the order of the sums, into full-size steps in either run (the same holds, rarely, for a weight whose gradient
    is ~1e-9: small learning rates keep that below the tolerance)."""
    adapter = TextAdapter.from_pretrained(str(TINY_LM_PATH), reference="copy", max_length=24, max_prompt_length=12)
    for name, p in adapter.policy.named_parameters():
        if name.endswith("attn.c_attn.bias"):
            p.requires_grad_(False)
    return adapter


VERIFIER = RewardJudge(arithmetic_correctness)
SHORT = {"max_new_tokens": 4}


def rated_rows(n: int = 24) -> list[dict]:
    """One action per row with its reward and a thumbs up (reward >= 0.5), unevenly spread over the rows."""
    rows = []
    for i in range(n):
        c, a = i % 3, (i * 7 + i // 5) % 4
        rows.append({"prompt": c, "response": a, "reward": float(REWARD[c, a]), "desirable": bool(REWARD[c, a] >= 0.5),
                     "row": i})
    return rows


SCENARIOS = {
    # name: (adapter factory, step factory, rows factory, learning rate)
    "oaif": (tabular, lambda: OAIFStep(RewardJudge(table_reward), beta=0.5), prompt_rows, 0.5),
    "oaif_local_draws": (tabular, lambda: LocalDrawsOAIF(RewardJudge(table_reward), beta=0.5), prompt_rows, 0.5),
    "nash_md": (tabular, lambda: NashMDStep(PreferenceMatrixJudge(CYCLE), beta=0.2, mixture=0.25), prompt_rows, 0.5),
    "hypo": (tabular, lambda: HyPOStep(beta=0.5, lam=0.5), lambda: pair_rows(24), 0.5),
    "selm": (tabular, lambda: SELMStep(beta=0.5, alpha=0.5), lambda: pair_rows(24), 0.5),
    "pmpo": (tabular, lambda: PMPOStep(alpha=0.7, beta=0.3, kl_samples=2), rated_rows, 0.5),
    "pmpo_local_fraction": (tabular, lambda: LocalFractionPMPO(alpha=0.7, beta=0.3, kl_samples=2), rated_rows, 0.5),
    "dro": (tabular, lambda: DROStep(tau=0.5, value_lr=0.1, value_buckets=64, reward_range=[0.0, 1.0]), rated_rows,
            0.5),
    # text: generate() for the policy's answers and the per-token geometric mixture's, judged by the verifier
    "text_nash_md": (tiny_lm, lambda: NashMDStep(VERIFIER, beta=0.1, mixture=0.25, sample=SHORT), sum_rows, 1e-3),
    "text_drpo": (tiny_lm, lambda: DRPOStep(arithmetic_correctness, num_samples=2, beta=0.1, reward_range=[0.0, 1.0],
                                            sample_kwargs={**SHORT, "temperature": 2.0}), sum_pairs, 3e-4),
}


def train(name: str, output_dir) -> dict:
    """Train a scenario; returns the per-step history and the final weights (the DRO value network's included)."""
    make_adapter, make_step, make_rows, lr = SCENARIOS[name]
    torch.manual_seed(0)
    adapter, step = make_adapter(), make_step()
    cfg = TrainConfig(output_dir=str(output_dir / name), max_steps=STEPS, batch_size=GLOBAL_BATCH,
                      gradient_accumulation_steps=2, learning_rate=lr, log_every=1, save_every=0, seed=3)
    history = Trainer(adapter, step, make_rows(), cfg).train()["history"]
    weights = {k: p.detach().clone() for k, p in adapter.unwrapped_policy.named_parameters() if p.requires_grad}
    if isinstance(step, DROStep):
        weights.update({f"value.{k}": p.detach().clone() for k, p in step.value.named_parameters()})
    return {"history": history, "weights": weights}


def _worker(rank: int, output_dir, result_file) -> None:
    results = {name: train(name, output_dir) for name in SCENARIOS}
    if rank == 0:
        torch.save(results, result_file)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_online")
    run_two_processes(_worker, root / "two", root / "two.pt")
    two = torch.load(root / "two.pt", weights_only=False)
    one = {name: train(name, root / "one") for name in SCENARIOS}
    return one, two


def assert_same_run(one: dict, two: dict) -> None:
    """Every logged value of every step (loss, judge counts, metrics) and every final weight agree to TOL."""
    assert [h["step"] for h in two["history"]] == list(range(1, STEPS + 1))
    for a, b in zip(one["history"], two["history"]):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=TOL, rel=TOL, nan_ok=True), (key, a, b)
    assert set(one["weights"]) == set(two["weights"])
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["oaif", "nash_md", "hypo", "selm", "pmpo", "dro", "text_nash_md", "text_drpo"])
def test_two_processes_equal_one_process(runs, name):
    one, two = runs
    assert_same_run(one[name], two[name])
    losses = [h["loss"] for h in one[name]["history"]]
    assert max(losses) - min(losses) > 100 * TOL  # training moved the loss: the equality is not trivial


def test_oaif_left_out_ties_are_weighted_over_the_global_batch(runs):
    """Some pairs tie (equal rewards) and are left out: the loss is still the one-process mean over kept pairs."""
    one, _ = runs
    history = one["oaif"]["history"]
    assert all(h["judge/pairs"] == GLOBAL_BATCH for h in history)
    assert any(0 < h["judge/ties"] < GLOBAL_BATCH for h in history)
    assert all(h["judge/valid"] + h["judge/ties"] == GLOBAL_BATCH for h in history)


@pytest.mark.parametrize("control, name", [("oaif_local_draws", "oaif"), ("pmpo_local_fraction", "pmpo")])
def test_per_process_draws_or_normalisation_differ_from_one_process(runs, control, name):
    one, two = runs
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one[name]["history"], two[control]["history"])]
    assert max(diffs) > 100 * TOL
    # in one process the controls are the real steps
    assert [h["loss"] for h in one[control]["history"]] == pytest.approx([h["loss"] for h in one[name]["history"]])
