"""Tabular (contextual bandit) adapter: exact softmax policies for theory checks.

The policy is a logits table ``z[c, a]`` and ``π(a|c) = softmax(z[c])[a]``; the reference is a frozen table of
probabilities. Scores are exact log-probabilities, so objectives can be checked against closed forms (e.g. the
ΨPO/IPO vs DPO illustrative example of Azar et al. 2023) and expectations can be taken exactly.

Records are ``{"prompt": context index, "response": action index}``; a sample batch is
``{"context": LongTensor [N], "action": LongTensor [N]}``.
"""

from __future__ import annotations

import json
import operator
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genalign.adapters.base import Adapter
from genalign.types import Scores

WEIGHTS_NAME = "tabular.safetensors"
CONFIG_NAME = "tabular_config.json"


class TabularPolicy(nn.Module):
    """A softmax policy over ``num_actions`` actions for each of ``num_contexts`` contexts."""

    def __init__(self, num_contexts: int, num_actions: int, probs: torch.Tensor | None = None):
        super().__init__()
        logits = torch.zeros(num_contexts, num_actions) if probs is None else probs.log()
        self.logits = nn.Parameter(logits.clone().float())

    def log_probs(self) -> torch.Tensor:
        """``log π(a|c)`` as a ``[C, A]`` tensor (log-softmax over actions)."""
        return torch.log_softmax(self.logits, dim=-1)

    def forward(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.log_probs()[context, action]


class TabularAdapter(Adapter):
    """Adapter over a :class:`TabularPolicy` and a frozen tabular reference.

    ``reference_probs`` is a ``[C, A]`` table of strictly positive rows summing to 1 (default uniform).
    ``init="reference"`` starts the policy at the reference, ``init="uniform"`` at zero logits.
    """

    deterministic = True

    def __init__(
        self,
        num_contexts: int,
        num_actions: int,
        reference_probs: torch.Tensor | None = None,
        init: str = "reference",
    ):
        if num_contexts < 1 or num_actions < 1:
            raise ValueError(f"num_contexts and num_actions must be >= 1, got {num_contexts} and {num_actions}")
        if init not in ("reference", "uniform"):
            raise ValueError(f"init must be 'reference' or 'uniform', got {init!r}")
        self.num_contexts, self.num_actions = num_contexts, num_actions
        reference_probs = _check_probs(reference_probs, num_contexts, num_actions)
        self.reference = TabularPolicy(num_contexts, num_actions, reference_probs).requires_grad_(False)
        self.policy = TabularPolicy(num_contexts, num_actions, reference_probs if init == "reference" else None)

    # ---------------------------------------------------------------------------------- batches
    def collate(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        context = [_index(record, i, "prompt", self.num_contexts) for i, record in enumerate(records)]
        action = [_index(record, i, "response", self.num_actions) for i, record in enumerate(records)]
        return {"context": torch.tensor(context, dtype=torch.long), "action": torch.tensor(action, dtype=torch.long)}

    def concat(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([p[k] for p in parts]) for k in ("context", "action")}

    # ---------------------------------------------------------------------------------- scoring
    def score(
        self,
        samples: dict[str, torch.Tensor],
        *,
        groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        with_reference: bool = True,
    ) -> Scores:
        """Exact ``log π(a|c)`` and ``log ref(a|c)``; no randomness, so ``groups``/``generator`` are unused."""
        context, action = samples["context"], samples["action"]
        reference = None
        if with_reference:  # the trainer moves only the policy: the frozen table follows the batch's device
            with torch.no_grad():
                reference = self.reference.to(context.device)(context, action)
        return Scores(policy=self.policy(context, action), reference=reference, lengths=torch.ones_like(context))

    def sample(
        self,
        conditions: torch.Tensor,
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        use_reference: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Exact categorical draws, ``num_samples`` per context, condition-major."""
        conditions = torch.as_tensor(conditions, dtype=torch.long)
        if conditions.ndim != 1 or (conditions < 0).any() or (conditions >= self.num_contexts).any():
            raise ValueError(f"conditions must be a 1-D tensor of context indices in [0, {self.num_contexts}), "
                             f"got {conditions.tolist()}")
        model = self.reference if use_reference else self.unwrapped_policy
        device = generator.device if generator is not None else model.logits.device
        with torch.no_grad():
            probs = model.log_probs().exp().to(device)[conditions.to(device)]
            actions = categorical(probs, num_samples, generator)
        return {"context": conditions.to(device).repeat_interleave(num_samples), "action": actions.reshape(-1)}

    def row_wise_draws(self, **sample_kwargs: Any) -> bool:
        """:meth:`Adapter.row_wise_draws`: True, every draw is :func:`categorical`'s ``[contexts, num_samples]``."""
        return True

    # ---------------------------------------------------------------------------------- exact quantities
    def probs(self) -> torch.Tensor:
        """``π(a|c)``, ``[C, A]``."""
        return self.unwrapped_policy.log_probs().exp()

    def reference_probs(self) -> torch.Tensor:
        """``ref(a|c)``, ``[C, A]``."""
        return self.reference.log_probs().exp()

    def kl_to_reference(self) -> torch.Tensor:
        """``KL(π‖ref)(c) = Σ_a π(a|c) (log π(a|c) − log ref(a|c))``, ``[C]``."""
        log_pi, log_ref = self._log_tables()
        return (log_pi.exp() * (log_pi - log_ref)).sum(-1)

    def reverse_kl(self) -> torch.Tensor:
        """``KL(ref‖π)(c) = Σ_a ref(a|c) (log ref(a|c) − log π(a|c))``, ``[C]``."""
        log_pi, log_ref = self._log_tables()
        return (log_ref.exp() * (log_ref - log_pi)).sum(-1)

    def _log_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        log_pi = self.unwrapped_policy.log_probs()
        return log_pi, self.reference.to(log_pi.device).log_probs()

    # ---------------------------------------------------------------------------------- persistence
    def save(self, directory: str) -> None:
        """Write both tables to ``tabular.safetensors`` and the shapes to ``tabular_config.json``."""
        os.makedirs(directory, exist_ok=True)
        tensors = {"policy_logits": self.unwrapped_policy.logits.detach().cpu().contiguous(),
                   "reference_logits": self.reference.logits.detach().cpu().contiguous()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({"num_contexts": self.num_contexts, "num_actions": self.num_actions}, f)

    @classmethod
    def load(cls, directory: str) -> "TabularAdapter":
        """Rebuild an adapter written by :meth:`save`."""
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = json.load(f)
        tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
        shape = (config["num_contexts"], config["num_actions"])
        for name in ("policy_logits", "reference_logits"):
            table = tensors.get(name)
            if table is None:
                raise ValueError(f"{directory}/{WEIGHTS_NAME} has no tensor {name!r}; write it with TabularAdapter.save")
            if tuple(table.shape) != shape:
                raise ValueError(f"{directory}/{WEIGHTS_NAME}: {name} has shape {tuple(table.shape)}, "
                                 f"but {CONFIG_NAME} says {shape}; re-save the adapter")
        adapter = cls(*shape, reference_probs=torch.softmax(tensors["reference_logits"], -1))
        with torch.no_grad():
            adapter.reference.logits.copy_(tensors["reference_logits"])
            adapter.policy.logits.copy_(tensors["policy_logits"])
        return adapter


def _check_probs(probs: torch.Tensor | None, num_contexts: int, num_actions: int) -> torch.Tensor:
    if probs is None:
        return torch.full((num_contexts, num_actions), 1.0 / num_actions)
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if tuple(probs.shape) != (num_contexts, num_actions):
        raise ValueError(f"reference_probs must have shape ({num_contexts}, {num_actions}), got {tuple(probs.shape)}")
    if (probs <= 0).any():
        raise ValueError("reference_probs must be strictly positive (KL to the reference is infinite otherwise)")
    row_sums = probs.sum(-1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5):
        bad = int((row_sums - 1).abs().argmax())
        raise ValueError(f"reference_probs row {bad} sums to {float(row_sums[bad]):.6f}; every row must sum to 1")
    return probs.float()


def _index(record: dict[str, Any], i: int, field: str, size: int) -> int:
    if field not in record:
        raise ValueError(f"record {i}: missing field {field!r} (an integer index in [0, {size}))")
    value = record[field]
    try:
        if isinstance(value, (bool, float)):
            raise TypeError
        index = operator.index(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"record {i}: field {field!r} must be an integer index, got {value!r}") from None
    if not 0 <= index < size:
        raise ValueError(f"record {i}: field {field!r} = {index} is out of range [0, {size})")
    return index


def categorical(probs: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """``num_samples`` exact draws from each row of ``probs [N, A]`` by inverting its CDF at uniforms
    ``U [N, num_samples]`` (action a when cdf(a−1) ≤ U < cdf(a)): one row-leading draw, so a row's actions do not
    depend on the other rows (sharded sampling)."""
    uniform = torch.rand((probs.shape[0], num_samples), generator=generator, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, uniform, right=True).clamp(max=probs.shape[1] - 1)
