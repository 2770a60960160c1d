"""Word inputs of the text-to-motion evaluator of Guo et al. 2022: a 300-d word vector and a 15-way POS one-hot per
``word/POS`` token.

Rules of the T2M text pipeline (checked against the official ``utils/word_vectorizer.py`` and
``data/dataset.py`` of EricGuo5513/text-to-motion):

* a caption's tokens are cut to ``max_text_len`` (20), wrapped as ``sos/OTHER ... eos/OTHER`` and padded with
  ``unk/OTHER`` to ``max_text_len + 2``; the caption length counts ``sos`` and ``eos``;
* a word in one of the VIP lists below takes that list's category instead of its POS tag; a tag outside the 15
  categories becomes ``OTHER``;
* with GloVe vectors, a word outside the vocabulary takes the ``unk`` vector and the ``OTHER`` category.

Word vectors come from one of two sources:

* :class:`GloVeVectors`: the official evaluator's GloVe 300-d files ``<prefix>_data.npy`` ``[V, 300]``,
  ``<prefix>_words.pkl`` (list of the V words; ``<prefix>_words.npy``, an array of strings, is accepted too) and
  ``<prefix>_idx.pkl`` (word -> row), ``prefix = "our_vab"`` (the ``glove/`` folder of EricGuo5513/text-to-motion,
  whose idx puts ``sos``, ``eos``, ``unk`` at rows 0, 1, 2), from a folder the user provides. Needed to run the
  official ``text_mot_match`` checkpoint. The three files must describe one vocabulary (V rows, V words, V
  indices); anything else is refused naming the files.
* :class:`MiniLMWordVectors`, the offline default: each word is encoded alone by the packaged all-MiniLM-L6-v2
  sentence encoder (mask-weighted mean of token states, L2-normalised, 384-d), multiplied by a fixed orthonormal
  ``[384, 300]`` projection (QR of a Gaussian matrix drawn from ``torch.Generator().manual_seed(seed)``) and
  rescaled to norm ``sqrt(300)`` (unit RMS per coordinate). Deterministic for a given encoder and seed, with no
  out-of-vocabulary words; it is *not* GloVe, so an evaluator trained with it only accepts these vectors.

Raw captions (no POS tags) are tokenised by :func:`caption_tokens`: lower-cased words, closed-class words
(determiners, prepositions, pronouns, auxiliaries, numbers) tagged from a small lexicon, every other word ``OTHER``
(VIP words still get their VIP category). HumanML3D's tokens are spaCy lemmas and tags; pass those whenever the
data has them, as the official evaluator was trained on them.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

POS_CATEGORIES = (
    "VERB", "NOUN", "DET", "ADP", "NUM", "AUX", "PRON", "ADJ", "ADV",
    "Loc_VIP", "Body_VIP", "Obj_VIP", "Act_VIP", "Desc_VIP", "OTHER",
)  # fmt: skip
POS_INDEX = {name: i for i, name in enumerate(POS_CATEGORIES)}

VIP_WORDS = {
    "Loc_VIP": ("left", "right", "clockwise", "counterclockwise", "anticlockwise", "forward", "back", "backward",
                "up", "down", "straight", "curve"),
    "Body_VIP": ("arm", "chin", "foot", "feet", "face", "hand", "mouth", "leg", "waist", "eye", "knee", "shoulder",
                 "thigh"),
    "Obj_VIP": ("stair", "dumbbell", "chair", "window", "floor", "car", "ball", "handrail", "baseball", "basketball"),
    "Act_VIP": ("walk", "run", "swing", "pick", "bring", "kick", "put", "squat", "throw", "hop", "dance", "jump",
                "turn", "stumble", "stop", "sit", "lift", "lower", "raise", "wash", "stand", "kneel", "stroll", "rub",
                "bend", "balance", "flap", "jog", "shuffle", "lean", "rotate", "spin", "spread", "climb"),
    "Desc_VIP": ("slowly", "carefully", "fast", "careful", "slow", "quickly", "happy", "angry", "sad", "happily",
                 "angrily", "sadly"),
}  # fmt: skip
VIP_CATEGORY = {word: category for category, words in VIP_WORDS.items() for word in words}

SOS, EOS, PAD = "sos/OTHER", "eos/OTHER", "unk/OTHER"
MAX_TEXT_LEN = 20

_CLOSED_CLASS = {
    "DET": "a an the this that these those each every another some any no all both either neither",
    "ADP": "in on at to from with by of over under around across through into onto toward towards along behind "
           "above below between near off out about after before during against without upon within beside",
    "PRON": "he she it they them him her his its their i you we me us my your our himself herself itself "
            "themselves someone somebody something one",
    "AUX": "is are was were be been being am do does did has have had will would can could should may might must",
    "NUM": "zero two three four five six seven eight nine ten eleven twelve twenty hundred once twice",
}  # fmt: skip
_LEXICON = {word: tag for tag, words in _CLOSED_CLASS.items() for word in words.split()}


def pos_category(word: str, pos: str) -> str:
    """The T2M category of a token: its VIP list if the word is in one, else ``pos`` if known, else ``OTHER``."""
    return VIP_CATEGORY.get(word) or (pos if pos in POS_INDEX else "OTHER")


def caption_tokens(caption: str) -> list[str]:
    """``word/POS`` tokens of a raw caption, tagged by the closed-class lexicon (see the module doc)."""
    words = re.findall(r"[a-z]+|\d+", caption.lower())
    return [f"{w}/{'NUM' if w.isdigit() else _LEXICON.get(w, 'OTHER')}" for w in words]


def split_token(token: str) -> tuple[str, str]:
    """``'word/POS' -> ('word', 'POS')``; raises naming the token when there is no ``/``."""
    word, sep, pos = token.rpartition("/")
    if not sep or not word:
        raise ValueError(f"token {token!r} is not 'word/POS' (e.g. 'walk/VERB'); pass raw captions as strings instead")
    return word, pos


def wrap_tokens(tokens: Sequence[str], max_text_len: int = MAX_TEXT_LEN) -> tuple[list[str], int]:
    """Cut to ``max_text_len``, add ``sos``/``eos``, pad with ``unk`` to ``max_text_len + 2``; returns
    ``(tokens, length)`` with ``length`` counting ``sos`` and ``eos``."""
    wrapped = [SOS, *tokens[:max_text_len], EOS]
    return wrapped + [PAD] * (max_text_len + 2 - len(wrapped)), len(wrapped)


class WordVectors(Protocol):
    """A word -> vector table: ``lookup(words) -> (vectors [n, dim] float32, known [n] bool)``."""

    dim: int

    def lookup(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


class _PlainUnpickler(pickle.Unpickler):
    """Reads only plain containers, strings and numbers: a vocabulary file has no reason to import anything."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to import {module}.{name}: expected only lists, dicts, str and int")


def _read_pickle(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected the GloVe vocabulary file of the T2M evaluator")
    with path.open("rb") as handle:
        try:
            return _PlainUnpickler(handle).load()
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: {error}") from None


class GloVeVectors:
    """The T2M evaluator's GloVe table from ``folder`` (``<prefix>_data.npy``, ``_words.pkl``, ``_idx.pkl``)."""

    def __init__(self, folder: str | Path, prefix: str = "our_vab") -> None:
        folder = Path(folder)
        data_path = folder / f"{prefix}_data.npy"
        if not data_path.exists():
            raise FileNotFoundError(f"{data_path} not found: expected the GloVe matrix [V, 300] of the T2M evaluator")
        self.vectors = np.load(data_path).astype(np.float32)
        words, words_path = _read_words(folder, prefix)
        idx_path = folder / f"{prefix}_idx.pkl"
        index = _read_pickle(idx_path)
        if self.vectors.ndim != 2:
            raise ValueError(f"{data_path}: expected a [V, D] matrix of word vectors, got shape {self.vectors.shape}")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{words_path}: expected a list of words (str)")
        if not isinstance(index, dict):
            raise ValueError(f"{idx_path}: expected a dict word -> row, got {type(index).__name__}")
        sizes = {data_path.name: len(self.vectors), words_path.name: len(words), idx_path.name: len(index)}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"{folder}: the GloVe files disagree on the vocabulary size ({', '.join(f'{k}: {v}' for k, v in sizes.items())}); "
                f"they must come from one export: take all three from the same glove/ folder (the T2M evaluator's)"
            )
        bad = [w for w in words if not 0 <= index.get(w, -1) < len(self.vectors)]
        if bad:
            raise ValueError(f"{idx_path}: no valid row for words {bad[:5]} of {words_path.name}")
        if "unk" not in index:
            raise ValueError(f"{folder}: the vocabulary has no 'unk' word, which out-of-vocabulary words map to")
        self.index = {w: int(index[w]) for w in words}
        self.dim = self.vectors.shape[1]
        self.source = str(folder)

    def lookup(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        known = np.array([w in self.index for w in words], dtype=bool)
        rows = [self.index[w] if k else self.index["unk"] for w, k in zip(words, known)]
        return self.vectors[rows].reshape(len(words), self.dim), known


def _read_words(folder: Path, prefix: str) -> tuple[list, Path]:
    """The word list from ``<prefix>_words.pkl`` or, failing that, ``<prefix>_words.npy`` (strings, no pickles)."""
    pkl, npy = folder / f"{prefix}_words.pkl", folder / f"{prefix}_words.npy"
    if pkl.exists() or not npy.exists():
        return _read_pickle(pkl), pkl
    try:
        return np.load(npy, allow_pickle=False).tolist(), npy
    except ValueError as error:
        raise ValueError(f"{npy}: expected an array of strings ({error})") from None


class MiniLMWordVectors:
    """Offline 300-d word vectors from a local sentence encoder (default: the packaged MiniLM); see the module doc.
    Vectors are cached in memory per word."""

    def __init__(self, path: str | Path | None = None, *, dim: int = 300, seed: int = 0) -> None:
        from genalign.data.text_encoder import SentenceEncoder

        self.encoder = SentenceEncoder(path, max_length=16)
        if not 0 < dim <= self.encoder.dim:
            raise ValueError(f"dim must be in [1, {self.encoder.dim}] (the encoder width), got {dim}")
        gaussian = torch.randn(self.encoder.dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.projection = torch.linalg.qr(gaussian).Q.float()  # orthonormal columns
        self.dim = dim
        self._cache: dict[str, np.ndarray] = {}

    def lookup(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        missing = list(dict.fromkeys(w for w in words if w not in self._cache))
        if missing:
            projected = self.encoder.encode(missing).pooled @ self.projection
            projected = projected / projected.norm(dim=-1, keepdim=True).clamp(min=1e-12) * self.dim**0.5
            self._cache.update(zip(missing, projected.numpy()))
        vectors = np.stack([self._cache[w] for w in words]) if words else np.zeros((0, self.dim), np.float32)
        return vectors, np.ones(len(words), dtype=bool)


def load_word_vectors(spec: str) -> WordVectors:
    """``"minilm"`` -> :class:`MiniLMWordVectors`; otherwise a folder of GloVe files -> :class:`GloVeVectors`."""
    return MiniLMWordVectors() if spec == "minilm" else GloVeVectors(spec)


class WordVectorizer:
    """Captions -> padded evaluator inputs ``(word_emb [B, L, dim], pos_onehot [B, L, 15], lengths [B])`` with
    ``L = max_text_len + 2``, following the rules in the module doc. Each caption is a raw string or a list of
    ``word/POS`` tokens."""

    def __init__(self, vectors: WordVectors, max_text_len: int = MAX_TEXT_LEN) -> None:
        self.vectors, self.max_text_len = vectors, max_text_len

    def __call__(self, captions: Sequence[str | Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("pass a list of captions, not a single string")
        wrapped, lengths = [], []
        for i, caption in enumerate(captions):
            if isinstance(caption, str):
                caption = caption_tokens(caption)
            elif not all(isinstance(t, str) for t in caption):
                raise TypeError(f"captions[{i}] must be a string or a list of 'word/POS' strings")
            tokens, length = wrap_tokens(list(caption), self.max_text_len)
            wrapped.append(tokens)
            lengths.append(length)
        pairs = [split_token(t) for tokens in wrapped for t in tokens]
        vectors, known = self.vectors.lookup([w for w, _ in pairs])
        categories = [pos_category(w, p) if k else "OTHER" for (w, p), k in zip(pairs, known)]
        onehot = np.zeros((len(pairs), len(POS_CATEGORIES)), dtype=np.float32)
        onehot[np.arange(len(pairs)), [POS_INDEX[c] for c in categories]] = 1.0
        shape = (len(wrapped), self.max_text_len + 2)
        return (
            torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).reshape(*shape, self.vectors.dim),
            torch.from_numpy(onehot).reshape(*shape, len(POS_CATEGORIES)),
            torch.tensor(lengths, dtype=torch.long),
        )
