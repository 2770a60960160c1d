"""Training the T2M text-motion evaluator in the two stages of Guo et al. 2022.

1. **Movement autoencoder.** The :class:`MovementConvEncoder` and a :class:`MovementConvDecoder` reconstruct the
   motion: ``L1(decoded, motion)`` over the valid frames, plus ``lambda_sparsity * mean|z|`` and
   ``lambda_smooth * mean|z_{j+1} - z_j|`` on the movement latents z (both lambdas 0.001, as the T2M setting).
2. **Text-motion matching.** With the movement encoder frozen (eval mode, no gradients), the text and motion
   encoders minimise the contrastive loss of Hadsell et al. 2006 on Euclidean distances d:

       L = mean_i d(t_i, m_i)^2 + mean_i max(0, margin - d(t_i, m_{(i + s) mod B}))^2

   matched pairs are pulled together, the batch shifted by s gives mismatched pairs pushed beyond ``margin`` (10).
   s is drawn uniformly from 1..B-1 each step; the T2M code draws from 0..B-2, where s = 0 turns the "mismatched"
   pairs into the matched ones, so we leave 0 out.

Adam with the T2M learning rate 1e-4 by default. The data is any dataset of
:class:`genalign.data.humanml3d.HumanML3DDataset` items (``motion``, ``length``, ``tokens``);
:func:`embed_dataset` gives the co-embeddings of such a dataset (what the protocol metrics take).
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from genalign.data.humanml3d import collate_motions
from genalign.models.t2m_evaluator import FOOT_CONTACT_DIMS, MovementConvDecoder, TextMotionEvaluator


def contrastive_loss(
    text_emb: torch.Tensor, motion_emb: torch.Tensor, *, margin: float = 10.0, shift: int = 1
) -> torch.Tensor:
    """The matching loss above for a batch of B matched rows, with the mismatched motions rolled by ``shift``."""
    if text_emb.shape != motion_emb.shape or text_emb.dim() != 2:
        raise ValueError(f"need paired [B, D] embeddings, got {tuple(text_emb.shape)} and {tuple(motion_emb.shape)}")
    if not 1 <= shift < len(text_emb):
        raise ValueError(f"shift must be in [1, B-1] = [1, {len(text_emb) - 1}] so every pair is mismatched, got {shift}")
    positive = F.pairwise_distance(text_emb, motion_emb).pow(2).mean()
    negative = (margin - F.pairwise_distance(text_emb, motion_emb.roll(-shift, 0))).clamp(min=0).pow(2).mean()
    return positive + negative


def _batches(dataset: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[dict]:
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than batch_size={batch_size}")
    loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, collate_fn=collate_motions, generator=generator)
    return itertools.chain.from_iterable(itertools.repeat(loader))


def _valid_mask(lengths: torch.Tensor, size: int, unit: int = 1) -> torch.Tensor:
    """``[B, size]`` float mask of the positions before ``lengths // unit``."""
    return (torch.arange(size, device=lengths.device) < (lengths // unit)[:, None]).float()


def train_movement_autoencoder(
    evaluator: TextMotionEvaluator,
    batches: Iterator[dict],
    steps: int,
    *,
    lr: float = 1e-4,
    lambda_sparsity: float = 1e-3,
    lambda_smooth: float = 1e-3,
    progress: bool = True,
) -> list[float]:
    """Stage 1: fit ``evaluator.movement_encoder`` with a fresh decoder; returns the loss per step."""
    config = evaluator.config
    decoder = MovementConvDecoder(config.movement_latent, config.movement_hidden, config.motion_dim).to(evaluator.device)
    encoder = evaluator.movement_encoder.train()
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="movement autoencoder", disable=not progress):
        batch = next(batches)
        target, lengths = evaluator.padded(batch["motion"], batch["length"])
        latents = evaluator.movement_encoder(target[..., :-FOOT_CONTACT_DIMS])
        decoded = decoder(latents)
        frames = _valid_mask(lengths, decoded.shape[1])
        tokens = _valid_mask(lengths, latents.shape[1], config.unit_length)
        reconstruction = ((decoded - target[:, : decoded.shape[1]]).abs().mean(-1) * frames).sum() / frames.sum()
        sparsity = (latents.abs().mean(-1) * tokens).sum() / tokens.sum()
        steps_mask = tokens[:, 1:]
        smooth = ((latents[:, 1:] - latents[:, :-1]).abs().mean(-1) * steps_mask).sum() / steps_mask.sum().clamp(min=1)
        loss = reconstruction + lambda_sparsity * sparsity + lambda_smooth * smooth
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_matching(
    evaluator: TextMotionEvaluator,
    batches: Iterator[dict],
    steps: int,
    *,
    lr: float = 1e-4,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> list[float]:
    """Stage 2: the contrastive matching loss with the movement encoder frozen; returns the loss per step."""
    evaluator.movement_encoder.eval().requires_grad_(False)
    evaluator.text_encoder.train()
    evaluator.motion_encoder.train()
    optimizer = torch.optim.Adam([*evaluator.text_encoder.parameters(), *evaluator.motion_encoder.parameters()], lr=lr)
    losses = []
    bar = tqdm(range(steps), desc="text-motion matching", disable=not progress)
    for _ in bar:
        batch = next(batches)
        text_emb, motion_emb = evaluator(batch["tokens"], batch["motion"], batch["length"])
        shift = int(torch.randint(1, len(text_emb), (), generator=generator))
        loss = contrastive_loss(text_emb, motion_emb, margin=evaluator.config.margin, shift=shift)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    evaluator.movement_encoder.requires_grad_(True)
    return losses


def train_evaluator(
    evaluator: TextMotionEvaluator,
    dataset: Dataset,
    *,
    steps: int = 20000,
    movement_steps: int = 5000,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Both stages on ``dataset``; records the dataset's ``mean``/``std`` on an evaluator that has none. Returns
    ``{"movement": losses, "matching": losses}`` and leaves the evaluator in eval mode."""
    dim = evaluator.config.motion_dim
    if getattr(dataset, "dim", dim) != dim:
        raise ValueError(f"the dataset has {dataset.dim}-d motions, the evaluator expects motion_dim={dim}")
    if evaluator.mean is None and getattr(dataset, "mean", None) is not None:
        evaluator.set_statistics(dataset.mean, dataset.std)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(dataset, batch_size, generator)
    history = {
        "movement": train_movement_autoencoder(evaluator, batches, movement_steps, lr=lr, progress=progress),
        "matching": train_matching(evaluator, batches, steps, lr=lr, generator=generator, progress=progress),
    }
    evaluator.eval()
    return history


@torch.no_grad()
def embed_dataset(evaluator: TextMotionEvaluator, dataset: Dataset, *, batch_size: int = 64, seed: int | None = None) -> dict:
    """Every item of ``dataset`` once, in order, through the evaluator (eval mode): ``text_emb`` and ``motion_emb``
    ``[N, embed_dim]`` plus the collated items (``motion``, ``length``, ``tokens``, ``id``, ...). With ``seed`` the
    dataset's random caption/crop draws come from ``torch.manual_seed(seed)`` inside a forked RNG, so they repeat
    and the caller's torch RNG is left as it was."""
    if len(dataset) == 0:
        raise ValueError("embed_dataset got an empty dataset")
    evaluator.eval()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        items = collate_motions([dataset[i] for i in range(len(dataset))])
    chunks = [
        evaluator(items["tokens"][i : i + batch_size], items["motion"][i : i + batch_size], items["length"][i : i + batch_size])
        for i in range(0, len(dataset), batch_size)
    ]
    return {"text_emb": torch.cat([t for t, _ in chunks]), "motion_emb": torch.cat([m for _, m in chunks]), **items}
