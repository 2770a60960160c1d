"""The official MDM (Tevet et al. 2023, "Human Motion Diffusion Model"; github.com/GuyTevet/motion-diffusion-model),
loaded from its own ``model*.pt`` + ``args.json`` and run through :class:`~genalign.adapters.motion.MotionAdapter`.

:class:`OfficialMDM` has the official module tree, so an official state dict loads key for key:

* ``input_process.poseEmbedding``: Linear(263 → d) per frame (GRU: 263 + d inputs, the condition is concatenated);
* ``sequence_pos_encoder.pe``: the sinusoid buffer ``[max_len, 1, d]``, pe[p, 2i] = sin(p·10000^(−2i/d)),
  pe[p, 2i+1] = cos(…); ``embed_timestep`` shares that module (hence also ``embed_timestep.sequence_pos_encoder.pe``)
  and embeds t as ``time_embed(pe[t])`` (Linear, SiLU, Linear);
* ``embed_text``: Linear from the text feature (CLIP ViT-B/32 ``encode_text``, 512-d; DistilBERT token states, 768-d);
* ``seqTransEncoder`` (``trans_enc``: tokens [time + text, frames], positions added, the first output dropped),
  ``seqTransDecoder`` (``trans_dec``: frames attend to the condition as memory; ``emb_trans_dec`` prepends the time
  token) or ``gru``; torch's layers, sequence-first, GELU, 4 heads, ff 1024, dropout 0.1;
* ``output_process.poseFinal``: Linear(d → 263). The network predicts x0.

Condition masking (classifier-free guidance, Ho & Salimans 2022) zeroes the text feature before ``embed_text``:
``uncond = f(x_t, t, 0)``, ``guided = uncond + s·(f(x_t, t, c) − uncond)`` with s = ``guidance_param`` (2.5; 1 when
the model was trained without masking, ``cond_mask_prob = 0``), as the official ``ClassifierFreeSampleModel``. In
training the official forward draws that masking itself; here the adapter's ``drop`` does it (drawn once per group and
shared by the policy and the reference), so ``forward`` never draws randomness.

Frames: models trained with ``--mask_frames`` hide padded frames from attention (key padding mask). Older models
(e.g. ``humanml_trans_enc_512/model000475000.pt``) were trained without it on motions zero-padded to 196 frames and
noised over all 196; :func:`load_official_adapter` then pads every batch to 196 frames so the model sees what it was
trained on (the padded frames are noised like the real ones; scores only count real frames).

Noise schedule: ``get_named_beta_schedule``: ``cosine`` is β_i = min(1 − ᾱ((i+1)/N)/ᾱ(i/N), 0.999) with
ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) (Nichol & Dhariwal 2021), ``linear`` is linspace(1e-4, 0.02)·1000/N; N =
``diffusion_steps`` (1000, or 50 for the 50-step models). It goes to diffusers' ``DDPMScheduler`` as
``trained_betas``; ancestral sampling over all N steps with ``variance_type="fixed_small"`` is the official
``p_sample_loop`` (``sigma_small``).

Text: the ``clip_model.*`` keys are not in the checkpoints. :class:`CLIPTextEncoder` reads a local transformers CLIP
folder (``CLIPTextModelWithProjection``: the final-layer state at the end-of-text token, layer-normed, times the
text projection: openai-clip's ``encode_text``), truncating captions to 20 tokens (+ start and end) as MDM does for
HumanML3D/KIT; :class:`DistilBertTextEncoder` gives the token states and mask of a local DistilBERT folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection

from genalign.models.mdm import _without_fused_inference
from genalign.models.text_condition import CachedCaptionEncoder

ARCHS = ("trans_enc", "trans_dec", "gru")
TEXT_ENCODERS = {"clip": 512, "bert": 768}  # text feature width per encoder type
FEATURE_DIMS = {"humanml": 263, "kit": 251}
ARGS_NAME = "args.json"
WEIGHTS_NAME = "model.pt"
POSITIONAL_KEYS = ("sequence_pos_encoder.pe", "embed_timestep.sequence_pos_encoder.pe")
CLIP_MAX_TEXT_TOKENS = 20  # MDM's clip_encode_text for humanml/kit: context of 20 tokens + start + end


# ---------------------------------------------------------------------------------------------------- schedule
def official_betas(noise_schedule: str, steps: int) -> np.ndarray:
    """MDM's ``get_named_beta_schedule(noise_schedule, steps)`` (float64); see the module docstring."""
    if noise_schedule == "cosine":
        alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])
    if noise_schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    raise ValueError(f"noise_schedule {noise_schedule!r} is not one of MDM's ('cosine', 'linear')")


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class OfficialMDMConfig:
    """The ``args.json`` fields that shape an official MDM (names as in the official argument parser), plus
    ``max_text_tokens``: the DistilBERT token states kept per caption (genalign's packing, see
    :class:`DistilBertTextEncoder`). ``args`` keeps every field of the file, written back on save."""

    arch: str = "trans_enc"
    dataset: str = "humanml"
    latent_dim: int = 512
    layers: int = 8
    text_encoder_type: str = "clip"
    emb_trans_dec: bool = False
    emb_policy: str = "add"
    cond_mask_prob: float = 0.1
    mask_frames: bool = False
    pos_embed_max_len: int = 5000
    diffusion_steps: int = 1000
    noise_schedule: str = "cosine"
    guidance_param: float = 2.5
    use_ema: bool = False
    max_text_tokens: int = 64
    ff_size: int = 1024  # fixed by the official get_model_args
    num_heads: int = 4
    dropout: float = 0.1
    max_frames: int = 196  # HumanML3D's max_motion_length
    args: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.text_encoder_type not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder_type must be one of {tuple(TEXT_ENCODERS)}, got {self.text_encoder_type!r}")
        if self.dataset not in FEATURE_DIMS:
            raise ValueError(f"dataset {self.dataset!r}: only the text-to-motion models (humanml, kit) are supported")
        if self.emb_policy not in ("add", "concat") or (self.emb_policy == "concat" and self.text_encoder_type != "bert"):
            raise ValueError(f"emb_policy {self.emb_policy!r}: MDM supports 'add', and 'concat' with the bert encoder")
        if self.latent_dim % self.num_heads or self.latent_dim % 2:
            raise ValueError(f"latent_dim={self.latent_dim} must be even and divisible by num_heads={self.num_heads}")

    # the interface MotionAdapter reads from a denoiser's config
    @property
    def feature_dim(self) -> int:
        return FEATURE_DIMS[self.dataset]

    @property
    def text_dim(self) -> int:
        return TEXT_ENCODERS[self.text_encoder_type]

    @property
    def cond_dim(self) -> int:
        """Width of one caption's condition vector: the CLIP feature, or the packed DistilBERT states + mask."""
        if self.text_encoder_type == "clip":
            return self.text_dim
        return self.max_text_tokens * (self.text_dim + 1)

    @property
    def prediction_type(self) -> str:
        return "sample"

    @property
    def cond_drop_prob(self) -> float:
        return self.cond_mask_prob

    @classmethod
    def from_args(cls, args: dict[str, Any], **overrides: Any) -> "OfficialMDMConfig":
        """From an ``args.json`` dict with the official defaults for absent fields (older models lack the newer
        options); guidance is 1 for a model trained without condition masking, as ``parse_and_load_from_model``."""
        unsupported = {"unconstrained": True, "multi_target_cond": True}
        for key, bad in unsupported.items():
            if args.get(key) == bad:
                raise ValueError(f"args.json has {key}={bad}: only text-conditioned MDM models are supported")
        if args.get("context_len", 0) or args.get("lambda_target_loc", 0):
            raise ValueError("args.json describes a prefix-completion / target-conditioned model (DiP): not supported")
        names = {f.name for f in fields(cls)} - {"args", "ff_size", "num_heads", "dropout", "max_frames"}
        values = {k: args[k] for k in names if k in args}
        values.setdefault("guidance_param", args.get("gen_guidance_param", 2.5))
        if float(args.get("cond_mask_prob", 0.1)) == 0:
            values["guidance_param"] = 1.0
        return cls(**{**values, **overrides, "args": dict(args)})

    def to_args(self) -> dict[str, Any]:
        """The ``args.json`` to write: the original fields updated with this config's values."""
        out = {**self.args, **{k: v for k, v in asdict(self).items() if k != "args"}}
        return out


# ---------------------------------------------------------------------------------------------------- modules
class PositionalEncoding(nn.Module):
    """The official sinusoid table ``pe [max_len, 1, d]`` (interleaved sin/cos) added to sequence-first tokens."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[: x.shape[0]].to(x.dtype))


class TimestepEmbedder(nn.Module):
    """``time_embed(pe[t])`` → ``[1, B, d]``."""

    def __init__(self, latent_dim: int, sequence_pos_encoder: PositionalEncoding):
        super().__init__()
        self.sequence_pos_encoder = sequence_pos_encoder
        self.time_embed = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.SiLU(), nn.Linear(latent_dim, latent_dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        pe = self.sequence_pos_encoder.pe[timesteps]  # [B, 1, d]
        return self.time_embed(pe.to(self.time_embed[0].weight.dtype)).permute(1, 0, 2)


class InputProcess(nn.Module):
    def __init__(self, input_feats: int, latent_dim: int):
        super().__init__()
        self.poseEmbedding = nn.Linear(input_feats, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.poseEmbedding(x)


class OutputProcess(nn.Module):
    def __init__(self, output_feats: int, latent_dim: int):
        super().__init__()
        self.poseFinal = nn.Linear(latent_dim, output_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.poseFinal(x)


class OfficialMDM(nn.Module):
    """The official text-to-motion MDM network with the denoiser interface :class:`MotionAdapter` calls.

    ``forward(x_t [B, T, D], t [B], cond [B, cond_dim], mask [B, T], drop [B]) -> x0 [B, T, D]``;
    :meth:`official_forward` takes the official layout (``x [B, D, 1, T]`` and the ``y`` dict).
    """

    def __init__(self, config: OfficialMDMConfig | None = None, **overrides: Any):
        super().__init__()
        config = config if config is not None else OfficialMDMConfig(**overrides)
        self.config = config
        d, feats = config.latent_dim, config.feature_dim
        gru_inputs = d if config.arch == "gru" else 0
        self.input_process = InputProcess(feats + gru_inputs, d)
        self.sequence_pos_encoder = PositionalEncoding(d, config.dropout, max_len=config.pos_embed_max_len)
        if config.arch == "trans_enc":
            layer = nn.TransformerEncoderLayer(d, config.num_heads, config.ff_size, config.dropout, activation="gelu")
            self.seqTransEncoder = nn.TransformerEncoder(layer, num_layers=config.layers, enable_nested_tensor=False)
        elif config.arch == "trans_dec":
            layer = nn.TransformerDecoderLayer(d, config.num_heads, config.ff_size, config.dropout, activation="gelu")
            self.seqTransDecoder = nn.TransformerDecoder(layer, num_layers=config.layers)
        else:
            self.gru = nn.GRU(d, d, num_layers=config.layers, batch_first=True)
        self.embed_timestep = TimestepEmbedder(d, self.sequence_pos_encoder)
        self.embed_text = nn.Linear(config.text_dim, d)
        self.output_process = OutputProcess(feats, d)
        self.register_buffer("null_cond", self._null_condition(), persistent=False)
        self.gradient_checkpointing = False

    def _null_condition(self) -> torch.Tensor:
        """The condition of an unconditional sample: a zero text feature (DistilBERT: zero states under the mask of
        the empty caption, its [CLS] and [SEP] tokens, as the official model sees ``uncond`` for the text '')."""
        cfg = self.config
        null = torch.zeros(cfg.cond_dim)
        if cfg.text_encoder_type == "bert":
            null[cfg.max_text_tokens * cfg.text_dim :][:2] = 1.0
        return null

    @property
    def prediction_type(self) -> str:
        return "sample"

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each transformer layer's activations in the backward pass (less memory, more compute)."""
        if self.config.arch == "gru":
            raise ValueError("gradient checkpointing covers the transformer variants; set train.gradient_checkpointing=false")
        self.gradient_checkpointing = True

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor | int,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted x0 ``[B, T, D]``; ``mask`` True on real frames (used by ``mask_frames`` models only),
        ``drop`` True where the caption is masked (zero text feature)."""
        cfg = self.config
        batch, frames = self._check(x_t, cond, mask, drop)
        timesteps = torch.as_tensor(timesteps, device=x_t.device).reshape(-1).expand(batch)
        text, text_pad = self._text_features(cond.to(x_t.dtype))  # [L, B, Dt], [B, L] True = no token
        if drop is not None:
            text = text * (~drop.to(text.device)).to(text.dtype).view(1, batch, 1)
        time_emb = self.embed_timestep(timesteps)  # [1, B, d]
        text_emb = self.embed_text(text)
        if cfg.emb_policy == "add":
            emb = text_emb + time_emb
        else:
            emb = torch.cat([time_emb, text_emb], dim=0)
            text_pad = torch.cat([torch.zeros_like(text_pad[:, :1]), text_pad], dim=1)
        x = x_t.transpose(0, 1)  # [T, B, D]
        if cfg.arch == "gru":
            x = torch.cat([x, emb.expand(frames, -1, -1)], dim=-1)
        x = self.input_process(x)
        frames_pad = None
        if cfg.mask_frames and mask is not None:
            frames_pad = ~mask.to(x.device, torch.bool)
            if cfg.arch == "trans_enc" or (cfg.arch == "trans_dec" and cfg.emb_trans_dec):
                frames_pad = torch.cat([frames_pad.new_zeros(batch, 1), frames_pad], dim=1)
        if cfg.arch == "trans_enc":
            xseq = self.sequence_pos_encoder(torch.cat([emb, x], dim=0))
            with _without_fused_inference():  # keeps LoRA layers in the path in eval mode
                out = self._layers(self.seqTransEncoder, xseq, src_key_padding_mask=frames_pad)[1:]
        elif cfg.arch == "trans_dec":
            xseq = self.sequence_pos_encoder(torch.cat([time_emb, x], dim=0) if cfg.emb_trans_dec else x)
            out = self._layers(self.seqTransDecoder, xseq, emb, tgt_key_padding_mask=frames_pad,
                               memory_key_padding_mask=text_pad)
            out = out[1:] if cfg.emb_trans_dec else out
        else:
            out, _ = self.gru(self.sequence_pos_encoder(x))  # batch_first=True on a sequence-first input, as official
        return self.output_process(out).transpose(0, 1)

    def _layers(self, stack: nn.Module, hidden: torch.Tensor, *memory: torch.Tensor, **masks) -> torch.Tensor:
        """The encoder / decoder stack (no final norm in MDM), one checkpointed call per layer when enabled."""
        for layer in stack.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, *memory, use_reentrant=False, **masks)
            else:
                hidden = layer(hidden, *memory, **masks)
        return hidden

    def official_forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: dict[str, Any]) -> torch.Tensor:
        """The official call: ``x [B, D, 1, T]``, ``y = {"text_embed": [B, cond_dim] (CLIP: also [1, B, 512]),
        "mask": bool [B, 1, 1, T],
        "uncond": bool}`` (and ``"scale" [B]``, guided as ``ClassifierFreeSampleModel``) → ``[B, D, 1, T]``."""
        motion = x.squeeze(2).transpose(1, 2)
        mask = y.get("mask")
        mask = None if mask is None or mask.shape[-1] <= 1 else mask.reshape(mask.shape[0], -1).to(torch.bool)
        cond = y["text_embed"]
        if cond.ndim == 3 and self.config.text_encoder_type == "clip":  # encode_text's [1, B, 512]
            cond = cond[0]
        if "scale" in y:
            out = self.guided(motion, timesteps, cond, mask, y["scale"])
        else:
            drop = torch.full((len(motion),), bool(y.get("uncond", False)), device=x.device)
            out = self(motion, timesteps, cond, mask, drop)
        return out.transpose(1, 2).unsqueeze(2)

    def guided(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor | int,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``uncond + s·(cond − uncond)``; ``s`` defaults to ``guidance_param`` (one value or one per sample). Two
        calls, as ``ClassifierFreeSampleModel``: the official GRU (a ``batch_first`` GRU fed sequence-first tensors)
        mixes the samples of a batch, so one doubled batch would not be the official output."""
        if self.config.cond_mask_prob <= 0:
            raise ValueError("classifier-free guidance needs a model trained with condition masking (cond_mask_prob > 0)")
        batch = x_t.shape[0]
        scale = self.config.guidance_param if scale is None else scale
        scale = torch.as_tensor(scale, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1, 1)
        conditional = self(x_t, timesteps, cond, mask)
        unconditional = self(x_t, timesteps, cond, mask, torch.ones(batch, dtype=torch.bool, device=x_t.device))
        return unconditional + scale * (conditional - unconditional)

    def _text_features(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sequence-first text features and their padding mask (None for CLIP's single feature)."""
        if self.config.text_encoder_type == "clip":
            return cond.unsqueeze(0), None
        states, valid = unpack_token_states(cond, self.config.max_text_tokens, self.config.text_dim)
        return states.transpose(0, 1), ~valid

    def _check(self, x_t, cond, mask, drop) -> tuple[int, int]:
        cfg = self.config
        if x_t.ndim != 3 or x_t.shape[-1] != cfg.feature_dim:
            raise ValueError(f"x_t must be [B, T, {cfg.feature_dim}], got {tuple(x_t.shape)}")
        batch, frames = x_t.shape[:2]
        if frames + 1 > cfg.pos_embed_max_len:
            raise ValueError(f"{frames} frames exceed the positional table ({cfg.pos_embed_max_len} positions)")
        if tuple(cond.shape) != (batch, cfg.cond_dim):
            raise ValueError(f"cond must be [{batch}, {cfg.cond_dim}] (one {cfg.text_encoder_type} condition per motion), "
                             f"got {tuple(cond.shape)}")
        if mask is not None and tuple(mask.shape) != (batch, frames):
            raise ValueError(f"mask must be [{batch}, {frames}], got {tuple(mask.shape)}")
        if drop is not None and tuple(drop.shape) != (batch,):
            raise ValueError(f"drop must be a bool tensor [{batch}], got {tuple(drop.shape)}")
        return batch, frames

    # ------------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """``directory/model.pt`` (``torch.save(state_dict())`` as the official training loop writes it, so the
        official code loads it too) and ``directory/args.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        (directory / ARGS_NAME).write_text(json.dumps(self.config.to_args(), indent=4, sort_keys=True))


def unpack_token_states(cond: torch.Tensor, max_tokens: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L·(width + 1)]`` → token states ``[B, L, width]`` and validity ``bool [B, L]`` (see
    :class:`DistilBertTextEncoder`)."""
    states = cond[:, : max_tokens * width].reshape(len(cond), max_tokens, width)
    return states, cond[:, max_tokens * width :] > 0.5


# ---------------------------------------------------------------------------------------------------- loading
def read_official_args(checkpoint: str | Path) -> dict[str, Any]:
    """The ``args.json`` beside ``checkpoint``."""
    path = Path(checkpoint).parent / ARGS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an official MDM checkpoint comes with the args.json of its training "
                                f"run in the same folder (it gives arch, layers, latent_dim, diffusion_steps, ...)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def read_official_state_dict(checkpoint: str | Path, use_avg: bool) -> dict[str, torch.Tensor]:
    """The state dict of ``model*.pt`` (``--use_ema`` runs save ``{"model", "model_avg"}``: the average when
    ``use_avg``, as ``load_saved_model``), without ``clip_model.*`` keys."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected an official MDM checkpoint (model<step>.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if "model_avg" in state and use_avg:
        state = state["model_avg"]
    elif "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return {k: v for k, v in state.items() if not k.startswith("clip_model.")}


def describe_checkpoint(keys: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> str:
    """What an MDM-like state dict looks like: architecture, layers, width, text feature, extras."""
    arch = next((a for a, prefix in (("trans_enc", "seqTransEncoder."), ("trans_dec", "seqTransDecoder."), ("gru", "gru."))
                 if any(k.startswith(prefix) for k in keys)), "unknown architecture")
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"(?:seqTrans(?:En|De)coder\.layers|gru\.weight_ih_l)\.?(\d+)", k))}
    parts = [f"arch={arch}", f"layers={max(layers) + 1 if layers else '?'}"]
    if "embed_text.weight" in shapes:
        latent, text = shapes["embed_text.weight"]
        encoder = {v: k for k, v in TEXT_ENCODERS.items()}.get(text, f"{text}-d")
        parts += [f"latent_dim={latent}", f"text_encoder_type={encoder}"]
    elif "embed_action.action_embedding" in shapes:
        parts.append("an action-conditioned model (embed_action)")
    else:
        parts.append("no text conditioning (unconstrained)")
    if any(k.startswith("embed_target_cond.") for k in keys):
        parts.append("target-joint conditioning (DiP, embed_target_cond)")
    if "input_process.poseEmbedding.weight" in shapes:
        parts.append(f"input features={shapes['input_process.poseEmbedding.weight'][1]}")
    return ", ".join(parts)


def check_state_dict(model: OfficialMDM, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise naming the first missing / unexpected / mis-shaped keys and the variant the checkpoint looks like; the
    fixed positional tables are not compared (older models saved another length, the official loader skips them)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in POSITIONAL_KEYS}
    found = {k: tuple(v.shape) for k, v in state.items() if k not in POSITIONAL_KEYS}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f"{k}: {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    cfg = model.config
    built = (f"arch={cfg.arch}, layers={cfg.layers}, latent_dim={cfg.latent_dim}, text_encoder_type="
             f"{cfg.text_encoder_type}, emb_trans_dec={cfg.emb_trans_dec}, dataset={cfg.dataset}")
    details = "; ".join(f"{name} ({len(items)}): {items[:6]}{' ...' if len(items) > 6 else ''}"
                        for name, items in (("missing", missing), ("unexpected", unexpected),
                                            ("shape checkpoint vs model", mismatched)) if items)
    raise ValueError(f"{source} does not match the MDM its args.json describes ({built}): {details}. The checkpoint "
                     f"looks like {describe_checkpoint(list(found), found)}; fix args.json beside it to the run that "
                     f"wrote the checkpoint (or pass the matching config overrides)")


def load_official_mdm(checkpoint: str | Path, *, use_avg: bool | None = None, **config_overrides: Any) -> OfficialMDM:
    """An :class:`OfficialMDM` from an official ``model*.pt`` and the ``args.json`` beside it (strict key check).

    ``use_avg`` picks the EMA weights of a ``{"model", "model_avg"}`` checkpoint (default: ``args.use_ema``);
    ``config_overrides`` replace ``args.json`` fields (e.g. ``guidance_param``, ``max_text_tokens``)."""
    config = OfficialMDMConfig.from_args(read_official_args(checkpoint), **config_overrides)
    model = OfficialMDM(config)
    state = read_official_state_dict(checkpoint, config.use_ema if use_avg is None else use_avg)
    check_state_dict(model, state, checkpoint)
    model.load_state_dict({k: v for k, v in state.items() if k not in POSITIONAL_KEYS}, strict=False)
    return model


# ---------------------------------------------------------------------------------------------------- text encoders
def _local_folder(path: str | Path | None, what: str) -> str:
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"text encoder folder {path} does not exist: the official MDM checkpoints hold no text "
                                f"encoder; pass a local transformers {what} folder (adapter.text_encoder=...)")
    return str(path)


class CLIPTextEncoder(CachedCaptionEncoder):
    """openai-clip ``encode_text`` from a local transformers CLIP folder (a ``CLIPModel`` such as
    openai/clip-vit-base-patch32, or a ``CLIPTextModelWithProjection``): ``[N, projection_dim]``.

    Captions are truncated to ``max_text_tokens`` (20) BPE tokens between the start and end tokens, as MDM's
    ``clip_encode_text`` does for HumanML3D and KIT (the official code runs CLIP in float16 on the GPU; this runs
    float32, so features differ from it by float16 rounding only)."""

    def __init__(self, path: str | Path, *, max_text_tokens: int = CLIP_MAX_TEXT_TOKENS, batch_size: int = 256):
        super().__init__(batch_size)
        self.path = _local_folder(path, "CLIP (ViT-B/32)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = CLIPTextModelWithProjection.from_pretrained(self.path, local_files_only=True).eval()
        self.context_length = max_text_tokens + 2
        if self.context_length > self.model.config.max_position_embeddings:
            raise ValueError(f"max_text_tokens={max_text_tokens} + 2 exceeds CLIP's {self.model.config.max_position_embeddings} positions")
        self.dim = self.model.config.projection_dim

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt")
        return self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds


class DistilBertTextEncoder(CachedCaptionEncoder):
    """DistilBERT token states of a local folder (e.g. distilbert-base-uncased) packed into one vector per caption:
    ``[N, L·(768 + 1)]`` = the states ``[L, 768]`` (zero after the caption's tokens) followed by the token mask
    ``[L]`` (1 = token), L = ``max_text_tokens``. The official model attends to exactly the caption's tokens (its
    padding is masked), so a fixed L changes nothing but lets conditions batch like CLIP's; a caption with more
    than L tokens raises (raise ``max_text_tokens``)."""

    def __init__(self, path: str | Path, *, max_text_tokens: int = 64, batch_size: int = 256):
        super().__init__(batch_size)
        self.path = _local_folder(path, "DistilBERT (distilbert-base-uncased)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
        self.max_text_tokens = max_text_tokens
        self.width = self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.dim
        self.dim = max_text_tokens * (self.width + 1)

    def _encode_uncached(self, captions: list[str]) -> torch.Tensor:
        enc = self.tokenizer(captions, padding=True, return_tensors="pt")
        counts = enc["attention_mask"].sum(1)
        if int(counts.max()) > self.max_text_tokens:
            worst = int(counts.argmax())
            raise ValueError(f"caption {captions[worst]!r} has {int(counts[worst])} DistilBERT tokens, more than "
                             f"max_text_tokens={self.max_text_tokens}; pass a larger max_text_tokens")
        states = self.model(**enc).last_hidden_state * enc["attention_mask"].unsqueeze(-1)
        packed = torch.zeros(len(captions), self.dim)
        length = states.shape[1]
        packed[:, : self.max_text_tokens * self.width].view(len(captions), self.max_text_tokens, self.width)[:, :length] = states
        packed[:, self.max_text_tokens * self.width :][:, :length] = enc["attention_mask"].float()
        return packed


def official_text_encoder(config: OfficialMDMConfig, path: str | Path | None) -> CachedCaptionEncoder:
    """The text encoder the model was trained with, from a local folder."""
    if config.text_encoder_type == "clip":
        return CLIPTextEncoder(path)
    return DistilBertTextEncoder(path, max_text_tokens=config.max_text_tokens)


# ---------------------------------------------------------------------------------------------------- adapter
def load_official_adapter(checkpoint: str | Path, text_encoder: str | Path | None = None, **adapter_kwargs: Any):
    """A :class:`~genalign.adapters.motion.MotionAdapter` over an official MDM checkpoint: the network
    (:func:`load_official_mdm`), its text encoder from the local folder ``text_encoder``, its noise schedule
    (``diffusion_steps`` steps of ``noise_schedule`` as ``trained_betas``) and, for models trained without
    ``mask_frames``, batches padded to 196 frames. ``adapter_kwargs`` go to ``MotionAdapter`` (``reference``,
    ``lora``, ``cond_drop_prob``, ...); ``guidance_param``/``max_text_tokens``/``use_avg`` to the model."""
    from genalign.adapters.motion import MotionAdapter

    model_keys = {k: adapter_kwargs.pop(k) for k in ("guidance_param", "max_text_tokens", "use_avg") if k in adapter_kwargs}
    use_avg = model_keys.pop("use_avg", None)
    model = load_official_mdm(checkpoint, use_avg=use_avg, **model_keys)
    cfg = model.config
    text = adapter_kwargs.pop("text", None) or official_text_encoder(cfg, text_encoder)
    betas = official_betas(cfg.noise_schedule, cfg.diffusion_steps)
    adapter_kwargs.setdefault("pad_frames", None if cfg.mask_frames else cfg.max_frames)
    return MotionAdapter(model, text, num_train_timesteps=cfg.diffusion_steps, trained_betas=betas.tolist(),
                         **adapter_kwargs)


def adapter_from_config(path: str, text_encoder: str | None = None, **adapter_kwargs: Any):
    """Hydra entry of ``configs/adapter/mdm.yaml`` (``adapter.path=.../model000475000.pt
    adapter.text_encoder=/models/clip``): :func:`load_official_adapter`."""
    return load_official_adapter(path, text_encoder, **adapter_kwargs)
