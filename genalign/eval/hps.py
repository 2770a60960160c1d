"""HPS v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv:2306.09341, github.com/tgxs002/HPSv2) from
the user's local checkpoint file, without open_clip.

HPS v2 is open_clip's CLIP ``ViT-H-14`` fine-tuned on human preferences; ``HPS_v2_compressed.pt`` /
``HPS_v2.1_compressed.pt`` hold ``{"state_dict": <open_clip CLIP state dict>}``. The score of an image x for its
prompt c is

    HPS(x, c) = 100 · <f_img(x) / ||f_img(x)||, f_txt(c) / ||f_txt(c)||>

(no logit scale), as the HPSv2 benchmark (``hpsv2/evaluation.py``: ``image_features @ text_features.T * 100``)
and its README tables report it (SD 1.4 ≈ 27, SDXL ≈ 27.7 with v2.0); ``hpsv2.score()`` returns the same
number / 100. Scores of v2.0 and v2.1 are not comparable with each other.

The open_clip state dict is converted into a ``transformers`` :class:`CLIPModel` whose sizes come from the
tensor shapes (any open_clip ViT-L/H/g...-style CLIP converts; only the head counts are not in the shapes, see
:func:`default_heads`). Text: the CLIP BPE tokenizer from a local folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K or
any openai CLIP folder: the same BPE as open_clip's ``bpe_simple_vocab_16e6``), context length = the checkpoint's
(77), features pooled at the argmax of the token ids (open_clip's EOT pooling). Images: HPSv2's validation
transform, ``ToTensor → Resize(shortest side, bicubic, antialias) → CenterCrop → Normalize(CLIP mean/std)``,
which resizes the float tensor (not a PIL image), reproduced here with ``torch.nn.functional.interpolate``.
"""

from __future__ import annotations

import html
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from genalign.rewards.clip_model import TOKENIZER_FILES, check_pairs, to_pixels

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip OPENAI_DATASET_MEAN / STD (HPSv2 uses these)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HPS_FILES = "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (huggingface.co/xswu/HPSv2)"
TOKENIZER_FIX = ("pass a local CLIP tokenizer folder holding tokenizer.json or vocab.json + merges.txt, e.g. "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K or openai/clip-vit-large-patch14 (the same CLIP BPE)")  # fmt: skip
REQUIRED_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                 "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj",
                 "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                 "text_projection", "logit_scale")  # fmt: skip
BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
              "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias")  # fmt: skip
BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
VISION_HEADS = {1280: 16, 1408: 16, 1664: 16, 1792: 16}  # open_clip ViT-H / g / bigG / e (head_width 80..112)


def default_heads(width: int, vision: bool) -> int:
    """open_clip's head count for a tower ``width`` wide: 64-wide heads, except the vision towers of ViT-H-14 (16
    heads of 80), ViT-g, ViT-bigG and ViT-e (16 heads). Pass ``vision_heads`` / ``text_heads`` for other models."""
    heads = VISION_HEADS.get(width) if vision else None
    return heads if heads is not None else max(1, width // 64)


def read_checkpoint(path: str | Path, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The open_clip state dict of an HPS file (``{"state_dict": ...}``, or a bare state dict), float32, with a
    DDP ``module.`` prefix removed; errors name the file and what to pass instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HPS checkpoint {path} does not exist; pass the file {HPS_FILES}")
    with path.open("rb") as file:
        torch_file = zipfile.is_zipfile(file) or file.seek(0) == 0 and file.read(1) == b"\x80"  # zip or legacy pickle
    error: Exception | None = None
    if torch_file:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as caught:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
            error = caught
            if weights_only and "Unsupported global" in str(caught):
                raise ValueError(f"HPS checkpoint {path} holds objects other than tensors, which torch.load("
                                 "weights_only=True) refuses; if you trust the file, pass weights_only=False") from caught  # fmt: skip
    if not torch_file or error is not None:
        detail = f" ({type(error).__name__}: {str(error)[:200]})" if error is not None else ""
        raise ValueError(f"HPS checkpoint {path} is not a torch file torch.load can read{detail}; pass {HPS_FILES}")
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"HPS checkpoint {path} holds a {type(loaded).__name__}, not a dict with a 'state_dict' of "
                         f"open_clip CLIP weights; pass {HPS_FILES}")  # fmt: skip
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in REQUIRED_KEYS if not isinstance(state.get(k), torch.Tensor)]
    if missing:
        found = ", ".join(list(state)[:5]) or "nothing"
        raise ValueError(f"HPS checkpoint {path} is not an open_clip CLIP ViT state dict: missing {missing[:6]} "
                         f"({len(missing)} of the required keys; it holds {found}...); pass {HPS_FILES}")  # fmt: skip
    return {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}


def num_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    numbers = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(numbers) + 1 if numbers else 0


def clip_config(state: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None,
                tokenizer: Any = None) -> Any:  # fmt: skip
    """A ``transformers`` CLIPConfig with the sizes of the open_clip state dict (GELU, LayerNorm eps 1e-5)."""
    from transformers import CLIPConfig

    conv = state["visual.conv1.weight"]  # [width, 3, patch, patch]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    text_width = state["ln_final.weight"].shape[0]
    embed_dim = state["text_projection"].shape[1]
    if state["visual.proj"].shape[1] != embed_dim:
        raise ValueError(f"image embedding width {state['visual.proj'].shape[1]} != text embedding width {embed_dim}")
    vision_layers, text_layers = num_blocks(state, "visual.transformer.resblocks."), num_blocks(state, "transformer.resblocks.")
    vision_heads = vision_heads or default_heads(vision_width, vision=True)
    text_heads = text_heads or default_heads(text_width, vision=False)
    for name, width, heads in (("vision", vision_width, vision_heads), ("text", text_width, text_heads)):
        if width % heads:
            raise ValueError(f"{name} width {width} is not divisible by {heads} heads; pass {name}_heads=")
    tokens = {}
    if tokenizer is not None:
        tokens = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=embed_dim)
    return CLIPConfig(
        text_config=dict(common, hidden_size=text_width, num_hidden_layers=text_layers, num_attention_heads=text_heads,
                         intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         vocab_size=state["token_embedding.weight"].shape[0],
                         max_position_embeddings=state["positional_embedding"].shape[0], **tokens),
        vision_config=dict(common, hidden_size=vision_width, num_hidden_layers=vision_layers,
                           num_attention_heads=vision_heads, patch_size=patch, image_size=grid * patch,
                           intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        projection_dim=embed_dim,
    )  # fmt: skip


def convert_state_dict(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """open_clip CLIP names → ``transformers`` CLIPModel names (see the module docstring for the layout)."""
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),  # open_clip: x @ proj; nn.Linear: x @ W.T
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    for source, target, layers in (("visual.transformer", "vision_model.encoder", vision_layers),
                                   ("transformer", "text_model.encoder", text_layers)):  # fmt: skip
        for i in range(layers):
            old, new = f"{source}.resblocks.{i}.", f"{target}.layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = state[f"{old}attn.in_proj_{kind}"].chunk(3, dim=0)  # in_proj = [W_q; W_k; W_v]
                out.update({f"{new}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))})
                for a, b in BLOCK_NAMES.items():
                    out[f"{new}{b}.{kind}"] = state[f"{old}{a}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def check_layout(state: dict[str, torch.Tensor], path: Path, vision_layers: int, text_layers: int) -> None:
    """Every block key present, nothing left over (layer scale, attentional pooling, ... are not supported)."""
    expected = set(REQUIRED_KEYS)
    for prefix, layers in (("visual.transformer.resblocks.", vision_layers), ("transformer.resblocks.", text_layers)):
        expected |= {f"{prefix}{i}.{k}" for i in range(layers) for k in BLOCK_KEYS}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected - {"attn_mask", "visual.attn_mask"})
    if not vision_layers or not text_layers or missing:
        raise ValueError(f"HPS checkpoint {path} is not an open_clip CLIP ViT state dict: {vision_layers} vision and "
                         f"{text_layers} text blocks, missing {missing[:6]}; pass {HPS_FILES}")  # fmt: skip
    if extra:
        raise ValueError(f"HPS checkpoint {path}: open_clip weights this converter does not handle (layer scale, "
                         f"attentional pooling, custom text towers, ...): {extra[:6]}")  # fmt: skip


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"HPS tokenizer folder {folder} does not exist; {TOKENIZER_FIX}")
    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise FileNotFoundError(f"HPS tokenizer folder {folder} has no tokenizer.json or vocab.json + merges.txt; "
                                f"{TOKENIZER_FIX}")  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    vocab = tokenizer.get_vocab()
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id != max(vocab.values()):
        raise ValueError(f"HPS tokenizer folder {folder}: its end-of-text token {tokenizer.eos_token!r} is not the "
                         f"last id of its vocabulary, as in the CLIP BPE (open_clip pools at the largest id); {TOKENIZER_FIX}")  # fmt: skip
    return tokenizer


def build_model(state: dict[str, torch.Tensor], config: Any) -> Any:
    """A CLIPModel holding exactly ``state`` (built on the meta device, so no random init of a 1B-weight model)."""
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(config)
    expected = set(model.state_dict()) - {k for k in model.state_dict() if k.endswith("position_ids")}
    if expected != set(state):
        raise RuntimeError(f"converted HPS weights do not fit transformers' CLIPModel: missing "
                           f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")  # fmt: skip
    for name, tensor in state.items():
        shape = model.get_parameter(name).shape
        if tuple(shape) != tuple(tensor.shape):
            raise ValueError(f"HPS weight {name}: shape {tuple(tensor.shape)}, transformers expects {tuple(shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    for module in (model.text_model.embeddings, model.vision_model.embeddings):  # non-persistent buffers
        positions = module.position_embedding.num_embeddings
        module.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"HPS conversion left tensors without values: {left[:4]}")
    return model.eval()


def load_hps(checkpoint_path: str | Path, tokenizer_folder: str | Path, device: str | torch.device = "cpu", *,
             vision_heads: int | None = None, text_heads: int | None = None, weights_only: bool = True) -> HPSScorer:  # fmt: skip
    """An :class:`HPSScorer` from an HPS v2 / v2.1 checkpoint file and a local CLIP tokenizer folder."""
    path = Path(checkpoint_path)
    state = read_checkpoint(path, weights_only=weights_only)
    tokenizer = load_tokenizer(tokenizer_folder)
    vision_layers, text_layers = num_blocks(state, "visual.transformer.resblocks."), num_blocks(state, "transformer.resblocks.")
    check_layout(state, path, vision_layers, text_layers)
    vocab_size = state["token_embedding.weight"].shape[0]
    if max(tokenizer.get_vocab().values()) >= vocab_size:
        raise ValueError(f"HPS tokenizer folder {tokenizer_folder}: {len(tokenizer)} tokens, but {path} embeds "
                         f"{vocab_size}; {TOKENIZER_FIX}")  # fmt: skip
    config = clip_config(state, vision_heads, text_heads, tokenizer)
    model = build_model(convert_state_dict(state, vision_layers, text_layers), config)
    return HPSScorer(model, tokenizer, device)


def hps_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's validation transform of one 8-bit RGB image ``[3, H, W]`` → normalised ``[3, size, size]``:
    torchvision ``Resize(size, BICUBIC)`` on the float tensor (shortest side to ``size``, the long side
    ``int(size · long / short)``, antialias as torchvision ≥ 0.17 does), ``CenterCrop(size)``, CLIP mean / std."""
    x = image.float().div(255)[None]
    h, w = x.shape[-2:]
    if min(h, w) != size:  # torchvision returns an image already at the size as it is
        short, long = min(h, w), max(h, w)
        new = (size, int(size * long / short)) if h <= w else (int(size * long / short), size)
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((x[0] - mean) / std).float()


def as_pixels(images: Any) -> list[torch.Tensor]:
    """8-bit RGB ``[3, H, W]`` tensors from ``[N, C, H, W]`` floats in [-1, 1] (genalign's convention, as the other
    scorers take), ``[N, 3, H, W]`` uint8, or a list of PIL images / uint8 ``[3, H, W]`` tensors."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            if images.dim() != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
            return list(images.expand(-1, 3, -1, -1).cpu())
        return to_pixels(images)
    pixels = []
    for image in images:
        if isinstance(image, torch.Tensor):
            pixels.extend(as_pixels(image[None]))
        else:  # a PIL image
            import numpy as np

            pixels.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous())
    return pixels


class HPSScorer:
    """``scorer(images, prompts) -> [N]`` HPS v2 scores (a :class:`genalign.eval.image.RewardScorer`); ``images``
    as :func:`as_pixels` takes them (``[N, C, H, W]`` in [-1, 1], uint8, or PIL images)."""

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.device = torch.device(device)
        self.model, self.tokenizer, self.batch_size = model.to(self.device).eval(), tokenizer, batch_size
        self.image_size = model.config.vision_config.image_size
        self.context_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_features(self, images: Any) -> torch.Tensor:
        """L2-normalised image features ``[N, D]`` (open_clip ``encode_image(normalize=True)``)."""
        pixels = torch.stack([hps_pixels(p, self.image_size) for p in as_pixels(images)])
        parts = []
        for chunk in pixels.split(self.batch_size):
            pooled = self.model.vision_model(pixel_values=chunk.to(self.device)).pooler_output  # ln_post(CLS)
            parts.append(self.model.visual_projection(pooled))
        return F.normalize(torch.cat(parts), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features ``[N, D]`` (open_clip ``encode_text(normalize=True)``: causal transformer,
        ln_final, the state at the largest token id = end of text, text projection)."""
        texts = [html.unescape(html.unescape(p)).strip() for p in prompts]  # open_clip's basic_clean (less ftfy)
        parts = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                    max_length=self.context_length, return_tensors="pt").to(self.device)  # fmt: skip
            hidden = self.model.text_model(**tokens).last_hidden_state
            pooled = hidden[torch.arange(len(hidden), device=self.device), tokens["input_ids"].argmax(-1)]
            parts.append(self.model.text_projection(pooled))
        return F.normalize(torch.cat(parts), dim=-1)

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        check_pairs(images, prompts)
        return (100 * (self.image_features(images) * self.text_features(prompts)).sum(-1)).float().cpu()
