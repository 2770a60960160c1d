"""Any local causal LM: summed completion log-probs against a plain transformers forward (TRL's truncation modes),
LoRA on every linear layer vs full fine-tuning, bf16 loading, gradient checkpointing, and DPO / KTO / IPO runs
through the CLI on tiny random Llama and GPT-2 models built in tiny_causal_lm.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_causal_lm import plain_logp, save_gpt2, save_llama, trl_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from genalign import objectives
from genalign.adapters.text import TextAdapter
from genalign.cli import CONFIG_DIR, REPO_ROOT, run
from genalign.data.batching import pairwise_batch

ROWS = [  # (prompt, response): short, exact fit, long response, response longer than any max_length below
    ("say hello", "hello there friend"),
    ("what is two plus two", "four"),
    ("count to three", "one two three three two one"),
    ("say hello", "one two three three two one one two three"),
]
USER = lambda text: [{"role": "user", "content": text}]
ASSISTANT = lambda text: [{"role": "assistant", "content": text}]
PAIRS = [
    {"prompt": "what is two plus two", "chosen": "four", "rejected": "five"},
    {"prompt": "is the sky red", "chosen": "no it is blue", "rejected": "yes it is red"},
    {"prompt": "name a colour", "chosen": "blue", "rejected": "go away"},
    {"prompt": "say hello", "chosen": "hello there friend", "rejected": "go away"},
    {"prompt": "count to three", "chosen": "one two three", "rejected": "three two one"},
    {"prompt": "what is two plus two", "chosen": "four", "rejected": "green sky"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {"llama": save_llama(root / "llama"), "gpt2": save_gpt2(root / "gpt2")}


# float32 forwards of a padded batch vs one unpadded row differ by ~1e-6 per logit (other matmul shapes and
# summation orders in any BLAS); sums of <= 10 log-probs of magnitude ~5 stay far inside 1e-4
ATOL = 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_summed_completion_logps_equal_a_plain_forward_under_truncation(folders, arch, mode):
    tokenizer = AutoTokenizer.from_pretrained(folders[arch])
    lengths = [len(tokenizer(p)["input_ids"]) + len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1
               for p, r in ROWS]
    max_prompt_length = max(len(tokenizer(p)["input_ids"]) for p, _ in ROWS)  # keep_start must not raise
    max_length = sorted(lengths)[1]  # rows 3 and 4 are too long
    adapter = TextAdapter.from_pretrained(folders[arch], reference="copy", lora=None, max_length=max_length,
                                          max_prompt_length=max_prompt_length, truncation_mode=mode)
    records = [{"prompt": p, "response": r, "row": i} for i, (p, r) in enumerate(ROWS)]
    scores = adapter.score(adapter.collate(records))
    model = AutoModelForCausalLM.from_pretrained(folders[arch])
    expected, counts = [], []
    for prompt, response in ROWS:
        ids, mask = trl_tokens(tokenizer, prompt, response, mode, max_length, max_prompt_length)
        expected.append(plain_logp(model, ids, mask))
        counts.append(sum(mask[1:]))
    torch.testing.assert_close(scores.policy.double(), torch.tensor(expected, dtype=torch.float64), atol=ATOL, rtol=0)
    assert scores.lengths.tolist() == counts  # scored tokens: the kept completion, minus a context-less first one
    cut = sum(length > max_length for length in lengths)
    assert cut >= 2 and adapter.truncated == cut and adapter.truncated_rows == {f"row {i}" for i in (2, 3)}


def test_keep_end_cuts_a_long_prompt_from_the_left_and_keep_start_refuses_it(folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    prompt, response = "what is two plus two", "four"  # 6 prompt tokens with <s>
    keep_end = TextAdapter.from_pretrained(folders["llama"], reference="none", max_length=16, max_prompt_length=3,
                                           truncation_mode="keep_end")
    batch = keep_end.collate([{"prompt": prompt, "response": response}])
    ids, mask = trl_tokens(tokenizer, prompt, response, "keep_end", 16, 3)
    assert batch["input_ids"][0].tolist() == ids == tokenizer("two plus two four", add_special_tokens=False)["input_ids"] + [2]
    assert keep_end.truncated == 1
    assert keep_end._prompt_ids(prompt, 0) == tokenizer(prompt)["input_ids"][-3:]  # generation prompts too
    keep_start = TextAdapter.from_pretrained(folders["llama"], reference="none", max_length=16, max_prompt_length=3)
    with pytest.raises(ValueError, match=r"row 0.*max_prompt_length=3.*keep_end"):
        keep_start.collate([{"prompt": prompt, "response": response, "row": 0}])
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        TextAdapter.from_pretrained(folders["llama"], reference="none", truncation_mode="left")


def test_chat_template_is_applied_to_conversational_rows(folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    adapter = TextAdapter.from_pretrained(folders["llama"], reference="none", max_length=64, max_prompt_length=32)
    prompt, reply = USER("is the sky red"), ASSISTANT("no it is blue")
    batch = adapter.collate([{"prompt": prompt, "response": reply}])
    full = tokenizer(tokenizer.apply_chat_template(prompt + reply, tokenize=False), add_special_tokens=False)
    context = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]
    ids = full["input_ids"]
    mask = [0] * len(context) + [1] * (len(ids) - len(context))
    assert batch["input_ids"][0].tolist() == ids and batch["loss_mask"][0].tolist() == mask
    assert tokenizer.convert_ids_to_tokens(ids[len(context):]) == ["no", "it", "is", "blue", "<|im_end|>"]
    model = AutoModelForCausalLM.from_pretrained(folders["llama"])
    assert adapter.score(batch).policy.item() == pytest.approx(plain_logp(model, ids, mask), abs=ATOL)


def test_a_tokenizer_without_pad_token_pads_with_eos_without_changing_scores(folders):
    adapter = TextAdapter.from_pretrained(folders["gpt2"], reference="none", max_length=64, max_prompt_length=32)
    assert adapter.tokenizer.pad_token is None and adapter.pad_id == adapter.tokenizer.eos_token_id
    records = [{"prompt": p, "response": r} for p, r in (ROWS[1], ROWS[3])]
    batch = adapter.collate(records)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short row is padded
    alone = torch.cat([adapter.score(adapter.collate([r])).policy for r in records])
    torch.testing.assert_close(adapter.score(batch).policy, alone, atol=ATOL, rtol=0)


LINEAR = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
          "gpt2": {"c_attn", "c_proj", "c_fc"}}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_all_linear_vs_full_fine_tuning(folders, arch):
    lora = TextAdapter.from_pretrained(folders[arch], reference="lora", lora={"r": 4, "target_modules": "all-linear"},
                                       max_length=64, max_prompt_length=32)
    wrapped = {name.split(".")[-1] for name, module in lora.policy.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == LINEAR[arch]  # every Linear / Conv1D layer, not the LM head
    trainable = [n for n, p in lora.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    full = TextAdapter.from_pretrained(folders[arch], reference="copy", lora=None, max_length=64, max_prompt_length=32)
    assert all(p.requires_grad for p in full.policy.parameters())
    assert not any(p.requires_grad for p in full.reference_model.parameters())
    batch = pairwise_batch(lora, PAIRS)
    for adapter in (lora, full):
        chosen, rejected = adapter.score_pairs(batch)
        torch.testing.assert_close(chosen.policy.detach(), chosen.reference)  # policy == reference at step 0
        loss = objectives.dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=0.1)
        assert loss.mean().item() == pytest.approx(math.log(2), abs=1e-6)


def test_bf16_loading_scores_in_float32_close_to_float32(folders):
    records = [{"prompt": p, "response": r} for p, r in ROWS[:2]]
    exact = TextAdapter.from_pretrained(folders["llama"], reference="none", max_length=64, max_prompt_length=32)
    half = TextAdapter.from_pretrained(folders["llama"], dtype="bfloat16", reference="lora",
                                       lora={"r": 4, "target_modules": "all-linear"}, max_length=64,
                                       max_prompt_length=32)
    base = half.policy.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.trainable_parameters())  # peft keeps adapters in float32
    scores = half.score(half.collate(records))
    reference = exact.score(exact.collate(records)).policy.detach()
    assert scores.policy.dtype == torch.float32 and torch.isfinite(scores.policy).all()
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); through 2 blocks the summed log-probs drift by
    # up to ~0.7 % here; 3 % relative bounds that with room for other BLAS kernels, and still tells a bf16 load
    # apart from a wrong one (different completions differ by ~50 %)
    torch.testing.assert_close(scores.policy.detach(), reference, rtol=0.03, atol=0.0)
    with pytest.raises(ValueError, match="not a torch dtype"):
        TextAdapter.from_pretrained(folders["llama"], dtype="bf17", reference="none")


@pytest.mark.parametrize("arch,lora", [("llama", {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}),
                                       ("gpt2", None)])
def test_gradient_checkpointing_gives_the_same_gradients(folders, arch, lora):
    def gradients(checkpointing):
        torch.manual_seed(0)  # the same LoRA initialisation on both sides (random B: non-zero gradients everywhere)
        adapter = TextAdapter.from_pretrained(folders[arch], reference="lora" if lora else "copy", lora=lora,
                                              max_length=64, max_prompt_length=32)
        if checkpointing:
            adapter.enable_gradient_checkpointing()
            layers = [m for m in adapter.policy.modules() if getattr(m, "gradient_checkpointing", False)]
            assert layers and adapter.policy.training  # transformers only checkpoints in train mode
        chosen, rejected = adapter.score_pairs(pairwise_batch(adapter, PAIRS))
        objectives.dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=0.1).mean().backward()
        return {n: p.grad for n, p in adapter.policy.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert all(g is not None for g in checkpointed.values())  # LoRA gradients reach the adapters
    # the recomputed forward repeats the same float32 operations on the same inputs: equal up to rounding
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-5, msg=name)
    assert any(g.abs().max() > 0 for g in plain.values())


# ---------------------------------------------------------------------------------------------- CLI runs
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


SHORT_RUN = ["train.max_steps=3", "train.batch_size=6", "train.gradient_accumulation_steps=1",
             "train.learning_rate=1e-2", "train.warmup_steps=0", "train.log_every=1", "train.save_every=0",
             "adapter.max_length=64", "adapter.max_prompt_length=32"]


def margin_after(final: Path, base: Path, pairs) -> float:
    """beta * Delta of the trained model against its base (loaded back from final/), mean over the pairs."""
    adapter = TextAdapter.from_trained(final, base=base, max_length=64, max_prompt_length=32)
    chosen, rejected = adapter.score_pairs(pairwise_batch(adapter, pairs))
    return (0.1 * ((chosen.policy - chosen.reference) - (rejected.policy - rejected.reference))).mean().item()


def test_cli_dpo_with_lora_and_gradient_checkpointing_on_gpt2(folders, tmp_path):
    """The README command (a subprocess of `python -m genalign.cli`): loss ln 2 at step 0, margin grows."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "genalign.cli", "experiment=lm_dpo", f"adapter.path={folders['gpt2']}",
         f"data.path={data}", f"output_dir={out}", "train.gradient_checkpointing=true", *SHORT_RUN],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(out)
    assert [h["step"] for h in log] == [1, 2, 3]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference on the first batch
    assert log[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert log[-1]["rewards/margin"] > 0 and log[-1]["loss"] < math.log(2)
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final" / "merged" / "config.json").is_file()
    assert margin_after(out / "final", folders["gpt2"], PAIRS) > 0


def compose_run(name, out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}", f"output_dir={out}", *overrides])
    run(cfg)
    return read_log(out)


def test_lm_kto_on_unpaired_conversations_with_llama(folders, tmp_path):
    """Same config path as the CLI, run in this process (hydra compose) to spare a second interpreter start."""
    rows = [{"prompt": USER(p["prompt"]), "completion": ASSISTANT(p[side]), "label": side == "chosen"}
            for p in PAIRS for side in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "feedback.jsonl", rows)
    out = tmp_path / "kto"
    log = compose_run("lm_kto", out, f"adapter.path={folders['llama']}", f"data.path={data}", *SHORT_RUN)
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigmoid(0) for every sample when pi == ref
    assert log[-1]["rewards/desirable"] > log[-1]["rewards/undesirable"]
    pairs = [{"prompt": USER(p["prompt"]), "chosen": ASSISTANT(p["chosen"]), "rejected": ASSISTANT(p["rejected"])}
             for p in PAIRS]
    assert margin_after(out / "final", folders["llama"], pairs) > 0


def test_lm_ipo_full_fine_tuning_on_conversational_pairs_with_llama(folders, tmp_path):
    pairs = [{"prompt": USER(p["prompt"]), "chosen": ASSISTANT(p["chosen"]), "rejected": ASSISTANT(p["rejected"])}
             for p in PAIRS]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "ipo"
    log = compose_run("lm_ipo", out, f"adapter.path={folders['llama']}", f"data.path={data}", "adapter.lora=null",
                      "adapter.reference=copy", *SHORT_RUN[:3], "train.learning_rate=1e-3", *SHORT_RUN[4:])
    assert log[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)  # (0 - 1/(2 beta))^2 at step 0
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["rewards/margin"] > 0
    assert (out / "final" / "config.json").is_file() and not (out / "final" / "adapter_config.json").exists()
    assert margin_after(out / "final", folders["llama"], pairs) > 0
