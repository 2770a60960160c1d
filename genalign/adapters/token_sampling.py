"""Ancestral token sampling with one random stream per generated sequence, for ``TextAdapter.sample``.

``generate()`` draws every sequence's next token with one ``torch.multinomial`` over the batch from the global RNG,
so a sequence's tokens depend on which other sequences share its batch. Here each sequence r owns a generator
seeded from a per-row seed, and the next token is drawn by the Gumbel-max trick inside ``generate``'s greedy search::

    y_t = argmax_v ( s_t(v) + G_t(v) ),   G_t(v) = −log(−log U_t(v)),   U_t ~ Uniform[0, 1)^V from stream r,

which is an exact draw from softmax(s_t) (Gumbel 1954; Maddison et al. 2014, "A* Sampling"), up to float32
uniforms: G ≤ 16.6, so a token more than ~19 nats below the best is never drawn (its probability is < 1e-8). s_t are the logits
after the usual processors and the sampling warpers (temperature, top-k, top-p, …, in ``generate``'s order). A
sequence's draws depend only on its own seed and step, so sampling a batch in shards (one per process) gives every
sequence the tokens it gets in the whole batch (to the rounding of its logits in a differently padded batch).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

#: ``generate`` keyword → warper, in the order ``generate`` applies them when it samples
WARPERS = {
    "top_k": TopKLogitsWarper,
    "top_p": TopPLogitsWarper,
    "min_p": MinPLogitsWarper,
    "typical_p": TypicalLogitsWarper,
    "epsilon_cutoff": EpsilonLogitsWarper,
    "eta_cutoff": EtaLogitsWarper,
}
#: values of the warper keywords that leave the distribution as it is
NEUTRAL = {"top_k": (0, None), "top_p": (1.0, None), "min_p": (0.0, None), "typical_p": (1.0, None),
           "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None)}


def warpers(temperature: float, options: dict[str, Any]) -> list[LogitsProcessor]:
    """The sampling warpers for ``temperature`` and the warper keywords in ``options`` (removed from it)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}; use do_sample=False for greedy")
    out: list[LogitsProcessor] = [] if temperature == 1.0 else [TemperatureLogitsWarper(temperature)]
    for name, warper in WARPERS.items():
        value = options.pop(name, None)
        if value not in NEUTRAL[name]:
            out.append(warper(value))
    return out


class RowStreamGumbel(LogitsProcessor):
    """Adds each row's Gumbel noise ``−log(−log U)`` to its scores; greedy search then takes the exact sample.

    Row r's uniforms come from its own generator seeded with ``seeds[r]`` (V float32 numbers per step, so a row's
    t-th draw is the same whatever the batch); tokens already at −inf (masked by a warper) stay there.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} sequences are being generated for {len(self.generators)} streams")
        vocab = scores.shape[1]
        uniform = torch.stack([torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        return scores.float() - torch.log(-torch.log(uniform))


def draw_seeds(count: int, num_samples: int, generator: torch.Generator | None) -> list[int]:
    """One seed per returned sequence, ``[count, num_samples]`` drawn row-leading from ``generator`` (the global
    RNG when None), flattened prompt-major."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(2**62, (count, num_samples), generator=generator, device=device).reshape(-1).tolist()
