"""Content-addressed cache of frozen-encoder outputs (VAE latents, text-encoder states) as safetensors files.

Each item is stored under ``<directory>/<kind>-<sha256(namespace, kind, content)>.safetensors``, so a latent is
computed once per distinct image and model, whatever batch it later lands in; the training step then never runs
the VAE or the text encoder. ``namespace`` names the frozen models (e.g. the pipeline folder) so entries of
different models never mix. Files are written to a temporary name and renamed, so concurrent processes and
interrupted runs never leave a half-written entry.

Memory holds at most ``memory_bytes`` of entries (least recently used first out; 0, the default: none), so the
cache of a dataset larger than memory lives on disk and only its hot part stays in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


class EncodingCache:
    """``lookup(kind, contents, compute)``: per-item tensors, from memory or disk when present, else from ``compute``.

    ``compute(indices)`` receives the positions (into ``contents``) of the distinct items not yet cached and
    returns one ``{name: tensor}`` per position. Without a ``directory`` nothing touches the disk, but repeated
    items within one call are still computed once. ``counts`` tallies where items came from (``memory``, ``disk``,
    ``computed``; distinct items per call).
    """

    def __init__(self, directory: str | os.PathLike | None = None, namespace: str = "", memory_bytes: int = 0):
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes={memory_bytes} must be >= 0 (0 keeps nothing in memory)")
        self.directory = Path(directory) if directory is not None else None
        self.namespace, self.memory_bytes = namespace, memory_bytes
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, Tensors] = OrderedDict()
        self.memory_used = 0  # bytes of the tensors held in memory
        self.counts = {"memory": 0, "disk": 0, "computed": 0}

    def key(self, kind: str, content: bytes) -> str:
        digest = hashlib.sha256()
        for part in (self.namespace.encode(), kind.encode(), content):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return f"{kind}-{digest.hexdigest()[:40]}"

    def path(self, kind: str, content: bytes) -> Path:
        return self.directory / f"{self.key(kind, content)}.safetensors"

    def lookup(self, kind: str, contents: Sequence[bytes],
               compute: Callable[[list[int]], list[Tensors]]) -> list[Tensors]:
        first: dict[bytes, int] = {}
        for i, content in enumerate(contents):
            first.setdefault(content, i)
        found: dict[bytes, Tensors] = {}
        for content in first:
            key = self.key(kind, content)
            if key in self._memory:
                self._memory.move_to_end(key)
                found[content] = self._memory[key]
                self.counts["memory"] += 1
            elif self.directory is not None and (path := self.directory / f"{key}.safetensors").exists():
                found[content] = self._remember(key, load_file(path))
                self.counts["disk"] += 1
        missing = [i for content, i in first.items() if content not in found]
        if missing:
            fresh = compute(missing)
            if len(fresh) != len(missing):
                raise RuntimeError(f"encoder returned {len(fresh)} results for {len(missing)} inputs")
            self.counts["computed"] += len(missing)
            for i, tensors in zip(missing, fresh):
                tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
                found[contents[i]] = self._remember(self.key(kind, contents[i]), tensors)
                if self.directory is not None:
                    self._write(self.path(kind, contents[i]), tensors)
        return [found[content] for content in contents]

    def _remember(self, key: str, tensors: Tensors) -> Tensors:
        """Keep ``tensors`` in memory within the budget, evicting the least recently used entries."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size <= self.memory_bytes:
            self._memory[key] = tensors
            self.memory_used += size
            while self.memory_used > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self.memory_used -= sum(t.numel() * t.element_size() for t in old.values())
        return tensors

    @staticmethod
    def _write(path: Path, tensors: Tensors) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
