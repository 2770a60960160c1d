"""Tiny random causal LMs and reward models in the public Hugging Face layouts, built locally for the tests.

* ``llama``: a WordLevel tokenizer with ``<s>`` prepended, a ``<pad>`` token and a ChatML chat template, and a
  ``LlamaForCausalLM`` (grouped-query attention, SwiGLU MLP, untied head).
* ``gpt2``: a byte-level BPE tokenizer trained here, GPT-2 style: ``<|endoftext|>`` is BOS and EOS and there is
  no pad token; a ``GPT2LMHeadModel`` with GPT-2's default dropout of 0.1.

Each is written with ``save_pretrained`` (model and tokenizer), so code under test loads it like any local model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast)

CORPUS = [
    "what is two plus two", "four", "five", "the cat sat on the mat", "a dog ran in the park",
    "say hello", "hello there friend", "go away", "name a colour", "blue", "green sky", "is the sky red",
    "no it is blue", "yes it is red", "count to three", "one two three", "three two one",
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def llama_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({w for line in CORPUS for w in line.split()} | {"user", "assistant", "system"})
    vocab = {token: i for i, token in enumerate(LLAMA_SPECIAL + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def _llama_config(tokenizer: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def _gpt2_config(tokenizer: PreTrainedTokenizerFast, **extra) -> GPT2Config:
    return GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                      initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, **extra)


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def save_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama causal LM with its tokenizer (chat template, pad token) in ``directory``."""
    tokenizer = llama_tokenizer()
    _seeded(lambda: LlamaForCausalLM(_llama_config(tokenizer)), seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_gpt2(directory: Path, seed: int = 0) -> Path:
    """A tiny random GPT-2 causal LM with its tokenizer (no pad token, no chat template) in ``directory``."""
    tokenizer = gpt2_tokenizer()
    _seeded(lambda: GPT2LMHeadModel(_gpt2_config(tokenizer)), seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_reward_model(directory: Path, architecture: str, seed: int = 0) -> Path:
    """A tiny random sequence-classification reward model (num_labels=1) and its tokenizer in ``directory``;
    the GPT-2 one has no pad token in its tokenizer or config, as GPT-2 checkpoints have none."""
    if architecture == "llama":
        tokenizer = llama_tokenizer()
        build = lambda: LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    else:
        tokenizer = gpt2_tokenizer()
        build = lambda: GPT2ForSequenceClassification(_gpt2_config(tokenizer, num_labels=1))
    _seeded(build, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def plain_logp(model, ids, mask):
    """Independent score: one unpadded forward, float64 log_softmax, gather at every scored position t >= 1."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])


def trl_tokens(tokenizer, prompt, response, mode, max_length, max_prompt_length):
    """Prompt ids (with the tokenizer's special tokens) + response ids + EOS, truncated as TRL's truncation_mode:
    keep_start -> seq[:max_length]; keep_end -> prompt[-max_prompt_length:], then seq[-max_length:]."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if mode == "keep_end":
        prompt_ids = prompt_ids[-max_prompt_length:]
    ids, mask = prompt_ids + completion, [0] * len(prompt_ids) + [1] * len(completion)
    window = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return ids[window], mask[window]
