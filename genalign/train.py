"""The one optimizer core: every adapter and every objective train through :class:`Trainer`.

Built on ``accelerate`` (mixed precision, gradient accumulation, DDP/FSDP/DeepSpeed through ``accelerate
launch``). Checkpoints are written to a temporary folder and renamed into place, so a kill never leaves a
half-written checkpoint; resuming restores model, optimizer, scheduler, every RNG and the data position
(the row order is a pure function of the step, see :class:`genalign.data.batching.RowOrder`). Rows stream through a
``torch.utils.data.DataLoader`` (:mod:`genalign.data.loader`): the trainer never materialises the dataset.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from genalign.adapters.base import Adapter
from genalign.data.batching import RowOrder, pairwise_batch
from genalign.data.loader import SKIPPED_ROWS, Chunks, MicroBatches, check_map_style, row_loader
from genalign.distributed import Shard
from genalign.steps import StepContext

log = logging.getLogger(__name__)

Evaluator = Callable[[Adapter], dict[str, float]]


@dataclass
class TrainConfig:
    """Hyper-parameters of a run. ``batch_size`` is the global micro-batch, split across processes; ``compile``
    runs the (accelerate-prepared) policy through ``torch.compile``. ``num_workers`` DataLoader worker processes
    read rows ahead (``prefetch_factor`` micro-batches each; 0: rows are read in the training process), into pinned
    memory on CUDA when ``pin_memory``."""

    output_dir: str = "outputs/run"
    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    cache_reference: bool = True
    log_with: list[str] = field(default_factory=list)
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True


class _GeneratorState:
    """Wraps the trainer's torch.Generator (shared noise for diffusion scores) for accelerate checkpointing."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


class Trainer:
    """Train ``adapter.policy`` with ``step`` (see :mod:`genalign.steps`) over ``rows``, a map-style dataset of row
    dicts (``__len__``/``__getitem__``; a list is one) read one micro-batch at a time (:mod:`genalign.data.loader`).

    ``evaluate(adapter) -> dict`` runs before training, every ``eval_every`` steps and at the end; the first
    and last results land in ``output_dir/metrics.json`` as ``{"before": ..., "after": ...}``.
    """

    def __init__(
        self,
        adapter: Adapter,
        step: Callable,
        rows: Sequence[dict[str, Any]],
        config: TrainConfig,
        evaluate: Evaluator | None = None,
        accelerator: Accelerator | None = None,
    ):
        check_map_style(rows)
        self.adapter, self.step_fn, self.rows, self.cfg, self.evaluate = adapter, step, rows, config, evaluate
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=config.log_with or None,
            project_dir=str(self.output_dir),
            # a parameter some processes' shares skip (adapter.some_parameters_skip_batches) must be found unused
            # there: its gradient is then the global batch's, as in one process
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=adapter.some_parameters_skip_batches())],
        )
        # the global RNG (dropout) gets seed + process index: independent masks per process (see genalign.distributed)
        set_seed(config.seed, device_specific=True)
        world = self.accelerator.num_processes
        if config.batch_size % world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of processes ({world})")
        self.order = RowOrder(len(self.rows), config.batch_size, seed=config.seed)
        self.shard = Shard(self.accelerator.process_index, world)
        if config.gradient_checkpointing:
            adapter.enable_gradient_checkpointing()
        self.trainable = params = adapter.trainable_parameters()  # fixed for the run; clipped every step
        if not params:
            raise ValueError("the adapter's policy has no trainable parameters (is everything frozen?)")
        self.optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=tuple(config.adam_betas)
        )
        self.scheduler = get_scheduler(
            config.lr_scheduler, self.optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps
        )
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:  # no dataloader goes through prepare(), so DeepSpeed is told the per-process batch
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size // world
        adapter.policy, self.optimizer = self.accelerator.prepare(adapter.policy, self.optimizer)
        self.model = adapter.policy  # the prepared module: accelerate gathers its (possibly sharded) state dict
        if config.compile:  # around the DDP/FSDP wrapper, as accelerate's dynamo plugin does
            adapter.policy = torch.compile(adapter.policy)
        self.noise = _GeneratorState(config.seed + 1)
        step_state = step.checkpoint_state() if hasattr(step, "checkpoint_state") else []
        self.accelerator.register_for_checkpointing(self.scheduler, self.noise, *adapter.checkpoint_state(), *step_state)
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.metrics: dict[str, Any] = {}
        #: ``[len(rows), 2]`` reference scores (chosen, rejected) by dataset index, see :meth:`cache_reference_scores`
        self.reference_scores: torch.Tensor | None = None
        self._stream: Any = None  # (order, next micro-step, iterator over the DataLoader)
        self._skipped: set[str] = set()  # sources of bad rows the dataset substituted in this process's batches

    # ------------------------------------------------------------------ public
    def train(self) -> dict[str, Any]:
        """Run (or resume) to ``max_steps``; returns ``{"before", "after", "history"}``."""
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.log_with:
            acc.init_trackers(self.output_dir.name, config=_flat(asdict(cfg)))
        if not (cfg.resume and self._resume()):
            self.metrics["before"] = self._evaluate("before")
            self._write_metrics()
        if cfg.cache_reference:
            self.cache_reference_scores()
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, disable=not acc.is_local_main_process, desc="train")
        while self.global_step < cfg.max_steps:
            logs = self.step()
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            self._after_step(logs)
        bar.close()
        self._stream = None  # ends the DataLoader workers
        if "after" not in self.metrics:
            self.metrics["after"] = self._evaluate("after")
        self.metrics["history"] = self.history
        self._write_metrics()
        self.save_final()
        if acc.is_main_process:
            _plot_curves(self.history, self.output_dir / "training_curve.png")
        for tracker in acc.trackers:  # not end_training(): that also tears down the process group, which the
            tracker.finish()  # caller may still need (another trainer, evaluation); it ends with the process
        return self.metrics

    def save_final(self) -> Path:
        """Write the trained weights to ``output_dir/final`` in the adapter's layout (:meth:`Adapter.save`).

        Every process calls this: ``Accelerator.get_state_dict`` gathers FSDP / ZeRO-3 shards into full tensors
        (a collective), then the main process saves them through :meth:`Adapter.holding`.
        """
        acc = self.accelerator
        final = self.output_dir / "final"
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:
            with self.adapter.holding(state_dict):
                self.adapter.save(str(final))
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ one optimizer step
    def step(self) -> dict[str, float]:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches of the next global batches); advances
        :attr:`global_step` and returns the step's logs (loss, metrics, grad_norm, lr; means over processes).
        :meth:`train` calls it; benchmarks and custom loops may too (no evaluation, logging or checkpoints)."""
        acc, cfg = self.accelerator, self.cfg
        ctx = StepContext(generator=self.noise.generator, global_mean=self._global_mean, shard=self.shard)
        sums: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            micro_step = self.global_step * cfg.gradient_accumulation_steps + micro
            indices, rows = self._micro_batch(micro_step)
            with acc.accumulate(self.adapter.policy):
                with acc.autocast(), self.shard.draws(self.noise.generator):
                    loss, metrics = self.step_fn(self.adapter, rows, ctx)
                loss = loss.float().mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at optimizer step {self.global_step}, micro-batch {micro}, "
                        f"dataset rows {indices}; lower the learning rate or beta, or check those rows"
                    )
                acc.backward(loss)
                if acc.sync_gradients and self.cfg.max_grad_norm is not None:
                    sums["grad_norm"] = float(acc.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    self.adapter.on_optimizer_step()
                    if hasattr(self.step_fn, "on_optimizer_step"):
                        self.step_fn.on_optimizer_step(self.adapter, self.global_step + 1)
            sums["loss"] = sums.get("loss", 0.0) + loss.item() / cfg.gradient_accumulation_steps
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
        self.scheduler.step()
        sums["lr"] = self.scheduler.get_last_lr()[0]
        self.global_step += 1
        logs = {k: self._global_mean(torch.tensor(v, device=acc.device)).item() for k, v in sums.items()}
        if getattr(self.rows, "skip_bad_rows", False):  # summed over processes
            count = self._global_mean(torch.tensor(float(len(self._skipped)), device=acc.device)).item()
            logs["data/bad_rows_skipped"] = count * acc.num_processes
        return logs

    # ------------------------------------------------------------------ data
    def _micro_batch(self, micro_step: int) -> tuple[list[int], list[dict[str, Any]]]:
        """This process's dataset indices and rows of ``micro_step``, from the DataLoader stream. The stream starts
        at the first micro-step asked for (the resumed step) and is rebuilt when a caller jumps elsewhere or
        replaces :attr:`order`; it stops at the run's last micro-step, so workers never read past the run."""
        cfg = self.cfg
        if self._stream is None or self._stream[:2] != (self.order, micro_step):
            stop = max(cfg.max_steps * cfg.gradient_accumulation_steps, micro_step + cfg.gradient_accumulation_steps)
            batches = MicroBatches(self.order, self.shard, micro_step, stop)
            self._stream = (self.order, micro_step, iter(self._loader(batches)))
        indices, rows = next(self._stream[2])
        self._stream = (self.order, micro_step + 1, self._stream[2])
        for row in rows:
            for source in set(row.get(SKIPPED_ROWS, ())) - self._skipped:
                if len(self._skipped) < 5:  # the rest are counted: data/bad_rows_skipped in the logs
                    log.warning("bad row skipped: %s (micro-step %d trains on a substitute)", source, micro_step)
                self._skipped.add(source)
        return indices, self._with_reference(indices, rows)

    def _loader(self, batch_sampler: Any):
        cfg = self.cfg
        return row_loader(self.rows, batch_sampler, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                          pin_memory=cfg.pin_memory and self.accelerator.device.type == "cuda", seed=cfg.seed)

    def _with_reference(self, indices: list[int], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows with their cached reference scores added (copies: the dataset's rows are never modified)."""
        if self.reference_scores is None:
            return rows
        scores = self.reference_scores[indices].tolist()
        return [{**row, "reference_chosen": c, "reference_rejected": j} for row, (c, j) in zip(rows, scores)]

    def _after_step(self, logs: dict[str, float]) -> None:
        cfg, acc = self.cfg, self.accelerator
        logs["step"] = self.global_step
        if self.global_step == cfg.max_steps:
            self.metrics["after"] = self._evaluate("after")
        elif cfg.eval_every and self.global_step % cfg.eval_every == 0:
            logs.update({f"eval/{k}": v for k, v in self._evaluate(f"step-{self.global_step:08d}").items()})
        self.history.append(logs)
        if cfg.log_with:
            acc.log(logs, step=self.global_step)
        if acc.is_main_process and (self.global_step % max(cfg.log_every, 1) == 0 or self.global_step == cfg.max_steps):
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(logs) + "\n")
        if (cfg.save_every and self.global_step % cfg.save_every == 0) or self.global_step == cfg.max_steps:
            self.save_checkpoint()

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, tag: str) -> dict[str, float]:
        """Run the evaluator; one that takes ``tag`` and ``output_dir`` keywords may also write pictures there
        (sample grids named by the tag: "before", "step-N", "after")."""
        if self.evaluate is None:
            return {}
        extra = {}
        if {"tag", "output_dir"} <= set(inspect.signature(self.evaluate).parameters):
            extra = {"tag": tag, "output_dir": self.output_dir if self.accelerator.is_main_process else None}
        model = self.adapter.policy
        model.eval()
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        # evaluation draws its own randomness: it must not shift the training RNG streams
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.accelerator.autocast():
            result = {k: float(v) for k, v in self.evaluate(self.adapter, **extra).items()}
        model.train()
        return result

    def _write_metrics(self) -> None:
        if self.accelerator.is_main_process:
            _atomic_write_text(self.output_dir / "metrics.json", json.dumps(self.metrics, indent=2))

    # ------------------------------------------------------------------ reference cache
    def cache_reference_scores(self) -> None:
        """Precompute the reference scores of every pair once when they cannot change (a deterministic adapter,
        pairwise rows that do not carry their own): :attr:`reference_scores` keeps them by dataset index (two floats
        a row; the rows are not modified) and each micro-batch's rows get theirs added when they are read.

        The set is read in chunks of ``batch_size`` through the same DataLoader as training. With several processes
        each scores an equal number of chunks (its :meth:`Shard.split` share, the last one repeated where shares
        differ by one, so collective forwards such as FSDP's stay in step) and the scores are gathered; a chunk
        holds the same rows whichever process scores it, so every process ends with the one-process scores.
        """
        if self.reference_scores is not None or not self.adapter.deterministic or len(self.rows) == 0:
            return
        first = self.rows[0]
        if "chosen" not in first or "reference_chosen" in first:
            return
        n, bs = len(self.rows), self.cfg.batch_size
        chunks = [range(start, min(start + bs, n)) for start in range(0, n, bs)]
        mine = list(self.shard.split(len(chunks)))
        share = -(-len(chunks) // self.shard.count)
        padded = [chunks[i] for i in mine] + [chunks[mine[-1] if mine else 0]] * (share - len(mine))
        computed: list[tuple[int, list[list[float]]]] = []
        with torch.no_grad(), self.accelerator.autocast():
            for k, (indices, rows) in enumerate(self._loader(Chunks(padded))):
                batch = pairwise_batch(self.adapter, rows).to(self.accelerator.device)
                chosen, rejected = self.adapter.score_pairs(batch)
                if chosen.reference is None:
                    return  # reference-free objective (e.g. SimPO): nothing to cache (the same on every process)
                if k < len(mine):
                    pair_scores = torch.stack([chosen.reference, rejected.reference], 1).float()
                    computed.append((indices[0], pair_scores.tolist()))
        scores = torch.full((n, 2), float("nan"))
        for start, values in self.shard.gather(computed):
            scores[start : start + len(values)] = torch.tensor(values)
        self.reference_scores = scores

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """accelerate state + trainer state into ``step-N.tmp``, then an atomic rename to ``step-N``."""
        acc = self.accelerator
        final = self.checkpoint_root / f"step-{self.global_step:08d}"
        tmp = final.with_suffix(".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process has written its RNG state before the rename
        if acc.is_main_process:
            state = {"global_step": self.global_step, "metrics": self.metrics, "history": self.history}
            _atomic_write_text(tmp / "trainer_state.json", json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.cfg.keep_checkpoints or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_root.exists():
            return []
        return sorted(p for p in self.checkpoint_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))

    def _resume(self) -> bool:
        found = self.checkpoints()
        if not found:
            return False
        latest = found[-1]
        self.accelerator.load_state(str(latest))
        state = json.loads((latest / "trainer_state.json").read_text())
        self.global_step, self.metrics, self.history = state["global_step"], state["metrics"], state["history"]
        log.info("resumed from %s at step %d", latest, self.global_step)
        return True

    def _global_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t.mean()
        return self.accelerator.gather(t.reshape(-1).to(self.accelerator.device)).mean()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


def _plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss, implicit reward margin and accuracy against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "rewards/margin", "rewards/accuracy") if any(k in h for h in history)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [h["step"] for h in history if key in h and math.isfinite(h[key])]
        ax.plot(steps, [h[key] for h in history if key in h and math.isfinite(h[key])])
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
