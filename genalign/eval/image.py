"""Image evaluation: FID with any feature network, reward-model scores, prompt accuracy, CLIP score, win rates.

* FID (Heusel et al. 2017): d² = ||μ_r − μ_g||² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½) between Gaussian fits of real and
  generated features. torchmetrics' ``FrechetInceptionDistance`` does the accumulation; :class:`FeatureNetwork`
  lets any module (the digit classifier's ``features``, an InceptionV3 whose weights the user has) be its network.
* CLIP score (Hessel et al. 2021, scaled as in torchmetrics): 100 · max(cos(E_image, E_text), 0), from a local
  ``transformers`` CLIPModel folder.
* Win rate (the Diffusion-DPO protocol, Wallace et al. 2023): with N images per prompt, each model is represented on
  a prompt by the median score of its N images; the new model wins a prompt when its median is higher, ties count ½.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from genalign.data.digits import parse_digit
from genalign.rewards.clip_model import LocalCLIP, check_pairs


@runtime_checkable
class RewardScorer(Protocol):
    """Anything that scores images against their prompts: ``scorer(images [N, C, H, W], prompts) -> [N]``."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class FeatureNetwork(nn.Module):
    """Wrap ``network`` so torchmetrics' FID can use it: ``forward`` calls ``network.<method>`` and returns float64
    features ``[N, num_features]``; ``num_features`` comes from the argument or the network's own attribute."""

    def __init__(self, network: nn.Module, method: str = "forward", num_features: int | None = None) -> None:
        super().__init__()
        if not callable(getattr(network, method, None)):
            raise AttributeError(f"{type(network).__name__} has no method {method!r} to extract features with")
        num_features = num_features if num_features is not None else getattr(network, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError(
                f"cannot tell the feature width of {type(network).__name__}: pass num_features= "
                "or give the network an int attribute num_features"
            )
        self.network, self.method, self.num_features = network, method, num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = getattr(self.network, self.method)(images)
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"feature network gave shape {tuple(features.shape)}, expected [N, {self.num_features}]")
        return features.double()


def fid_metric(network: nn.Module, method: str = "forward", num_features: int | None = None,
               reset_real_features: bool = True) -> FrechetInceptionDistance:  # fmt: skip
    """A streaming torchmetrics FID over ``network.<method>`` features; ``update(images, real=...)``, ``compute()``
    (``reset()`` keeps the real features with ``reset_real_features=False``)."""
    feature = FeatureNetwork(network, method, num_features)
    return FrechetInceptionDistance(feature=feature, reset_real_features=reset_real_features)


@torch.no_grad()
def fid_against(
    real: torch.Tensor,
    network: nn.Module,
    *,
    method: str = "forward",
    num_features: int | None = None,
    batch_size: int = 500,
) -> Callable[[torch.Tensor], float]:
    """``fid(generated)`` = :func:`frechet_distance` ``(real, generated, ...)`` for any number of generated sets,
    the real images going through ``network`` once, here. Images go to the network's device, where the running
    feature sums are kept too (torchmetrics adds the features to them in place)."""
    if len(real) < 2:
        raise ValueError(f"FID needs at least 2 real images, got {len(real)}")
    device = next(network.parameters(), torch.empty(0)).device  # the feature sums live with the features
    metric = fid_metric(network, method, num_features, reset_real_features=False).to(device)
    for chunk in real.split(batch_size):
        metric.update(chunk.to(device), real=True)

    @torch.no_grad()
    def fid(generated: torch.Tensor) -> float:
        if len(generated) < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {len(generated)}")
        metric.reset()  # the generated features only
        for chunk in generated.split(batch_size):
            metric.update(chunk.to(device), real=False)
        return metric.compute().item()

    return fid


def frechet_distance(
    real: torch.Tensor,
    generated: torch.Tensor,
    network: nn.Module,
    *,
    method: str = "forward",
    num_features: int | None = None,
    batch_size: int = 500,
) -> float:
    """FID between two image sets (each ``[N, C, H, W]``, N ≥ 2) in the feature space of ``network.<method>``."""
    return fid_against(real, network, method=method, num_features=num_features, batch_size=batch_size)(generated)


@torch.no_grad()
def reward_scores(scorer: RewardScorer, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``scorer`` applied in batches; one score per image, ``[N]``."""
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
    prompts = list(prompts)
    parts = [scorer(images[i : i + batch_size], prompts[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([p.detach().float().cpu() for p in parts]) if parts else torch.zeros(0)


def mean_reward(scorer: RewardScorer, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> float:
    return reward_scores(scorer, images, prompts, batch_size).mean().item()


@torch.no_grad()
def prompt_hits(classifier: nn.Module, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``[N]`` bools: does the digit classifier label image i as the digit its prompt names (argmax)?"""
    digits = torch.tensor([parse_digit(p) for p in prompts])
    if len(digits) != len(images):
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
    predicted = torch.cat([classifier(chunk).argmax(-1).cpu() for chunk in images.split(batch_size)])
    return predicted == digits


def prompt_accuracy(classifier: nn.Module, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> float:
    """Fraction of images the digit classifier labels as the digit their prompt names."""
    return prompt_hits(classifier, images, prompts, batch_size).float().mean().item()


def win_rate(scores_new: torch.Tensor, scores_base: torch.Tensor) -> float:
    """Share of prompts where the new model's median score beats the base model's; ties count ½.

    Scores are ``[P]`` (one image per prompt) or ``[P, N]`` (N images per prompt, prompt-major). With even N the
    median is the lower middle value (``torch.median``), so it is always the score of an actual image.
    """
    new, base = (torch.as_tensor(s, dtype=torch.float64) for s in (scores_new, scores_base))
    shapes = (tuple(new.shape), tuple(base.shape))
    new, base = (s.unsqueeze(-1) if s.dim() == 1 else s for s in (new, base))
    if new.dim() != 2 or base.dim() != 2 or new.shape[0] != base.shape[0] or 0 in new.shape + base.shape:
        raise ValueError(f"scores must be [P] or [P, N] with the same P > 0 prompts; got shapes {shapes[0]} and {shapes[1]}")
    new, base = new.median(-1).values, base.median(-1).values
    return ((new > base).double() + 0.5 * (new == base).double()).mean().item()


class ClipScorer:
    """CLIP score per image from a local ``transformers`` CLIP folder (model, tokenizer, image processor).

    ``scorer(images, prompts)`` = 100 · max(cos(E_image, E_text), 0), shape ``[N]``. Images are ``[N, C, H, W]`` in
    [-1, 1] (C = 1 is repeated to RGB); they are quantised to 8 bits and go through the folder's image processor,
    as real photos would.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.clip = LocalCLIP(path, "CLIP", device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_pairs(images, prompts)
        cosine = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return (100 * cosine).clamp(min=0).float().cpu()
