"""Multi-turn DPO and KTO on trajectories: only assistant turns are scored (tool turns masked), losses equal an
independent token-level computation, and the arithmetic trajectory data are what they claim."""

import json

import pytest
import torch

from genalign.adapters.text import TextAdapter
from genalign.data.arithmetic import TINY_LM_PATH, parse_prompt
from genalign.data.multiturn import ARITHMETIC_CHAT_TEMPLATE, arithmetic_trajectories
from genalign.data.text import read_pairwise
from genalign.objectives import dpo, kto
from genalign.steps import StepContext, build_step

ROW = {"prompt": [{"role": "user", "content": "12+34="}],
       "chosen": [{"role": "assistant", "content": "46"}, {"role": "tool", "content": "7+8="},
                  {"role": "assistant", "content": "15"}],
       "rejected": [{"role": "assistant", "content": "36"}, {"role": "tool", "content": "7+8="},
                    {"role": "assistant", "content": "15"}], "row": 0}


@pytest.fixture(scope="module")
def adapter():
    adapter = TextAdapter.from_pretrained(TINY_LM_PATH, reference="copy", max_length=48, max_prompt_length=16,
                                          chat_template=ARITHMETIC_CHAT_TEMPLATE)
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not all zero
        for p in adapter.policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return adapter


def by_hand(adapter, texts):
    """Token ids and loss mask built independently: [bos] + each message's characters, EOS after assistant turns;
    scored = the assistant turns' tokens and their EOS. ``texts`` = [(role, content), ...]."""
    tok = adapter.tokenizer
    ids, mask = [tok.bos_token_id], [0]
    for role, content in texts:
        piece = tok(content, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if role == "assistant" else [])
        ids += piece
        mask += [int(role == "assistant")] * len(piece)
    return ids, mask


def logp(model, ids, mask):
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=ids_t).logits[0, :-1].double()
    token = torch.log_softmax(logits, -1).gather(-1, ids_t[0, 1:, None]).squeeze(-1)
    return float((token * torch.tensor(mask[1:], dtype=torch.float64)).sum())


def conversation(row, side):
    return [(m["role"], m["content"]) for m in row["prompt"] + row[side]]


def test_tool_turns_are_masked_out_of_the_scored_tokens(adapter):
    for side in ("chosen", "rejected"):
        ids, mask = adapter.encode({"prompt": ROW["prompt"], "response": ROW[side]})
        assert (ids, mask) == by_hand(adapter, conversation(ROW, side))
        scored = adapter.tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert scored.replace("<eos>", "|") == f"{ROW[side][0]['content']}|15|"  # never the tool's "7+8="


def test_multiturn_dpo_equals_token_level_computation(adapter):
    step = build_step("dpo", beta=0.5)
    loss, _ = step(adapter, [ROW], StepContext(generator=torch.Generator()))
    scores = {side: {name: logp(model, *by_hand(adapter, conversation(ROW, side)))
                     for name, model in (("policy", adapter.policy), ("reference", adapter.reference_model))}
              for side in ("chosen", "rejected")}
    expected = dpo(*(torch.tensor([scores[s][m]]) for s, m in (("chosen", "policy"), ("rejected", "policy"),
                                                               ("chosen", "reference"), ("rejected", "reference"))),
                   beta=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_multiturn_kto_scores_whole_trajectories(adapter):
    rows = [{"prompt": ROW["prompt"], "response": ROW["chosen"], "desirable": True, "row": 0},
            {"prompt": ROW["prompt"], "response": ROW["rejected"], "desirable": False, "row": 1}]
    loss, _ = build_step("kto", beta=0.3)(adapter, rows, StepContext(generator=torch.Generator()))
    r = torch.tensor([logp(adapter.policy, *by_hand(adapter, conversation(ROW, s)))
                      - logp(adapter.reference_model, *by_hand(adapter, conversation(ROW, s))) for s in ("chosen", "rejected")])
    expected = kto(r, torch.zeros(2), torch.tensor([True, False]), beta=0.3, kl=r.mean())
    torch.testing.assert_close(loss.detach().double(), expected.double(), rtol=1e-4, atol=1e-6)


def test_dpo_step_widens_the_trajectory_margin(adapter):
    """One descent step raises log π(chosen trajectory) − log π(rejected trajectory) (assistant turns only)."""
    model = adapter.policy
    before = {s: logp(model, *by_hand(adapter, conversation(ROW, s))) for s in ("chosen", "rejected")}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss, _ = build_step("dpo", beta=0.5)(adapter, [ROW], StepContext(generator=torch.Generator()))
    loss.mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    after = {s: logp(model, *by_hand(adapter, conversation(ROW, s))) for s in ("chosen", "rejected")}
    assert after["chosen"] - after["rejected"] > before["chosen"] - before["rejected"]


def test_arithmetic_trajectories_are_what_they_claim():
    rows = arithmetic_trajectories("train", n=30, seed=1, turns=3)
    for row in rows:
        problems = [parse_prompt(row["prompt"][0]["content"])] + [
            parse_prompt(m["content"]) for m in row["chosen"] if m["role"] == "tool"]
        answers = {s: [int(m["content"]) for m in row[s] if m["role"] == "assistant"] for s in ("chosen", "rejected")}
        truth = [a + b for a, b in problems]
        assert len(truth) == 3 and answers["chosen"] == truth
        assert sum(x != y for x, y in zip(answers["rejected"], truth)) == 1  # exactly one wrong turn
    labelled = arithmetic_trajectories("heldout", n=40, seed=1, kind="labelled")
    assert {r["label"] for r in labelled} == {True, False}
    with pytest.raises(ValueError, match="only"):
        arithmetic_trajectories("heldout", n=400, turns=2)


def test_trajectory_without_assistant_turn_is_rejected_naming_the_line(tmp_path):
    path = tmp_path / "traj.jsonl"
    bad = dict(ROW, rejected=[{"role": "tool", "content": "7+8="}])
    bad.pop("row")
    good = {k: v for k, v in ROW.items() if k != "row"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"traj.jsonl:2: field 'rejected' has no assistant message"):
        read_pairwise(path)
