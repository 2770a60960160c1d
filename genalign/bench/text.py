"""Text suite: genalign's DPO step against TRL's ``DPOTrainer`` on the same GPT-2-shaped model, rows and batches.

Both sides train a full copy of the same initial weights with a frozen reference copy, AdamW at the same learning
rate, a constant schedule and gradient clipping at 1.0, on the same micro-batches (genalign's
:class:`~genalign.data.batching.RowOrder`). One step is, for each side, everything its own training loop does per
optimizer step:

* genalign: :class:`~genalign.train.Trainer`'s optimizer step (tokenise + collate the rows, one concatenated forward
  of chosen and rejected, log-probs only from the first completion token on, cached reference scores, DPO loss,
  backward, clip, AdamW). The reference scores are computed once before training (``TrainConfig.cache_reference``).
* TRL: the collator on the pre-tokenised rows, ``DPOTrainer.training_step`` (forward, reference forward unless
  ``precompute_ref_log_probs``, loss, backward), clip, optimizer and scheduler step, as its ``train`` loop does.

Both peers are measured: TRL as configured by default (reference forward every step) and TRL with
``precompute_ref_log_probs=True`` (the like-for-like counterpart of genalign's cached reference scores).
"""

from __future__ import annotations

import copy
import random
import string
import tempfile
from dataclasses import asdict, dataclass
from contextlib import nullcontext
from typing import Any
from unittest import mock

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import genalign.adapters.text as text_adapter
from genalign.adapters.text import TextAdapter
from genalign.bench.measure import timed
from genalign.data.batching import RowOrder
from genalign.models.tiny_lm import char_tokenizer
from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig

CHARACTERS = string.ascii_lowercase + string.digits + " .,;:!?'-+=()"


@dataclass
class TextConfig:
    """Model, data and optimisation of the text suite (CPU defaults: a small GPT-2; :meth:`for_cuda`: ~0.5B)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 8192  # GPT-2-like LM-head cost; the character tokenizer uses the first ids only
    n_positions: int = 128
    prompt_chars: tuple[int, int] = (24, 48)
    response_chars: tuple[int, int] = (8, 40)
    rows: int = 96
    batch_size: int = 8
    beta: float = 0.1
    learning_rate: float = 1e-5
    mixed_precision: str = "no"
    seed: int = 0

    @classmethod
    def for_cuda(cls) -> "TextConfig":
        """GPT-2-shaped ~0.54B parameters (24 layers, 1280 wide, 50257 vocabulary) in bf16 autocast."""
        return cls(n_layer=24, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024, prompt_chars=(128, 256),
                   response_chars=(64, 256), rows=256, batch_size=8, mixed_precision="bf16")

    @classmethod
    def tiny(cls) -> "TextConfig":
        """A 2-layer, 32-wide GPT-2 on 12 rows of 4 pairs: seconds per run on the CPU, for plumbing checks
        (``--text-shape tiny``), not for timing."""
        return cls(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=96, rows=12, batch_size=4)


def make_rows(config: TextConfig) -> list[dict[str, Any]]:
    """Random character strings as prompt / chosen / rejected (the content does not matter for throughput)."""
    rng = random.Random(config.seed)

    def text(bounds: tuple[int, int]) -> str:
        return "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(*bounds)))

    return [{"prompt": text(config.prompt_chars), "chosen": text(config.response_chars),
             "rejected": text(config.response_chars), "row": i} for i in range(config.rows)]


def make_model(config: TextConfig, tokenizer) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (no dropout), seeded."""
    gpt2 = GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return GPT2LMHeadModel(gpt2)


def full_softmax_logps(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor,
                       keep_logits: bool) -> torch.Tensor:
    """The textbook sequence log-prob (lever off): logits at every position, a full-vocabulary float32
    ``log_softmax``, then the targets gathered; same value as :func:`genalign.adapters.text._sequence_logps`."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask[:, 1:]).sum(-1)


class GenalignDPO:
    """genalign's trainer on a TextAdapter (full fine-tune, frozen reference copy). Lever-off variants:
    ``cache_reference=False`` recomputes the reference scores every step; ``full_softmax=True`` scores with
    :func:`full_softmax_logps` instead of genalign's kept-positions ``logsumexp``."""

    def __init__(self, model: torch.nn.Module, tokenizer, rows: list[dict], config: TextConfig, order: RowOrder,
                 cache_reference: bool = True, full_softmax: bool = False):
        self.name = "genalign-full-softmax" if full_softmax else "genalign" if cache_reference else "genalign-no-cache"
        self.full_softmax = full_softmax
        self.workdir = tempfile.TemporaryDirectory(prefix="genalign-bench-")
        adapter = TextAdapter(model, tokenizer, reference="copy", max_length=config.n_positions,
                              max_prompt_length=config.n_positions - 1)
        train = TrainConfig(output_dir=self.workdir.name, max_steps=10**9, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, lr_scheduler="constant", max_grad_norm=1.0,
                            mixed_precision=config.mixed_precision, seed=config.seed,
                            cache_reference=cache_reference)
        self.trainer = Trainer(adapter, build_step("dpo", beta=config.beta), [dict(r) for r in rows], train)
        self.trainer.order = order
        self.setup_seconds = timed(self.trainer.cache_reference_scores)[0] if cache_reference else 0.0

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.adapter.unwrapped_policy

    def step(self) -> float:
        """One optimizer step on the next micro-batch of the shared order; returns the loss."""
        lever_off = mock.patch.object(text_adapter, "_sequence_logps", full_softmax_logps)
        with lever_off if self.full_softmax else nullcontext():
            return self.trainer.step()["loss"]


class TRLDPO:
    """TRL's DPOTrainer stepped the way its ``train`` loop steps it, on the shared micro-batch order."""

    def __init__(self, model: torch.nn.Module, tokenizer, rows: list[dict], config: TextConfig, order: RowOrder,
                 precompute_reference: bool = False):
        from datasets import Dataset, disable_progress_bars
        from trl import DPOConfig, DPOTrainer

        disable_progress_bars()
        self.name = "trl+precompute" if precompute_reference else "trl"
        self.workdir = tempfile.TemporaryDirectory(prefix="genalign-bench-trl-")
        cuda = torch.cuda.is_available()
        args = DPOConfig(
            output_dir=self.workdir.name, per_device_train_batch_size=config.batch_size, beta=config.beta,
            learning_rate=config.learning_rate, lr_scheduler_type="constant", max_grad_norm=1.0,
            max_length=config.n_positions, precompute_ref_log_probs=precompute_reference, seed=config.seed,
            bf16=config.mixed_precision == "bf16", use_cpu=not cuda, report_to="none", save_strategy="no",
            disable_tqdm=True, logging_steps=10**9,
        )
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        self.setup_seconds, self.trainer = timed(
            lambda: DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval().requires_grad_(False), args=args,
                               train_dataset=data, processing_class=tokenizer))
        trainer = self.trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=10**9)
        trainer.current_gradient_accumulation_steps = 1  # set by HF's train loop, read by training_step
        self.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        self.order, self.micro_step = order, 0

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def step(self) -> float:
        trainer, model = self.trainer, self.model_wrapped
        indices = self.order.indices(self.micro_step)
        self.micro_step += 1
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in indices])
        loss = trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return float(loss)


def build(config: TextConfig, sides: tuple[str, ...] = ("genalign", "trl", "trl+precompute")) -> dict[str, Any]:
    """The named sides on copies of one initial model, sharing rows and the micro-batch order (``genalign-no-cache``
    is the lever-off genalign variant)."""
    tokenizer = char_tokenizer(CHARACTERS)
    rows = make_rows(config)
    model = make_model(config, tokenizer)
    if torch.cuda.is_available():
        model = model.cuda()
    order = RowOrder(len(rows), config.batch_size, seed=config.seed)
    makers = {
        "genalign": lambda: GenalignDPO(copy.deepcopy(model), tokenizer, rows, config, order),
        "genalign-no-cache": lambda: GenalignDPO(copy.deepcopy(model), tokenizer, rows, config, order, False),
        "genalign-full-softmax": lambda: GenalignDPO(copy.deepcopy(model), tokenizer, rows, config, order,
                                                     full_softmax=True),
        "trl": lambda: TRLDPO(copy.deepcopy(model), copy.deepcopy(tokenizer), rows, config, order),
        "trl+precompute": lambda: TRLDPO(copy.deepcopy(model), copy.deepcopy(tokenizer), rows, config, order, True),
    }
    unknown = set(sides) - set(makers)
    if unknown:
        raise ValueError(f"unknown text sides {sorted(unknown)}; choose from {sorted(makers)}")
    return {name: makers[name]() for name in sides}


def describe(config: TextConfig) -> dict[str, Any]:
    return {"model": f"GPT-2 {config.n_layer}x{config.n_embd}, vocab {config.vocab_size}", **asdict(config)}
