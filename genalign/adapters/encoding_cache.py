"""Content-addressed cache of frozen-encoder outputs (VAE latents, text-encoder states) as safetensors files.

Each item is stored under ``<directory>/<kind>-<sha256(namespace, kind, content)>.safetensors``, so a latent is
computed once per distinct image and model, whatever batch it later lands in; the training step then never runs
the VAE or the text encoder. ``namespace`` names the frozen models (e.g. the pipeline folder) so entries of
different models never mix. Files are written to a temporary name and renamed, so concurrent processes and
interrupted runs never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


class EncodingCache:
    """``lookup(kind, contents, compute)``: per-item tensors, from disk when present, else from ``compute``.

    ``compute(indices)`` receives the positions (into ``contents``) of the distinct items not yet cached and
    returns one ``{name: tensor}`` per position. Without a ``directory`` nothing touches the disk, but repeated
    items within one call are still computed once.
    """

    def __init__(self, directory: str | os.PathLike | None = None, namespace: str = ""):
        self.directory = Path(directory) if directory is not None else None
        self.namespace = namespace
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, content: bytes) -> Path:
        digest = hashlib.sha256()
        for part in (self.namespace.encode(), kind.encode(), content):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return self.directory / f"{kind}-{digest.hexdigest()[:40]}.safetensors"

    def lookup(self, kind: str, contents: Sequence[bytes], compute: Callable[[list[int]], list[Tensors]]) -> list[Tensors]:
        first: dict[bytes, int] = {}
        for i, content in enumerate(contents):
            first.setdefault(content, i)
        found: dict[bytes, Tensors] = {}
        if self.directory is not None:
            for content in first:
                path = self.path(kind, content)
                if path.exists():
                    found[content] = load_file(path)
        missing = [i for content, i in first.items() if content not in found]
        if missing:
            fresh = compute(missing)
            if len(fresh) != len(missing):
                raise RuntimeError(f"encoder returned {len(fresh)} results for {len(missing)} inputs")
            for i, tensors in zip(missing, fresh):
                tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
                found[contents[i]] = tensors
                if self.directory is not None:
                    self._write(self.path(kind, contents[i]), tensors)
        return [found[content] for content in contents]

    @staticmethod
    def _write(path: Path, tensors: Tensors) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
