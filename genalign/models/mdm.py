"""MDM-style text-to-motion denoiser (Tevet et al. 2023, "Human Motion Diffusion Model").

A transformer encoder over motion frames ``x_t [B, T, D]`` (D = 263 HumanML3D features) with one extra token in
front: the *condition token* ``MLP(sinusoid(t)) + W_c c``, where ``c [B, Dc]`` is a pooled sentence embedding of
the caption. Frames are projected to ``d_model``, sinusoidal positions are added over ``[condition, frames]``, and
padded frames are hidden from attention with ``src_key_padding_mask`` (the condition token is never masked), so
outputs at real frames do not depend on what padded frames contain. The output projection returns to ``D``: the
clean motion ``x0`` by default (``prediction_type="sample"``, as MDM) or the noise (``"epsilon"``).

Classifier-free guidance (Ho & Salimans 2022): during training the caption embedding is replaced with probability
``cond_drop_prob`` (0.1) by a learned null embedding (initialised at zero, i.e. MDM's zeroed condition), and
``guided = uncond + scale * (cond - uncond)``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_timestep_embedding
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


@dataclass
class MotionDenoiserConfig:
    """Sizes of a :class:`MotionDenoiser`; the defaults are MDM's HumanML3D model with a MiniLM (384-d) caption
    embedding (MDM itself used CLIP ViT-B/32, ``cond_dim=512``)."""

    feature_dim: int = 263
    cond_dim: int = 384
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    max_frames: int = 196
    prediction_type: str = "sample"
    cond_drop_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("feature_dim", "cond_dim", "d_model", "num_layers", "num_heads", "ff_dim", "max_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MotionDenoiserConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even and divisible by num_heads={self.num_heads}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        for name in ("dropout", "cond_drop_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"MotionDenoiserConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")


class MotionDenoiser(nn.Module):
    """``f(x_t, t, c, mask) -> [B, T, D]``: predicted x0 (or eps) for each frame; see the module docstring."""

    def __init__(self, config: MotionDenoiserConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = MotionDenoiserConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a MotionDenoiserConfig or keyword sizes, not both")
        self.config = config
        d = config.d_model
        self.input_proj = nn.Linear(config.feature_dim, d)
        self.time_sinusoid = Timesteps(d, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = TimestepEmbedding(d, d)
        self.cond_proj = nn.Linear(config.cond_dim, d)
        self.null_cond = nn.Parameter(torch.zeros(config.cond_dim))
        self.pos_dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            d, config.num_heads, config.ff_dim, config.dropout, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.output_proj = nn.Linear(d, config.feature_dim)
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each encoder layer's activations during the backward pass (less memory, more compute)."""
        self.gradient_checkpointing = True

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor | int,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise ``x_t [B, T, D]`` at ``timesteps [B]`` under captions ``cond [B, Dc]``.

        ``mask [B, T]`` is True on real frames (None: all real); ``drop [B]`` (bool) swaps a sample's caption for
        the null condition (classifier-free guidance).
        """
        batch, frames = self._check(x_t, cond, mask, drop)
        timesteps = torch.as_tensor(timesteps, device=x_t.device).reshape(-1).expand(batch)
        if drop is not None:
            cond = torch.where(drop.to(cond.device).unsqueeze(-1), self.null_cond.to(cond.dtype), cond)
        cond_token = self.time_mlp(self.time_sinusoid(timesteps).to(x_t.dtype)) + self.cond_proj(cond)
        tokens = torch.cat([cond_token.unsqueeze(1), self.input_proj(x_t)], dim=1)
        positions = get_timestep_embedding(torch.arange(frames + 1, device=x_t.device), self.config.d_model,
                                           flip_sin_to_cos=True, downscale_freq_shift=0)
        tokens = self.pos_dropout(tokens + positions.to(tokens.dtype))
        padding = None
        if mask is not None:
            padding = torch.cat([mask.new_zeros(batch, 1), ~mask], dim=1).to(torch.bool)
        with _without_fused_inference():
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = tokens
                for layer in self.encoder.layers:
                    hidden = checkpoint(layer, hidden, src_key_padding_mask=padding, use_reentrant=False)
            else:
                hidden = self.encoder(tokens, src_key_padding_mask=padding)
        return self.output_proj(hidden[:, 1:])

    def drop_condition(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bernoulli(``cond_drop_prob``) draws ``[batch_size]`` (CPU, from ``generator``): which captions to drop."""
        return torch.rand(batch_size, generator=generator) < self.config.cond_drop_prob

    def guided(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor | int,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float = 2.5,
    ) -> torch.Tensor:
        """Classifier-free guidance: ``uncond + scale * (cond - uncond)``, both halves in one forward."""
        batch = x_t.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x_t.device).reshape(-1).expand(batch)
        drop = torch.arange(2 * batch, device=x_t.device) >= batch
        both = self(
            x_t.repeat(2, 1, 1), timesteps.repeat(2), cond.repeat(2, 1), None if mask is None else mask.repeat(2, 1), drop
        )
        conditional, unconditional = both.split(batch)
        return unconditional + scale * (conditional - unconditional)

    # ------------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MotionDenoiser":
        """Load a denoiser written by :meth:`save_pretrained`."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} does not exist; expected a folder written by MotionDenoiser.save_pretrained "
                    f"(with {CONFIG_NAME} and {WEIGHTS_NAME})"
                )
        raw = json.loads((directory / CONFIG_NAME).read_text())
        known = {f.name for f in fields(MotionDenoiserConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{directory / CONFIG_NAME}: unknown fields {unknown}; known fields are {sorted(known)}")
        model = cls(MotionDenoiserConfig(**raw))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model

    # ------------------------------------------------------------------------------------------ checks
    def _check(self, x_t, cond, mask, drop) -> tuple[int, int]:
        cfg = self.config
        if x_t.ndim != 3 or x_t.shape[-1] != cfg.feature_dim:
            raise ValueError(f"x_t must be [B, T, {cfg.feature_dim}], got {tuple(x_t.shape)}")
        batch, frames = x_t.shape[:2]
        if frames > cfg.max_frames:
            raise ValueError(f"motion has {frames} frames but the model was built for at most max_frames={cfg.max_frames}")
        if tuple(cond.shape) != (batch, cfg.cond_dim):
            raise ValueError(f"cond must be [{batch}, {cfg.cond_dim}] (one caption embedding per motion), got {tuple(cond.shape)}")
        if mask is not None and tuple(mask.shape) != (batch, frames):
            raise ValueError(f"mask must be [{batch}, {frames}] like x_t's first two dims, got {tuple(mask.shape)}")
        if drop is not None and tuple(drop.shape) != (batch,):
            raise ValueError(f"drop must be a bool tensor [{batch}], got {tuple(drop.shape)}")
        return batch, frames


@contextmanager
def _without_fused_inference():
    """Switch off torch's fused transformer inference path while the encoder runs.

    In eval mode that path reads each layer's weights directly instead of calling its sub-modules, so LoRA
    wrappers (``peft``) around the attention and feed-forward layers would be silently skipped.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
