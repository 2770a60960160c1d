"""A local ``transformers`` CLIP folder (model + tokenizer + image processor) turned into L2-normalised embeddings,
shared by the CLIP-based scorers (CLIP score, PickScore, the LAION aesthetic predictor). Nothing is downloaded:
a folder that is missing a file gets an error naming the folder and the files expected there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_clip_folder(path: str | Path, what: str, *, text: bool = True, processor_path: str | Path | None = None) -> Path:
    """``path`` as a ``Path`` when it is a CLIPModel folder with weights (and, in ``processor_path`` or ``path``, the
    image processor and with ``text`` a tokenizer); otherwise ``FileNotFoundError`` / ``ValueError`` saying what
    is missing, where, and what a valid folder holds."""
    path = Path(path)
    layout = (f"a transformers CLIPModel folder as save_pretrained writes it: config.json (model_type 'clip'), "
              f"{' or '.join(WEIGHT_FILES)}, preprocessor_config.json"
              + (", and tokenizer.json or vocab.json + merges.txt" if text else ""))  # fmt: skip
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist; pass {layout}")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{what} folder {path} has no config.json; expected {layout}")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(f"{what} folder {path}: config.json has model_type {model_type!r}, not 'clip'; expected {layout}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{what} folder {path} has no weights ({' or '.join(WEIGHT_FILES)}); expected {layout}")
    processor = Path(processor_path) if processor_path is not None else path
    if not (processor / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{what}: {processor} has no preprocessor_config.json (the CLIP image processor); "
                                f"expected {layout}")  # fmt: skip
    if text and not any(all((processor / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise FileNotFoundError(f"{what}: {processor} has no tokenizer (tokenizer.json or vocab.json + merges.txt); "
                                f"expected {layout}")  # fmt: skip
    return path


def to_pixels(images: torch.Tensor) -> list[torch.Tensor]:
    """``[N, 1 or 3, H, W]`` in [-1, 1] → a list of 8-bit RGB images ``[3, H, W]`` (what a saved PNG would hold)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    return list(((images.expand(-1, 3, -1, -1).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())


class LocalCLIP:
    """A CLIPModel with its image processor (and tokenizer when ``text``) from local folders, in eval mode."""

    def __init__(self, path: str | Path, what: str = "CLIP", *, text: bool = True,
                 processor_path: str | Path | None = None, device: str | torch.device = "cpu") -> None:  # fmt: skip
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = check_clip_folder(path, what, text=text, processor_path=processor_path)
        processor = processor_path if processor_path is not None else path
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(processor, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(processor, local_files_only=True) if text else None

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings ``[N, D]`` (the folder's resize / crop / normalisation)."""
        pixel_values = self.image_processor(images=to_pixels(images), return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixel_values.to(self.device)).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[N, D]`` (prompts truncated to the model's context)."""
        if self.tokenizer is None:
            raise RuntimeError("this LocalCLIP was loaded with text=False")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings)  # fmt: skip
        pooled = self.model.text_model(**tokens.to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)


def check_pairs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
