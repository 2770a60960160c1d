"""Drawing the policy's own samples for online methods, on any adapter: plain draws, draws from the geometric
mixture of policy and reference, selecting samples out of a batch and reading their responses.

Geometric mixture (Munos et al. 2023, "Nash Learning from Human Feedback", §6): with mixing coefficient c,

    π_c(y | x) ∝ π(y | x)^(1−c) · ref(y | x)^c,

sampled per token for language models (log_softmax(c·ref_logits + (1−c)·policy_logits) at each step), exactly for
the tabular adapter, and for diffusion (image and motion) as the mixture c·f_ref + (1−c)·f_θ of the two denoisers'
predictions at every sampling step (the diffusion analogue: a weighted sum of scores is the score of the geometric mixture of the
per-step Gaussian kernels). c = 0 is the policy, c = 1 the reference.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from genalign.adapters.base import Adapter
from genalign.adapters.tabular import TabularAdapter, categorical
from genalign.adapters.text import TextAdapter, eval_mode
from genalign.objectives._checks import in_range
from genalign.online.pairs import sample_responses


def draw(
    adapter: Adapter,
    prompts: Sequence[Any],
    num_samples: int,
    generator: torch.Generator | None,
    *,
    mixture: float = 0.0,
    use_reference: bool = False,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """``num_samples`` samples per prompt (prompt-major) from the policy, the reference (``use_reference``) or the
    geometric mixture with coefficient ``mixture`` = c ∈ [0, 1]; ``sample_kwargs`` go to ``adapter.sample``, on top
    of the adapter's ``online_sample_kwargs``."""
    c = check_mixture(mixture)
    prompts = list(prompts)
    sample_kwargs = options(adapter, sample_kwargs)
    if c == 0.0 or use_reference:
        return adapter.sample(prompts, num_samples, generator=generator, use_reference=use_reference, **sample_kwargs)
    if c == 1.0:
        return adapter.sample(prompts, num_samples, generator=generator, use_reference=True, **sample_kwargs)
    if isinstance(adapter, TabularAdapter):
        return _tabular_mixture(adapter, prompts, num_samples, generator, c)
    if isinstance(adapter, TextAdapter):
        processor = _TokenMixture(adapter, prompts, num_samples, c)
        extra = list(sample_kwargs.pop("logits_processor", []))
        return adapter.sample(prompts, num_samples, generator=generator,
                              logits_processor=LogitsProcessorList([processor, *extra]), **sample_kwargs)
    from genalign.adapters.image import ImageDiffusionAdapter  # diffusers: imported only for diffusion models
    from genalign.adapters.motion import MotionAdapter

    reference = {ImageDiffusionAdapter: "reference_unet", MotionAdapter: "reference_model"}.get(type(adapter))
    if reference is not None:
        with _denoiser_mixture(adapter, getattr(adapter, reference), c):
            return adapter.sample(prompts, num_samples, generator=generator, **sample_kwargs)
    raise TypeError(f"geometric-mixture sampling is not defined for {type(adapter).__name__}; use mixture=0")


def options(adapter: Adapter, sample_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``sample`` keywords of an online draw: the adapter's ``online_sample_kwargs`` updated by the step's."""
    return {**adapter.online_sample_kwargs, **sample_kwargs}


def check_mixture(c: float) -> float:
    """The mixing coefficient c, which must lie in [0, 1]."""
    return in_range("mixture", c, 0.0, 1.0)


def prompts(rows: Sequence[dict]) -> list[Any]:
    """The ``prompt`` of every row (the conditions to sample from); a row without one raises naming it."""
    missing = [r.get("row", i) for i, r in enumerate(rows) if r.get("prompt") is None]
    if missing:
        raise ValueError(f"rows {missing[:10]} have no 'prompt' field; online methods sample from each row's prompt")
    return [r["prompt"] for r in rows]


def device(adapter: Adapter) -> torch.device:
    return next(adapter.policy.parameters()).device


class Collated:
    """A view of an adapter whose records' ``response`` is already a one-sample sample batch (from :func:`take`):
    ``collate`` concatenates them, everything else is the adapter's. Lets offline steps (``PairwiseStep``) score
    the policy's own samples exactly as drawn, without decoding and re-encoding them."""

    def __init__(self, adapter: Adapter):
        self._adapter = adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def collate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self._adapter.concat([record["response"] for record in records])


def take(batch: dict[str, Any], index: torch.Tensor | Sequence[int]) -> dict[str, Any]:
    """The samples ``index`` of a sample batch: every per-sample tensor or list is indexed, ``None`` stays; a sampler
    ``trajectory`` (one entry per sampler step, not per sample) is left out."""
    index = torch.as_tensor(index, dtype=torch.long)
    size = batch_size(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "trajectory":
            continue
        if value is None:
            out[key] = None
        elif isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == size:
            out[key] = [value[i] for i in index.tolist()]
        else:
            raise ValueError(f"cannot select samples from a batch whose field {key!r} is not per-sample "
                             f"(expected a tensor or list of length {size})")
    return out


def batch_size(batch: dict[str, Any]) -> int:
    """Number of samples in an adapter's sample batch."""
    for key in ("input_ids", "x0", "motion", "action"):
        if isinstance(batch.get(key), torch.Tensor):
            return batch[key].shape[0]
    raise ValueError(f"cannot tell the number of samples of a batch with keys {sorted(batch)}")


def responses(batch: dict[str, Any]) -> list[Any]:
    """What a judge sees of each sample: decoded ``texts`` (text), action indices (tabular), images or motions."""
    if "texts" in batch:
        return list(batch["texts"])
    if "action" in batch:
        return batch["action"].tolist()
    return sample_responses(batch)


def ended(adapter: Adapter, batch: dict[str, Any]) -> torch.Tensor:
    """``[N]`` bool: the sample finished with a stop token. Text generations that hit ``max_new_tokens`` (or the
    adapter's ``max_length``) without one are False; samples of other modalities always end."""
    n = batch_size(batch)
    if not isinstance(adapter, TextAdapter):
        return torch.ones(n, dtype=torch.bool)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    scored = mask.sum(-1) > 0
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    final = ids.gather(1, last[:, None]).squeeze(1)
    stops = torch.tensor(adapter._stop_ids(), device=ids.device)
    return (scored & torch.isin(final, stops)).cpu()


# ---------------------------------------------------------------------------------------------- mixtures
def _tabular_mixture(adapter: TabularAdapter, prompts: list, num_samples: int, generator, c: float) -> dict:
    """Exact draws from softmax(c·log ref + (1−c)·log π) per context."""
    contexts = torch.as_tensor(prompts, dtype=torch.long)
    if contexts.ndim != 1 or (contexts < 0).any() or (contexts >= adapter.num_contexts).any():
        raise ValueError(f"prompts must be context indices in [0, {adapter.num_contexts}), got {prompts}")
    device = generator.device if generator is not None else torch.device("cpu")
    with torch.no_grad():
        log_pi, log_ref = adapter._log_tables()
        probs = torch.softmax(c * log_ref + (1 - c) * log_pi, -1).to(device)[contexts.to(device)]
        actions = categorical(probs, num_samples, generator)
    return {"context": contexts.to(device).repeat_interleave(num_samples), "action": actions.reshape(-1)}


class _TokenMixture(LogitsProcessor):
    """Replace the policy's next-token logits by log_softmax(c·ref + (1−c)·policy); the reference runs on the
    whole sequence so far (the prompts left-padded as ``TextAdapter.sample`` pads them)."""

    def __init__(self, adapter: TextAdapter, prompts: list, num_samples: int, c: float):
        lengths = torch.tensor([len(adapter._prompt_ids(p, i)) for i, p in enumerate(prompts)])
        width = int(lengths.max())
        attention = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        self.adapter, self.c, self.prompt_attention = adapter, c, attention.repeat_interleave(num_samples, 0)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, width = input_ids.shape
        prompt = self.prompt_attention.to(input_ids.device)
        attention = torch.cat([prompt, prompt.new_ones(n, width - prompt.shape[1])], 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        with self.adapter._generation_model(use_reference=True) as reference, eval_mode(reference):
            logits = reference(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                               use_cache=False).logits[:, -1].float()
        mixed = self.c * torch.log_softmax(logits, -1) + (1 - self.c) * torch.log_softmax(scores.float(), -1)
        return torch.log_softmax(mixed, -1).to(scores.dtype)


class _MixedDenoiser(torch.nn.Module):
    """c·f_ref + (1−c)·f_θ for every way the sampler calls the network (``forward``; ``guided`` for motion models):
    the prediction of the geometric mixture's denoiser."""

    def __init__(self, policy: torch.nn.Module, reference: Callable[[], Any], c: float):
        super().__init__()
        self.policy, self.c, self._reference = policy, c, reference

    def _mix(self, name: str, *args: Any, **kwargs: Any) -> Any:
        policy = getattr(self.policy, name)(*args, **kwargs)
        with self._reference() as network:
            reference = getattr(network, name)(*args, **kwargs)
        if isinstance(policy, tuple):  # diffusers' return_dict=False
            return (self.c * reference[0] + (1 - self.c) * policy[0],)
        return self.c * reference + (1 - self.c) * policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._mix("__call__", *args, **kwargs)

    def guided(self, *args: Any, **kwargs: Any) -> Any:
        return self._mix("guided", *args, **kwargs)


@contextlib.contextmanager
def _denoiser_mixture(adapter: Any, reference: Callable[[], Any], c: float) -> Iterator[None]:
    """Make ``adapter.sample`` denoise with the mixed prediction (both networks in eval mode) for the block; the
    adapter's ``_sampling_model`` is shadowed by an instance attribute for the duration."""
    policy = adapter.unwrapped_policy

    @contextlib.contextmanager
    def mixed_model(use_reference: bool) -> Iterator[torch.nn.Module]:
        with reference() as network:
            modes = [(m, m.training) for m in (policy, network)]
        try:
            for module, _ in modes:
                module.eval()
            yield _MixedDenoiser(policy, reference, c)
        finally:
            for module, training in modes:
                module.train(training)

    adapter._sampling_model = mixed_model
    try:
        yield
    finally:
        del adapter._sampling_model
