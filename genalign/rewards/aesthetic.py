"""The LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): an MLP on L2-normalised
CLIP ViT-L/14 image embeddings, predicting the 1–10 AVA-style rating.

score(x) = MLP(E_image(x) / ‖E_image(x)‖), MLP = Linear(768, 1024) → Dropout(0.2) → Linear(1024, 128) → Dropout(0.2)
→ Linear(128, 64) → Dropout(0.1) → Linear(64, 16) → Linear(16, 1) (no activations: the published model is linear),
state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}`` as in ``sac+logos+ava1-l14-linearMSE.pth``. The CLIP folder is
``openai/clip-vit-large-patch14`` saved by ``transformers`` (its processor = the openai ``clip`` preprocessing:
bicubic resize to 224, centre crop, CLIP mean/std).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from genalign.rewards.clip_model import LocalCLIP, check_pairs

HINT = "the improved-aesthetic-predictor MLP state dict (e.g. sac+logos+ava1-l14-linearMSE.pth)"


def aesthetic_mlp(input_size: int = 768) -> nn.Sequential:
    """The predictor's MLP with its published layer indices (dropouts at 1, 3, 5)."""
    return nn.Sequential(
        nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip


def load_aesthetic_mlp(path: str | Path, input_size: int) -> nn.Sequential:
    """The MLP with the weights of ``path`` (keys ``layers.N.*`` as saved by the predictor, or ``N.*``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic predictor weights {path} do not exist; pass {HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a torch state dict ({error}); pass {HINT}") from error
    state = {k.removeprefix("layers."): v for k, v in state.items()} if isinstance(state, dict) else {}
    mlp = aesthetic_mlp(input_size)
    expected = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise ValueError(f"{path} does not fit the aesthetic MLP on {input_size}-d CLIP embeddings: keys "
                         f"{wrong[:4]} differ (file: {[found.get(k) for k in wrong[:4]]}, expected: "
                         f"{[expected.get(k) for k in wrong[:4]]}); pass {HINT} with a CLIP ViT-L/14 folder")  # fmt: skip
    mlp.load_state_dict(state)
    return mlp.eval()


class AestheticScorer:
    """``scorer(images [N, C, H, W] in [-1, 1], prompts) -> [N]`` aesthetic ratings (prompts are not used)."""

    def __init__(self, clip_path: str | Path, mlp_path: str | Path, device: str | torch.device = "cpu") -> None:
        self.clip = LocalCLIP(clip_path, "aesthetic predictor CLIP", text=False, device=device)
        self.mlp = load_aesthetic_mlp(mlp_path, self.clip.model.config.projection_dim).to(self.clip.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_pairs(images, prompts)
        return self.mlp(self.clip.image_embeds(images)).squeeze(-1).float().cpu()
