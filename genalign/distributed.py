"""Multi-process runs that equal the one-process run with the same global batch.

**What "the same" means.** With W processes, the global micro-batch of B rows (``TrainConfig.batch_size``) is cut
into W contiguous shares: process r gets rows ``[r·B/W, (r+1)·B/W)``. Every process holds the same shared generator
(the trainer's, seeded identically). While a step runs, each draw from that generator whose leading dimension is d
(per-row noise ε, timesteps t, condition drops, buffer picks) is made as the one-process run makes it for the whole
global batch, with leading dimension d·W, and the process keeps its slice ``[r·d, (r+1)·d)``. So every row gets
exactly the random numbers it gets in the one-process run, and the generator advances identically on every process
(it stays in lockstep, which is why the main process's saved copy restores all of them). DDP averages gradients over
processes; with equal shares the mean of the per-process means is the global mean. Steps that must draw for the
global batch as a whole (Diffusion-DRO's sampler offsets) change the slicing rule with :meth:`Shard.remap`.

The draws are intercepted with a :class:`torch.overrides.TorchFunctionMode` (``torch.rand``/``randn``/``randint``
called with that generator, including diffusers' ``randn_tensor``), so adapters need no distributed code.

Where the contract stops: (1) a draw's trailing shape must not depend on the share; rows padded to the longest of
their own share (variable-length motion) get noise of another shape than in the one-process run, so such runs agree
in distribution, not value for value. (2) The global torch RNG (dropout) is seeded ``seed + process index`` by the
trainer, so processes draw independent dropout masks; models with active dropout agree in distribution only.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.overrides import TorchFunctionMode

#: ``span(d) -> (total, start)``: draw ``total`` rows instead of ``d`` and keep ``[start, start + d)``
Span = Callable[[int], tuple[int, int]]
_DRAWS = (torch.rand, torch.randn, torch.randint)


class ShardedDraws(TorchFunctionMode):
    """Within this mode, a draw from ``generator`` of leading dimension d is drawn with leading dimension
    ``total`` and sliced to ``[start, start + d)``, ``(total, start) = span(d)``; ``span=None`` leaves draws as made.
    Scalar draws (shape ``()``) are never resized."""

    def __init__(self, generator: torch.Generator, span: Span | None):
        super().__init__()
        self.generator, self.span = generator, span

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _DRAWS or kwargs.get("generator") is not self.generator or self.span is None:
            return func(*args, **kwargs)
        args, kwargs = list(args), dict(kwargs)
        if "size" in kwargs:
            size = tuple(kwargs["size"])
        elif func is torch.randint:
            size = tuple(args[-1])
        elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            size = tuple(args[0])
        else:
            size, args = tuple(args), [tuple(args)]
        if not size:
            return func(*args, **kwargs)
        total, start = self.span(size[0])
        if total == size[0] and start == 0:
            return func(*args, **kwargs)
        full = (total, *size[1:])
        if "size" in kwargs:
            kwargs["size"] = full
        else:
            args[-1] = full
        return func(*args, **kwargs)[start : start + size[0]].clone()


class Shard:
    """This process's part of every global micro-batch (``index`` of ``count`` processes), the slicing of shared
    draws (see the module docstring) and gathering across processes."""

    def __init__(self, index: int = 0, count: int = 1):
        if not 0 <= index < count:
            raise ValueError(f"process index {index} is outside 0 … {count - 1}")
        self.index, self.count = index, count
        self._mode: ShardedDraws | None = None

    def rows(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous share of a global batch whose size is a multiple of ``count``."""
        if len(items) % self.count:
            raise ValueError(f"a global batch of {len(items)} rows cannot be split evenly over {self.count} processes; "
                             "make batch_size a multiple of the number of processes")
        n = len(items) // self.count
        return list(items[self.index * n : (self.index + 1) * n])

    def split(self, n: int) -> range:
        """This process's contiguous share of n work items (the first ``n mod count`` processes take one more)."""
        base, extra = divmod(n, self.count)
        start = self.index * base + min(self.index, extra)
        return range(start, start + base + (self.index < extra))

    def draws(self, generator: torch.Generator):
        """Context: draws from ``generator`` are this process's slice of the global batch's draws."""
        if self.count == 1:
            return nullcontext()
        return self._activate(ShardedDraws(generator, lambda d: (d * self.count, d * self.index)))

    @contextmanager
    def _activate(self, mode: ShardedDraws) -> Iterator[None]:
        outer, self._mode = self._mode, mode
        try:
            with mode:
                yield
        finally:
            self._mode = outer

    @contextmanager
    def remap(self, span: Span | None) -> Iterator[None]:
        """Context: the active :meth:`draws` slices by ``span`` instead (``None``: every process draws exactly what
        the one-process run draws). No effect in a one-process run."""
        if self._mode is None:
            yield
            return
        outer, self._mode.span = self._mode.span, span
        try:
            yield
        finally:
            self._mode.span = outer

    def gather(self, items: Sequence[Any]) -> list[Any]:
        """Every process's ``items`` (picklable) concatenated in process order, on every process."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))
