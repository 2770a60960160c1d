"""Train the digit classifier on the digits train split and ship it to ``assets/digit-classifier/``.

Augmentation: each training image is shifted by a random whole number of pixels in [-max_shift, max_shift] along
each axis (zero-padded with the background value -1). Prints the held-out accuracy and stores it in the config.

    python scripts/train_digit_classifier.py --resolution 16 --epochs 30
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from genalign.data.digits import HELD_OUT_FRACTION, SPLIT_SEED, load_digit_images, split_indices
from genalign.rewards.digit_classifier import DEFAULT_PATH, DigitClassifier


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own integer offset (dy, dx) in [-max_shift, max_shift]^2, padding with -1."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(-1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-shift", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digit_images(args.resolution)
    train, held_out = split_indices(labels, HELD_OUT_FRACTION, SPLIT_SEED)
    model = DigitClassifier(args.resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    for epoch in range(args.epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=generator)]
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            loss = F.cross_entropy(model(random_shift(images[batch], args.max_shift, generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        scheduler.step()
        print(f"epoch {epoch + 1:3d}  train loss {total / len(order):.4f}  "
              f"held-out accuracy {accuracy(model, images[held_out], labels[held_out]):.4f}")  # fmt: skip

    held_out_accuracy = accuracy(model, images[held_out], labels[held_out])
    training = {
        "held_out_accuracy": round(held_out_accuracy, 4),
        "train_accuracy": round(accuracy(model, images[train], labels[train]), 4),
        "split_seed": SPLIT_SEED,
        "held_out_fraction": HELD_OUT_FRACTION,
        **{k: v for k, v in vars(args).items() if k != "out"},
    }
    model.save(args.out, training)
    print(f"held-out accuracy {held_out_accuracy:.4f} on {len(held_out)} images; saved to {args.out}")


if __name__ == "__main__":
    main()
