"""The embedded digits demo's evaluation protocol: prompted-digit reward, prompt accuracy and FID.

A model is evaluated through a callable ``sample_fn(prompts, generator) -> images [N, 1, R, R]`` in [-1, 1], so
the protocol does not depend on any adapter's API. The prompts are fixed (``per_digit`` prompts for each digit
0..9, cycling through the caption templates) and so is the generator seed, so two models (a base model and its
aligned version) are compared on the same prompts and, for samplers that draw their noise from the generator, the
same initial noise. Metrics, all with the shipped digit classifier (:mod:`genalign.rewards.digit_classifier`):

* ``reward``: mean over images of p_cls(d_i | x_i), the probability of the digit the prompt names;
* ``prompt_accuracy``: share of images with argmax_d p_cls(d | x_i) = d_i;
* ``fid``: Fréchet distance (Heusel et al. 2017) between the held-out real digits and the samples in the
  classifier's penultimate feature space (in place of InceptionV3 for this domain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from genalign.data.digits import CAPTION_TEMPLATES, DigitsDataset, caption
from genalign.eval.digits_grid import digit_rows
from genalign.eval.image import frechet_distance, mean_reward, prompt_accuracy
from genalign.rewards.digit_classifier import DigitClassifier, DigitPromptReward, load_digit_classifier

SampleFn = Callable[[list[str], torch.Generator], torch.Tensor]


class DigitsEvaluator:
    """Fixed-prompt, fixed-seed evaluation of a digits text-to-image model.

    Args:
        per_digit: prompts per digit; the evaluation draws ``10 * per_digit`` images (digit-major order).
        seed: seed of the CPU generator handed to ``sample_fn``.
        classifier: the reward / feature network (default: the shipped classifier).
        real: the reference images for FID (default: the held-out split at the classifier's resolution).
    """

    def __init__(
        self,
        per_digit: int = 10,
        *,
        seed: int = 0,
        classifier: DigitClassifier | None = None,
        real: torch.Tensor | None = None,
    ) -> None:
        if per_digit < 1:
            raise ValueError(f"per_digit must be at least 1, got {per_digit}")
        self.classifier = classifier if classifier is not None else load_digit_classifier()
        self.real = real if real is not None else DigitsDataset("held_out", self.classifier.resolution).images
        self.seed = seed
        self.prompts = [caption(d, i % len(CAPTION_TEMPLATES)) for d in range(10) for i in range(per_digit)]

    def generate(self, sample_fn: SampleFn) -> torch.Tensor:
        """``sample_fn(self.prompts, generator seeded with self.seed)``, checked: ``[N, 1, R, R]``, finite, in [-1, 1]."""
        images = sample_fn(list(self.prompts), torch.Generator().manual_seed(self.seed))
        self._check(images, "sample_fn returned")
        return images.detach().float().cpu()

    @torch.no_grad()
    def metrics(self, images: torch.Tensor) -> dict[str, float]:
        """``{"reward", "prompt_accuracy", "fid"}`` of images drawn for :attr:`prompts` (in that order)."""
        self._check(images, "images are")
        images = images.detach().float().cpu()
        return {
            "reward": mean_reward(DigitPromptReward(self.classifier), images, self.prompts),
            "prompt_accuracy": prompt_accuracy(self.classifier, images, self.prompts),
            "fid": frechet_distance(self.real, images, self.classifier, method="features"),
        }

    def evaluate(self, sample_fn: SampleFn) -> dict[str, float]:
        """:meth:`metrics` of :meth:`generate`."""
        return self.metrics(self.generate(sample_fn))

    def _check(self, images: torch.Tensor, what: str) -> None:
        n = len(self.prompts)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[:2] != (n, 1):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{what} {shape}; expected one grey image per prompt, [{n}, 1, H, W]")
        if not torch.isfinite(images).all():
            raise ValueError(f"{what} non-finite values (NaN or inf); the sampler diverged")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"{what} values in [{lo:.3f}, {hi:.3f}]; expected [-1, 1] (clamp the decoded samples)")


def save_sample_grid(
    images: torch.Tensor, prompts: Sequence[str], path: str | Path, *, columns: int | None = None
) -> torch.Tensor:
    """Write a PNG grid with one row per prompted digit (ascending, labelled) and that digit's images left to right.

    ``columns`` caps the images shown per row (default: the largest count of any digit); images are ``[N, 1, H, W]``
    in [-1, 1], one per prompt. Returns the drawn canvas: cell (r, c) is at ``[1 + r(H+1), 1 + c(W+1)]``, with
    1-pixel white (+1) separators.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.dim() != 4 or images.shape[1] != 1 or len(images) != len(prompts):
        raise ValueError(f"need grey images [N, 1, H, W] and one prompt each; got shape {tuple(images.shape)} "
                         f"and {len(prompts)} prompts")  # fmt: skip
    images = images.detach().float().cpu()
    by_digit = {d: [images[i, 0] for i in indices] for d, indices in digit_rows(prompts, columns).items()}
    columns = max(len(row) for row in by_digit.values())
    h, w = images.shape[-2:]
    pad = 1
    canvas = torch.ones(len(by_digit) * (h + pad) + pad, columns * (w + pad) + pad)  # white separators
    for r, digit in enumerate(sorted(by_digit)):
        for c, image in enumerate(by_digit[digit]):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            canvas[top : top + h, left : left + w] = image.clamp(-1, 1)
    inches_per_pixel = 0.04  # 4 screen pixels per image pixel at dpi 100
    figure, axes = plt.subplots(figsize=(canvas.shape[1] * inches_per_pixel + 0.6, canvas.shape[0] * inches_per_pixel + 0.3))
    axes.imshow(canvas.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    axes.set_yticks([pad + r * (h + pad) + (h - 1) / 2 for r in range(len(by_digit))], [str(d) for d in sorted(by_digit)])
    axes.set_xticks([])
    axes.set_ylabel("prompted digit")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return canvas
