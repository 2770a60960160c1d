"""TextAdapter: scores against an independent log-softmax loop, masks, references, caching, sampling, saving."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from genalign import objectives
from genalign.adapters.text import TextAdapter
from genalign.data.batching import pairwise_batch
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2

CHARS = "0123456789+= abcdefghijklmnopqrstuvwxyz:|"
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}
RECORDS = [
    {"prompt": "12+7=", "response": "19", "row": 0},
    {"prompt": "3+4=", "response": "7 is it", "row": 1},
    {"prompt": "hello", "response": "x", "row": 2},
]
PAIRS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "11", "row": 0},
    {"prompt": "20+5=", "chosen": "25", "rejected": "52", "row": 1},
    {"prompt": "what", "chosen": "yes", "rejected": "no no", "row": 2},
]
# a prefix-stable template: "|role:content" per message, "<eos>" closes a turn, "|assistant:" opens a reply
TEMPLATE = ("{% for m in messages %}|{{ m['role'] }}:{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}|assistant:{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(CHARS)


def make(tokenizer, reference="copy", lora=None, seed=0, **kw):
    kw.setdefault("max_length", 60)
    kw.setdefault("max_prompt_length", 40)
    return TextAdapter(tiny_gpt2(tokenizer, n_positions=64, seed=seed), tokenizer, reference=reference, lora=lora, **kw)


def loop_logps(model, batch):
    """Independent reference: unpadded forward, full log_softmax, a Python loop over scored positions."""
    out = []
    with torch.no_grad():
        for ids, attention, mask in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
            length = int(attention.sum())
            logp = torch.log_softmax(model(ids[None, :length]).logits[0].double(), dim=-1)
            out.append(sum(logp[t - 1, ids[t]].item() for t in range(1, length) if mask[t]))
    return torch.tensor(out, dtype=torch.float64)


def masked_tokens(tokenizer, batch, i):
    ids, mask = batch["input_ids"][i], batch["loss_mask"][i]
    return "".join(tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist()))


def test_summed_logps_equal_full_log_softmax_loop(tokenizer):
    adapter = make(tokenizer)
    batch = adapter.collate(RECORDS)
    scores = adapter.score(batch)
    expected = loop_logps(adapter.policy, batch)
    torch.testing.assert_close(scores.policy.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.reference.double(), expected, atol=1e-5, rtol=1e-5)
    assert scores.lengths.tolist() == [3, 8, 2]  # response characters + EOS
    assert scores.policy.requires_grad and not scores.reference.requires_grad


def test_single_turn_mask_covers_response_and_eos(tokenizer):
    batch = make(tokenizer).collate(RECORDS)
    for i, record in enumerate(RECORDS):
        assert masked_tokens(tokenizer, batch, i) == record["response"] + "<eos>"
        n = len(record["prompt"]) + len(record["response"]) + 2  # <bos> ... <eos>
        assert batch["attention_mask"][i].sum() == n
        assert tokenizer.convert_ids_to_tokens(batch["input_ids"][i, :1].tolist()) == ["<bos>"]
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()


CONVERSATION = {
    "prompt": [{"role": "user", "content": "ab"}],
    "response": [{"role": "assistant", "content": "cd"}, {"role": "user", "content": "ef"},
                 {"role": "assistant", "content": "gh"}],
    "row": 4,
}


def test_multi_turn_plain_template_scores_only_assistant_turns(tokenizer):
    adapter = make(tokenizer)
    batch = adapter.collate([CONVERSATION])
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert "".join(tokens) == "<bos>user: ab<eos>assistant: cd<eos>user: ef<eos>assistant: gh<eos>"
    assert masked_tokens(tokenizer, batch, 0) == "cd<eos>gh<eos>"
    scored = [t for t, m in zip(tokens, batch["loss_mask"][0].tolist()) if m]
    assert "e" not in scored and "f" not in scored  # the user turn inside the response is context


def test_multi_turn_chat_template_boundaries():
    tokenizer = char_tokenizer(CHARS)  # the adapter sets the template on its tokenizer
    adapter = make(tokenizer, chat_template=TEMPLATE)
    batch = adapter.collate([CONVERSATION])
    rendered = tokenizer.apply_chat_template(CONVERSATION["prompt"] + CONVERSATION["response"], tokenize=False)
    assert batch["input_ids"][0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert masked_tokens(tokenizer, batch, 0) == "cd<eos>gh<eos>"
    # with a message prompt a string response becomes an assistant message; two strings stay raw text
    batch = adapter.collate([{"prompt": [{"role": "user", "content": "ab"}], "response": "cd"},
                             {"prompt": "ab", "response": "cd"}])
    mixed, raw = batch["input_ids"]
    assert "".join(tokenizer.convert_ids_to_tokens(mixed.tolist())) == "|user:ab<eos>|assistant:cd<eos>"
    assert "".join(tokenizer.convert_ids_to_tokens(raw.tolist())).startswith("<bos>abcd<eos>")


def test_template_that_rewrites_history_raises():
    tokenizer = char_tokenizer(CHARS)
    unstable = "{% for m in messages %}{{ m['role'] }}{{ messages|length }}:{{ m['content'] }}{% endfor %}"
    adapter = make(tokenizer, chat_template=unstable)
    with pytest.raises(ValueError, match="row 4.*prefix-stable"):
        adapter.collate([CONVERSATION])


def test_bad_records_raise_naming_row_and_field(tokenizer):
    adapter = make(tokenizer, max_length=30, max_prompt_length=10)
    with pytest.raises(ValueError, match=r"row 7.*'prompt'.*max_prompt_length=10.*raise max_prompt_length"):
        adapter.collate([RECORDS[0], {"prompt": "1" * 11, "response": "2", "row": 7}])
    with pytest.raises(ValueError, match=r"row 3.*'response'"):
        adapter.collate([{"prompt": "1+1=", "response": "", "row": 3}])
    with pytest.raises(ValueError, match=r"row 1.*missing field 'response'"):
        adapter.collate([RECORDS[0], {"prompt": "1+1="}])
    with pytest.raises(ValueError, match=r"row 5.*'response' message 0"):
        adapter.collate([{"prompt": "a", "response": [{"role": "assistant"}], "row": 5}])
    with pytest.raises(ValueError, match=r"row 6.*no assistant message"):
        adapter.collate([{"prompt": "a", "response": [{"role": "user", "content": "b"}], "row": 6}])


def test_long_response_is_truncated_from_the_right_and_counted(tokenizer):
    adapter = make(tokenizer, max_length=12, max_prompt_length=8)
    batch = adapter.collate([{"prompt": "12+3=", "response": "abcdefghij"}, RECORDS[0]])
    assert batch["input_ids"].shape[1] == 12
    assert masked_tokens(tokenizer, batch, 0) == "abcdef"  # 12 - <bos> - 5 prompt chars; EOS cut too
    assert adapter.truncated == 1


def test_concatenated_forward_equals_separate_forwards(tokenizer):
    adapter = make(tokenizer)
    first, second = adapter.collate(RECORDS[:1]), adapter.collate(RECORDS[1:])
    joint = adapter.score(adapter.concat([first, second]))
    separate = torch.cat([adapter.score(first).policy, adapter.score(second).policy])
    torch.testing.assert_close(joint.policy, separate, atol=1e-5, rtol=1e-5)
    chosen, rejected = adapter.score_pairs(pairwise_batch(adapter, PAIRS))
    alone = adapter.score(adapter.collate([{"prompt": p["prompt"], "response": p["rejected"]} for p in PAIRS]))
    torch.testing.assert_close(rejected.policy, alone.policy, atol=1e-5, rtol=1e-5)


def dpo_step(adapter, lr=1e-2):
    optimizer = torch.optim.Adam(adapter.trainable_parameters(), lr=lr)
    chosen, rejected = adapter.score_pairs(pairwise_batch(adapter, PAIRS))
    objectives.dpo(chosen.policy, rejected.policy, chosen.reference, rejected.reference, beta=0.1).mean().backward()
    optimizer.step()


def test_lora_reference_is_the_base_model_and_stays_frozen(tokenizer):
    base = tiny_gpt2(tokenizer, n_positions=64, seed=3)
    frozen_base = copy.deepcopy(base)
    adapter = TextAdapter(base, tokenizer, reference="lora", lora=LORA, max_length=60, max_prompt_length=40)
    batch = adapter.collate(RECORDS)
    before = adapter.score(batch)
    expected = loop_logps(frozen_base, batch)
    torch.testing.assert_close(before.reference.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before.policy.detach(), before.reference)  # LoRA starts as the identity
    assert all("lora" in n for n, p in adapter.policy.named_parameters() if p.requires_grad)
    dpo_step(adapter)
    after = adapter.score(batch)
    assert (after.policy - before.policy).abs().max() > 1e-4
    torch.testing.assert_close(after.reference, before.reference)


def test_copy_reference_stays_frozen_under_full_fine_tuning(tokenizer):
    adapter = make(tokenizer, reference="copy")
    assert not any(p.requires_grad for p in adapter.reference_model.parameters())
    assert not adapter.reference_model.training
    batch = adapter.collate(RECORDS)
    before = adapter.score(batch)
    dpo_step(adapter)
    after = adapter.score(batch)
    assert (after.policy - before.policy).abs().max() > 1e-4
    torch.testing.assert_close(after.reference, before.reference)


def test_dpo_step_raises_the_implicit_reward_margin(tokenizer):
    adapter = make(tokenizer, reference="lora", lora=LORA)
    batch = pairwise_batch(adapter, PAIRS)
    for _ in range(3):
        dpo_step(adapter, lr=3e-3)
    chosen, rejected = adapter.score_pairs(batch)
    delta = (chosen.policy - chosen.reference) - (rejected.policy - rejected.reference)
    assert (delta > 0).all()


def test_reference_free_adapter(tokenizer):
    adapter = make(tokenizer, reference="none")
    assert adapter.score(adapter.collate(RECORDS)).reference is None
    with pytest.raises(ValueError, match="reference='none'"):
        adapter.sample(["1+1="], use_reference=True)
    with pytest.raises(ValueError, match="reference='none'"):
        adapter.cache_reference_scores(PAIRS)
    with pytest.raises(ValueError, match="needs a LoRA config"):
        TextAdapter(tiny_gpt2(tokenizer), tokenizer, reference="lora")


def test_cached_reference_scores_equal_fresh_ones(tokenizer):
    adapter = make(tokenizer, reference="lora", lora=LORA)
    dpo_step(adapter)  # the policy moves away from the reference; the cache must hold the reference
    cached_chosen, cached_rejected = adapter.cache_reference_scores(PAIRS, batch_size=2)
    chosen, rejected = adapter.score_pairs(pairwise_batch(adapter, PAIRS))
    torch.testing.assert_close(cached_chosen, chosen.reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cached_rejected, rejected.reference, atol=1e-6, rtol=1e-6)
    rows = [dict(p, reference_chosen=c, reference_rejected=r)
            for p, c, r in zip(PAIRS, cached_chosen.tolist(), cached_rejected.tolist())]
    from_cache, _ = adapter.score_pairs(pairwise_batch(adapter, rows))
    torch.testing.assert_close(from_cache.reference, chosen.reference, atol=1e-6, rtol=1e-6)


def test_sampling_is_seeded_masks_generated_tokens_and_rescores(tokenizer):
    adapter = make(tokenizer)
    state = torch.get_rng_state()
    draw = lambda: adapter.sample(["1+2=", "ab"], num_samples=3, generator=torch.Generator().manual_seed(5),
                                  max_new_tokens=6)
    first, second = draw(), draw()
    assert torch.equal(torch.get_rng_state(), state)  # seeding did not touch the global RNG
    assert torch.equal(first["input_ids"], second["input_ids"]) and first["texts"] == second["texts"]
    assert first["input_ids"].shape[0] == 6 and len(first["texts"]) == 6
    for j in range(6):
        prompt = ["1+2=", "ab"][j // 3]
        tokens = tokenizer.convert_ids_to_tokens(first["input_ids"][j][first["attention_mask"][j].bool()].tolist())
        assert "".join(tokens[1 : 1 + len(prompt)]) == prompt
        generated = masked_tokens(tokenizer, first, j)
        assert "".join(tokens[1 + len(prompt):]) == generated and 1 <= len(tokens) - 1 - len(prompt) <= 6
        assert "<eos>" not in generated[:-5]  # generation stops at the first EOS
    # scoring a sample equals the independent loop over its tokens
    expected = loop_logps(adapter.policy, first)
    torch.testing.assert_close(adapter.score(first).policy.double(), expected, atol=1e-5, rtol=1e-5)


def test_greedy_sampling_follows_the_argmax_under_left_padding(tokenizer):
    adapter = make(tokenizer, seed=1)
    prompts = ["12+", "hello there", "7"]
    out = adapter.sample(prompts, do_sample=False, max_new_tokens=5)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(5):
                nxt = int(adapter.policy(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tokenizer.eos_token_id:
                    break
        assert out["input_ids"][row][out["attention_mask"][row].bool()].tolist() == ids


def test_save_lora_adapter_and_merged_model(tokenizer, tmp_path):
    adapter = make(tokenizer, reference="lora", lora=LORA)
    dpo_step(adapter)
    batch = adapter.collate(RECORDS)
    trained = adapter.score(batch, with_reference=False).policy.detach()
    adapter.save(str(tmp_path))
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "merged" / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    expected = loop_logps(merged, batch)
    torch.testing.assert_close(trained.double(), expected, atol=1e-5, rtol=1e-5)
    assert any("lora" in n for n, _ in adapter.policy.named_parameters())  # saving did not merge the live model


def test_save_full_model_round_trips_through_from_pretrained(tokenizer, tmp_path):
    adapter = make(tokenizer, reference="copy")
    dpo_step(adapter)
    batch = adapter.collate(RECORDS)
    adapter.save(str(tmp_path))
    loaded = TextAdapter.from_pretrained(tmp_path, reference="none", max_length=60, max_prompt_length=40)
    torch.testing.assert_close(loaded.score(batch).policy, adapter.score(batch).policy, atol=1e-6, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        TextAdapter.from_pretrained(tmp_path / "no-such-model")
