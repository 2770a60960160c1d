"""The FID InceptionV3 (pool3, 2048 features) loading the user's local ``pt_inception-2015-12-05-6726825d.pth``.

The network is the TensorFlow Inception graph of Heusel et al. 2017 ported to PyTorch by pytorch-fid (mseitzer)
and torch-fidelity (toshas), which both ship the same weights (pytorch-fid: ``pt_inception-2015-12-05-6726825d.pth``,
torch-fidelity: ``weights-inception-2015-12-05-6726825d.pth``). It differs from torchvision's InceptionV3 in four
places: 1008 classes, average pools that ignore the zero padding (``count_include_pad=False``) in the A, C and first
E blocks, and a max pool in the last E block's pool branch. Neither package installs here (both pull torchvision,
which has no CPU build on this index), so the module is written out with their state-dict key layout.

Images come in as the package's ``[N, C, H, W]`` in [-1, 1] (C = 1 is repeated to RGB), are quantised to 8 bits as a
saved PNG would be, resized to 299 × 299 and normalised, as the reference implementation picked by ``resize`` does:

* ``"torch-fidelity"`` (torchmetrics' default FID feature extractor): TensorFlow-1.x bilinear resize
  (source pixel = output pixel · in/out, no half-pixel offset) of the 0..255 values, then (x − 128) / 128;
* ``"pytorch-fid"``: x / 255, ``F.interpolate(bilinear, align_corners=False)``, then 2x − 1.

For 299 × 299 inputs both resizes are the identity and the two differ only by 127.5 vs 128 in the normalisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 299
RESIZE_MODES = ("torch-fidelity", "pytorch-fid")
WEIGHTS_HINT = ("the FID InceptionV3 weights file pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release "
                "'fid_weights') or torch-fidelity's weights-inception-2015-12-05-6726825d.pth")  # fmt: skip


class BasicConv2d(nn.Module):
    """conv (no bias) → BatchNorm (eps 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF's pool ignores the padding


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double,
                          self.branch_pool(_avg_pool(x))], 1)  # fmt: skip


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = BasicConv2d(cin, c7, 1), BasicConv2d(c7, c7, **row), BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = BasicConv2d(c7, c7, **col), BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = BasicConv2d(c7, c7, **col), BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for i in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{i}")(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        long = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), long, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=False``: Mixed_7b (average pool branch); ``True``: Mixed_7c (the TF graph's max pool branch)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, **row), BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, **row), BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled)], 1)  # fmt: skip


def resize_like_tensorflow1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x ``resize_bilinear(align_corners=False)``: output pixel o samples the input at o · in/out (no half-pixel
    offset), interpolating between floor and floor + 1 (clamped to the edge)."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float32 coordinates, as torch-fidelity computes them (its float64 mode aside)
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()  # = floor: src >= 0
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[-2]), axis(x.shape[-1])
    top = x[..., y0, :] + (x[..., y1, :] - x[..., y0, :]) * dy[:, None]
    return top[..., x0] + (top[..., x1] - top[..., x0]) * dx


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 up to its 2048-d average pool (``forward(images [N, C, H, W] in [-1, 1]) -> [N, 2048]``).

    Usable as :func:`genalign.eval.image.frechet_distance`'s network (``num_features = 2048``).
    """

    num_features = 2048

    def __init__(self, resize: str = "torch-fidelity") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the 1008-way classifier of the TF graph: in the weights file, unused here

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → the network's 299 × 299 input, as the chosen reference implementation prepares it."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().expand(-1, 3, -1, -1)  # 0..255, as a PNG holds
        if self.resize == "torch-fidelity":
            return (resize_like_tensorflow1(pixels, SIZE) - 128) / 128
        return 2 * F.interpolate(pixels / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).to(self.fc.weight)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def load_fid_inception(path: str | Path, resize: str = "torch-fidelity", device: str | torch.device = "cpu") -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights of the local file ``path`` (nothing is downloaded), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"InceptionV3 weights {path} do not exist; pass {WEIGHTS_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle that is not a plain state dict, or not a torch file at all
        raise ValueError(f"{path} is not a torch state dict ({error}); pass {WEIGHTS_HINT}") from error
    network = FIDInceptionV3(resize)
    expected = set(network.state_dict())
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # files saved without them load too
    found = set(state) if isinstance(state, dict) else set()
    missing, unexpected = sorted(expected - optional - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not the FID InceptionV3 state dict: {len(missing)} keys missing (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); pass {WEIGHTS_HINT}")  # fmt: skip
    own = network.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the FID InceptionV3 has "
                             f"{tuple(own[key].shape)}; pass {WEIGHTS_HINT}")  # fmt: skip
    network.load_state_dict(state, strict=False)  # strict except for the optional BN counters checked above
    return network.requires_grad_(False).eval().to(device)
