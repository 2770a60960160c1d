"""The HumanML3D / KIT-ML evaluation protocol (Guo et al. 2022) with the replication loop of the official scripts
(EricGuo5513/text-to-motion ``final_evaluations.py``, GuyTevet/motion-diffusion-model ``eval/eval_humanml.py``).

Each of the ``replications`` (20) runs the whole protocol again:

1. the test loader is drawn afresh (:meth:`ProtocolTestSet.draw`): clips shuffled, one caption per clip chosen at
   random, each clip cropped to a multiple of ``unit_length`` (one unit shorter with probability 1/3) at a random
   offset, as ``Text2MotionDatasetV2`` does;
2. the generator **regenerates** a motion for each of the first ``num_samples`` draws (MDM: 1000, i.e. the first
   ``1000 // 32 + 1`` batches of 32) at the draw's length, from a new seed (``seed + r``);
3. R-precision top-1/2/3 over consecutive batches of 32 (1 matching + 31 mismatched motions, Euclidean distance),
   MM-Dist, FID of the generated embeddings against the real embeddings of every drawn clip, Diversity (300
   pairs) and, with ``mm_captions`` > 0, MultiModality: ``mm_generations`` (30) new generations for each of
   ``mm_captions`` (100) drawn captions, 10 pairs each (the official script regenerates whole batches for it,
   ``100 // 32 + 1`` of them; here exactly ``mm_captions`` rows are drawn);

and every metric is reported as mean ± 1.96·std/√n over the replications (``genalign.eval.motion.Interval``). The
same draws with the real motions in place of the generated ones give the "ground truth" row of a results table.

Generators are callables ``generate(captions, lengths, seed) -> motions``: one un-normalised feature array
``[lengths[i], D]`` per caption (:func:`adapter_generator` wraps a :class:`~genalign.adapters.motion.MotionAdapter`).
A folder of already generated motions cannot be regenerated: :func:`folder_motions` reads it, and its replications
then re-draw captions, crops and batches only (reported as ``regenerated: false``).

Captions enter the evaluator as the test set's ``word/POS`` tokens (a caption line without them is refused naming
the file and line); motions are normalised with the evaluator's own statistics (``evaluator.normalize``) and zeroed
after their length, as the official loader pads real motions (MDM's own script feeds its generated motions
unzeroed past the length; only the last movement token's receptive field sees the difference). A folder's motions
are scored at their own length (cut to ``max_motion_length``), paired with the caption drawn for their clip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from genalign.data.humanml3d import HumanML3DDataset
from genalign.eval.motion import Interval, MotionMetrics, evaluate_embeddings, flatten, report_names
from genalign.models.t2m_evaluator import TextMotionEvaluator
from genalign.models.word_vectors import split_token

log = logging.getLogger(__name__)

Generator = Callable[[list[str], list[int], int], Sequence[np.ndarray | torch.Tensor]]
OFFICIAL_NUM_SAMPLES = 1000  # MDM's num_samples_limit
EMBED_CHUNK = 256  # motions embedded at once


@dataclass(frozen=True)
class TestDraw:
    """One row of a protocol pass: clip ``id``, the caption drawn for it (text and ``word/POS`` tokens), and the
    real motion cropped as the protocol does, un-normalised ``[length, D]``."""

    id: str
    caption: str
    tokens: tuple[str, ...]
    length: int
    motion: np.ndarray


class ProtocolTestSet:
    """The test split of a HumanML3D-layout folder read with the protocol's rules
    (:class:`~genalign.data.humanml3d.HumanML3DDataset`); every caption must carry ``word/POS`` tokens."""

    def __init__(self, root: str | Path, split: str = "test", **dataset_kwargs) -> None:
        self.dataset = HumanML3DDataset(root, split, random_crop=True, **dataset_kwargs)
        if len(self.dataset) == 0:
            raise ValueError(f"{root} split {split!r} has no clip left by the protocol's length rules "
                             f"(dropped: {dict(self.dataset.dropped)})")
        for clip in self.dataset.clips:
            for caption in clip.captions:
                _check_tokens(self.dataset.text_dir / f"{clip.id}.txt", caption.text, caption.tokens)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def ids(self) -> list[str]:
        return sorted({clip.id for clip in self.dataset.clips})

    def draw(self, seed: int) -> list[TestDraw]:
        """Every clip once, in a shuffled order, with its caption, crop length and offset drawn as the protocol's
        loader draws them; repeatable for a given ``seed`` (torch's global RNG is left as it was)."""
        order = np.random.default_rng(seed).permutation(len(self.dataset))
        rows = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for index in order:
                item = self.dataset[int(index)]
                motion = self.dataset.denormalize(item["motion"][: item["length"]].double()).numpy()
                rows.append(TestDraw(item["id"], item["caption"], tuple(item["tokens"]), item["length"], motion))
        return rows


def _check_tokens(path: Path, text: str, tokens: Sequence[str]) -> None:
    """Raise naming ``path`` and the caption's line when a token is not ``word/POS``."""
    try:
        for token in tokens:
            split_token(token)
    except ValueError:
        lines = path.read_text(encoding="utf-8").splitlines()
        number = next((i for i, line in enumerate(lines, 1) if line.split("#")[0] == text), "?")
        raise ValueError(
            f"{path}:{number}: caption {text!r} has no POS tags (got tokens {' '.join(tokens)!r}); the evaluator's "
            f"text encoder reads 'word/POS' tokens (HumanML3D's texts carry spaCy lemma/POS pairs, e.g. "
            f"'a/DET man/NOUN walk/VERB'): tag the captions (spaCy) and write them as 'caption#tokens#start#end'"
        ) from None


@dataclass
class ProtocolResult:
    """Replicated metrics of the generated motions and of the real ones on the same draws."""

    generated: dict[str, Interval]
    ground_truth: dict[str, Interval]
    replications: int
    num_samples: int
    regenerated: bool
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """``{"generated": {name: mean, name_ci95: half-width}, "ground_truth": ..., "protocol": {...}}``."""
        return {
            "generated": flatten(self.generated),
            "ground_truth": flatten(self.ground_truth),
            "protocol": {"replications": self.replications, "num_samples": self.num_samples,
                         "regenerated": self.regenerated, **self.extra},
        }


class MotionProtocol:
    """The replicated protocol for one evaluator and test set (see the module doc).

    Args:
        num_samples: draws generated per replication, rounded up to whole batches as MDM does
            (``num_samples // batch_size + 1`` batches), at most the whole test set in whole batches.
        diversity_pairs: 300 in the protocol; the generated set must hold at least that many motions.
        mm_captions / mm_generations / mm_pairs: MultiModality (0 = off; the protocol: 100, 30, 10).
    """

    def __init__(
        self,
        evaluator: TextMotionEvaluator,
        test_set: ProtocolTestSet,
        *,
        replications: int = 20,
        seed: int = 0,
        num_samples: int = OFFICIAL_NUM_SAMPLES,
        batch_size: int = 32,
        diversity_pairs: int = 300,
        mm_captions: int = 0,
        mm_generations: int = 30,
        mm_pairs: int = 10,
    ) -> None:
        if evaluator.mean is None or evaluator.std is None:
            raise ValueError("the evaluator has no recorded mean/std: the protocol normalises motions with them")
        if replications < 1:
            raise ValueError(f"replications must be at least 1, got {replications}")
        batches = min(num_samples // batch_size + 1, len(test_set) // batch_size)
        if batches < 1:
            raise ValueError(f"the test set has {len(test_set)} clips, fewer than one R-precision batch of {batch_size}")
        self.num_samples = batches * batch_size
        if self.num_samples < diversity_pairs:
            raise ValueError(f"Diversity draws {diversity_pairs} pairs from {self.num_samples} generated motions; "
                             f"evaluate more clips or lower diversity_pairs")
        if mm_captions and (mm_captions > self.num_samples or mm_generations < mm_pairs):
            raise ValueError(f"MultiModality needs mm_captions <= {self.num_samples} drawn captions and "
                             f"mm_generations >= mm_pairs, got {mm_captions}, {mm_generations}, {mm_pairs}")
        self.evaluator, self.test_set = evaluator, test_set
        self.replications, self.seed, self.batch_size = replications, seed, batch_size
        self.diversity_pairs = diversity_pairs
        self.mm_captions, self.mm_generations, self.mm_pairs = mm_captions, mm_generations, mm_pairs

    # ------------------------------------------------------------------------------------------- embeddings
    def embed_motions(self, motions: Sequence[np.ndarray | torch.Tensor], lengths: Sequence[int]) -> np.ndarray:
        """Evaluator embeddings ``[N, E]`` of un-normalised motions, each cut to its length."""
        dim = self.evaluator.config.motion_dim
        out = []
        for start in range(0, len(motions), EMBED_CHUNK):
            chunk = [torch.as_tensor(np.asarray(m), dtype=torch.float32) for m in motions[start : start + EMBED_CHUNK]]
            chunk_lengths = list(lengths[start : start + EMBED_CHUNK])
            padded = torch.zeros(len(chunk), max(chunk_lengths), dim)
            for i, (motion, length) in enumerate(zip(chunk, chunk_lengths)):
                padded[i, :length] = motion[:length]
            with torch.no_grad():
                out.append(self.evaluator.encode_motion(self.evaluator.normalize(padded), chunk_lengths).cpu().numpy())
        return np.concatenate(out)

    def embed_texts(self, rows: Sequence[TestDraw]) -> np.ndarray:
        with torch.no_grad():
            return self.evaluator.encode_text([list(r.tokens) for r in rows]).cpu().numpy()

    # ------------------------------------------------------------------------------------------- the loop
    def run(self, generate: Generator | None = None, *, motions: dict[str, np.ndarray] | None = None) -> ProtocolResult:
        """Replicate the protocol for ``generate`` (regenerating every motion each time) or for fixed ``motions``
        by clip id (e.g. :func:`folder_motions`)."""
        if (generate is None) == (motions is None):
            raise ValueError("pass exactly one of generate (a generator to regenerate from) or motions (fixed, by id)")
        if motions is not None:
            missing = sorted(set(self.test_set.ids) - set(motions))
            if missing:
                raise ValueError(f"no generated motion for {len(missing)} test clips, e.g. {missing[:5]}: name the "
                                 f"files <id>.npy after the test split's ids")
            if self.mm_captions:
                raise ValueError("MultiModality needs new generations: it cannot be computed from a folder of motions")
            log.warning("fixed motions: replications re-draw captions, crops and batches but not the motions")
        generated, real = MotionMetrics(), MotionMetrics()
        for r in tqdm(range(self.replications), desc="protocol replications", unit="replication"):
            gen_values, real_values = self.replication(r, generate, motions)
            generated.update(gen_values)
            real.update(real_values)
        return ProtocolResult(report_names(generated.compute()), report_names(real.compute()), self.replications,
                              self.num_samples, regenerated=generate is not None)

    def replication(self, r: int, generate: Generator | None, motions: dict | None) -> tuple[dict, dict]:
        """One pass: ``(generated metrics, ground-truth metrics)`` of replication ``r``."""
        seed = self.seed + r
        rows = self.test_set.draw(seed)
        real_all = self.embed_motions([row.motion for row in rows], [row.length for row in rows])
        rows = rows[: self.num_samples]
        captions, lengths = [row.caption for row in rows], [row.length for row in rows]
        if generate is not None:
            gen = _checked(generate(captions, lengths, seed), lengths, "generate")
        else:
            gen = [motions[row.id] for row in rows]
            lengths = [min(len(m), self.evaluator.config.max_motion_length) for m in gen]
        gen_emb = self.embed_motions(gen, lengths)
        text_emb = self.embed_texts(rows)
        mm_emb = self.multimodality_embeddings(rows, generate, seed) if self.mm_captions else None
        kw = {"batch_size": self.batch_size, "diversity_pairs": self.diversity_pairs, "mm_pairs": self.mm_pairs}
        gen_values = evaluate_embeddings(text_emb, gen_emb, real_all, mm_emb=mm_emb, generator=seed, **kw)
        real_values = evaluate_embeddings(text_emb, real_all[: len(rows)], real_all, generator=seed, **kw)
        return gen_values, real_values

    def multimodality_embeddings(self, rows: Sequence[TestDraw], generate: Generator, seed: int) -> np.ndarray:
        """``[mm_captions, mm_generations, E]``: new generations of drawn captions (caption-major), from a seed
        distinct from the replication's."""
        picks = np.random.default_rng([seed, 1]).choice(len(rows), self.mm_captions, replace=False)
        captions = [rows[i].caption for i in picks for _ in range(self.mm_generations)]
        lengths = [rows[i].length for i in picks for _ in range(self.mm_generations)]
        motions = _checked(generate(captions, lengths, seed + 1_000_003), lengths, "generate (MultiModality)")
        return self.embed_motions(motions, lengths).reshape(self.mm_captions, self.mm_generations, -1)


def _checked(motions, lengths: Sequence[int], what: str) -> list[np.ndarray]:
    motions = list(motions)
    if len(motions) != len(lengths):
        raise ValueError(f"{what} returned {len(motions)} motions for {len(lengths)} captions")
    out = []
    for i, (motion, length) in enumerate(zip(motions, lengths)):
        array = motion.detach().cpu().numpy() if isinstance(motion, torch.Tensor) else np.asarray(motion)
        if array.ndim != 2 or len(array) < length or not np.isfinite(array[:length]).all():
            raise ValueError(f"{what}: motion {i} must be finite [T >= {length}, D] features, got shape {array.shape}")
        out.append(array[:length])
    return out


# ----------------------------------------------------------------------------------------------- generators
def adapter_generator(
    adapter,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 2.5,
    scheduler: str = "ddpm",
    batch_size: int = 64,
) -> Generator:
    """``generate(captions, lengths, seed)`` from a :class:`~genalign.adapters.motion.MotionAdapter` whose samples
    are normalised with ``mean``/``std`` (the training data's ``Mean.npy``/``Std.npy``): samples each batch with
    ``torch.Generator().manual_seed(seed)`` and returns un-normalised features ``[length, D]``."""
    mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)

    def generate(captions: list[str], lengths: list[int], seed: int) -> list[np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, len(captions), batch_size):
            batch = adapter.sample(captions[start : start + batch_size], generator=generator,
                                   lengths=lengths[start : start + batch_size], num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, scheduler=scheduler)
            out += [(m[v].cpu().float() * std_t + mean_t).numpy() for m, v in zip(batch["motion"], batch["mask"])]
        return out

    return generate


def folder_motions(folder: str | Path, ids: Sequence[str], dim: int) -> dict[str, np.ndarray]:
    """``{id: [T, dim]}`` from ``folder/<id>.npy`` (un-normalised features, as the protocol's data holds them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected generated motions <test id>.npy, [T, {dim}]")
    out = {}
    for motion_id in ids:
        path = folder / f"{motion_id}.npy"
        if not path.exists():
            continue  # MotionProtocol.run names every missing id at once
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2 or array.shape[1] != dim or len(array) < 4 or not np.isfinite(array).all():
            raise ValueError(f"{path}: expected finite un-normalised features [T >= 4, {dim}], got shape {array.shape}")
        out[motion_id] = array.astype(np.float32)
    return out
