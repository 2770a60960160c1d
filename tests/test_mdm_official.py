"""The official MDM loaded as it is (genalign.models.mdm_official).

Random weights are laid out as the official code names and shapes them (the published HumanML3D model scaled to
latent_dim 32 and 2 layers; ff 1024 and 4 heads as get_model_args fixes them), saved as the official training loop
saves them (``torch.save(state_dict)`` with the ``clip_model.*`` keys removed, args.json beside it), loaded, and the
outputs compared with an independent plain-torch re-implementation of the official forward written here. Also: the
cosine betas against the formula, CLIP text features against an openai-clip-style ``encode_text``, the key-mismatch
error, HumanML3D folder errors, and a few SoPo steps through the CLI on a tiny HumanML3D folder (loss ln 2 at step 0).

Tolerances: outputs are O(1) float32 values from a few hundred multiply-adds per element through 2 layers; torch's
fused attention and this file's explicit softmax sum in different orders, so they agree to ~1e-6 relative; 1e-4
absolute leaves a wide margin on any BLAS while a wrong mask, position or weight changes outputs by O(0.1).
"""

import json
import logging
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from genalign.cli import CONFIG_DIR, run
from genalign.data import motion_rows
from genalign.models import mdm_official
from genalign.models.mdm_official import CLIPTextEncoder, load_official_adapter, load_official_mdm
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator

D, LATENT, LAYERS, FF, HEADS, CLIP_DIM, BERT_DIM = 263, 32, 2, 1024, 4, 512, 768
ATOL = 1e-4


# ------------------------------------------------------------------------------------------- official layout
def sinusoid(max_len: int, d: int) -> torch.Tensor:
    """The official PositionalEncoding table [max_len, 1, d]: even channels sin, odd channels cos."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    pe = torch.zeros(max_len, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe[:, None]


def official_shapes(arch: str, text_dim: int, max_len: int = 5000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official text-to-motion MDM state dict (model/mdm.py with torch's transformer layers)."""
    d = LATENT
    shapes = {"input_process.poseEmbedding.weight": (d, D + (d if arch == "gru" else 0)),
              "input_process.poseEmbedding.bias": (d,),
              "sequence_pos_encoder.pe": (max_len, 1, d), "embed_timestep.sequence_pos_encoder.pe": (max_len, 1, d),
              "embed_timestep.time_embed.0.weight": (d, d), "embed_timestep.time_embed.0.bias": (d,),
              "embed_timestep.time_embed.2.weight": (d, d), "embed_timestep.time_embed.2.bias": (d,),
              "embed_text.weight": (d, text_dim), "embed_text.bias": (d,),
              "output_process.poseFinal.weight": (D, d), "output_process.poseFinal.bias": (D,)}
    attention = {"in_proj_weight": (3 * d, d), "in_proj_bias": (3 * d,), "out_proj.weight": (d, d), "out_proj.bias": (d,)}
    block = {"linear1.weight": (FF, d), "linear1.bias": (FF,), "linear2.weight": (d, FF), "linear2.bias": (d,)}
    for i in range(LAYERS):
        if arch == "gru":
            for kind in ("ih", "hh"):
                shapes[f"gru.weight_{kind}_l{i}"], shapes[f"gru.bias_{kind}_l{i}"] = (3 * d, d), (3 * d,)
            continue
        prefix = f"seqTransEncoder.layers.{i}." if arch == "trans_enc" else f"seqTransDecoder.layers.{i}."
        sublayers = ["self_attn"] + (["multihead_attn"] if arch == "trans_dec" else [])
        norms = ["norm1", "norm2"] + (["norm3"] if arch == "trans_dec" else [])
        shapes.update({f"{prefix}{s}.{k}": v for s in sublayers for k, v in attention.items()})
        shapes.update({f"{prefix}{k}": v for k, v in block.items()})
        shapes.update({f"{prefix}{n}.{w}": (d,) for n in norms for w in ("weight", "bias")})
    return shapes


def random_official_state(arch: str, text_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(arch, text_dim).items():
        if key.endswith(".pe"):
            state[key] = sinusoid(shape[0], shape[2])
        elif ".norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 16
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return state


def official_args(**overrides) -> dict:
    """args.json of a HumanML3D run as the official train_mdm writes it (an older run: no mask_frames field)."""
    args = {"arch": "trans_enc", "batch_size": 64, "cond_mask_prob": 0.1, "dataset": "humanml", "diffusion_steps": 1000,
            "emb_trans_dec": False, "lambda_fc": 0.0, "lambda_rcxyz": 0.0, "lambda_vel": 0.0, "latent_dim": LATENT,
            "layers": LAYERS, "lr": 0.0001, "noise_schedule": "cosine", "num_steps": 600000, "save_dir": "save/x",
            "seed": 10, "sigma_small": True, "unconstrained": False}
    return {**args, **overrides}


def save_official(folder: Path, state: dict, args: dict, name: str = "model000475000.pt") -> Path:
    """As the official TrainLoop.save: drop clip_model.* keys, torch.save the state dict; args.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {**state, "clip_model.positional_embedding": torch.zeros(77, 8), "clip_model.text_projection": torch.zeros(8, 8)}
    state = {k: v for k, v in state.items() if not k.startswith("clip_model.")}
    torch.save(state, folder / name)
    (folder / "args.json").write_text(json.dumps(args, indent=4, sort_keys=True))
    return folder / name


# ------------------------------------------------------------------------------------------- reference forward
def linear(x, state, name):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def layer_norm(x, state, name):
    return F.layer_norm(x, (x.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def attention(q_in, kv_in, state, name, key_pad=None):
    """nn.MultiheadAttention written out: q_in [Lq, B, d], kv_in [Lk, B, d], key_pad [B, Lk] True = ignore."""
    w, b = state[f"{name}.in_proj_weight"], state[f"{name}.in_proj_bias"]
    d = q_in.shape[-1]
    q, k, v = (x @ w[i * d : (i + 1) * d].T + b[i * d : (i + 1) * d] for i, x in enumerate((q_in, kv_in, kv_in)))
    split = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, d // HEADS).permute(1, 2, 0, 3)  # [B, H, L, dh]
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // HEADS)
    if key_pad is not None:
        logits = logits.masked_fill(key_pad[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ split(v)).permute(2, 0, 1, 3).reshape(q_in.shape[0], q_in.shape[1], d)
    return linear(out, state, f"{name}.out_proj")


def feed_forward(x, state, prefix):
    return linear(F.gelu(linear(x, state, f"{prefix}linear1")), state, f"{prefix}linear2")


def reference_forward(state, args, x, t, text, *, uncond=False, frame_mask=None, text_pad=None):
    """The official MDM.forward for a text model: x [B, 263, 1, T], text = enc_text ([1, B, 512] CLIP or
    [L, B, 768] BERT), frame_mask bool [B, T] (True = real) used when mask_frames, text_pad [B, L] True = no token."""
    bs, _, _, frames = x.shape
    pe = state["sequence_pos_encoder.pe"]
    h = linear(pe[t], state, "embed_timestep.time_embed.0")  # [B, 1, d]
    time_emb = linear(F.silu(h), state, "embed_timestep.time_embed.2").permute(1, 0, 2)
    enc = torch.zeros_like(text) if uncond else text
    emb = linear(enc, state, "embed_text") + time_emb
    seq = x.permute(3, 0, 1, 2).reshape(frames, bs, -1)
    if args["arch"] == "gru":
        seq = torch.cat([seq, emb.repeat(frames, 1, 1)], dim=-1)
    seq = linear(seq, state, "input_process.poseEmbedding")
    pad = None
    if args.get("mask_frames") and frame_mask is not None:
        pad = ~frame_mask
        if args["arch"] == "trans_enc" or args.get("emb_trans_dec"):
            pad = torch.cat([torch.zeros(bs, 1, dtype=torch.bool), pad], dim=1)
    if args["arch"] == "trans_enc":
        h = torch.cat([emb, seq]) + pe[: frames + 1]
        for i in range(LAYERS):
            p = f"seqTransEncoder.layers.{i}."
            h = layer_norm(h + attention(h, h, state, p + "self_attn", pad), state, p + "norm1")
            h = layer_norm(h + feed_forward(h, state, p), state, p + "norm2")
        out = h[1:]
    elif args["arch"] == "trans_dec":
        h = (torch.cat([time_emb, seq]) if args.get("emb_trans_dec") else seq)
        h = h + pe[: h.shape[0]]
        for i in range(LAYERS):
            p = f"seqTransDecoder.layers.{i}."
            h = layer_norm(h + attention(h, h, state, p + "self_attn", pad), state, p + "norm1")
            h = layer_norm(h + attention(h, emb, state, p + "multihead_attn", text_pad), state, p + "norm2")
            h = layer_norm(h + feed_forward(h, state, p), state, p + "norm3")
        out = h[1:] if args.get("emb_trans_dec") else h
    else:  # nn.GRU(batch_first=True) fed [T, B, d]: frames act as the batch, the batch as time
        h = (seq + pe[:frames]).transpose(0, 1)  # [B, T, d]: the GRU's "time" axis is the motion batch
        for i in range(LAYERS):
            hidden, outs = torch.zeros(frames, LATENT), []
            for step in range(bs):
                gi = h[step] @ state[f"gru.weight_ih_l{i}"].T + state[f"gru.bias_ih_l{i}"]
                gh = hidden @ state[f"gru.weight_hh_l{i}"].T + state[f"gru.bias_hh_l{i}"]
                r, z = torch.sigmoid(gi[:, :LATENT] + gh[:, :LATENT]), torch.sigmoid(gi[:, LATENT:2 * LATENT] + gh[:, LATENT:2 * LATENT])
                n = torch.tanh(gi[:, 2 * LATENT:] + r * gh[:, 2 * LATENT:])
                hidden = (1 - z) * n + z * hidden
                outs.append(hidden)
            h = torch.stack(outs)
        out = h.transpose(0, 1)
    out = linear(out, state, "output_process.poseFinal")  # [T, B, 263]
    return out.reshape(frames, bs, D, 1).permute(1, 2, 3, 0)


def inputs(batch=3, frames=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D, 1, frames, generator=gen)
    return x, torch.tensor([0, 437, 999][:batch]), torch.randn(batch, CLIP_DIM, generator=gen)


# ------------------------------------------------------------------------------------------- forward tests
@pytest.mark.parametrize("arch", ["trans_enc", "trans_dec", "gru"])
def test_official_checkpoint_loads_and_matches_the_official_forward(tmp_path, arch):
    state, args = random_official_state(arch, CLIP_DIM), official_args(arch=arch)
    model = load_official_mdm(save_official(tmp_path / "save", state, args)).eval()
    assert set(model.state_dict()) == set(official_shapes(arch, CLIP_DIM))  # the official names, nothing else
    x, t, text = inputs()
    with torch.no_grad():
        for uncond in (False, True):
            got = model.official_forward(x, t, {"text_embed": text[None], "mask": torch.ones(3, 1, 1, 12, dtype=torch.bool),
                                                "uncond": uncond})
            want = reference_forward(state, args, x, t, text[None], uncond=uncond)
            assert got.shape == (3, D, 1, 12)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        # classifier-free guidance as ClassifierFreeSampleModel: uncond + s (cond - uncond), s per sample
        scale = torch.tensor([2.5, 1.0, 4.0])
        got = model.official_forward(x, t, {"text_embed": text, "scale": scale})
        cond, uncond = (reference_forward(state, args, x, t, text[None], uncond=u) for u in (False, True))
        torch.testing.assert_close(got, uncond + scale.view(-1, 1, 1, 1) * (cond - uncond), atol=ATOL, rtol=0)
    # without mask_frames every frame is attended to: a padded frame's content changes the real frames' outputs
    if arch == "trans_enc":
        motion = x.squeeze(2).transpose(1, 2)
        mask = torch.arange(12) < 8
        other = motion.clone()
        other[:, 8:] += 1.0
        with torch.no_grad():
            a, b = model(motion, t, text, mask.expand(3, -1)), model(other, t, text, mask.expand(3, -1))
        assert (a[:, :8] - b[:, :8]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["trans_enc", "trans_dec"])
def test_mask_frames_hides_padded_frames(tmp_path, arch):
    """--mask_frames models: padded frames are keys no real frame attends to (the time token never masked)."""
    state = random_official_state(arch, CLIP_DIM)
    args = official_args(arch=arch, emb_trans_dec=arch == "trans_dec", mask_frames=True, diffusion_steps=50)
    model = load_official_mdm(save_official(tmp_path / "save", state, args)).eval()
    x, t, text = inputs()
    t = torch.tensor([0, 17, 49])
    real = torch.arange(12) < torch.tensor([12, 9, 6])[:, None]
    with torch.no_grad():
        got = model.official_forward(x, t, {"text_embed": text, "mask": real[:, None, None, :]})
        want = reference_forward(state, args, x, t, text[None], frame_mask=real)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        changed = x.clone()
        changed[..., 9:] += 5.0  # only padding of samples 1 and 2 (and real frames 9-11 of sample 0)
        again = model.official_forward(changed, t, {"text_embed": text, "mask": real[:, None, None, :]})
    torch.testing.assert_close(again[1, ..., :9], got[1, ..., :9], atol=ATOL, rtol=0)
    torch.testing.assert_close(again[2, ..., :6], got[2, ..., :6], atol=ATOL, rtol=0)


def test_distilbert_variant_attends_to_the_caption_tokens_only(tmp_path):
    """trans_dec + DistilBERT: memory = embed_text(token states) + time embedding under the token mask; the packed
    condition (states then mask, max_text_tokens = 6) gives the official output, and uncond keeps the mask."""
    state = random_official_state("trans_dec", BERT_DIM)
    args = official_args(arch="trans_dec", text_encoder_type="bert", mask_frames=True, diffusion_steps=50)
    model = load_official_mdm(save_official(tmp_path / "save", state, args), max_text_tokens=6).eval()
    x, t, _ = inputs()
    t = torch.tensor([3, 20, 49])
    gen = torch.Generator().manual_seed(4)
    tokens = torch.tensor([4, 6, 2])
    states = torch.randn(3, 6, BERT_DIM, generator=gen) * (torch.arange(6) < tokens[:, None]).unsqueeze(-1)
    valid = torch.arange(6) < tokens[:, None]
    packed = torch.cat([states.flatten(1), valid.float()], dim=1)
    real = torch.ones(3, 12, dtype=torch.bool)
    with torch.no_grad():
        for uncond in (False, True):
            got = model.official_forward(x, t, {"text_embed": packed, "mask": real[:, None, None], "uncond": uncond})
            want = reference_forward(state, args, x, t, states.transpose(0, 1), uncond=uncond, frame_mask=real,
                                     text_pad=~valid)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    state, args = random_official_state("trans_enc", CLIP_DIM), official_args(mask_frames=True)
    model = load_official_mdm(save_official(tmp_path / "save", state, args)).train()
    x, t, text = inputs()
    motion, mask = x.squeeze(2).transpose(1, 2), torch.arange(12) < torch.tensor([12, 8, 5])[:, None]
    grads = []
    for enabled in (False, True):
        model.gradient_checkpointing = enabled
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout draws (checkpoint replays the RNG state when recomputing)
        model(motion, t, text, mask).square().mean().backward()
        grads.append(model.input_process.poseEmbedding.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)  # same ops recomputed


# ------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("steps", [1000, 50])
def test_cosine_betas_follow_the_alpha_bar_formula(steps):
    s = np.arange(steps + 1) / steps
    alpha_bar = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    betas = mdm_official.official_betas("cosine", steps)
    # float64 both ways; 1 - ratio cancels for the smallest betas (~4e-5): 1e-16 absolute is ~1e-11 relative
    np.testing.assert_allclose(betas, expected, rtol=1e-9, atol=0)
    assert betas[-1] == 0.999  # the cap: alpha_bar(1) = 0


def test_adapter_uses_the_official_schedule_padding_and_text_encoder(tmp_path):
    state, args = random_official_state("trans_enc", CLIP_DIM), official_args(latent_dim=LATENT)
    clip_dir = tiny_clip(tmp_path / "clip", CLIP_DIM)
    adapter = load_official_adapter(save_official(tmp_path / "save", state, args), str(clip_dir))
    betas = mdm_official.official_betas("cosine", 1000)
    torch.testing.assert_close(adapter.noise_scheduler.betas, torch.tensor(betas, dtype=torch.float32))
    torch.testing.assert_close(adapter.noise_scheduler.alphas_cumprod.double(), torch.tensor(np.cumprod(1 - betas)),
                               atol=1e-6, rtol=1e-5)  # float32 cumulative product of 1000 factors
    assert adapter.pad_frames == 196 and adapter.prediction_type == "sample"
    motion = torch.randn(44, D)
    batch = adapter.collate([{"prompt": "a man walks", "response": motion}, {"prompt": "jump", "response": motion[:40]}])
    assert batch["motion"].shape == (2, 196, D) and batch["mask"].sum(1).tolist() == [44, 40]
    # the score: x0 error over real frames at x_t = sqrt(ab) x0 + sqrt(1 - ab) eps over all 196 frames
    t = torch.tensor([600, 600])
    eps = torch.randn(2, 196, D, generator=torch.Generator().manual_seed(0))
    ab = float(np.cumprod(1 - betas)[600])
    x_t = math.sqrt(ab) * batch["motion"] + math.sqrt(1 - ab) * eps
    scores = adapter.score_at(batch, x_t.float(), t, batch["motion"])
    with torch.no_grad():
        pred = reference_forward(state, args, x_t.float().transpose(1, 2)[:, :, None], t, batch["cond"][None])
    pred = pred[:, :, 0].transpose(1, 2)
    mask = batch["mask"].unsqueeze(-1).float()
    want = -(((pred - batch["motion"]) ** 2) * mask).sum((1, 2)) / (mask.sum((1, 2)) * D)
    torch.testing.assert_close(scores.policy.detach(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.reference, scores.policy.detach())  # step 0: policy = reference
    samples = adapter.sample(["a man walks"], 2, lengths=[40], num_inference_steps=3,
                             generator=torch.Generator().manual_seed(0))
    assert samples["motion"].shape == (2, 196, D) and samples["mask"].sum(1).tolist() == [40, 40]
    assert samples["motion"][:, 40:].abs().max() == 0


def test_ancestral_sampling_is_the_official_p_sample_loop_with_guidance(tmp_path):
    """A 50-step model sampled with adapter.sample(scheduler='ddpm', 50 steps) equals the official p_sample_loop
    written out (x0 prediction, q_posterior mean, FIXED_SMALL variance, no noise at t = 0) on the same draws."""
    state = random_official_state("trans_enc", CLIP_DIM)
    args = official_args(diffusion_steps=50, mask_frames=True)
    clip_dir = tiny_clip(tmp_path / "clip", CLIP_DIM)
    adapter = load_official_adapter(save_official(tmp_path / "save", state, args), str(clip_dir))
    assert adapter.pad_frames is None  # mask_frames models see their real frames only
    lengths = [40, 28]
    out = adapter.sample(["a man walks", "jump"], lengths=lengths, num_inference_steps=50, scheduler="ddpm",
                         guidance_scale=2.5, generator=torch.Generator().manual_seed(3))
    betas = mdm_official.official_betas("cosine", 50)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    coef_x0, coef_xt = betas * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)
    variance = betas * (1 - ab_prev) / (1 - ab)
    model = adapter.policy.eval()
    cond = adapter.encode_captions(["a man walks", "jump"])
    mask = torch.arange(40) < torch.tensor(lengths)[:, None]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, D, generator=gen)
    with torch.no_grad():
        for t in range(49, -1, -1):
            x0 = model.guided(x, torch.full((2,), t), cond, mask, 2.5)
            x = float(coef_x0[t]) * x0 + float(coef_xt[t]) * x
            if t > 0:
                x = x + math.sqrt(variance[t]) * torch.randn(x.shape, generator=gen)
    # float32 scheduler coefficients vs float64 ones here, compounded over 50 steps through the network
    torch.testing.assert_close(out["motion"], x * mask.unsqueeze(-1), atol=1e-3, rtol=1e-3)
    assert (out["motion"] - x * mask.unsqueeze(-1)).abs().mean() < 1e-4


# ------------------------------------------------------------------------------------------- CLIP text features
def tiny_clip(folder: Path, projection_dim: int = 12) -> Path:
    """A random CLIPTextModelWithProjection with a one-character BPE vocabulary whose end-of-text token has the
    largest id, as in openai's vocabulary (encode_text pools at argmax of the token ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase
    tokens = [*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
                            bos_token_id=52, eos_token_id=53, pad_token_id=53)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


def openai_encode_text(model: CLIPTextModelWithProjection, token_ids: list[int]) -> torch.Tensor:
    """openai-clip's encode_text on a 77-token context: token + positional embedding, pre-LN residual blocks with a
    causal mask and QuickGELU, ln_final, the state at argmax(token ids) (the end token), @ text_projection."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    text = torch.zeros(77, dtype=torch.long)
    text[: len(token_ids)] = torch.tensor(token_ids)  # MDM zero-pads its 22-token context to 77
    x = sd["text_model.embeddings.token_embedding.weight"][text] + sd["text_model.embeddings.position_embedding.weight"]
    heads, d = model.config.num_attention_heads, x.shape[-1]
    causal = torch.full((77, 77), float("-inf")).triu(1)
    for i in range(model.config.num_hidden_layers):
        p = f"text_model.encoder.layers.{i}."
        h = F.layer_norm(x, (d,), sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"])
        q, k, v = (h @ sd[f"{p}self_attn.{n}_proj.weight"].T + sd[f"{p}self_attn.{n}_proj.bias"] for n in "qkv")
        q, k, v = (z.reshape(77, heads, d // heads).transpose(0, 1) for z in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(d // heads) + causal).softmax(-1) @ v
        x = x + att.transpose(0, 1).reshape(77, d) @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"])
        h = h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = F.layer_norm(x, (d,), sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"])
    return x[text.argmax()] @ sd["text_projection.weight"].T  # HF stores openai's text_projection transposed


def test_clip_text_features_equal_openai_encode_text_with_mdm_truncation(tmp_path):
    folder = tiny_clip(tmp_path / "clip")
    encoder = CLIPTextEncoder(folder)
    model = CLIPTextModelWithProjection.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    captions = ["a man walks", "the person turns around slowly and then sits down"]  # the second: > 20 tokens
    features = encoder(captions)
    assert features.shape == (2, 12)
    for caption, row in zip(captions, features):
        content = tokenizer(caption)["input_ids"][1:-1]
        ids = [52, *content[:20], 53]  # clip.tokenize(context_length=22, truncate=True): 20 tokens, end token last
        with torch.no_grad():
            torch.testing.assert_close(row, openai_encode_text(model, ids), atol=1e-5, rtol=1e-5)
    assert len(tokenizer(captions[1])["input_ids"]) > 22


def tiny_distilbert(folder: Path):
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "walks", "forward", "jumps", "the", "person"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    DistilBertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=len(words), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                             max_position_embeddings=32)).eval()
    model.save_pretrained(folder)
    return DistilBertTokenizer.from_pretrained(folder), model


def test_distilbert_encoder_packs_the_caption_token_states_and_mask(tmp_path):
    tokenizer, model = tiny_distilbert(tmp_path / "bert")
    encoder = mdm_official.DistilBertTextEncoder(tmp_path / "bert", max_text_tokens=8)
    assert encoder.dim == 8 * 17
    captions = ["a man walks forward", "the person jumps"]
    packed = encoder(captions)
    states, valid = mdm_official.unpack_token_states(packed, 8, 16)
    for caption, row_states, row_valid in zip(captions, states, valid):
        enc = tokenizer(caption, return_tensors="pt")  # alone, unpadded: what the official BERT wrapper attends to
        n = enc["input_ids"].shape[1]
        with torch.no_grad():
            torch.testing.assert_close(row_states[:n], model(**enc).last_hidden_state[0], atol=1e-5, rtol=1e-5)
        assert row_valid.tolist() == [True] * n + [False] * (8 - n) and row_states[n:].abs().max() == 0
    with pytest.raises(ValueError, match="has 11 DistilBERT tokens, more than max_text_tokens=8"):
        encoder(["a man walks forward a man walks forward a"])


# ------------------------------------------------------------------------------------------- errors
def test_a_checkpoint_of_another_variant_is_refused_naming_keys_and_variant(tmp_path):
    state = random_official_state("trans_dec", BERT_DIM)
    path = save_official(tmp_path / "save", state, official_args(arch="trans_enc"))
    with pytest.raises(ValueError) as info:
        load_official_mdm(path)
    message = str(info.value)
    assert "model000475000.pt" in message and "missing (24): ['seqTransEncoder.layers.0.self_attn.in_proj_weight'" in message
    assert "unexpected (36): ['seqTransDecoder.layers.0" in message
    assert "embed_text.weight: (32, 768) vs (32, 512)" in message
    assert "looks like arch=trans_dec, layers=2, latent_dim=32, text_encoder_type=bert" in message
    (tmp_path / "save" / "args.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"save/args\.json not found"):
        load_official_mdm(path)
    path = save_official(tmp_path / "ok", random_official_state("trans_enc", CLIP_DIM), official_args())
    with pytest.raises(FileNotFoundError, match="text encoder folder None does not exist"):
        load_official_adapter(path)


# ------------------------------------------------------------------------------------------- HumanML3D + CLI
CAPTIONS = ["a person walks forward", "someone jumps in place", "a man waves his right hand"]


def write_humanml3d(root: Path, lengths=(48, 52, 60, 44, 30, 210)) -> Path:
    """The published layout: new_joint_vecs/*.npy [T, 263], texts/*.txt with POS tags, split files, Mean/Std.
    The 30- and 210-frame motions break the length rules (40 <= T < 200)."""
    rng = np.random.default_rng(0)
    (root / "new_joint_vecs").mkdir(parents=True)
    (root / "texts").mkdir()
    ids = [f"{i:06d}" for i in range(len(lengths))]
    for i, (motion_id, frames) in enumerate(zip(ids, lengths)):
        np.save(root / "new_joint_vecs" / f"{motion_id}.npy", rng.normal(size=(frames, D)).astype(np.float32))
        text = CAPTIONS[i % 3]
        tagged = " ".join(f"{w}/{'NOUN' if w in ('person', 'man', 'hand') else 'OTHER'}" for w in text.split())
        (root / "texts" / f"{motion_id}.txt").write_text(f"{text}#{tagged}#0.0#0.0\n")
    np.save(root / "Mean.npy", np.full(D, 0.1, np.float32))
    np.save(root / "Std.npy", np.full(D, 1.5, np.float32))
    for split in ("train", "val", "test"):
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_humanml3d_folder_errors_name_the_file_and_dropped_motions_are_logged(tmp_path, caplog):
    root = write_humanml3d(tmp_path / "HumanML3D")
    with caplog.at_level(logging.WARNING, logger="genalign.data.humanml3d"):
        rows = motion_rows.demonstration_rows(root, "train")
    assert [r["motion_id"] for r in rows] == ["000000", "000001", "000002", "000003"]
    assert "'motion_too_short': 1" in caplog.text and "'motion_too_long': 1" in caplog.text
    np.testing.assert_allclose(rows[0]["response"].numpy(),
                               (np.load(root / "new_joint_vecs" / "000000.npy") - 0.1) / 1.5, rtol=1e-6, atol=1e-6)
    (root / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"HumanML3D/val\.txt not found.*copy them into"):
        motion_rows.demonstration_rows(root, "val")
    np.save(root / "new_joint_vecs" / "000002.npy", np.zeros((50, 251), np.float32))
    with pytest.raises(ValueError, match=r"000002\.npy: expected features of shape \[T, 263\].*remove '000002' from train\.txt"):
        motion_rows.demonstration_rows(root, "train")


def judge(path: Path) -> Path:
    """A random tiny T2M evaluator (reward and metric network) that takes 196-frame motions."""
    from test_motion_experiment import TINY_EVALUATOR, write_glove

    torch.manual_seed(1)
    glove = write_glove(path.parent / f"{path.name}-glove")
    sizes = {**TINY_EVALUATOR, "max_motion_length": 196}
    TextMotionEvaluator(EvaluatorConfig(word_dim=8, word_vectors=str(glove), **sizes)).save(path)
    return path


def test_few_sopo_steps_on_the_official_model_through_the_cli(tmp_path):
    root = write_humanml3d(tmp_path / "HumanML3D", lengths=[48 + i % 5 for i in range(33)])
    state, args = random_official_state("trans_enc", CLIP_DIM), official_args(diffusion_steps=50)
    checkpoint = save_official(tmp_path / "save", state, args, "model000750000.pt")
    clip_dir = tiny_clip(tmp_path / "clip", CLIP_DIM)
    judge(tmp_path / "judge")
    out = tmp_path / "run"
    overrides = [
        "experiment=mdm_sopo", f"output_dir={out}", f"adapter.path={checkpoint}", f"adapter.text_encoder={clip_dir}",
        f"data.root={root}", f"objective.evaluator={tmp_path / 'judge'}", "objective.num_samples=2",
        f"evaluator.evaluator_path={tmp_path / 'judge'}", "evaluator.num_prompts=32", "evaluator.replications=2",
        "evaluator.num_inference_steps=2", "evaluator.num_gifs=0",
        "objective.num_inference_steps=2", "train.max_steps=3", "train.batch_size=2", "train.learning_rate=1e-3",
        "train.log_every=1", "train.save_every=0",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics = run(cfg)
    assert set(metrics["before"]) == set(metrics["after"]) >= {"r_precision_top3", "mm_dist", "fid"}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert logs[0]["step"] == 1 and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    trained = load_official_mdm(out / "final" / "model.pt")  # saved in the official layout with its args.json
    assert set(trained.state_dict()) == set(official_shapes("trans_enc", CLIP_DIM))
    assert json.loads((out / "final" / "args.json").read_text())["diffusion_steps"] == 50
    moved = (trained.state_dict()["output_process.poseFinal.weight"] - state["output_process.poseFinal.weight"]).abs()
    assert moved.max() > 0
