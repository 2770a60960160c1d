"""The one interface every modality adapter implements.

An adapter owns a modality: it turns raw records into sample batches (``collate``), scores N samples under
the policy and the reference on shared randomness (``score``), and draws samples from a model (``sample``).
Objectives never see models; the trainer never sees modality details.

Shared randomness: ``score(samples, groups=g)`` gives samples with the same ``g[i]`` the same random draw
(timestep and noise for diffusion), and the reference is evaluated on exactly the policy's inputs. A pair's
chosen and rejected therefore share ``t`` and ``eps`` when scored through :meth:`Adapter.score_pairs`.
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import torch
from accelerate.utils import extract_model_from_parallel

from genalign.types import PairwiseBatch, SampleBatch, Scores


class Adapter(abc.ABC):
    """Base class of the modality adapters (text, image, motion, tabular)."""

    #: the trainable network; the trainer replaces it with the ``accelerate``-prepared module
    policy: torch.nn.Module
    #: True when scores do not depend on fresh randomness, so reference scores can be computed once and cached
    deterministic: bool = False
    #: :meth:`sample` keywords that online draws (``genalign.online.draws``) use unless the step sets them
    online_sample_kwargs: Mapping[str, Any] = MappingProxyType({})

    @abc.abstractmethod
    def collate(self, records: Sequence[dict[str, Any]]) -> SampleBatch:
        """Turn raw records (one sample each) into a sample batch; bad records raise naming the field."""

    @abc.abstractmethod
    def concat(self, parts: Sequence[SampleBatch]) -> SampleBatch:
        """Concatenate sample batches along the sample axis (so a pair is scored in one forward)."""

    @abc.abstractmethod
    def score(
        self,
        samples: SampleBatch,
        *,
        groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        with_reference: bool = True,
    ) -> Scores:
        """Per-sample scores ``[N]`` for the policy (with grad) and, if asked, the reference (no grad)."""

    @abc.abstractmethod
    def sample(
        self,
        conditions: Any,
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        use_reference: bool = False,
    ) -> SampleBatch:
        """Draw ``num_samples`` samples per condition (condition-major) from the policy or the reference."""

    def row_wise_draws(self, **sample_kwargs: Any) -> bool:
        """Whether :meth:`sample` with these keywords draws from its generator only tensors whose leading dimension
        is the sample and whose other dimensions do not depend on the other samples. Then, under
        :meth:`genalign.distributed.Shard.draws`, a process sampling only its own rows draws exactly the numbers
        the one-process run draws for them (:func:`genalign.online.global_batch.draw`). False unless an adapter
        knows better (a sampler whose draws' shapes depend on the batch, e.g. padding to its longest sample)."""
        return False

    # ----------------------------------------------------------------------------------------------
    def score_pairs(
        self,
        batch: PairwiseBatch,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Scores, Scores]:
        """Score chosen and rejected in one concatenated forward; pair i shares its randomness.

        Cached reference scores on the batch are used instead of running the reference.
        """
        cached = batch.reference_chosen is not None and batch.reference_rejected is not None
        groups = torch.arange(batch.size).repeat(2)
        scores = self.score(
            self.concat([batch.chosen, batch.rejected]),
            groups=groups,
            generator=generator,
            with_reference=not cached,
        )
        chosen, rejected = scores.split([batch.size, batch.size])
        if cached:
            chosen.reference, rejected.reference = batch.reference_chosen, batch.reference_rejected
        return chosen, rejected

    @property
    def unwrapped_policy(self) -> torch.nn.Module:
        """The policy without DDP/FSDP/compile wrappers (for ``disable_adapter``, saving, generation).

        Remembered per wrapper object: unwrapping walks every submodule (looking for compiled regions), which costs
        more than a small model's forward when done several times per step; assigning a new ``policy`` unwraps anew.
        """
        policy = self.policy
        remembered = self.__dict__.get("_unwrapped")
        if remembered is None or remembered[0] is not policy:
            remembered = self._unwrapped = (policy, extract_model_from_parallel(policy))
        return remembered[1]

    def reference_copy_on_policy_device(self, reference: torch.nn.Module) -> torch.nn.Module:
        """A frozen reference copy, moved to the policy's device the first time it is used after a move."""
        device = next(self.unwrapped_policy.parameters()).device
        if next(reference.parameters()).device != device:
            reference.to(device)
        return reference

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def some_parameters_skip_batches(self) -> bool:
        """Whether a trainable parameter can be left out of a batch's forward (e.g. a null-condition embedding used
        only when a caption is dropped). Under DDP such a parameter must be found unused on the processes whose
        share skipped it, or their gradient reduction waits forever; False by default."""
        return False

    def on_optimizer_step(self) -> None:
        """Called by the trainer after every optimizer step (e.g. EMA updates); nothing by default."""

    def checkpoint_state(self) -> list[Any]:
        """Extra objects with ``state_dict``/``load_state_dict`` that checkpoints must hold (e.g. an EMA)."""
        return []

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the policy (transformers and diffusers name the switch differently)."""
        model = self.unwrapped_policy
        for name in ("gradient_checkpointing_enable", "enable_gradient_checkpointing"):
            if hasattr(model, name):
                getattr(model, name)()
                return
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing switch; set train.gradient_checkpointing=false")

    def save(self, directory: str) -> None:
        """Write the trained weights in the modality's native layout (override per adapter).

        Every adapter saves what :attr:`unwrapped_policy` holds, so ``with adapter.holding(state_dict):
        adapter.save(d)`` writes the weights of a gathered state dict (sharded runs, see :meth:`holding`).
        """
        self.unwrapped_policy.save_pretrained(directory)

    @contextmanager
    def holding(self, state_dict: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
        """The unwrapped policy with every parameter and buffer replaced by ``state_dict``'s tensor of that name
        for the duration of the block; the original tensors are put back afterwards.

        Under FSDP or DeepSpeed ZeRO-3 each process holds shards of the parameters; ``accelerate``'s
        ``Accelerator.get_state_dict(policy)`` gathers the full tensors, and saving inside this block writes them
        through the adapter's own layout (LoRA files, ``save_pretrained``, merged copies). Parameters shared by
        several names (tied embeddings) stay shared. The keys must be exactly those of the policy's
        ``state_dict()`` (of the network itself: a ``torch.compile`` wrapper's ``_orig_mod.`` prefix is not expected).
        """
        model = extract_model_from_parallel(self.unwrapped_policy, keep_torch_compile=False)
        expected, given = set(model.state_dict()), set(state_dict)
        if expected != given:
            raise ValueError(
                f"the state dict to hold does not match {type(model).__name__}'s: missing {sorted(expected - given)[:5]}, "
                f"unexpected {sorted(given - expected)[:5]}; pass accelerator.get_state_dict(policy) of this adapter"
            )
        replaced: dict[int, torch.Tensor] = {}  # id of an original tensor -> its replacement (keeps ties)
        undo: list[tuple[dict[str, Any], str, torch.Tensor]] = []
        covered: set[str] = set()
        try:
            for slot, named in (("_parameters", model.named_parameters(remove_duplicate=False)),
                                ("_buffers", model.named_buffers(remove_duplicate=False))):
                for name, original in list(named):
                    if name not in state_dict:  # a non-persistent buffer: not part of the saved state
                        continue
                    if id(original) not in replaced:
                        value = state_dict[name]
                        replaced[id(original)] = (
                            torch.nn.Parameter(value, requires_grad=original.requires_grad) if slot == "_parameters"
                            else value
                        )
                    owner_name, _, attr = name.rpartition(".")
                    table = getattr(model.get_submodule(owner_name), slot)
                    undo.append((table, attr, original))
                    table[attr] = replaced[id(original)]
                    covered.add(name)
            if covered != given:  # a state-dict hook renamed keys: they name no parameter or buffer
                raise ValueError(f"state dict keys {sorted(given - covered)[:5]} name no parameter or buffer of "
                                 f"{type(model).__name__}; they cannot be held")
            yield model
        finally:
            for table, attr, original in reversed(undo):
                table[attr] = original
