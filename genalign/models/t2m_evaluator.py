"""The text-motion evaluator of Guo et al. 2022 ("Generating Diverse and Natural 3D Human Motions from Text"), the
network behind the HumanML3D / KIT-ML metrics (R-precision, MM-Dist, FID, Diversity, MultiModality).

Three modules, named and shaped as in the official ``text_mot_match`` checkpoint so that its state dicts load:

* ``MovementConvEncoder``: ``main`` = Conv1d(in, hidden, 4, 2, 1) -> Dropout(0.2) -> LeakyReLU(0.2) ->
  Conv1d(hidden, latent, 4, 2, 1) -> Dropout(0.2) -> LeakyReLU(0.2), then ``out_net`` = Linear(latent, latent).
  Input: the features without the 4 foot contacts (259 of 263 dims); two stride-2 convolutions turn T frames into
  T/4 movement tokens (``unit_length`` = 4).
* ``MotionEncoderBiGRUCo``: ``input_emb`` Linear(latent, hidden) -> bidirectional ``gru`` started from the learnt
  ``hidden`` [2, 1, hidden] -> concatenated final states -> ``output_net`` = Linear(2h, h) -> LayerNorm(h) ->
  LeakyReLU(0.2) -> Linear(h, embed). Sequences are packed by movement length (frames // 4).
* ``TextEncoderBiGRUCo``: ``pos_emb`` Linear(15, word_dim) added to the word vector, then ``input_emb``, ``gru``,
  ``hidden`` and ``output_net`` as above, packed by caption length.

Official sizes (the defaults of :class:`EvaluatorConfig`): movement 512/512, motion hidden 1024, text hidden 512,
co-embedding 512, GloVe 300-d words. :meth:`TextMotionEvaluator.load_state_dicts` compares every key and shape
with the checkpoint and raises one error listing the missing, unexpected and mis-shaped keys, so a checkpoint from
another layout is refused rather than half-loaded. The layout and forward were checked against the official code
(EricGuo5513/text-to-motion ``networks/modules.py``, ``networks/evaluator_wrapper.py``): key names ``main.{0,3}``,
``out_net``, ``input_emb``, ``gru.*_l0[_reverse]``, ``hidden``, ``output_net.{0,1,3}`` and ``pos_emb``; the initial
GRU state is ``hidden`` repeated over the batch; the official wrapper sorts motions by length (descending) for
``pack_padded_sequence`` and feeds ``m_lens // unit_length`` movement tokens, which the unsorted packing here
computes identically in the input order. ``finest.tar`` (``TextMotionMatchTrainer.save``) holds the three state
dicts plus ``opt_text_encoder``/``opt_motion_encoder`` (Adam states), ``epoch`` and ``iter``; the evaluator's
inputs are normalised with the statistics in ``t2m/Comp_v6_KLD01/meta/{mean,std}.npy`` (MDM copies them to
``dataset/t2m_mean.npy``), not the dataset's ``Mean.npy``/``Std.npy``: see :func:`official_files`.

Padding: the official pipeline zero-pads every motion to 196 frames, and the last movement tokens see a few frames
past the motion's end. Here frames at or beyond a motion's length are zeroed and the motion is zero-padded (or its
padding cropped) to exactly ``max_motion_length`` (196) frames before the convolutions, so an embedding depends
only on the motion's own frames (not on the padding's content or on the batch's padded length) and equals the
official computation on the official inputs.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from genalign.models.word_vectors import POS_CATEGORIES, GloVeVectors, WordVectorizer, WordVectors, load_word_vectors

FOOT_CONTACT_DIMS = 4
MODULES = ("movement_encoder", "text_encoder", "motion_encoder")
WEIGHTS_NAME, CONFIG_NAME = "evaluator.safetensors", "config.json"


def init_weights(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for convolutions and linear layers (the T2M initialisation)."""
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MovementConvEncoder(nn.Module):
    """``[B, T, in] -> [B, T // 4, latent]`` movement tokens (see the module doc)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv1d(input_size, hidden_size, 4, 2, 1), nn.Dropout(dropout), nn.LeakyReLU(0.2),
            nn.Conv1d(hidden_size, output_size, 4, 2, 1), nn.Dropout(dropout), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.out_net = nn.Linear(output_size, output_size)
        self.apply(init_weights)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_net(self.main(features.transpose(1, 2)).transpose(1, 2))


class MovementConvDecoder(nn.Module):
    """``[B, T / 4, latent] -> [B, T, out]``: two ConvTranspose1d(4, 2, 1) + LeakyReLU(0.2), then ``out_net``
    Linear(out, out). The decoder of the movement autoencoder the T2M code pretrains the encoder with."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose1d(input_size, hidden_size, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose1d(hidden_size, output_size, 4, 2, 1), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.out_net = nn.Linear(output_size, output_size)
        self.apply(init_weights)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.out_net(self.main(latents.transpose(1, 2)).transpose(1, 2))


class _BiGRUCo(nn.Module):
    """Shared tail of the two sequence encoders: packed bi-GRU from a learnt initial state, then ``output_net``."""

    def __init__(self, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True, bidirectional=True)
        self.output_net = nn.Sequential(
            nn.Linear(hidden_size * 2, hidden_size), nn.LayerNorm(hidden_size), nn.LeakyReLU(0.2),
            nn.Linear(hidden_size, output_size),
        )  # fmt: skip
        self.hidden = nn.Parameter(torch.randn(2, 1, hidden_size))
        self.output_net.apply(init_weights)

    def summarize(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, L, hidden]`` padded inputs with ``lengths [B]`` (1..L) -> ``[B, output]``."""
        lengths = torch.as_tensor(lengths).long().cpu()
        if lengths.shape != inputs.shape[:1] or lengths.min() < 1 or lengths.max() > inputs.shape[1]:
            raise ValueError(
                f"need one length in [1, {inputs.shape[1]}] per sequence for inputs {tuple(inputs.shape)}, "
                f"got lengths {lengths.tolist()}"
            )
        packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed, self.hidden.expand(-1, inputs.shape[0], -1).contiguous())
        return self.output_net(torch.cat([last[0], last[1]], dim=-1))


class MotionEncoderBiGRUCo(_BiGRUCo):
    """Movement tokens ``[B, L, latent]`` and token lengths -> motion co-embeddings ``[B, output]``."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__(hidden_size, output_size)
        self.input_emb = nn.Linear(input_size, hidden_size)
        self.input_emb.apply(init_weights)

    def forward(self, movements: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.summarize(self.input_emb(movements), lengths)


class TextEncoderBiGRUCo(_BiGRUCo):
    """Word vectors ``[B, L, word]``, POS one-hots ``[B, L, 15]`` and caption lengths -> text co-embeddings."""

    def __init__(self, word_size: int, pos_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__(hidden_size, output_size)
        self.pos_emb = nn.Linear(pos_size, word_size)
        self.input_emb = nn.Linear(word_size, hidden_size)
        self.pos_emb.apply(init_weights)
        self.input_emb.apply(init_weights)

    def forward(self, word_embs: torch.Tensor, pos_onehot: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.summarize(self.input_emb(word_embs + self.pos_emb(pos_onehot)), lengths)


@dataclass(frozen=True)
class EvaluatorConfig:
    """Sizes (official defaults), the contrastive ``margin`` and the word-vector source (``"minilm"`` or a folder
    of the T2M GloVe files). ``motion_dim`` is 263 for HumanML3D, 251 for KIT-ML."""

    motion_dim: int = 263
    word_dim: int = 300
    movement_hidden: int = 512
    movement_latent: int = 512
    motion_hidden: int = 1024
    text_hidden: int = 512
    embed_dim: int = 512
    unit_length: int = 4
    max_motion_length: int = 196
    max_text_len: int = 20
    margin: float = 10.0
    word_vectors: str = "minilm"

    @classmethod
    def from_dict(cls, values: Mapping) -> "EvaluatorConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown evaluator config fields {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**values)


def _stat(value, dim: int, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = torch.as_tensor(np.asarray(value), dtype=torch.float32)
    if tensor.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},) (the motion features), got {tuple(tensor.shape)}")
    return tensor


class TextMotionEvaluator(nn.Module):
    """The three T2M encoders plus the word inputs; ``encode_text`` / ``encode_motion`` give co-embeddings
    ``[B, embed_dim]`` whose Euclidean distances the motion metrics use.

    Motions are ``[B, T, motion_dim]`` features normalised with the statistics the evaluator was trained with
    (``mean``/``std`` when recorded; :meth:`normalize` applies them), lengths in frames (>= ``unit_length``).
    ``word_vectors`` overrides the table named by ``config.word_vectors`` (loaded on first use otherwise).
    """

    def __init__(
        self,
        config: EvaluatorConfig | None = None,
        *,
        word_vectors: WordVectors | None = None,
        mean: np.ndarray | torch.Tensor | None = None,
        std: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or EvaluatorConfig()
        if config.motion_dim <= FOOT_CONTACT_DIMS:
            raise ValueError(f"motion_dim must exceed the {FOOT_CONTACT_DIMS} foot-contact dims, got {config.motion_dim}")
        self.movement_encoder = MovementConvEncoder(
            config.motion_dim - FOOT_CONTACT_DIMS, config.movement_hidden, config.movement_latent
        )
        self.text_encoder = TextEncoderBiGRUCo(config.word_dim, len(POS_CATEGORIES), config.text_hidden, config.embed_dim)
        self.motion_encoder = MotionEncoderBiGRUCo(config.movement_latent, config.motion_hidden, config.embed_dim)
        self.set_statistics(mean, std)
        self._vectorizer = None if word_vectors is None else self._make_vectorizer(word_vectors)

    # ------------------------------------------------------------------------------------------------ inputs
    def _make_vectorizer(self, vectors: WordVectors) -> WordVectorizer:
        if vectors.dim != self.config.word_dim:
            source = getattr(vectors, "source", type(vectors).__name__)
            raise ValueError(f"word vectors from {source} are {vectors.dim}-d, the evaluator expects word_dim="
                             f"{self.config.word_dim}; pass the word vectors it was trained with")
        return WordVectorizer(vectors, self.config.max_text_len)

    @property
    def vectorizer(self) -> WordVectorizer:
        if self._vectorizer is None:
            self._vectorizer = self._make_vectorizer(load_word_vectors(self.config.word_vectors))
        return self._vectorizer

    @property
    def device(self) -> torch.device:
        return self.text_encoder.hidden.device

    def set_statistics(self, mean: np.ndarray | torch.Tensor | None, std: np.ndarray | torch.Tensor | None) -> None:
        """Record the feature ``mean``/``std`` ``[motion_dim]`` the evaluator's inputs are normalised with."""
        dim = self.config.motion_dim
        self.mean, self.std = _stat(mean, dim, "mean"), _stat(std, dim, "std")

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """``(features - mean) / std`` with the recorded statistics (raw features -> evaluator inputs)."""
        if self.mean is None or self.std is None:
            raise ValueError("this evaluator has no recorded mean/std; normalise the motions as it was trained")
        return (features - self.mean.to(features)) / self.std.to(features)

    # ------------------------------------------------------------------------------------------------ encoders
    def encode_text(self, captions: Sequence[str | Sequence[str]]) -> torch.Tensor:
        """Captions (raw strings or lists of ``word/POS`` tokens) -> ``[B, embed_dim]``."""
        if len(captions) == 0:
            raise ValueError("encode_text needs at least one caption")
        words, pos, lengths = (x.to(self.device) for x in self.vectorizer(captions))
        return self.text_encoder(words, pos, lengths)

    def padded(self, motions: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``motions`` zeroed at and beyond ``lengths`` and zero-padded or cropped to ``max_motion_length`` frames
        (see the module doc), on the evaluator's device, and the lengths as a long tensor."""
        config = self.config
        if motions.dim() != 3 or motions.shape[-1] != config.motion_dim:
            raise ValueError(f"motions must be [B, T, {config.motion_dim}], got {tuple(motions.shape)}")
        lengths = torch.as_tensor(lengths).long().to(self.device)
        high = min(motions.shape[1], config.max_motion_length)
        if lengths.shape != motions.shape[:1] or lengths.min() < config.unit_length or lengths.max() > high:
            raise ValueError(
                f"need one length in [{config.unit_length}, {high}] frames per motion (at most the padded length "
                f"and max_motion_length={config.max_motion_length}), got {lengths.tolist()}"
            )
        frames = config.max_motion_length
        motions = motions[:, :frames].to(self.device)
        valid = torch.arange(motions.shape[1], device=self.device) < lengths[:, None]
        return F.pad(motions * valid[..., None], (0, 0, 0, frames - motions.shape[1])), lengths

    def movements(self, motions: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Movement tokens ``[B, max_motion_length // 4, latent]`` of the :meth:`padded` motions without their
        foot contacts, and the token counts ``lengths // 4``."""
        padded, lengths = self.padded(motions, lengths)
        return self.movement_encoder(padded[..., :-FOOT_CONTACT_DIMS]), lengths // self.config.unit_length

    def encode_motion(self, motions: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``[B, T, motion_dim]`` normalised motions and their lengths in frames -> ``[B, embed_dim]``."""
        tokens, token_lengths = self.movements(motions, lengths)
        return self.motion_encoder(tokens, token_lengths)

    def forward(self, captions, motions: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text_emb, motion_emb)``, both ``[B, embed_dim]``, row i pairing caption i with motion i."""
        return self.encode_text(captions), self.encode_motion(motions, lengths)

    # --------------------------------------------------------------------------------------- state and files
    def load_state_dicts(self, state: Mapping[str, Mapping[str, torch.Tensor]], source: str = "checkpoint") -> None:
        """Load ``{"movement_encoder": ..., "text_encoder": ..., "motion_encoder": ...}`` after checking every key
        and shape; one error lists everything that does not match."""
        problems = [f"'{name}' state dict absent" for name in MODULES if name not in state]
        for name in MODULES:
            if name not in state:
                continue
            own = getattr(self, name).state_dict()
            given = state[name]
            missing = sorted(set(own) - set(given))
            unexpected = sorted(set(given) - set(own))
            shapes = [
                f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                for k in sorted(set(own) & set(given)) if tuple(given[k].shape) != tuple(own[k].shape)
            ]  # fmt: skip
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
                if items:
                    problems.append(f"{name} {label}: {items}")
        if problems:
            raise ValueError(
                f"{source} does not match the T2M evaluator layout (config {asdict(self.config)}):\n  "
                + "\n  ".join(problems)
            )
        for name in MODULES:
            getattr(self, name).load_state_dict(state[name])

    @classmethod
    def from_official(
        cls,
        checkpoint: str | Path,
        *,
        glove_dir: str | Path,
        config: EvaluatorConfig | None = None,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
    ) -> "TextMotionEvaluator":
        """The official evaluator from its ``text_mot_match/model/finest.tar`` (a dict holding the three state dicts
        under ``movement_encoder``, ``text_encoder``, ``motion_encoder``) and the folder of its GloVe files;
        ``mean``/``std`` are the evaluator's own statistics (its ``meta/mean.npy``, ``meta/std.npy``). The file is
        read with ``torch.load(weights_only=True)``: tensors and plain values only, no code (the official file's
        Adam states, ``epoch`` and ``iter`` are plain values and are ignored). The GloVe files are read now, so a
        bad vocabulary fails here rather than at the first caption."""
        config = replace(config or EvaluatorConfig(), word_vectors=str(glove_dir))
        evaluator = cls(config, word_vectors=GloVeVectors(glove_dir), mean=mean, std=std)
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{checkpoint}: holds more than tensors and plain values ({error}); if you trust the file, load it "
                f"with torch.load(weights_only=False) and pass the dict to load_state_dicts"
            ) from None
        if not isinstance(state, Mapping):
            raise ValueError(f"{checkpoint}: expected a dict of state dicts, got {type(state).__name__}")
        evaluator.load_state_dicts(state, str(checkpoint))
        return evaluator.eval()

    @classmethod
    def from_official_folder(
        cls, root: str | Path, *, glove_dir: str | Path, config: EvaluatorConfig | None = None
    ) -> "TextMotionEvaluator":
        """The official evaluator from its ``t2m`` (or ``kit``) folder: :func:`official_files` finds ``finest.tar``
        and the meta statistics; ``motion_dim`` follows the statistics (263 HumanML3D, 251 KIT-ML)."""
        checkpoint, mean_path, std_path = official_files(root)
        mean, std = _read_stat(mean_path), _read_stat(std_path)
        if mean.shape != std.shape:
            raise ValueError(f"{mean_path} {mean.shape} and {std_path} {std.shape} must have the same shape")
        config = replace(config or EvaluatorConfig(), motion_dim=int(mean.shape[0]))
        return cls.from_official(checkpoint, glove_dir=glove_dir, config=config, mean=mean, std=std)

    def save(self, directory: str | Path, training: dict | None = None) -> None:
        """Write ``evaluator.safetensors`` (``<module>.<key>`` plus ``stats.mean``/``stats.std`` when recorded) and
        ``config.json`` (with ``training`` facts if given)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{k}": v for name in MODULES for k, v in getattr(self, name).state_dict().items()}
        tensors.update({f"stats.{n}": v for n, v in (("mean", self.mean), ("std", self.std)) if v is not None})
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME))
        payload = {"config": asdict(self.config), **({"training": training} if training else {})}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, *, word_vectors: WordVectors | None = None) -> "TextMotionEvaluator":
        """Read what :meth:`save` wrote; returns the evaluator in eval mode."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory / name} not found: expected a TextMotionEvaluator.save folder")
        config = EvaluatorConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text())["config"])
        tensors = load_file(str(directory / WEIGHTS_NAME))
        mean, std = tensors.pop("stats.mean", None), tensors.pop("stats.std", None)
        evaluator = cls(config, word_vectors=word_vectors, mean=mean, std=std)
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            module, _, rest = key.partition(".")
            state.setdefault(module, {})[rest] = value
        extra = sorted(set(state) - set(MODULES))
        if extra:
            raise ValueError(f"{directory / WEIGHTS_NAME}: unexpected tensor groups {extra}, expected {list(MODULES)}")
        evaluator.load_state_dicts(state, str(directory / WEIGHTS_NAME))
        return evaluator.eval()


OFFICIAL_CHECKPOINT = Path("text_mot_match") / "model" / "finest.tar"
#: where the official zips keep the evaluator's input statistics, in the order they are looked for
OFFICIAL_META = (Path("meta"), Path("Comp_v6_KLD01") / "meta", Path("Comp_v6_KLD005") / "meta",
                 Path("text_mot_match") / "meta")  # fmt: skip


def official_files(root: str | Path) -> tuple[Path, Path, Path]:
    """``(finest.tar, mean.npy, std.npy)`` of an official evaluator folder: ``root/text_mot_match/model/finest.tar``
    and the first of ``root/{meta, Comp_v6_KLD01/meta, Comp_v6_KLD005/meta, text_mot_match/meta}`` holding both
    ``mean.npy`` and ``std.npy``. Raises naming what is missing and where it was looked for."""
    root = Path(root)
    checkpoint = root / OFFICIAL_CHECKPOINT
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{checkpoint} not found: expected the official evaluator folder (the 't2m' folder of the T2M "
            f"evaluators zip, holding text_mot_match/model/finest.tar and <model>/meta/mean.npy, std.npy)"
        )
    for meta in OFFICIAL_META:
        mean, std = root / meta / "mean.npy", root / meta / "std.npy"
        if mean.is_file() and std.is_file():
            return checkpoint, mean, std
    looked = ", ".join(str(root / m) for m in OFFICIAL_META)
    raise FileNotFoundError(
        f"{root}: no folder with both mean.npy and std.npy (looked in {looked}): the official evaluator normalises "
        f"its inputs with these statistics; copy them from the evaluators zip (t2m/Comp_v6_KLD01/meta/)"
    )


def _read_stat(path: Path) -> np.ndarray:
    value = np.load(path, allow_pickle=False)
    if value.ndim != 1 or not np.isfinite(value).all():
        raise ValueError(f"{path}: expected a finite 1-D array of per-feature statistics, got shape {value.shape}")
    return value.astype(np.float32)


def load_evaluator(path: str | Path, *, glove_dir: str | Path | None = None) -> TextMotionEvaluator:
    """An evaluator from either a :meth:`TextMotionEvaluator.save` folder (``config.json``; ``glove_dir``, when
    given, replaces its word vectors) or an official folder (``text_mot_match/model/finest.tar``; needs
    ``glove_dir``)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        vectors = None if glove_dir is None else GloVeVectors(glove_dir)
        return TextMotionEvaluator.load(path, word_vectors=vectors)
    if (path / OFFICIAL_CHECKPOINT).is_file():
        if glove_dir is None:
            raise ValueError(f"{path} is an official evaluator: pass the folder of its GloVe files "
                             f"(our_vab_data.npy, our_vab_words.pkl, our_vab_idx.pkl) as glove_dir")
        return TextMotionEvaluator.from_official_folder(path, glove_dir=glove_dir)
    raise FileNotFoundError(f"{path}: neither a genalign evaluator folder ({CONFIG_NAME}, {WEIGHTS_NAME}) nor an "
                            f"official one ({OFFICIAL_CHECKPOINT})")
