"""SeRA and OSP steps on the exact tabular adapter: losses against numpy recomputations (the policy's own samples
re-drawn from a copy of the step's generator), selection/pairing rules, exact resume, bad input."""

import numpy as np
import pytest
import torch
from test_online_steps_a import redraw

from genalign.adapters.tabular import TabularAdapter
from genalign.online.judges import PreferenceMatrixJudge
from genalign.online.osp import OSPStep, ranked_pairs
from genalign.online.sera import SeRAStep
from genalign.steps import StepContext, build_step
from genalign.train import Trainer, TrainConfig

REFERENCE = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.55, 0.05, 0.25, 0.15]])
PAIRS = [{"prompt": 0, "chosen": 0, "rejected": 3, "row": 0}, {"prompt": 0, "chosen": 2, "rejected": 1, "row": 1},
         {"prompt": 1, "chosen": 1, "rejected": 0, "row": 2}, {"prompt": 1, "chosen": 3, "rejected": 2, "row": 3}]


def logits(seed):
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))


def set_policy(adapter, table):
    with torch.no_grad():
        adapter.policy.logits.copy_(table)


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_dpo(beta, lp, lr, w, l, c):
    """−log σ(β[(π_w − ref_w) − (π_l − ref_l)]) for context c, actions w (chosen) and l (rejected)."""
    x = beta * ((lp[c, w] - lr[c, w]) - (lp[c, l] - lr[c, l]))
    return np.log1p(np.exp(-x))


def same_state(generator):
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    return copy


LOG_REF = np.log(REFERENCE.double().numpy())


# ------------------------------------------------------------------------------------------------ SeRA
def test_sera_round_zero_is_dpo_on_every_pair():
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    set_policy(adapter, logits(0))
    loss, metrics = SeRAStep(beta=0.5, top_fraction=0.5)(adapter, PAIRS, StepContext(torch.Generator()))
    lp = np_log_softmax(logits(0))
    np.testing.assert_allclose(loss.detach().numpy(), [np_dpo(0.5, lp, LOG_REF, r["chosen"], r["rejected"], r["prompt"])
                                                       for r in PAIRS], rtol=1e-5)
    assert metrics["sera/round"] == 0.0


def test_sera_selects_by_the_snapshot_margin_and_bootstraps_its_own_pairs():
    beta, k = 0.5, 5
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    step = SeRAStep(beta=beta, top_fraction=0.5, round_steps=3, num_samples=k)
    set_policy(adapter, logits(1))  # π_1, frozen at the end of round 0
    step.on_optimizer_step(adapter, 3)
    assert step.round == 1
    set_policy(adapter, logits(2))  # the live policy has moved on
    generator = torch.Generator().manual_seed(5)
    replay = same_state(generator)
    loss, metrics = step(adapter, PAIRS, StepContext(generator))

    snap, live = np_log_softmax(logits(1)), np_log_softmax(logits(2))
    margins = [beta * ((snap[r["prompt"], r["chosen"]] - LOG_REF[r["prompt"], r["chosen"]])
                       - (snap[r["prompt"], r["rejected"]] - LOG_REF[r["prompt"], r["rejected"]])) for r in PAIRS]
    kept = np.argsort(margins)[::-1][:2]
    expected = [np_dpo(beta, live, LOG_REF, PAIRS[i]["chosen"], PAIRS[i]["rejected"], PAIRS[i]["prompt"]) for i in kept]
    # bootstrapping: K draws per prompt from π_1, best/worst by π_1's implicit reward, DPO of the live policy
    probs = torch.softmax(logits(1), -1)[torch.tensor([r["prompt"] for r in PAIRS])]
    drawn = redraw(probs, range(len(PAIRS)), k, replay).reshape(len(PAIRS), k)
    for r, actions in zip(PAIRS, drawn):
        c = r["prompt"]
        implicit = [snap[c, a] - LOG_REF[c, a] for a in actions]
        if max(implicit) > min(implicit):
            expected.append(np_dpo(beta, live, LOG_REF, actions[int(np.argmax(implicit))],
                                   actions[int(np.argmin(implicit))], c))
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)
    assert metrics["sera/kept"] == 2.0 and metrics["sera/bootstrap/pairs"] == len(expected) - 2


def test_sera_resume_is_exact(tmp_path):
    def run(out, steps):
        adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
        step = SeRAStep(beta=0.5, top_fraction=0.5, round_steps=2, num_samples=3)
        cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=2, learning_rate=0.1, save_every=3,
                          log_every=1)
        Trainer(adapter, step, PAIRS, cfg).train()
        return adapter.policy.logits.detach().clone(), step.round

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6)
    assert torch.equal(straight[0], resumed[0]) and straight[1] == resumed[1] == 3


def test_sera_bad_parameters():
    with pytest.raises(ValueError, match="top_fraction"):
        build_step("sera", top_fraction=0.0)
    with pytest.raises(ValueError, match="num_samples must be 0"):
        build_step("sera", num_samples=1)
    with pytest.raises(ValueError, match="round_steps"):
        build_step("sera", round_steps=0)


# ------------------------------------------------------------------------------------------------ OSP
def test_ranked_pairs_orders_every_untied_pair_better_first():
    judged = torch.tensor([[0.2, 0.9, 0.2], [1.0, 1.0, 1.0]])
    prompt, better, worse = ranked_pairs(judged)
    got = sorted(zip(prompt.tolist(), better.tolist(), worse.tolist()))
    assert got == [(0, 1, 0), (0, 1, 2)]  # (0, 2) tie and the all-tied prompt are left out


def test_osp_likelihood_judge_loss_matches_numpy():
    beta, temperature, k = 0.4, 0.5, 4
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    set_policy(adapter, logits(3))
    generator = torch.Generator().manual_seed(11)
    replay = same_state(generator)
    rows = [{"prompt": 0}, {"prompt": 1}]
    loss, metrics = OSPStep(k, beta, temperature=temperature)(adapter, rows, StepContext(generator))
    lp = np_log_softmax(logits(3))
    drawn = redraw(torch.softmax(logits(3), -1), [0, 1], k, replay).reshape(2, k)
    expected = []
    for c, actions in enumerate(drawn):
        for i in range(k):
            for j in range(i + 1, k):
                si, sj = lp[c, actions[i]], lp[c, actions[j]]
                if si == sj:
                    continue
                w, l = (actions[i], actions[j]) if si > sj else (actions[j], actions[i])
                p = 1 / (1 + np.exp(-abs(si - sj) / temperature))
                x = beta * ((lp[c, w] - LOG_REF[c, w]) - (lp[c, l] - LOG_REF[c, l]))
                expected.append(-(p * -np.log1p(np.exp(-x)) + (1 - p) * -np.log1p(np.exp(x))))
    np.testing.assert_allclose(sorted(loss.detach().numpy()), sorted(expected), rtol=1e-5)
    assert metrics["osp/pairs"] == len(expected)


def test_osp_offline_weight_adds_dpo_on_the_rows_own_pairs():
    """λ > 0: the online soft-preference losses (the same draws as λ = 0) followed by λ × DPO of every row's offline
    pair, which is what teaches the model's own judgement the preferences."""
    beta, lam = 0.4, 0.5
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    set_policy(adapter, logits(3))
    online, _ = OSPStep(4, beta)(adapter, PAIRS, StepContext(torch.Generator().manual_seed(2)))
    loss, metrics = OSPStep(4, beta, offline_weight=lam)(adapter, PAIRS, StepContext(torch.Generator().manual_seed(2)))
    lp = np_log_softmax(logits(3))
    offline = [lam * np_dpo(beta, lp, LOG_REF, r["chosen"], r["rejected"], r["prompt"]) for r in PAIRS]
    np.testing.assert_allclose(loss.detach().numpy(), [*online.detach().numpy(), *offline], rtol=1e-5)
    assert metrics["osp/offline_loss"] == pytest.approx(np.mean(offline) / lam, rel=1e-5)
    with pytest.raises(ValueError, match="chosen"):  # λ > 0 needs the rows' pairs
        OSPStep(4, beta, offline_weight=lam)(adapter, [{"prompt": 0, "row": 7}], StepContext(torch.Generator()))


def test_osp_pairwise_judge_gives_borda_scores():
    matrix = torch.tensor([[0.5, 0.9, 0.8, 0.7], [0.1, 0.5, 0.6, 0.3], [0.2, 0.4, 0.5, 0.5], [0.3, 0.7, 0.5, 0.5]])
    adapter = TabularAdapter(1, 4)
    step = OSPStep(4, judge=PreferenceMatrixJudge(matrix))
    samples = {"context": torch.zeros(4, dtype=torch.long), "action": torch.tensor([0, 1, 2, 3])}
    scores = adapter.score(samples)
    from genalign.online.self_pairs import grouped

    judged = step.judgement(adapter, [0], samples, grouped(scores, 1, 4))
    expected = (matrix.sum(1) - 0.5) / 3  # mean probability of beating the other three
    torch.testing.assert_close(judged[0], expected.float())


def test_osp_bad_parameters():
    with pytest.raises(ValueError, match="num_samples"):
        build_step("osp", num_samples=1)
    with pytest.raises(ValueError, match="judge must be"):
        build_step("osp", judge="the model, somehow")
    with pytest.raises(ValueError, match="offline_weight"):
        build_step("osp", offline_weight=-1.0)
