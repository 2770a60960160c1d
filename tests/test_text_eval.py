"""Text evaluation: win rate and implicit-reward accuracy against independent computations, the local
sequence-classification reward model against a plain forward, and `genalign-eval text` end to end on tiny models
built in tiny_causal_lm.py."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
from tiny_causal_lm import plain_logp, save_gpt2, save_llama, save_reward_model, trl_tokens
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from genalign.adapters.text import TextAdapter
from genalign.cli import REPO_ROOT
from genalign.eval.text import implicit_reward_accuracy, win_rate
from genalign.eval_cli import main as eval_main
from genalign.rewards.sequence_classifier import SequenceClassifierReward

PROMPTS = ["what is two plus two", "say hello", "name a colour", "is the sky red", "count to three"]
PAIRS = [
    {"prompt": "what is two plus two", "chosen": " four", "rejected": " five"},
    {"prompt": "is the sky red", "chosen": " no it is blue", "rejected": " yes it is red"},
    {"prompt": "say hello", "chosen": " hello there friend", "rejected": " go away"},
    {"prompt": "count to three", "chosen": " one two three", "rejected": " three two one"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A GPT-2 base, a LoRA "trained" model on it (random adapters, so it differs from the base), and reward
    models for both architectures."""
    root = tmp_path_factory.mktemp("eval")
    base = save_gpt2(root / "base")
    trained = TextAdapter.from_pretrained(base, reference="lora", max_length=64, max_prompt_length=32,
                                          lora={"r": 4, "target_modules": "all-linear", "init_lora_weights": False})
    trained.save(str(root / "final"))
    return {"base": base, "final": root / "final", "llama": save_llama(root / "llama"),
            "rm_gpt2": save_reward_model(root / "rm_gpt2", "gpt2"),
            "rm_llama": save_reward_model(root / "rm_llama", "llama")}


def test_win_rate_counts_ties_as_half_with_a_normal_interval():
    model = [1.0, 2.0, 0.5, 3.0, -1.0, 0.0]
    base = [0.0, 2.0, 1.0, 1.0, -1.0, 4.0]
    outcomes = [1.0 if m > b else 0.5 if m == b else 0.0 for m, b in zip(model, base)]  # 1, .5, 0, 1, .5, 0
    result = win_rate(model, base)
    assert result["win_rate"] == pytest.approx(sum(outcomes) / 6) == 0.5
    assert result["win_rate_ci95"] == pytest.approx(1.96 * statistics.stdev(outcomes) / math.sqrt(6))
    assert (result["wins"], result["ties"], result["losses"], result["n_prompts"]) == (2, 2, 2, 6)
    assert result["mean_reward"] == pytest.approx(sum(model) / 6)
    assert result["mean_reward_base"] == pytest.approx(sum(base) / 6)
    assert win_rate([3.0, 3.0], [3.0, 3.0])["win_rate"] == 0.5
    with pytest.raises(ValueError, match="one base reward per model reward"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"model rewards of prompts \[1\] are not finite"):
        win_rate([1.0, float("nan")], [1.0, 2.0])


def test_implicit_reward_accuracy_equals_plain_forwards_of_model_and_base(folders):
    adapter = TextAdapter.from_trained(folders["final"], max_length=64, max_prompt_length=32)
    result = implicit_reward_accuracy(adapter, PAIRS, beta=0.1)
    policy = AutoModelForCausalLM.from_pretrained(folders["final"] / "merged")
    base = AutoModelForCausalLM.from_pretrained(folders["base"])
    tokenizer = AutoTokenizer.from_pretrained(folders["base"])
    margins = []
    for pair in PAIRS:
        ratio = {}
        for side in ("chosen", "rejected"):
            ids, mask = trl_tokens(tokenizer, pair["prompt"], pair[side], "keep_start", 64, 32)
            ratio[side] = plain_logp(policy, ids, mask) - plain_logp(base, ids, mask)
        margins.append(0.1 * (ratio["chosen"] - ratio["rejected"]))
    expected = sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)
    assert result["implicit_reward_accuracy"] == expected
    # float32 scores of the LoRA model vs the merged weights: ~1e-5 per log-prob, times beta
    assert result["mean_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert all(abs(m) > 1e-3 for m in margins)  # the random adapters moved every pair off a tie


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reward_model_reads_the_last_token_of_each_unpadded_row(folders, arch):
    path = folders[f"rm_{arch}"]
    reward = SequenceClassifierReward(path, batch_size=4)
    if arch == "gpt2":  # no pad token anywhere: EOS pads, as TRL does
        assert AutoTokenizer.from_pretrained(path).pad_token is None
        assert reward.model.config.pad_token_id == reward.tokenizer.eos_token_id
        prompts, responses = PROMPTS, [" four", " hello there friend", " blue", " no", " one two three"]
    else:  # chat template applied to conversational prompts
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        responses = ["four", "hello there friend", "blue", "no", "one two three"]
    scores = reward(prompts, responses)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    expected = []
    for prompt, response in zip(prompts, responses):
        if arch == "gpt2":
            ids = tokenizer(prompt + response)["input_ids"]
        else:
            text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():  # one unpadded row: the classifier reads its last position
            expected.append(model(torch.tensor([ids])).logits[0, 0].item())
    # padded batch vs single rows in float32: ~1e-6 differences from other matmul shapes in any BLAS
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=0)
    assert scores.std() > 1e-3 and reward.truncated == 0


def test_reward_model_must_have_one_label(tmp_path):
    from transformers import GPT2ForSequenceClassification
    from tiny_causal_lm import _gpt2_config, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    GPT2ForSequenceClassification(_gpt2_config(tokenizer, num_labels=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=2.*num_labels=1"):
        SequenceClassifierReward(tmp_path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_genalign_eval_text_end_to_end(folders, tmp_path):
    """The real command: metrics.json and samples.jsonl, each metric recomputed here from what it wrote."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "genalign.eval_cli", "text", "--model", str(folders["final"]), "--prompts",
         str(prompts), "--pairs", str(pairs), "--reward-model", str(folders["rm_gpt2"]), "--out", str(out),
         "--max-new-tokens", "6", "--max-length", "64", "--max-prompt-length", "32"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == PROMPTS and [s["row"] for s in samples] == list(range(5))
    assert metrics["win_rate"] == win_rate([s["reward_model"] for s in samples],
                                           [s["reward_base"] for s in samples])["win_rate"]
    assert any(s["model"] != s["base"] for s in samples)  # the adapters change the greedy answers
    # the written rewards are the reward model's scores of prompt + answer, and the answers are greedy
    reward = SequenceClassifierReward(folders["rm_gpt2"])
    rescored = reward(PROMPTS, [s["model"] for s in samples])
    torch.testing.assert_close(rescored, torch.tensor([s["reward_model"] for s in samples]), atol=1e-4, rtol=0)
    base = TextAdapter.from_pretrained(folders["base"], reference="none", max_length=64, max_prompt_length=32)
    assert base.sample(PROMPTS, do_sample=False, max_new_tokens=6)["texts"] == [s["base"] for s in samples]
    adapter = TextAdapter.from_trained(folders["final"], max_length=64, max_prompt_length=32)
    assert metrics["implicit_reward_accuracy"] == implicit_reward_accuracy(adapter, PAIRS)["implicit_reward_accuracy"]
    assert metrics["settings"]["beta"] == 0.1 and metrics["n_prompts"] == 5


def test_a_model_against_itself_wins_half_the_time(folders, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code = eval_main(["text", "--model", str(folders["base"]), "--base", str(folders["base"]), "--prompts",
                      str(prompts), "--pairs", str(pairs), "--reward-model", str(folders["rm_gpt2"]), "--out",
                      str(tmp_path / "self"), "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3"])
    assert code == 0
    metrics = json.loads((tmp_path / "self" / "metrics.json").read_text())
    assert metrics["win_rate"] == 0.5 and metrics["ties"] == 5  # same weights, same seeded draws
    assert metrics["implicit_reward_accuracy"] == 0.5 and metrics["mean_margin"] == 0.0
    assert "win_rate: 0.5000" in capsys.readouterr().out


def test_genalign_eval_text_refuses_incomplete_arguments(folders, tmp_path):
    with pytest.raises(SystemExit, match="--prompts needs --reward-model"):
        eval_main(["text", "--model", str(folders["final"]), "--prompts", "p.jsonl", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--prompts .* and/or --pairs"):
        eval_main(["text", "--model", str(folders["final"]), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="fully fine-tuned model: pass its base"):
        TextAdapter.from_trained(folders["base"])
    with pytest.raises(FileNotFoundError, match="did you mean .*final"):
        TextAdapter.from_trained(folders["final"].parent)


def test_held_out_pairs_in_the_anthropic_hh_layout(folders, tmp_path):
    """``--pairs`` takes the layouts training takes: HH transcripts score as the same conversation written as
    message lists (the shared "Human" turn is the prompt); KTO-layout rows have no pair and are refused."""
    hh = [{"chosen": f"\n\nHuman: {p['prompt']}\n\nAssistant:{p['chosen']}",
           "rejected": f"\n\nHuman: {p['prompt']}\n\nAssistant:{p['rejected']}"} for p in PAIRS]
    as_messages = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                    "chosen": [{"role": "assistant", "content": p["chosen"].lstrip()}],
                    "rejected": [{"role": "assistant", "content": p["rejected"].lstrip()}]} for p in PAIRS]
    out = tmp_path / "hh"
    assert eval_main(["text", "--model", str(folders["final"]), "--pairs", str(write_jsonl(tmp_path / "hh.jsonl", hh)),
                      "--out", str(out), "--max-length", "64", "--max-prompt-length", "32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    adapter = TextAdapter.from_trained(folders["final"], max_length=64, max_prompt_length=32)
    expected = implicit_reward_accuracy(adapter, as_messages)
    assert metrics["implicit_reward_accuracy"] == expected["implicit_reward_accuracy"]
    assert metrics["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-6)
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "say hello", "completion": " hi", "label": True}])
    with pytest.raises(SystemExit, match=r"kto\.jsonl holds unpaired rows .* --pairs needs chosen/rejected pairs"):
        eval_main(["text", "--model", str(folders["final"]), "--pairs", str(kto), "--out", str(tmp_path / "k")])
