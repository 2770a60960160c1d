"""Causal language models (any ``transformers`` ``AutoModelForCausalLM``): the score is the summed log-probability
of the completion tokens, ``s(y | x) = sum_t log pi(y_t | x, y_<t)`` (Rafailov et al. 2023, eq. 7).

Records (one sample each) are ``{"prompt": str | messages, "response": str | messages, "row": int}`` where
messages are ``[{"role": ..., "content": ...}, ...]``.

* Both strings (completion style): tokens = ``tokenizer(prompt)`` (with the tokenizer's own special tokens,
  e.g. BOS) + ``tokenizer(response)`` + EOS; the response tokens and the EOS are scored.
* Otherwise (chat style) a string prompt becomes one user message and a string response one assistant message;
  the conversation is ``prompt + response`` and only the *assistant messages of the response* are scored
  (assistant turns inside the prompt are context). With a chat template, each message's span is found by
  rendering the conversation prefix by prefix, so the boundaries are exact; the scored span of an assistant
  message is everything its rendering adds after the generation prompt (content and end-of-turn marker).
  Without a chat template a plain one is used: every message is ``"{role}: {content}"`` followed by EOS.

Truncation follows TRL's ``truncation_mode`` (``DPOConfig``/``DataCollatorForPreference``, TRL 1.x), applied to the
whole token sequence (prompt + completion) of every sample:

* ``keep_start`` (TRL's default): ``ids[:max_length]``, so the end of the response is cut. A prompt (everything
  before the first scored token) longer than ``max_prompt_length`` raises, so at least one scored token is left.
* ``keep_end``: ``ids[-max_length:]``, so the prompt is cut from the left (old context goes first). The prompt is
  first cut from the left to ``max_prompt_length`` (TRL < 1.0's ``prompt_ids[-max_prompt_length:]``); a response
  longer than ``max_length - 1`` also loses its start. The first kept token has no context, so it is not scored
  (TRL's shifted labels skip it too). Generation prompts are cut from the left to ``max_prompt_length``.

Every cut is counted (``truncated``: sequences cut so far, a row counting each time it is collated;
``truncated_rows``: which rows) and logged as a warning the first time and at 10, 100, ... distinct rows.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from genalign.adapters.base import Adapter
from genalign.adapters.token_sampling import RowStreamGumbel, draw_seeds, warpers
from genalign.data.batching import pairwise_batch
from genalign.types import Scores

REFERENCES = ("lora", "copy", "none")
TRUNCATION_MODES = ("keep_start", "keep_end")
log = logging.getLogger(__name__)
Piece = tuple[list[int], bool]  # token ids and whether they are scored


class TextAdapter(Adapter):
    """Adapter for causal LMs.

    ``reference``: "lora" (the policy with its LoRA adapters disabled: no second copy; needs ``lora``, or a model
    that already is a ``peft.PeftModel``), "copy" (a frozen deep copy, for full fine-tuning; ``reference_model``
    gives another network instead, e.g. the base of a trained model) or "none" (reference-free objectives such as
    SimPO). ``lora``: keyword arguments of ``peft.LoraConfig`` (r, lora_alpha, lora_dropout, target_modules, e.g.
    ``"all-linear"``). ``chat_template`` replaces the tokenizer's template (it is set on the tokenizer, so a saved
    tokenizer keeps it). ``truncation_mode``: see the module docstring. A tokenizer without a pad token pads
    with EOS (padded positions are masked out of attention and scores, so the choice does not change a score).
    The policy is put in train mode (``from_pretrained`` returns eval mode, and transformers only checkpoints
    activations in train mode); ``disable_dropout`` (TRL's default) zeroes its dropout so the policy's scores are
    deterministic and equal the reference's at step 0.
    """

    deterministic = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        reference: str = "lora",
        lora: dict[str, Any] | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        chat_template: str | None = None,
        truncation_mode: str = "keep_start",
        reference_model: torch.nn.Module | None = None,
        disable_dropout: bool = True,
    ) -> None:
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        has_adapters = _is_peft(model)
        if reference == "lora" and lora is None and not has_adapters:
            raise ValueError("reference='lora' needs a LoRA config (lora={'r': ..., ...}); "
                             "use reference='copy' for full fine-tuning")
        if lora is not None and has_adapters:
            raise ValueError("the model already has peft adapters; pass lora=None to train them as they are")
        if reference_model is not None and reference != "copy":
            raise ValueError(f"reference_model is the frozen reference of reference='copy', got reference={reference!r}")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES} (TRL's meaning), got {truncation_mode!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before building the adapter")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 (the first token needs no score but is context), "
                             f"got {max_prompt_length}")
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.tokenizer = tokenizer
        self.reference_mode = reference
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.truncated = 0  # sequences cut so far (a row counts each time it is collated)
        self.truncated_rows: set[str] = set()
        network = model.get_base_model() if has_adapters else model
        self._keeps_logits = "logits_to_keep" in inspect.signature(network.forward).parameters
        if disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        self.policy = model.train()
        self.reference_model = None
        if reference == "copy":
            frozen = copy.deepcopy(model) if reference_model is None else reference_model
            self.reference_model = frozen.eval().requires_grad_(False)
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None, **kwargs: Any) -> "TextAdapter":
        """Load model and tokenizer from a local folder (nothing is downloaded); ``kwargs`` go to the constructor.
        ``dtype``: a torch dtype or its name ("float32", "bfloat16"), "auto" (the checkpoint's), None (float32)."""
        model = load_causal_lm(path, dtype)
        return cls(model, AutoTokenizer.from_pretrained(path, local_files_only=True), **kwargs)

    @classmethod
    def from_trained(
        cls, path: str | Path, *, base: str | Path | None = None, dtype: torch.dtype | str | None = None, **kwargs: Any
    ) -> "TextAdapter":
        """A trained model (a run's ``final/`` folder, as :meth:`save` writes it) with its base model as the reference.

        A LoRA folder (``adapter_config.json``) is applied to ``base`` (default: the base path recorded in that
        file) and the reference is the same network with the adapters disabled; a full model needs ``base``, loaded
        as a frozen reference copy. The tokenizer is the trained folder's (it keeps the chat template used).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no trained model folder at {str(path)!r}: give a run's final/ folder")
        if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
            hint = f"; did you mean {path / 'final'}?" if (path / "final").is_dir() else ""
            raise FileNotFoundError(f"{path} holds neither a LoRA adapter (adapter_config.json) nor a model "
                                    f"(config.json){hint}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base = base or PeftConfig.from_pretrained(str(path)).base_model_name_or_path
            if not base or not Path(base).is_dir():
                raise FileNotFoundError(f"{path} is a LoRA adapter whose base model folder {str(base)!r} is not here; "
                                        "pass the base model folder (--base)")
            model = PeftModel.from_pretrained(load_causal_lm(base, dtype), str(path))
            return cls(model, tokenizer, reference="lora", lora=None, **kwargs)
        if base is None:
            raise ValueError(f"{path} is a fully fine-tuned model: pass its base model folder (--base) as the reference")
        reference_model = load_causal_lm(base, dtype)
        return cls(load_causal_lm(path, dtype), tokenizer, reference="copy", reference_model=reference_model, **kwargs)

    # ------------------------------------------------------------------------------------------ tokenization
    def _tokens(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _start(self) -> list[int]:
        """What the tokenizer puts in front of a text (e.g. BOS), or BOS/EOS so the first token has a context."""
        start = self._tokens("", special=True)
        if start:
            return start
        bos = self.tokenizer.bos_token_id
        return [self.tokenizer.eos_token_id if bos is None else bos]

    def _pieces(self, prompt: Any, response: Any, where: str) -> list[Piece]:
        if isinstance(response, str) and not response:
            raise ValueError(f"{where}: field 'response' is empty; drop the row or give it a completion")
        if isinstance(prompt, str) and isinstance(response, str):
            return [(self._tokens(prompt, special=True), False),
                    (self._tokens(response) + [self.tokenizer.eos_token_id], True)]
        context = _messages(prompt, "user", where, "prompt")
        if not context:
            raise ValueError(f"{where}: field 'prompt' is an empty message list; give at least one message")
        reply = _messages(response, "assistant", where, "response")
        if not any(m["role"] == "assistant" for m in reply):
            raise ValueError(f"{where}: field 'response' has no assistant message, so nothing would be scored")
        return self._conversation(context, reply, where)

    def _conversation(self, context: list[dict], reply: list[dict], where: str, open_reply: bool = False) -> list[Piece]:
        """Pieces of ``context + reply``; ``open_reply`` appends the header of a new assistant turn (generation)."""
        if self.tokenizer.chat_template is None:
            return self._plain_pieces(context, reply, open_reply)
        return self._template_pieces(context, reply, where, open_reply)

    def _plain_pieces(self, context: list[dict], reply: list[dict], open_reply: bool) -> list[Piece]:
        """Plain template: ``"{role}: {content}" EOS`` per message; assistant replies score content + EOS."""
        eos = self.tokenizer.eos_token_id
        pieces: list[Piece] = [(self._start(), False)]
        for index, message in enumerate(context + reply):
            scored = index >= len(context) and message["role"] == "assistant"
            pieces.append((self._tokens(f"{message['role']}: "), False))
            pieces.append((self._tokens(message["content"]) + [eos], scored))
        if open_reply:
            pieces.append((self._tokens("assistant: "), False))
        return pieces

    def _template_pieces(self, context: list[dict], reply: list[dict], where: str, open_reply: bool) -> list[Piece]:
        """Chat template: render prefix by prefix and tokenize each added span on its own."""
        conversation = context + reply

        def render(n: int, generation_prompt: bool = False) -> str:
            try:
                return self.tokenizer.apply_chat_template(
                    conversation[:n], tokenize=False, add_generation_prompt=generation_prompt)
            except Exception as error:  # template errors are user data errors: say which row
                raise ValueError(f"{where}: the chat template failed on this conversation: {error}") from error

        spans: list[tuple[str, bool]] = []
        for n in range(1, len(conversation) + 1):
            if n > len(context) and conversation[n - 1]["role"] == "assistant":
                spans += [(render(n - 1, True), False), (render(n), True)]
            else:
                spans.append((render(n), False))
        if open_reply:
            spans.append((render(len(conversation), True), False))
        pieces: list[Piece] = []
        previous = ""
        for text, scored in spans:
            if not text.startswith(previous):
                raise ValueError(f"{where}: the chat template renders earlier messages differently once later "
                                 "ones are added, so message boundaries cannot be located; pass a "
                                 "prefix-stable chat_template to the adapter")
            pieces.append((self._tokens(text[len(previous):]), scored))
            previous = text
        return pieces

    def _assemble(self, pieces: list[Piece], where: str) -> tuple[list[int], list[int]]:
        ids = [t for part, _ in pieces for t in part]
        mask = [int(scored) for part, scored in pieces for _ in part]
        if not ids or mask[0]:
            ids, mask = self._start() + ids, [0] * len(self._start()) + mask
        prompt_length = mask.index(1) if 1 in mask else len(mask)
        cut = False
        if prompt_length > self.max_prompt_length:
            if self.truncation_mode == "keep_start":
                raise ValueError(f"{where}: field 'prompt' is {prompt_length} tokens, longer than max_prompt_length="
                                 f"{self.max_prompt_length}; raise max_prompt_length, shorten the prompt or use "
                                 "truncation_mode=keep_end (cuts the prompt from the left)")
            drop = prompt_length - self.max_prompt_length
            ids, mask, cut = ids[drop:], mask[drop:], True
        if len(ids) > self.max_length:
            if self.truncation_mode == "keep_start":  # keeps >= 1 scored token, as max_prompt_length < max_length
                ids, mask = ids[: self.max_length], mask[: self.max_length]
            else:  # the first kept token has no context: it cannot be scored
                ids, mask = ids[-self.max_length :], [0] + mask[-self.max_length + 1 :]
            cut = True
        if cut:
            self._count_truncation(where)
        return ids, mask

    def _count_truncation(self, where: str) -> None:
        self.truncated += 1
        if where in self.truncated_rows:
            return
        self.truncated_rows.add(where)
        count = len(self.truncated_rows)
        if math.log10(count).is_integer():  # 1, 10, 100, ... distinct rows
            cut = "the end of the response" if self.truncation_mode == "keep_start" else "the prompt from the left"
            log.warning("%s: over max_length=%d tokens (or its prompt over max_prompt_length=%d): %s was cut "
                        "(truncation_mode=%s); %d distinct rows truncated so far", where, self.max_length,
                        self.max_prompt_length, cut, self.truncation_mode, count)

    def encode(self, record: dict[str, Any], index: int = 0) -> tuple[list[int], list[int]]:
        """Token ids and the loss mask (1 on scored tokens) of one record."""
        where = _where(record, index)
        for name in ("prompt", "response"):
            if name not in record:
                raise ValueError(f"{where}: missing field {name!r}")
        return self._assemble(self._pieces(record["prompt"], record["response"], where), where)

    def _pad(self, encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in encoded)
        rows = [(ids + [self.pad_id] * (width - len(ids)), [1] * len(ids) + [0] * (width - len(ids)),
                 mask + [0] * (width - len(ids))) for ids, mask in encoded]
        ids, attention, loss = (torch.tensor(column, dtype=torch.long) for column in zip(*rows))
        return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}

    # ------------------------------------------------------------------------------------------ Adapter API
    def collate(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (``[N, T]`` LongTensors)."""
        if not records:
            raise ValueError("collate got no records")
        return self._pad([self.encode(record, i) for i, record in enumerate(records)])

    def concat(self, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pad every part to the longest and stack them; ``texts`` are kept when every part has them."""
        width = max(part["input_ids"].shape[1] for part in parts)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "loss_mask": 0}
        out: dict[str, Any] = {
            key: torch.cat([torch.nn.functional.pad(part[key], (0, width - part[key].shape[1]), value=value)
                            for part in parts])
            for key, value in fill.items()
        }
        if all("texts" in part for part in parts):
            out["texts"] = [text for part in parts for text in part["texts"]]
        return out

    def score(
        self,
        samples: dict[str, Any],
        *,
        groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        with_reference: bool = True,
    ) -> Scores:
        """Summed log-probs of the masked tokens under the policy (with grad) and the reference (no grad).

        ``groups`` and ``generator`` are unused: text scores involve no randomness.
        """
        ids, attention, mask = self._inputs(samples)
        policy = _sequence_logps(self.policy, ids, attention, mask, self._keeps_logits)
        reference = self._reference_logps(ids, attention, mask) if with_reference else None
        return Scores(policy=policy, reference=reference, lengths=mask.sum(-1))

    @torch.no_grad()
    def sample(
        self,
        conditions: Sequence[Any],
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        use_reference: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        do_sample: bool = True,
        **generate_kwargs: Any,
    ) -> dict[str, Any]:
        """``num_samples`` completions per prompt (prompt-major), collated, with the decoded ``texts``.

        Sampling is ancestral sampling at ``temperature`` (no top-k/top-p unless passed in ``generate_kwargs``),
        one random stream per returned sequence seeded from ``generator`` (the global RNG when None) without
        touching the global RNG state (:mod:`genalign.adapters.token_sampling`): a sequence's tokens do not depend
        on the other sequences of the call. ``do_sample=False`` is greedy. The loss mask covers the generated tokens
        up to and including the first stop token.
        """
        prompts = [self._prompt_ids(condition, i) for i, condition in enumerate(conditions)]
        width = max(len(p) for p in prompts)
        device = self._device()
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        stops = self._stop_ids()
        options = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=stops, **generate_kwargs)
        if do_sample:
            options["logits_processor"] = LogitsProcessorList([
                *options.pop("logits_processor", []), *warpers(temperature, options),
                RowStreamGumbel(draw_seeds(len(prompts), num_samples, generator), device),
            ])
            input_ids, attention = input_ids.repeat_interleave(num_samples, 0), attention.repeat_interleave(num_samples, 0)
        else:
            options["num_return_sequences"] = num_samples
        # greedy search either way (the Gumbel noise makes it a draw); the model's own sampling defaults stay off
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        with self._generation_model(use_reference) as model, eval_mode(model):
            generated = model.generate(input_ids=input_ids, attention_mask=attention, **options)[:, width:]
        encoded, texts = [], []
        for j, row in enumerate(generated.tolist()):
            cut = next((k + 1 for k, token in enumerate(row) if token in stops), len(row))
            index = j // num_samples
            encoded.append(self._assemble([(prompts[index], False), (row[:cut], True)], f"condition {index}"))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        batch: dict[str, Any] = self._pad(encoded)
        batch["texts"] = texts
        return batch

    def row_wise_draws(self, **sample_kwargs: Any) -> bool:
        """:meth:`Adapter.row_wise_draws`: True. The only draw from the generator is the seeds ``[prompts,
        num_samples]``; each sequence then samples from its own stream (greedy search draws nothing)."""
        return True

    def save(self, directory: str) -> None:
        """LoRA: the peft adapter in ``directory`` and the merged full model in ``directory/merged``;
        full fine-tuning: the model. The tokenizer goes next to each model."""
        model = self.unwrapped_policy
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if hasattr(model, "merge_and_unload"):
            merged_dir = Path(directory) / "merged"
            copy.deepcopy(model).merge_and_unload().save_pretrained(merged_dir)
            self.tokenizer.save_pretrained(merged_dir)

    # ------------------------------------------------------------------------------------------ helpers
    @torch.no_grad()
    def cache_reference_scores(
        self, rows: Sequence[dict[str, Any]], *, batch_size: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference scores of every pairwise row's chosen and rejected, computed once (CPU tensors ``[len(rows)]``)."""
        if self.reference_mode == "none":
            raise ValueError("reference='none' has no reference model to cache scores from")
        chosen, rejected = [], []
        for start in range(0, len(rows), batch_size):
            batch = pairwise_batch(self, rows[start : start + batch_size])
            for side, out in ((batch.chosen, chosen), (batch.rejected, rejected)):
                out.append(self._reference_logps(*self._inputs(side)).cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def _inputs(self, samples: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self._device()
        return tuple(samples[key].to(device) for key in ("input_ids", "attention_mask", "loss_mask"))

    def _device(self) -> torch.device:
        return next(self.unwrapped_policy.parameters()).device

    @torch.no_grad()
    def _reference_logps(self, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        if self.reference_mode == "none":
            return None
        with self._generation_model(use_reference=True) as model, eval_mode(model):
            return _sequence_logps(model, ids, attention, mask, self._keeps_logits)

    @contextlib.contextmanager
    def _generation_model(self, use_reference: bool) -> Iterator[torch.nn.Module]:
        """The policy, or the reference: the policy with LoRA disabled, or the frozen copy."""
        model = self.unwrapped_policy
        if not use_reference:
            yield model
        elif self.reference_mode == "lora":
            with model.disable_adapter():
                yield model
        elif self.reference_mode == "copy":
            device = self._device()
            if next(self.reference_model.parameters()).device != device:
                self.reference_model.to(device)
            yield self.reference_model
        else:
            raise ValueError("use_reference=True needs a reference model, but the adapter has reference='none'")

    def _prompt_ids(self, condition: Any, index: int) -> list[int]:
        """Prompt tokens for generation: the string as is, or messages plus the generation prompt."""
        where = f"condition {index}"
        if isinstance(condition, str):
            pieces = [(self._tokens(condition, special=True), False)]
        else:
            pieces = self._conversation(_messages(condition, "user", where, "prompt"), [], where, open_reply=True)
        ids = [t for part, _ in pieces for t in part] or self._start()
        if len(ids) > self.max_prompt_length:
            if self.truncation_mode == "keep_start":
                raise ValueError(f"{where}: the prompt is {len(ids)} tokens, longer than max_prompt_length="
                                 f"{self.max_prompt_length}; raise max_prompt_length, shorten the prompt or use "
                                 "truncation_mode=keep_end (cuts the prompt from the left)")
            ids = ids[-self.max_prompt_length :]
            self._count_truncation(where)
        return ids

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of the transformer blocks (non-reentrant, as PyTorch recommends).

        With LoRA the embeddings are frozen, so the block inputs carry no gradient; ``enable_input_require_grads``
        makes them require one, which reentrant checkpointing needs to reach the adapters (peft's recipe).
        """
        model = self.unwrapped_policy
        network = model.get_base_model() if _is_peft(model) else model
        enable = getattr(network, "activation_checkpointing_enable", None) or network.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # transformers 5 renamed the switch; the first argument is the same
        if network is not model:
            network.enable_input_require_grads()

    def _stop_ids(self) -> list[int]:
        configured = getattr(getattr(self.unwrapped_policy, "generation_config", None), "eos_token_id", None)
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        return sorted({self.tokenizer.eos_token_id, *configured})

    # ------------------------------------------------------------------------------------------ WPO weights
    @torch.no_grad()
    def wpo_logps(self, samples: dict[str, Any]) -> torch.Tensor:
        """Per sample, the mean over scored tokens of log π(y_t | y_<t) − log Σ_v π(v | y_<t)² under the policy
        (WPO's aligned length-normalised log-probability, see :func:`genalign.objectives.wpo_weights`); float32, no
        gradient. One extra forward of the policy in eval mode (no dropout draws, so the training RNG is untouched).
        """
        ids, attention, mask = self._inputs(samples)
        model = self.unwrapped_policy
        with eval_mode(model):
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        log_z = torch.logsumexp(logits, dim=-1)
        token_logps = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - log_z
        log_sum_sq = torch.logsumexp(2 * logits, dim=-1) - 2 * log_z
        weights = mask[:, 1:].to(logits.dtype)
        return ((token_logps - log_sum_sq) * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def load_causal_lm(path: str | Path, dtype: torch.dtype | str | None = None) -> torch.nn.Module:
    """``AutoModelForCausalLM`` from a local folder; ``dtype`` may be a name ("float32", "bfloat16") or "auto"."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no local model folder at {str(path)!r}: give the path of a folder saved with "
                                "save_pretrained (config.json, weights and tokenizer files)")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16, float16 or auto")
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def _is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``; no model can be one before peft is imported, so this does not
    import it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _sequence_logps(
    model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, keep_logits: bool
) -> torch.Tensor:
    """``sum_t mask_t * log p(ids_t | ids_<t)`` per row.

    log p = target logit - logsumexp(logits) in float32: the full-vocabulary log-softmax is never built. The LM
    head only runs on positions from the earliest scored token on (``logits_to_keep``) when the model allows.
    """
    width = ids.shape[1]
    first = max(int(mask.float().argmax(-1).min()), 1)
    keep = width - first + 1 if keep_logits else width
    kwargs = {"logits_to_keep": keep} if keep_logits else {}
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False, **kwargs).logits[:, -keep:-1]
    targets, weights = ids[:, width - keep + 1 :], mask[:, width - keep + 1 :]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    token_logps = picked - torch.logsumexp(logits.float(), dim=-1)
    return (token_logps * weights).sum(-1)


def _messages(value: Any, role: str, where: str, field: str) -> list[dict[str, str]]:
    """A string becomes one ``role`` message; a message list is checked for ``role``/``content`` strings."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(f"{where}: field {field!r} must be a string or a list of messages, got {type(value).__name__}")
    for k, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: field {field!r} message {k} must be a dict with string 'role' and "
                             f"'content', got {message!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _where(record: dict[str, Any], index: int) -> str:
    where = f"row {record.get('row', index)}"
    return f"{where} ({record['source']})" if "source" in record else where


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for a forward, restoring every submodule's previous mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
