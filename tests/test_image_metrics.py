"""The field's image metrics from local files: the FID InceptionV3, PickScore and the LAION aesthetic predictor.

No real weights can be downloaded here, so each test writes random weights in the exact published layout (the key
names and shapes of ``pt_inception-2015-12-05-6726825d.pth``, of a PickScore_v1 CLIP folder, of the aesthetic MLP's
``.pth``), loads them through the package and compares with an independent computation written in the test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genalign.eval.image import frechet_distance
from genalign.eval.inception import FIDInceptionV3, load_fid_inception, resize_like_tensorflow1
from genalign.rewards.aesthetic import AestheticScorer
from genalign.rewards.pickscore import PickScorer
from tiny_clip import clip_embeddings_by_hand, write_tiny_clip

# ------------------------------------------------------------------------------------- the FID InceptionV3
# The published architecture (Szegedy et al. 2016, TF graph 2015-12-05, as ported by pytorch-fid / torch-fidelity),
# written out here independently of genalign.eval.inception: name -> (in, out, kernel, stride, padding).
SPEC: dict[str, tuple] = {}


def conv(name, cin, cout, k, s=1, p=0):
    SPEC[name] = (cin, cout, k if isinstance(k, tuple) else (k, k), s, p if isinstance(p, tuple) else (p, p))


for args in [("Conv2d_1a_3x3", 3, 32, 3, 2), ("Conv2d_2a_3x3", 32, 32, 3), ("Conv2d_2b_3x3", 32, 64, 3, 1, 1),
             ("Conv2d_3b_1x1", 64, 80, 1), ("Conv2d_4a_3x3", 80, 192, 3)]:  # fmt: skip
    conv(*args)
for m, cin, pool in (("5b", 192, 32), ("5c", 256, 64), ("5d", 288, 64)):  # A blocks
    b = f"Mixed_{m}."
    conv(b + "branch1x1", cin, 64, 1)
    conv(b + "branch5x5_1", cin, 48, 1), conv(b + "branch5x5_2", 48, 64, 5, 1, 2)
    conv(b + "branch3x3dbl_1", cin, 64, 1), conv(b + "branch3x3dbl_2", 64, 96, 3, 1, 1)
    conv(b + "branch3x3dbl_3", 96, 96, 3, 1, 1), conv(b + "branch_pool", cin, pool, 1)
conv("Mixed_6a.branch3x3", 288, 384, 3, 2)  # B block
conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1), conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 1, 1)
conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 2)
for m, c7 in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):  # C blocks
    b, row, col = f"Mixed_{m}.", ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    conv(b + "branch1x1", 768, 192, 1)
    conv(b + "branch7x7_1", 768, c7, 1), conv(b + "branch7x7_2", c7, c7, *row), conv(b + "branch7x7_3", c7, 192, *col)
    conv(b + "branch7x7dbl_1", 768, c7, 1)
    for i, (cout, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
        conv(b + f"branch7x7dbl_{i}", c7, cout, *shape)
    conv(b + "branch_pool", 768, 192, 1)
conv("Mixed_7a.branch3x3_1", 768, 192, 1), conv("Mixed_7a.branch3x3_2", 192, 320, 3, 2)  # D block
conv("Mixed_7a.branch7x7x3_1", 768, 192, 1), conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3))
conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)), conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, 2)
for m, cin in (("7b", 1280), ("7c", 2048)):  # E blocks
    b = f"Mixed_{m}."
    conv(b + "branch1x1", cin, 320, 1), conv(b + "branch3x3_1", cin, 384, 1)
    conv(b + "branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)), conv(b + "branch3x3_2b", 384, 384, (3, 1), 1, (1, 0))
    conv(b + "branch3x3dbl_1", cin, 448, 1), conv(b + "branch3x3dbl_2", 448, 384, 3, 1, 1)
    conv(b + "branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)), conv(b + "branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0))
    conv(b + "branch_pool", cin, 192, 1)


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the file's layout: He-normal convs and BN statistics near identity, so activations keep
    an O(1) scale through the ~95 layers (PyTorch's default init would shrink them towards 0)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (cin, cout, (kh, kw), _, _) in SPEC.items():
        state[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=g) * math.sqrt(2 / (cin * kh * kw))
        state[f"{name}.bn.weight"] = 0.5 + torch.rand(cout, generator=g)
        state[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=g)
        state[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=g)
        state[f"{name}.bn.running_var"] = 0.5 + torch.rand(cout, generator=g)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) / math.sqrt(2048)
    state["fc.bias"] = torch.zeros(1008)
    return state


def reference_features(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The pool3 features of a 299×299 normalised input, functionally from the state dict and SPEC."""

    def c(name, inp):
        _, _, _, stride, padding = SPEC[name]
        out = F.conv2d(inp, state[f"{name}.conv.weight"], stride=stride, padding=padding)
        bn = [state[f"{name}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        return F.relu(F.batch_norm(out, *bn, training=False, eps=1e-3))

    def chain(inp, *names):
        for name in names:
            inp = c(name, inp)
        return inp

    def tf_avg(inp):  # TF's average pool ignores the zero padding
        return F.avg_pool2d(inp, 3, 1, 1, count_include_pad=False)

    x = F.max_pool2d(chain(x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), 3, 2)
    x = F.max_pool2d(chain(x, "Conv2d_3b_1x1", "Conv2d_4a_3x3"), 3, 2)
    for m in ("5b", "5c", "5d"):
        b = f"Mixed_{m}."
        x = torch.cat([c(b + "branch1x1", x), chain(x, b + "branch5x5_1", b + "branch5x5_2"),
                       chain(x, *(b + f"branch3x3dbl_{i}" for i in (1, 2, 3))), c(b + "branch_pool", tf_avg(x))], 1)  # fmt: skip
    b = "Mixed_6a."
    x = torch.cat([c(b + "branch3x3", x), chain(x, *(b + f"branch3x3dbl_{i}" for i in (1, 2, 3))), F.max_pool2d(x, 3, 2)], 1)
    for m in ("6b", "6c", "6d", "6e"):
        b = f"Mixed_{m}."
        x = torch.cat([c(b + "branch1x1", x), chain(x, *(b + f"branch7x7_{i}" for i in (1, 2, 3))),
                       chain(x, *(b + f"branch7x7dbl_{i}" for i in range(1, 6))), c(b + "branch_pool", tf_avg(x))], 1)  # fmt: skip
    b = "Mixed_7a."
    x = torch.cat([chain(x, b + "branch3x3_1", b + "branch3x3_2"), chain(x, *(b + f"branch7x7x3_{i}" for i in (1, 2, 3, 4))),
                   F.max_pool2d(x, 3, 2)], 1)  # fmt: skip
    for m, pool in (("7b", tf_avg), ("7c", lambda t: F.max_pool2d(t, 3, 1, 1))):  # the last E block max-pools
        b = f"Mixed_{m}."
        single, double = c(b + "branch3x3_1", x), chain(x, b + "branch3x3dbl_1", b + "branch3x3dbl_2")
        x = torch.cat([c(b + "branch1x1", x), c(b + "branch3x3_2a", single), c(b + "branch3x3_2b", single),
                       c(b + "branch3x3dbl_3a", double), c(b + "branch3x3dbl_3b", double), c(b + "branch_pool", pool(x))], 1)  # fmt: skip
    return x.mean((2, 3))


def tf1_resize_numpy(x: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1.x resize_bilinear(align_corners=False) in float64 numpy: sample at o·in/out, floor/ceil lerp."""

    def weights(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (y0, y1, wy), (x0, x1, wx) = weights(x.shape[-2]), weights(x.shape[-1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def write_inception_file(folder, seed: int = 0):
    """Random FID InceptionV3 weights saved as ``folder/pt_inception-2015-12-05-6726825d.pth``; (path, state)."""
    state = random_inception_state(seed)
    path = folder / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return write_inception_file(tmp_path_factory.mktemp("fid"))


def images(n: int, h: int, w: int, seed: int, channels: int = 3) -> torch.Tensor:
    return torch.rand(n, channels, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_preprocessing_follows_each_reference_implementation():
    x = images(2, 20, 24, seed=3)
    pixels = ((x + 1) * 127.5).round()  # what a PNG of the images holds
    fidelity = FIDInceptionV3("torch-fidelity").preprocess(x)
    expected = (tf1_resize_numpy(pixels.double().numpy(), 299) - 128) / 128
    # float32 sample positions vs float64 here: ≤ 1e-5 of a pixel step on 0..255 values, /128 → well under 1e-4
    assert fidelity.shape == (2, 3, 299, 299) and np.abs(fidelity.double().numpy() - expected).max() < 1e-4
    pytorch_fid = FIDInceptionV3("pytorch-fid").preprocess(x)
    assert torch.allclose(pytorch_fid, 2 * F.interpolate(pixels / 255, size=(299, 299), mode="bilinear") - 1, atol=1e-6)
    grey = images(1, 299, 299, seed=4, channels=1)  # at 299 both resizes are the identity; grey repeats to RGB
    g = ((grey + 1) * 127.5).round().expand(-1, 3, -1, -1)
    assert torch.allclose(FIDInceptionV3("torch-fidelity").preprocess(grey), (g - 128) / 128, atol=1e-6)
    assert torch.allclose(FIDInceptionV3("pytorch-fid").preprocess(grey), g / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="resize must be one of"):
        FIDInceptionV3("nearest")


def test_inception_features_and_fid_match_an_independent_implementation(inception_file):
    path, state = inception_file
    network = load_fid_inception(path)
    real, fake = images(2, 32, 32, seed=0), images(2, 32, 32, seed=1).clamp(-0.2, 1)
    with torch.no_grad():
        ours = network(torch.cat([real, fake]))
        reference = reference_features(state, network.preprocess(torch.cat([real, fake])))
    assert ours.shape == (4, 2048) and reference.abs().mean() > 1e-2  # activations kept their scale
    # same float32 ops in a different grouping (module vs functional): relative error ~1e-6 after ~95 layers
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    # FID through torchmetrics (the package's path) vs the closed form on the reference features: with n = 2 per
    # set, Σ = XᵀX/(n−1) for centred X, so Tr((Σ_r Σ_g)^½) = nuclear norm of X_r X_gᵀ / (n − 1)
    n, a, b = 2, reference[:2].double(), reference[2:].double()
    xa, xb = a - a.mean(0), b - b.mean(0)
    trace_root = torch.linalg.svdvals(xa @ xb.T).sum() / (n - 1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((xa**2).sum() + (xb**2).sum()) / (n - 1) - 2 * trace_root
    assert frechet_distance(real, fake, network) == pytest.approx(expected.item(), rel=1e-3)  # the 1e-3


def test_inception_file_errors_name_the_file_and_the_fix(inception_file, tmp_path):
    path, state = inception_file
    with pytest.raises(FileNotFoundError, match=r"absent\.pth do not exist.*pt_inception-2015-12-05-6726825d"):
        load_fid_inception(tmp_path / "absent.pth")
    torchvision_like = {k: v for k, v in state.items() if not k.startswith("Mixed_7c")} | {"AuxLogits.fc.weight": torch.zeros(1)}
    torch.save(torchvision_like, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth is not the FID InceptionV3 state dict: \d+ keys missing.*AuxLogits"):
        load_fid_inception(tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not torch")
    with pytest.raises(ValueError, match=r"text\.pth is not a torch state dict"):
        load_fid_inception(tmp_path / "text.pth")


def test_inception_equals_torch_fidelity_and_pytorch_fid_where_installed(inception_file):
    """The issue's 1e-3 equality with the reference packages; they need torchvision, which does not install on
    this CPU index, so this runs (instead of skipping) only where they are installed."""
    fidelity = pytest.importorskip("torch_fidelity")
    path, _ = inception_file
    x = images(2, 64, 48, seed=5)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    theirs = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    with torch.no_grad():
        assert torch.allclose(load_fid_inception(path)(x), theirs(u8)[0], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------- CLIP-based scorers
#: the tiny PickScore folder's logit scale: another value than CLIP's default 1/0.07, so the tests see that the
#: folder's own value is used
PICK_LOGIT_SCALE = 37.0


def write_pick_folder(folder):
    """A tiny PickScore_v1-layout CLIP folder (logit scale :data:`PICK_LOGIT_SCALE`); (folder, model, tokenizer)."""
    return write_tiny_clip(folder, logit_scale=math.log(PICK_LOGIT_SCALE), seed=4)


@pytest.fixture(scope="module")
def pick_folder(tmp_path_factory):
    return write_pick_folder(tmp_path_factory.mktemp("pickscore"))


def test_pickscore_is_the_scaled_cosine_of_the_folders_clip(pick_folder):
    folder, model, tokenizer = pick_folder
    x = images(3, 32, 32, seed=6)
    prompts = ["a red cat", "a blue house", "the digit 3"]
    vision, text = clip_embeddings_by_hand(model, tokenizer, x, prompts)
    expected = PICK_LOGIT_SCALE * (vision * text).sum(-1)
    scores = PickScorer(folder)(x, prompts)
    assert scores.shape == (3,)
    # float32 towers on the same inputs; 37 × cos with cos error ~1e-6
    assert torch.allclose(scores, expected, atol=1e-4)
    # the scorer's ranking of prompts for one image is the CLIP ranking (what PickScore's probabilities use)
    one = PickScorer(folder)(x[:1].expand(3, -1, -1, -1), prompts)
    assert torch.equal(one.argsort(), (vision[:1] * text).sum(-1).argsort())


def test_pickscore_folder_errors_name_the_path_and_the_expected_files(pick_folder, tmp_path):
    folder, _, _ = pick_folder
    with pytest.raises(FileNotFoundError, match=r"PickScore folder .*nowhere does not exist; pass a transformers CLIPModel"):
        PickScorer(tmp_path / "nowhere")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"bert: config.json has model_type 'bert', not 'clip'"):
        PickScorer(bert)
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_processor / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no-processor has no preprocessor_config.json"):
        PickScorer(no_processor)
    assert torch.isfinite(PickScorer(no_processor, processor_path=folder)(images(1, 32, 32, 0), ["a cat"])).all()


AESTHETIC_LAYERS = (0, 2, 4, 6, 7)  # the predictor's nn.Sequential indices of its linear layers


def write_aesthetic_mlp(folder, seed: int = 7, input_size: int = 16):
    """Random LAION aesthetic MLP weights (the v2 ``.pth`` layout) on ``input_size``-d CLIP embeddings (16 = the
    tiny CLIP's projection_dim, 768 for L/14), saved as ``folder/sac+logos+ava1-l14-linearMSE.pth``; (path, state)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(input_size, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for index, (fan_in, fan_out) in zip(AESTHETIC_LAYERS, sizes):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=g)
    path = folder / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    return path, state


def aesthetic_by_hand(state: dict[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """``[N]`` aesthetic scores of unit-norm CLIP image embeddings: the linear layers only (dropout is off at
    evaluation)."""
    h = embeddings
    for index in AESTHETIC_LAYERS:
        h = h @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return h.squeeze(-1)


def test_aesthetic_predictor_is_the_mlp_on_normalised_clip_image_embeddings(pick_folder, tmp_path):
    folder, model, tokenizer = pick_folder
    path, state = write_aesthetic_mlp(tmp_path)
    scorer = AestheticScorer(folder, path)
    x = images(4, 32, 32, seed=8)
    scores = scorer(x, [""] * 4)
    expected = aesthetic_by_hand(state, clip_embeddings_by_hand(model, tokenizer, x))
    assert scores.shape == (4,) and torch.allclose(scores, expected, atol=1e-4)
    wrong = {k: v for k, v in state.items() if not k.startswith("layers.7")}
    torch.save(wrong, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth does not fit the aesthetic MLP on 16-d CLIP embeddings: keys \['7\.bias', '7\.weight'\]"):
        AestheticScorer(folder, tmp_path / "short.pth")
    with pytest.raises(FileNotFoundError, match=r"aesthetic predictor weights .*missing\.pth do not exist"):
        AestheticScorer(folder, tmp_path / "missing.pth")
