"""Image suite: genalign's Diffusion-DPO step against ``scripts/diffusers_dpo_loop.py`` (the per-step work of the
diffusers research-project Diffusion-DPO script) on the same SD-1.5-shaped UNet + VAE + CLIP text encoder.

Both sides train the same LoRA (same rank, targets and initial weights) with AdamW, clipping at 1.0 and β = 5000
(genalign: ``dpo`` with β = 2500 on negative denoising errors, the same loss), on the same pairs and batch size.
With ``train="full"`` (``--image-train full``) both train every UNet weight instead, against a frozen copy of the
initial UNet as the reference (``configs/adapter/sd15.yaml``'s ``adapter.lora=null adapter.reference=copy``).

* genalign: :class:`~genalign.train.Trainer`'s optimizer step over an
  :class:`~genalign.adapters.image.ImageDiffusionAdapter` whose VAE latents (posterior mean) and text-encoder states
  come from its on-disk encoding cache (filled by one pass over the data before timing, reported as setup time);
  the step runs the UNet only: policy forward on the concatenated pair, LoRA-disabled reference forward (the frozen
  copy's forward in a full fine-tune).
* peer: VAE encode of both images and the text encoder every step, then the same two UNet forwards.

CPU: a tiny UNet/VAE/CLIP with SD 1.5's block layout (4 UNet levels, 3 with cross-attention, 8x VAE) on 128-pixel
images. CUDA (:meth:`ImageConfig.for_cuda`): SD 1.5's real shapes with random weights at 512 pixels, bf16 autocast.
``--image-shape sd15`` (:meth:`ImageConfig.sd15`): SD 1.5's real shapes in float32, 1 pair per micro-batch, on any
device (the CPU measurement of the real shape). ``--image-shape tiny`` (:meth:`ImageConfig.tiny`): a few-channel
model at 64 pixels, to test the plumbing in seconds (``scripts/gpu_check.sh`` with ``GPU_CHECK_ALLOW_CPU=1``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import string
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from genalign.adapters.clip_prompt import CLIPPromptEncoder
from genalign.adapters.image import DEFAULT_LORA_TARGETS, ImageDiffusionAdapter
from genalign.bench.measure import count_flops, timed
from genalign.data.batching import RowOrder
from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig

PEER_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "diffusers_dpo_loop.py"
VOCAB = string.ascii_lowercase + string.digits + " .,!?'-"
TRAIN_MODES = ("lora", "full")
WORDS = ("a", "red", "cat", "dog", "on", "the", "blue", "car", "tree", "house", "small", "big", "photo", "of")


@dataclass
class ImageConfig:
    """Shapes, data and optimisation of the image suite (CPU defaults; :meth:`for_cuda` gives SD 1.5's shapes)."""

    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    vae_channels: tuple[int, ...] = (16, 32, 48, 48)
    vae_layers: int = 1
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_length: int = 77
    image_size: int = 128
    attention_head_dim: int = 8
    norm_groups: int = 16
    rows: int = 32
    batch_size: int = 4
    lora_rank: int = 4
    beta_dpo: float = 5000.0
    learning_rate: float = 1e-5
    num_train_timesteps: int = 1000
    mixed_precision: str = "no"
    channels_last: bool = False  # genalign's policy UNet in channels-last memory format (a lever)
    train: str = "lora"  # "lora" (adapters disabled = reference) or "full" (every UNet weight, frozen reference copy)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"ImageConfig.train (--image-train) must be one of {TRAIN_MODES}, got {self.train!r}")

    @classmethod
    def for_cuda(cls) -> "ImageConfig":
        """SD 1.5: UNet (320, 640, 1280, 1280), VAE (128, 256, 512, 512), CLIP ViT-L/14 text (768 wide, 12 layers),
        512-pixel images, bf16 autocast."""
        return cls(unet_channels=(320, 640, 1280, 1280), vae_channels=(128, 256, 512, 512), text_hidden=768,
                   vae_layers=2, text_layers=12, text_heads=12, image_size=512, attention_head_dim=8, norm_groups=32, rows=64,
                   batch_size=8, lora_rank=8, mixed_precision="bf16")

    @classmethod
    def sd15(cls) -> "ImageConfig":
        """SD 1.5's real shapes (:meth:`for_cuda`) at a size a CPU can step: float32, 1 pair per micro-batch, 2 rows
        (``genalign-bench --suite image --image-shape sd15``). The UNet is diffusers' ``runwayml/stable-diffusion-v1-5``
        unet/config.json (859,520,964 parameters), the VAE its vae/ (scaling 0.18215, 4x64x64 latents of 512-pixel
        images), the text encoder CLIP ViT-L/14's (768 wide, 12 layers, 12 heads, MLP 3072, 77 tokens; only its token
        table is smaller: the suite's character tokenizer has 88 tokens, not 49,408); LoRA r 8 on the attention
        projections, as ``configs/adapter/sd15.yaml``."""
        return replace(cls.for_cuda(), rows=2, batch_size=1, mixed_precision="no")

    @classmethod
    def tiny(cls) -> "ImageConfig":
        """A few channels per block at 64 pixels, 6 rows of 3 pairs: seconds per run on the CPU, for plumbing
        checks (``--image-shape tiny``), not for timing."""
        return cls(unet_channels=(8, 16, 16, 16), vae_channels=(4, 8, 8, 8), text_hidden=16, text_length=12,
                   image_size=64, attention_head_dim=4, norm_groups=4, rows=6, batch_size=3)

    @property
    def lora(self) -> dict[str, Any] | None:
        """The LoRA both sides add (``peft.LoraConfig`` keywords), or None for a full fine-tune."""
        if self.train == "full":
            return None
        return {"r": self.lora_rank, "lora_alpha": self.lora_rank, "target_modules": list(DEFAULT_LORA_TARGETS)}


def char_clip_tokenizer(directory: Path, max_length: int) -> CLIPTokenizer:
    """A CLIP tokenizer over single characters (no merges), written to ``directory``."""
    vocab: dict[str, int] = {}
    for c in VOCAB:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def make_components(config: ImageConfig, device: str | None = None) -> dict[str, Any]:
    """Seeded random UNet, VAE, CLIP text encoder, tokenizer and DDPM scheduler with SD 1.5's layout, on ``device``
    (default: CUDA when available, else the CPU; ``"meta"`` builds shapes only, for FLOP counts)."""
    workdir = tempfile.mkdtemp(prefix="genalign-bench-clip-")
    tokenizer = char_clip_tokenizer(Path(workdir), config.text_length)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]), torch.device(device if device == "meta" else "cpu"):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=config.unet_channels, norm_num_groups=config.norm_groups,
            cross_attention_dim=config.text_hidden, attention_head_dim=config.attention_head_dim,
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=config.vae_layers, norm_num_groups=config.norm_groups,
                            sample_size=config.image_size)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=config.text_hidden, intermediate_size=4 * config.text_hidden,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            max_position_embeddings=config.text_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return {"unet": unet.to(device), "vae": vae.to(device), "text_encoder": text.to(device), "tokenizer": tokenizer,
            "scheduler": scheduler}


def make_rows(config: ImageConfig) -> list[dict[str, Any]]:
    """Random smooth image pairs in [−1, 1] with short prompts."""
    g = torch.Generator().manual_seed(config.seed)
    size = config.image_size

    def image() -> torch.Tensor:
        coarse = torch.randn(1, 3, size // 8, size // 8, generator=g)
        return torch.tanh(F.interpolate(coarse, size=(size, size), mode="bilinear"))[0]

    rows = []
    for i in range(config.rows):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (5,), generator=g)]
        rows.append({"prompt": " ".join(words), "chosen": image(), "rejected": image(), "row": i})
    return rows


def load_peer_module():
    """``scripts/diffusers_dpo_loop.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("diffusers_dpo_loop", PEER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_loop(components: dict[str, Any], config: ImageConfig, **options: Any):
    """The diffusers-style loop on (copies of) ``components``."""
    module = load_peer_module()
    return module.DiffusersDPOLoop(
        copy.deepcopy(components["unet"]), components["vae"], components["text_encoder"], components["tokenizer"],
        components["scheduler"], lora=config.lora, beta_dpo=config.beta_dpo, learning_rate=config.learning_rate,
        mixed_precision=config.mixed_precision, **options)


def genalign_adapter(components: dict[str, Any], config: ImageConfig, cache_dir: str | None,
                     lora: bool = True) -> ImageDiffusionAdapter:
    """genalign's adapter on a copy of the UNet (``config.lora``, or full fine-tuning with a frozen reference copy
    when ``config.train`` is ``"full"`` or ``lora=False``); VAE and text encoder through the encoding cache."""
    encoder = CLIPPromptEncoder([components["tokenizer"]], [components["text_encoder"]])
    unet = copy.deepcopy(components["unet"])
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return ImageDiffusionAdapter(unet, components["scheduler"], encoder, vae=components["vae"],
                                 lora=config.lora if lora else None,
                                 prompt_dropout=0.0, cache_dir=cache_dir, cache_namespace="genalign-bench")


class GenalignDiffusionDPO:
    """genalign's trainer on the image adapter (encoding cache warm before timing). Lever variants:
    ``channels_last``, the policy UNet in channels-last memory format; ``cached_reference``, reference scores
    cached per row before timing, so the step runs the policy forward only. That is the step a cache keyed by
    (row, t, noise) would give if each row's ``(t, eps)`` were fixed (e.g. drawn from a per-row seed): a timing
    measurement only, since here the step draws fresh ``(t, eps)`` that the cached scores were not computed at."""

    def __init__(self, components: dict[str, Any], rows: list[dict], config: ImageConfig, order: RowOrder,
                 channels_last: bool = False, cached_reference: bool = False):
        self.name = ("genalign-channels-last" if channels_last else
                     "genalign-cached-reference" if cached_reference else "genalign")
        config = replace(config, channels_last=channels_last)
        self.workdir = tempfile.TemporaryDirectory(prefix="genalign-bench-image-")
        adapter = genalign_adapter(components, config, cache_dir=str(Path(self.workdir.name) / "cache"))
        train = TrainConfig(output_dir=str(Path(self.workdir.name) / "run"), max_steps=10**9,
                            batch_size=config.batch_size, learning_rate=config.learning_rate, lr_scheduler="constant",
                            max_grad_norm=1.0, mixed_precision=config.mixed_precision, seed=config.seed)
        self.trainer = Trainer(adapter, build_step("dpo", beta=config.beta_dpo / 2), rows, train)
        self.trainer.order = order
        self.setup_seconds, _ = timed(lambda: self._fill_cache(adapter, rows, config.batch_size))
        if cached_reference:
            adapter.deterministic = True  # this variant treats the scores as cacheable (see the class docstring)
            self.setup_seconds += timed(self.trainer.cache_reference_scores)[0]

    @staticmethod
    def _fill_cache(adapter: ImageDiffusionAdapter, rows: list[dict], batch_size: int) -> None:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            adapter.encode_images(torch.stack([r[k] for r in chunk for k in ("chosen", "rejected")]))
            adapter.encode_prompts([r["prompt"] for r in chunk])

    def step(self) -> float:
        return self.trainer.step()["loss"]


class PeerDiffusionDPO:
    """The diffusers-style loop stepped on the shared micro-batch order."""

    name = "diffusers-loop"

    def __init__(self, components: dict[str, Any], rows: list[dict], config: ImageConfig, order: RowOrder):
        self.loop, self.rows, self.order, self.micro_step = peer_loop(components, config), rows, order, 0
        device = next(self.loop.unet.parameters()).device
        self.generator = torch.Generator(device).manual_seed(config.seed + 1)
        self.setup_seconds = 0.0

    def step(self) -> float:
        indices = self.order.indices(self.micro_step)
        self.micro_step += 1
        return self.loop.step(self.loop.collate([self.rows[i] for i in indices]), generator=self.generator)


def build(config: ImageConfig, sides: tuple[str, ...] = ("genalign", "diffusers-loop")) -> dict[str, Any]:
    components = make_components(config)
    rows = make_rows(config)
    order = RowOrder(len(rows), config.batch_size, seed=config.seed)
    makers = {
        "genalign": lambda: GenalignDiffusionDPO(components, rows, config, order),
        "genalign-channels-last": lambda: GenalignDiffusionDPO(components, rows, config, order, channels_last=True),
        "genalign-cached-reference": lambda: GenalignDiffusionDPO(components, rows, config, order,
                                                                  cached_reference=True),
        "diffusers-loop": lambda: PeerDiffusionDPO(components, rows, config, order),
    }
    unknown = set(sides) - set(makers)
    if unknown:
        raise ValueError(f"unknown image sides {sorted(unknown)}; choose from {sorted(makers)}")
    return {name: makers[name]() for name in sides}


def sd15_flops() -> dict[str, float]:
    """FLOPs of the diffusers-style step on one pair at SD 1.5's real shapes (counted on the meta device, nothing is
    computed), and the share of them genalign's encoding cache removes (VAE encode of both images + text encoder):
    the compute-bound ceiling of the speed-up from caching is ``step / (step − cached)``."""
    config = ImageConfig.for_cuda()
    loop = peer_loop(make_components(config, "meta"), config)
    batch = loop.collate(make_rows(replace(config, rows=1)))
    pixels, ids = batch["pixel_values"].to("meta"), batch["input_ids"].to("meta")
    step = count_flops(lambda: loop.loss(batch).backward())
    cached = count_flops(lambda: loop.vae.encode(torch.cat(pixels.chunk(2, dim=1))))
    cached += count_flops(lambda: loop.text_encoder(ids))
    return {"step_tflops_per_pair": step / 1e12, "vae_and_text_tflops_per_pair": cached / 1e12,
            "cached_share": cached / step, "caching_speedup_ceiling": step / (step - cached)}


def describe(config: ImageConfig) -> dict[str, Any]:
    full = ", full fine-tune (frozen reference copy)" if config.train == "full" else ""
    return {"model": f"SD1.5-layout UNet {config.unet_channels}, VAE {config.vae_channels}, "
                     f"CLIP {config.text_layers}x{config.text_hidden}, {config.image_size}px{full}", **asdict(config)}
