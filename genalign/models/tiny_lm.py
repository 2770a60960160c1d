"""A character-level tokenizer and a tiny GPT-2 for the embedded text defaults and the tests.

The tokenizer maps every character of ``characters`` to one token (``tokenizers`` WordLevel model over a
one-character split, fused back on decode), adds ``<bos>`` in front of every encoded text and knows
``<pad>``, ``<eos>`` and ``<unk>``. It is a regular ``transformers`` fast tokenizer, saved with
``save_pretrained`` and loaded with ``AutoTokenizer``.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer(characters: str) -> PreTrainedTokenizerFast:
    """One token per character of ``characters`` (duplicates ignored) plus the special tokens."""
    unique = list(dict.fromkeys(characters))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *unique])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 32,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for ``tokenizer``, without dropout (scores are deterministic)."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)
