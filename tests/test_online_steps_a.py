"""Online steps OAIF, IPO-MD, Nash-MD, HyPO, SELM, their judges and geometric-mixture sampling.

Loss values are recomputed here from the tables / models with numpy or plain loops, redrawing the samples from the
same seeded generator; gradients are checked against their closed forms or by the direction they move the policy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genalign.adapters.tabular import TabularAdapter
from genalign.adapters.text import TextAdapter
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2
from genalign.online import draws
from genalign.online.judges import (
    LLMJudge, PreferenceMatrixJudge, RewardJudge, arithmetic_correctness, build_judge, judge_pairs,
)
from genalign.online.nash_md import nash_md
from genalign.steps import StepContext, build_step

REFERENCE = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.55, 0.05, 0.25, 0.15]])
# P[a, b] = P(a ≻ b) with ties on the diagonal and one more tie (1 vs 3)
MATRIX = np.array([[0.5, 0.8, 0.3, 0.9], [0.2, 0.5, 0.6, 0.5], [0.7, 0.4, 0.5, 0.1], [0.1, 0.5, 0.9, 0.5]])
SEED = 7


def tabular(seed=0):
    adapter = TabularAdapter(2, 4, reference_probs=REFERENCE)
    with torch.no_grad():
        adapter.policy.logits.copy_(torch.randn(2, 4, generator=torch.Generator().manual_seed(seed)))
    return adapter


def ctx(seed=SEED):
    return StepContext(generator=torch.Generator().manual_seed(seed))


def tables(adapter):
    """log π and log ref as float64 numpy tables, computed here."""
    z = adapter.policy.logits.detach().double().numpy()
    log_pi = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return log_pi, np.log(REFERENCE.double().numpy())


def redraw(probs, contexts, k, generator):
    """What the adapter's categorical draw yields for these probabilities and generator state: uniforms U [n, k],
    each turned into the number of actions whose cumulative probability is at most U (inverse CDF)."""
    probs = torch.as_tensor(probs, dtype=torch.float32)[torch.as_tensor(contexts)]
    uniform = torch.rand((probs.shape[0], k), generator=generator)
    below = (uniform[..., None] >= probs.cumsum(-1)[:, None, :]).sum(-1)
    return below.clamp(max=probs.shape[1] - 1).reshape(-1).numpy()


def mixture_probs(adapter, c):
    log_pi, log_ref = tables(adapter)
    m = np.exp(c * log_ref + (1 - c) * log_pi)
    return m / m.sum(-1, keepdims=True)


CONTEXTS = [0, 1, 0, 1, 1, 0, 0, 1]
PROMPT_ROWS = [{"prompt": c, "row": i} for i, c in enumerate(CONTEXTS)]
log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731


# ------------------------------------------------------------------------------------------ judges
def test_reward_judge_labels_ties_temperature_and_range():
    reward = lambda prompts, responses: torch.tensor([float(r) for r in responses])  # noqa: E731
    hard = RewardJudge(reward)
    assert hard(["x"] * 3, [3, 1, 2], [1, 3, 2]).tolist() == [1.0, 0.0, 0.5]
    soft = RewardJudge(reward, temperature=2.0)
    assert soft(["x"], [3], [1]).item() == pytest.approx(1 / (1 + math.exp(-1.0)))
    ranged = RewardJudge(reward, reward_range=(0, 2))
    with pytest.raises(ValueError, match=r"reward 3.0 for prompt 'q1' lies outside the declared reward_range"):
        ranged(["q0", "q1"], [1, 3], [0, 0])
    with pytest.raises(ValueError, match=r"one reward per response \(\[4\]\)"):
        RewardJudge(lambda p, r: torch.zeros(3))(["a", "b"], [0, 0], [0, 0])
    assert arithmetic_correctness(["2+3=", "10+15="], ["5", "24"]).tolist() == [1.0, 0.0]


def test_judge_pairs_rules_ties_nan_shape_range_and_unfinished():
    verdicts = torch.tensor([0.9, 0.5, float("nan"), 0.2, 0.7, 0.4])
    judge = lambda prompts, a, b: verdicts  # noqa: E731
    prompts = list("abcdef")
    ended_a = torch.tensor([True, True, True, True, False, False])
    ended_b = torch.tensor([True, True, True, True, True, False])
    lose = judge_pairs(judge, prompts, prompts, prompts, ended_a=ended_a, ended_b=ended_b)
    # pair 4: a unfinished vs b finished -> a loses (0); pair 5: both unfinished -> tie -> left out
    assert lose.valid.tolist() == [True, False, False, True, True, False]
    assert lose.prob[lose.valid].tolist() == pytest.approx([0.9, 0.2, 0.0])
    assert lose.counts == {"judge/pairs": 6.0, "judge/ties": 2.0, "judge/nan": 1.0, "judge/unfinished": 3.0,
                           "judge/valid": 3.0}
    drop = judge_pairs(judge, prompts, prompts, prompts, ended_a=ended_a, ended_b=ended_b, truncated="drop")
    assert drop.valid.tolist() == [True, False, False, True, False, False]
    keep_ties = judge_pairs(judge, prompts, prompts, prompts, ties_valid=True)
    assert keep_ties.valid.tolist() == [True, True, False, True, True, True]
    with pytest.raises(ValueError, match=r"returned shape \(6, 1\) for 6 pairs"):
        judge_pairs(lambda p, a, b: verdicts[:, None], prompts, prompts, prompts)
    with pytest.raises(ValueError, match=r"returned 1.5 for prompt 'b'"):
        judge_pairs(lambda p, a, b: torch.tensor([0.1, 1.5, 0, 0, 0, 0]), prompts, prompts, prompts)
    with pytest.raises(ValueError, match="truncated must be one of"):
        judge_pairs(judge, prompts, prompts, prompts, truncated="keep")


def test_preference_matrix_and_build_judge_from_a_config():
    judge = build_judge({"_target_": "genalign.online.judges.PreferenceMatrixJudge", "matrix": MATRIX.tolist()})
    assert judge([0, 1], [0, 2], [1, 3]).tolist() == pytest.approx([MATRIX[0, 1], MATRIX[2, 3]])
    with pytest.raises(ValueError, match=r"P\[a, b\] \+ P\[b, a\] = 1"):
        PreferenceMatrixJudge([[0.5, 0.9], [0.9, 0.5]])
    with pytest.raises(ValueError, match="judge must be a callable"):
        build_judge("best")


@pytest.fixture(scope="module")
def judge_tokenizer():
    return char_tokenizer("0123456789+= ABq:")


def test_llm_judge_compares_next_token_logits_of_a_and_b_in_both_orders(judge_tokenizer):
    model = tiny_gpt2(judge_tokenizer, n_positions=64, seed=3)
    adapter = TextAdapter(model, judge_tokenizer, reference="copy", max_length=60, max_prompt_length=40)
    template = "q:{prompt} A:{a} B:{b} :"
    judge = LLMJudge(adapter, template=template)
    prompts, a, b = ["1+2=", "10+20="], ["3", "30"], ["12", "3"]

    def p_first(prompt, x, y):  # unpadded forward of the reference copy, softmax over the two choice logits
        ids = judge_tokenizer(template.format(prompt=prompt, a=x, b=y))["input_ids"]
        with torch.no_grad():
            logits = adapter.reference_model(torch.tensor([ids])).logits[0, -1].double()
        pair = logits[[judge_tokenizer.convert_tokens_to_ids("A"), judge_tokenizer.convert_tokens_to_ids("B")]]
        return torch.softmax(pair, -1)[0].item()

    expected = [0.5 * (p_first(p, x, y) + 1 - p_first(p, y, x)) for p, x, y in zip(prompts, a, b)]
    assert judge(prompts, a, b).tolist() == pytest.approx(expected, abs=1e-5)
    one_order = LLMJudge(adapter, template=template, swap=False)(prompts, a, b)
    assert one_order.tolist() == pytest.approx([p_first(p, x, y) for p, x, y in zip(prompts, a, b)], abs=1e-5)
    with pytest.raises(ValueError, match="judge choice 'Z' is not a single known token"):
        LLMJudge(adapter, template=template, choices=("A", "Z"))(prompts, a, b)


# ------------------------------------------------------------------------------------------ mixture sampling
def test_tabular_mixture_draws_follow_the_geometric_mixture():
    adapter = tabular()
    samples = draws.draw(adapter, [0] * 20000 + [1] * 20000, 1, torch.Generator().manual_seed(0), mixture=0.3)
    expected = mixture_probs(adapter, 0.3)
    for c in (0, 1):
        freq = np.bincount(samples["action"][samples["context"] == c].numpy(), minlength=4) / 20000
        np.testing.assert_allclose(freq, expected[c], atol=0.012)


@pytest.fixture(scope="module")
def lm_tokenizer():
    return char_tokenizer("0123456789+= ")


def text_adapter(tokenizer, seed=1):
    """A tiny LM whose policy differs from its reference copy (policy weights re-drawn after copying)."""
    adapter = TextAdapter(tiny_gpt2(tokenizer, n_positions=32, seed=0), tokenizer, reference="copy",
                          max_length=24, max_prompt_length=12)
    other = tiny_gpt2(tokenizer, n_positions=32, seed=seed)
    adapter.policy.load_state_dict(other.state_dict())
    return adapter


def test_text_mixture_decodes_from_log_softmax_of_mixed_logits(lm_tokenizer):
    adapter, c = text_adapter(lm_tokenizer), 0.4
    prompts = ["1+2=", "33+44="]
    out = draws.draw(adapter, prompts, 1, None, mixture=c, do_sample=False, max_new_tokens=5)
    eos = lm_tokenizer.eos_token_id
    for prompt, got in zip(prompts, out["texts"]):
        ids = lm_tokenizer(prompt)["input_ids"]
        tokens = []
        with torch.no_grad():
            for _ in range(5):  # greedy on c*log ref + (1-c)*log pi, unpadded, one model call each
                lp = torch.log_softmax(adapter.policy(torch.tensor([ids])).logits[0, -1].double(), -1)
                lr = torch.log_softmax(adapter.reference_model(torch.tensor([ids])).logits[0, -1].double(), -1)
                token = int(torch.argmax(c * lr + (1 - c) * lp))
                ids, tokens = ids + [token], tokens + [token]
                if token == eos:
                    break
        assert got == lm_tokenizer.decode(tokens, skip_special_tokens=True)


def test_ended_marks_generations_cut_by_the_length_limit(lm_tokenizer):
    adapter = text_adapter(lm_tokenizer)
    out = draws.draw(adapter, ["1+2="] * 16, 1, torch.Generator().manual_seed(0), max_new_tokens=1)
    finished = draws.ended(adapter, out)
    last = [int(ids[mask.bool()][-1]) for ids, mask in zip(out["input_ids"], out["loss_mask"])]
    assert finished.tolist() == [token == lm_tokenizer.eos_token_id for token in last]
    assert (~finished).any()


def test_image_mixture_denoises_with_the_mixed_prediction():
    from diffusers.utils.torch_utils import randn_tensor
    from tiny_pixel import pixel_adapter

    from genalign.adapters.diffusion_scores import sampling_scheduler

    adapter, c = pixel_adapter(), 0.3
    with torch.no_grad():
        for p in adapter.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    prompts = ["a cat", "a dog"]
    got = draws.draw(adapter, prompts, 1, torch.Generator().manual_seed(0), mixture=c, num_inference_steps=3,
                     guidance_scale=1.0, scheduler="ddim")["x0"]
    assert adapter.policy.training  # the policy's mode is restored
    cond = adapter.encode_prompts(prompts)["cond"]
    sched = sampling_scheduler("ddim", adapter.noise_scheduler.config)
    sched.set_timesteps(3)
    x = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    adapter.policy.eval()
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((2,), int(t))
            pred = [net(x, tt, encoder_hidden_states=cond).sample for net in (adapter.reference, adapter.policy)]
            x = sched.step(c * pred[0] + (1 - c) * pred[1], t, x).prev_sample
    adapter.policy.train()
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-4)
    plain = adapter.sample(prompts, 1, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                           guidance_scale=1.0, scheduler="ddim")["x0"]
    assert (plain - got).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ steps: loss values
def dpo_np(log_pi, log_ref, ctx_, w, l, beta):
    delta = (log_pi[ctx_, w] - log_ref[ctx_, w]) - (log_pi[ctx_, l] - log_ref[ctx_, l])
    return -log_sigmoid(beta * delta), delta


def judged(adapter, mixture, generator):
    """Redraw two actions per row (policy or mixture) and orient them by MATRIX; ties left out."""
    probs = mixture_probs(adapter, mixture)
    actions = redraw(probs, CONTEXTS, 2, generator).reshape(-1, 2)
    out = []
    for c, (a, b) in zip(CONTEXTS, actions):
        if MATRIX[a, b] != 0.5:
            out.append((c, a, b) if MATRIX[a, b] > 0.5 else (c, b, a))
    return out


def kept(loss, n_kept):
    """The per-pair losses of the kept pairs: a judged step returns one loss per row, left-out pairs weighted 0 and
    kept ones N / K, so that its mean is the mean over the kept pairs (genalign.online.global_batch)."""
    values = np.asarray(loss.detach().numpy() if isinstance(loss, torch.Tensor) else loss)
    return values[np.abs(values) > 1e-6] * n_kept / len(values)  # left-out: 0 (up to the float noise of a sum)


def test_oaif_dpo_loss_on_judged_policy_pairs_and_its_gradient_direction():
    adapter = tabular()
    step = build_step("oaif", judge=PreferenceMatrixJudge(MATRIX), objective="dpo", beta=0.5)
    loss, metrics = step(adapter, PROMPT_ROWS, ctx())
    log_pi, log_ref = tables(adapter)
    pairs = judged(adapter, 0.0, torch.Generator().manual_seed(SEED))
    assert 0 < len(pairs) < len(PROMPT_ROWS)  # some ties were left out
    expected = [dpo_np(log_pi, log_ref, c, w, l, 0.5)[0] for c, w, l in pairs]
    np.testing.assert_allclose(kept(loss, len(pairs)), expected, rtol=1e-5)
    np.testing.assert_allclose(loss.mean().item(), np.mean(expected), rtol=1e-5)
    assert metrics["judge/valid"] == len(pairs) and metrics["judge/ties"] == len(PROMPT_ROWS) - len(pairs)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    loss.mean().backward()
    optimizer.step()
    after, _ = tables(adapter)
    for c, w, l in pairs:  # every judged pair's log-ratio moved toward its chosen action
        assert after[c, w] - after[c, l] > log_pi[c, w] - log_pi[c, l]


def test_ipo_md_ipo_loss_on_mixture_pairs():
    adapter = tabular(1)
    step = build_step("ipo_md", judge=PreferenceMatrixJudge(MATRIX), beta=0.25, mixture=0.4)
    loss, _ = step(adapter, PROMPT_ROWS, ctx())
    log_pi, log_ref = tables(adapter)
    pairs = judged(adapter, 0.4, torch.Generator().manual_seed(SEED))
    expected = [(dpo_np(log_pi, log_ref, c, w, l, 0.25)[1] - 1 / (2 * 0.25)) ** 2 for c, w, l in pairs]
    np.testing.assert_allclose(kept(loss, len(pairs)), expected, rtol=1e-5)


def test_soft_preference_oaif_uses_the_judge_probability_as_strength():
    adapter = tabular(2)
    step = build_step("oaif", judge=PreferenceMatrixJudge(MATRIX), objective="soft_preference", beta=0.5)
    loss, _ = step(adapter, PROMPT_ROWS, ctx())
    log_pi, log_ref = tables(adapter)
    expected = []
    for c, w, l in judged(adapter, 0.0, torch.Generator().manual_seed(SEED)):
        _, delta = dpo_np(log_pi, log_ref, c, w, l, 0.5)
        p = MATRIX[w, l]
        expected.append(-(p * log_sigmoid(0.5 * delta) + (1 - p) * log_sigmoid(-0.5 * delta)))
    np.testing.assert_allclose(kept(loss, len(expected)), expected, rtol=1e-5)


def test_nash_md_reinforce_loss_and_gradient_against_the_closed_form():
    adapter, beta, c = tabular(3), 0.3, 0.25
    step = build_step("nash_md", judge=PreferenceMatrixJudge(MATRIX), beta=beta, mixture=c)
    loss, metrics = step(adapter, PROMPT_ROWS, ctx())
    log_pi, log_ref = tables(adapter)
    g = torch.Generator().manual_seed(SEED)
    own = redraw(np.exp(log_pi), CONTEXTS, 1, g)
    opponent = redraw(mixture_probs(adapter, c), CONTEXTS, 1, g)
    pi = np.exp(log_pi)
    advantage = np.array([MATRIX[y, o] - 0.5 - beta * (log_pi[x, y] - log_ref[x, y])
                          for x, y, o in zip(CONTEXTS, own, opponent)])
    lp = np.array([log_pi[x, y] for x, y in zip(CONTEXTS, own)])
    np.testing.assert_allclose(loss.detach().numpy(), -advantage * lp, rtol=1e-5)
    assert metrics["nash_md/preference"].item() == pytest.approx(np.mean([MATRIX[y, o] for y, o in zip(own, opponent)]))
    loss.sum().backward()  # d/dz of −A·log π(y|x) = −A·(e_y − π(·|x)) in row x
    expected = np.zeros((2, 4))
    for x, y, a in zip(CONTEXTS, own, advantage):
        expected[x] -= a * (np.eye(4)[y] - pi[x])
    np.testing.assert_allclose(adapter.policy.logits.grad.numpy(), expected, atol=1e-6)


def test_nash_md_function_checks_preferences():
    with pytest.raises(ValueError, match="preference must lie in"):
        nash_md(torch.zeros(2), torch.zeros(2), torch.tensor([0.2, 1.2]))


OFFLINE = [{"prompt": c, "chosen": w, "rejected": l, "row": i}
           for i, (c, w, l) in enumerate([(0, 3, 1), (1, 0, 2), (0, 2, 0), (1, 1, 3), (0, 1, 2), (1, 2, 0)])]
OFFLINE_CONTEXTS = [r["prompt"] for r in OFFLINE]


def test_hypo_loss_is_dpo_plus_the_kl_surrogate_on_own_samples():
    adapter, beta, lam = tabular(4), 0.4, 0.7
    loss, metrics = build_step("hypo", beta=beta, lam=lam)(adapter, OFFLINE, ctx())
    log_pi, log_ref = tables(adapter)
    own = redraw(np.exp(log_pi), OFFLINE_CONTEXTS, 1, torch.Generator().manual_seed(SEED))
    expected = [dpo_np(log_pi, log_ref, r["prompt"], r["chosen"], r["rejected"], beta)[0]
                + lam * (log_pi[x, y] - log_ref[x, y]) * log_pi[x, y]
                for r, x, y in zip(OFFLINE, OFFLINE_CONTEXTS, own)]
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)
    kl = np.mean([log_pi[x, y] - log_ref[x, y] for x, y in zip(OFFLINE_CONTEXTS, own)])
    assert metrics["hypo/kl"].item() == pytest.approx(kl, rel=1e-5)


def test_hypo_online_kl_pulls_the_policy_toward_the_reference():
    adapter = tabular(5)
    same = [{"prompt": i % 2, "chosen": 0, "rejected": 0, "row": i} for i in range(4000)]  # DPO gradient exactly 0
    before = adapter.kl_to_reference().detach().clone()
    loss, _ = build_step("hypo", beta=0.1, lam=1.0)(adapter, same, ctx())
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    loss.mean().backward()
    optimizer.step()
    assert (adapter.kl_to_reference() < before).all()


def test_selm_loss_is_dpo_plus_optimism_on_reference_samples_which_lowers_their_likelihood():
    adapter, beta, alpha = tabular(6), 0.4, 0.5
    loss, _ = build_step("selm", beta=beta, alpha=alpha)(adapter, OFFLINE, ctx())
    log_pi, log_ref = tables(adapter)
    from_ref = redraw(REFERENCE.numpy(), OFFLINE_CONTEXTS, 1, torch.Generator().manual_seed(SEED))
    expected = [dpo_np(log_pi, log_ref, r["prompt"], r["chosen"], r["rejected"], beta)[0]
                + alpha * beta * (log_pi[x, y] - log_ref[x, y]) for r, x, y in zip(OFFLINE, OFFLINE_CONTEXTS, from_ref)]
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)

    same = [{"prompt": i % 2, "chosen": 0, "rejected": 0, "row": i} for i in range(4000)]
    expected_ref_logp = lambda: (adapter.reference_probs() * adapter.policy.log_probs()).sum(-1)  # noqa: E731
    before = expected_ref_logp().detach().clone()
    loss, _ = build_step("selm", beta=1.0, alpha=1.0)(adapter, same, ctx())
    torch.optim.SGD(adapter.trainable_parameters(), lr=0.5).zero_grad()
    loss.mean().backward()
    torch.optim.SGD(adapter.trainable_parameters(), lr=0.5).step()
    assert (expected_ref_logp() < before).all()  # E_ref[log π] went down: optimism explores away from ref


def test_all_ties_give_a_zero_loss_and_bad_settings_raise():
    adapter = tabular()
    tie = lambda prompts, a, b: torch.full((len(prompts),), 0.5)  # noqa: E731
    loss, metrics = build_step("oaif", judge=tie)(adapter, PROMPT_ROWS, ctx())
    assert loss.abs().sum() == 0 and loss.requires_grad and metrics["judge/valid"] == 0
    with pytest.raises(ValueError, match="is not pairwise"):
        build_step("oaif", judge=tie, objective="kto")
    with pytest.raises(ValueError, match=r"mixture must lie in \[0.0, 1.0\]"):
        build_step("nash_md", judge=tie, mixture=1.5)
    with pytest.raises(ValueError, match="does not take"):
        build_step("hypo", judge=tie)
    with pytest.raises(ValueError, match="have no 'prompt' field"):
        build_step("nash_md", judge=tie)(adapter, [{"row": 3}], ctx())


def test_selm_with_a_judge_uses_online_pairs_then_reference_samples():
    adapter, beta, alpha = tabular(7), 0.5, 0.2
    step = build_step("selm", beta=beta, alpha=alpha, judge=PreferenceMatrixJudge(MATRIX))
    loss, metrics = step(adapter, PROMPT_ROWS, ctx())
    log_pi, log_ref = tables(adapter)
    g = torch.Generator().manual_seed(SEED)
    pairs = judged(adapter, 0.0, g)  # the two policy samples per row come first, then one reference sample per row
    from_ref = redraw(REFERENCE.numpy(), CONTEXTS, 1, g)
    dpo = [dpo_np(log_pi, log_ref, c, w, l, beta)[0] for c, w, l in pairs]
    optimism = np.array([alpha * beta * (log_pi[x, y] - log_ref[x, y]) for x, y in zip(CONTEXTS, from_ref)])
    np.testing.assert_allclose(kept(loss.detach().numpy() - optimism, len(pairs)), dpo, rtol=1e-4)
    np.testing.assert_allclose(loss.mean().item(), np.mean(dpo) + optimism.mean(), rtol=1e-5)
    assert metrics["judge/valid"] == len(pairs)


def test_motion_mixture_denoises_with_the_mixed_guided_prediction():
    from diffusers.utils.torch_utils import randn_tensor

    from genalign.adapters.diffusion_scores import sampling_scheduler
    from genalign.adapters.motion import MotionAdapter
    from genalign.models.mdm import MotionDenoiser, MotionDenoiserConfig

    table = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    text = lambda captions: table[torch.tensor([0 if c == "walk" else 1 for c in captions])]  # noqa: E731
    config = MotionDenoiserConfig(feature_dim=263, cond_dim=384, d_model=32, num_layers=2, num_heads=2, ff_dim=64,
                                  dropout=0.1, max_frames=16)
    torch.manual_seed(0)
    adapter, c = MotionAdapter(MotionDenoiser(config), text), 0.3
    with torch.no_grad():
        for p in adapter.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    options = dict(lengths=[8, 12], num_inference_steps=3, guidance_scale=2.0, scheduler="ddim")
    got = draws.draw(adapter, ["walk", "jump"], 1, torch.Generator().manual_seed(0), mixture=c, **options)["motion"]
    sched = sampling_scheduler("ddim", adapter.noise_scheduler.config)
    sched.set_timesteps(3)
    mask = torch.arange(12)[None] < torch.tensor([[8], [12]])
    cond = text(["walk", "jump"])
    # online draws take their noise row-wise: drawn at max_frames (16) and cut to the batch's 12 frames
    x = randn_tensor((2, 16, 263), generator=torch.Generator().manual_seed(0))[:, :12] * sched.init_noise_sigma
    policy, reference = adapter.unwrapped_policy.eval(), adapter.reference.eval()
    with torch.no_grad():
        for t in sched.timesteps:
            tt, x_in = t.expand(2), sched.scale_model_input(x, t)
            pred = c * reference.guided(x_in, tt, cond, mask, 2.0) + (1 - c) * policy.guided(x_in, tt, cond, mask, 2.0)
            x = sched.step(pred, t, x).prev_sample
    torch.testing.assert_close(got, x * mask.unsqueeze(-1), atol=1e-5, rtol=1e-4)
