"""A local sequence-classification reward model: ``r(x, y)`` = the single logit of an
``AutoModelForSequenceClassification`` folder with ``num_labels=1`` read at the last token of ``x + y`` (the
reward models of InstructGPT / TRL's ``RewardTrainer``, Ouyang et al. 2022).

Text of a row: a string prompt and response are concatenated as given (TRL's standard layout); a conversational
prompt (message list) gets the response as an assistant message and the reward tokenizer's chat template (without
one, the adapters' plain ``"{role}: {content}<eos>"`` layout). The model reads the rightmost non-pad token, so the
pad id matters: a config without ``pad_token_id`` gets the tokenizer's pad token, else its EOS (TRL's fallback).
Inputs longer than ``max_length`` keep their start, as the tokenizer truncates; each cut is counted in
``truncated`` and logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from genalign.adapters.text import _messages

log = logging.getLogger(__name__)


class SequenceClassifierReward:
    """``reward(prompts, responses) -> FloatTensor [N]`` (float32, on the CPU), scored ``batch_size`` at a time."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16, max_length: int | None = None) -> None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no local reward model folder at {str(path)!r}: give a folder saved with "
                                    "save_pretrained by an AutoModelForSequenceClassification (num_labels=1)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(device).eval()
        labels = self.model.config.num_labels
        if labels != 1:
            raise ValueError(f"{path}: the classifier has num_labels={labels}; a reward model has one output "
                             "(num_labels=1, a scalar score per sequence)")
        config = self.model.config
        if config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            config.pad_token_id = self.tokenizer.eos_token_id if pad is None else pad
        if config.pad_token_id is None:
            raise ValueError(f"{path}: the reward tokenizer has neither a pad nor an EOS token, so padded batches "
                             "cannot be read at their last token; set pad_token_id in its config.json")
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_length = max_length or min(self.tokenizer.model_max_length, positions or 10**9)
        self.batch_size = batch_size
        self.truncated = 0

    def text(self, prompt: Any, response: Any) -> str:
        """The text the reward model reads for one (prompt, response)."""
        if isinstance(prompt, str) and isinstance(response, str):
            return prompt + response
        conversation = _messages(prompt, "user", "reward", "prompt") + _messages(response, "assistant", "reward",
                                                                                  "response")
        if self.tokenizer.chat_template is not None:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        eos = self.tokenizer.eos_token or ""
        return "".join(f"{m['role']}: {m['content']}{eos}" for m in conversation)

    def tokens(self, prompt: Any, response: Any) -> list[int]:
        """Token ids of :meth:`text`: chat renderings carry their own special tokens, plain text gets the
        tokenizer's (e.g. BOS)."""
        plain = isinstance(prompt, str) and isinstance(response, str)
        return list(self.tokenizer(self.text(prompt, response), add_special_tokens=plain)["input_ids"])

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], responses: Sequence[Any]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"reward got {len(prompts)} prompts but {len(responses)} responses")
        full = [self.tokens(p, r) for p, r in zip(prompts, responses)]
        long = [i for i, row in enumerate(full) if len(row) > self.max_length]
        if long:
            self.truncated += len(long)
            log.warning("reward model: rows %s are longer than max_length=%d and lose their end; %d cut so far",
                        long[:10], self.max_length, self.truncated)
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(full), self.batch_size):
            ids = [row[: self.max_length] for row in full[start : start + self.batch_size]]
            width = max(len(row) for row in ids)
            pad = self.model.config.pad_token_id
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=device)
            attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=device)
            out.append(self.model(input_ids=input_ids, attention_mask=attention).logits[:, 0].float().cpu())
        return torch.cat(out)
