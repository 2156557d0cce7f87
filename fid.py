"""fid.py -- FID, precision and recall as the paper measured them (pytorch-fid's Inception path), and more.

Bertrand et al., "On the Stability of Iterative Retraining of Generative Models on their Own Data"
(ICLR 2024) report every result as FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium") and precision/recall (Kynkäänniemi et al. 2019, "Improved
Precision and Recall Metric for Assessing Generative Models", k = 3) over retraining iterations. The
paper computed them with the `fld` package, whose features are those of pytorch-fid: the TF-ported
Inception-v3 of 2015-12-05 (`pt_inception-2015-12-05-6726825d.pth`), images scaled to [0, 1], resized
bilinearly (half-pixel centres) to 299 x 299, mapped to [-1, 1], 2048-d pool3 features. This file
computes exactly that, so its numbers are comparable with pytorch-fid / fld numbers (and not with
clean-fid or NVlabs-EDM FIDs, which resize differently).

The k-NN metrics work in any feature space (Inception, pixels, classifier.py's features, raw Gaussian
vectors): beside precision and recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and
Diversity Metrics for Generative Models", same k), all four from one pass over the distances. For
labelled data, the class histogram of the samples (its total variation distance to the real one, the
number of classes still produced); and the noise floor, the same metrics between two halves of the
real set, which says how large a change must be to stand above sampling noise.

The k-NN tie rule. The radius of a point is its distance to its k-th nearest OTHER point of its own set
(the (k+1)-th smallest distance, itself included; an exact copy of it is another point, at distance 0),
and a sample is inside that ball when its distance is STRICTLY LESS than the radius. This is the rule
of fld's PrecisionRecall (`pairwise_dists < nn_dists`, num_neighbors = k + 1 = 4), the library of the
paper's CIFAR-10 numbers, and of Naeem et al.'s own prdc code (`<` in all four metrics), so it is kept.
Kynkäänniemi et al.'s reference code uses `<=`; prdc(..., inclusive=True) computes that rule. What the
inclusive rule changes: a sample exactly on a sphere counts as inside, so every metric can only grow;
most visibly, a ball of radius 0 (a point with k or more exact copies in its own set) is empty under
`<` and holds its copies under `<=`, so a set that repeats images gets no precision/recall/coverage
credit from those balls under `<`, and some under `<=`. Ties need equal distances: on the digits' real
pixels (noise_floor's halves of 898, seed 0, k = 3), in exact integers, one real-fake distance of the
806,404 equals a radius, and that real image lies inside 6 other balls, so both rules give the same four
numbers; on low-dimensional grids they differ often (tests/test_fid.py: 2-d points on 17 grey levels,
and a hand-computed 1-d case). Distances are float32
torch.cdist, as fld: exact for small integer-valued features (the tests), while elsewhere two identical
vectors get a distance of rounding size rather than 0 (up to 0.005 on the digits' pixels in [-1, 1],
whose closest distinct images are 0.66 apart), so there a tie with a radius of 0 is decided by rounding.

What is here, top to bottom:
  Config                 the defaults (batch, k, chunk, the weights address ...)
  FIDInception           Inception-v3 with the FID blocks of the TF graph; state dict = the .pth file
  load_inception         weights from a path, $FID_INCEPTION_WEIGHTS, the torch hub cache or the download
  inception_features     uint8 / [-1, 1] images -> (N, 2048) float64 pool3 features, batch-wise on a device
  pixel_features         the pixel-space variant for tiny images (8x8 digits): (N, C*H*W) in [-1, 1]
  feature_stats, frechet_distance   the Fréchet distance
  prdc, precision_recall, expected_coverage   precision, recall, density, coverage from the k-NN radii
  class_metrics, feature_metrics, noise_floor   the class histogram, all metrics at once, two real sets
  nearest_distances      each sample's distance to its nearest real image (the memorization measure)
  reference              reference statistics cached on disk together with what they were computed from
  main                   the command line

    python fid.py ref --data cifar10 --out cifar10-train.npz            # reference statistics + features
    python fid.py calc samples.npz --ref cifar10-train.npz              # one JSON line: fid, precision, recall, n
    python fid.py calc samples.npz --data digits --pixel                # pixel-space metrics for tiny images
    python fid.py calc samples/ --ref cifar10-train.npz --inception pt_inception-2015-12-05-6726825d.pth
    python -c "import fid, data; print(fid.noise_floor(fid.pixel_features(data.load_images('digits'))))"

IMAGES and --data take cifar10 | digits | mnist | fashion-mnist | a folder of images | a .zip of images |
a .npz/.npy uint8 array (NHWC or NCHW), read by data.py. Without internet, download the weights file by hand (see
Config.weights_url) and give it with --inception PATH or the environment variable FID_INCEPTION_WEIGHTS.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class Config:
    batch_size: int = 200       # images per Inception forward pass (pytorch-fid: 50; features agree across batch sizes)
    resolution: int = 299       # Inception input side in pixels (pytorch-fid `InceptionV3`, resize_input=True)
    k: int = 3                  # neighbours of the precision/recall radius (paper; fld: num_neighbors=4 = k + self)
    chunk: int = 10000          # rows (and columns) of one cdist block in precision/recall (fld: chunks of 10,000)
    min_frac: float = 0.1       # a class counts as produced above this fraction of its real share (class_metrics):
                                # the ~4 misread images per class of a 98%-accurate classifier on 1,797 stay below it
    eps: float = 1e-6           # diagonal offset when sqrtm fails on a singular product (pytorch-fid)
    imag_atol: float = 1e-3     # largest |imaginary part| on sqrtm's diagonal that is dropped (pytorch-fid)
    fd_method: str = "sqrtm"    # "sqrtm": scipy.linalg.sqrtm, as pytorch-fid (2048-d: ~40 CPU-s on a 2-core Xeon);
                                # "eigh": pivoted Cholesky + symmetric eigenvalues (~7 CPU-s there at full rank,
                                # 0.3 s at rank 5; same FID to 1e-15 relative at full rank)
    floor_splits: int = 20      # random pairs of real halves the noise floor's mean and sd are taken over
    floor_max_half: int = 2000  # points in each of them at most: FD is scaled to the sizes asked, the rest hardly move
    min_images: int = 2048      # fewer than Inception's 2048 dims: singular covariance, biased FID (pytorch-fid README)
    precision: str = "fp32"     # "fp32" (exact, TF32 off) | "tf32" (CUDA) | "bf16" (autocast); see inception_features
    weights_url: str = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                        "pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid 0.3.0 FID_WEIGHTS_URL
    weights_env: str = "FID_INCEPTION_WEIGHTS"  # environment variable naming a local copy of the weights file


CFG = Config()
WEIGHTS_FILE = os.path.basename(CFG.weights_url)  # the name it has in the torch hub cache
PROTOCOL = "pytorch-fid: uint8/255, bilinear 299x299 (align_corners=False), 2x-1, Inception 2015-12-05 pool3"


# ----------------------------------------------------------------------------------------------------
# The FID Inception-v3 network
#
# torchvision's Inception-v3 layout (Szegedy et al. 2016, "Rethinking the Inception Architecture"),
# with the blocks of the TF 2015-12-05 graph that pytorch-fid patched in: the pool branch of the A, C
# and first E blocks averages over valid pixels only (TF: count_include_pad=False), and the last E
# block (Mixed_7c) max-pools there. Names and shapes equal the released .pth (566 state-dict entries,
# fc 2048 -> 1008 classes is loaded but not used).


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU.

    In eval mode BatchNorm is the per-channel affine map gamma (x - mean) / sqrt(var + eps) + beta
    (Ioffe & Szegedy 2015, Alg. 2), folded here into the conv weights and a bias: the same function
    (to float32 rounding) with one pass less over the activations."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        if self.training:
            return F.relu(self.bn(self.conv(x)), inplace=True)
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)                          # (C_out,)
        w = self.conv.weight * scale[:, None, None, None]                                # (C_out, C_in, kh, kw)
        b = bn.bias - bn.running_mean * scale                                            # (C_out,)
        return F.relu(F.conv2d(x, w, b, self.conv.stride, self.conv.padding), inplace=True)


def tf_avg_pool(x):
    """3x3 average pool, stride 1, over the valid pixels only (TF semantics at the border)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (35 x 35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a (35 -> 17): stride-2 3x3 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17 x 17): 1x1 | factorised 7x7 | twice factorised 7x7 | pool-1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8 x 8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    pool = "avg" (Mixed_7b, TF valid-pixel average) or "max" (Mixed_7c, as in the TF graph)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInception(nn.Module):
    """Inception-v3 of the FID: (B, 3, 299, 299) in [-1, 1] -> (B, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)        # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)                 # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)      # -> 147, then max pool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)                # -> 71, then max pool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32)          # (B, 256, 35, 35)
        self.Mixed_5c = InceptionA(256, pool_features=64)          # (B, 288, 35, 35)
        self.Mixed_5d = InceptionA(288, pool_features=64)          # (B, 288, 35, 35)
        self.Mixed_6a = InceptionB(288)                            # (B, 768, 17, 17)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)                    # (B, 768, 17, 17)
        self.Mixed_7a = InceptionD(768)                            # (B, 1280, 8, 8)
        self.Mixed_7b = InceptionE(1280, pool="avg")               # (B, 2048, 8, 8)
        self.Mixed_7c = InceptionE(2048, pool="max")               # (B, 2048, 8, 8)
        self.fc = nn.Linear(2048, 1008)                            # ImageNet logits of the TF graph; unused

    def forward(self, x):  # x: (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # (B, 2048): global average pool = pool3


# ----------------------------------------------------------------------------------------------------
# Loading the weights


class InceptionUnavailable(RuntimeError):
    """The FID Inception weights file could not be found, downloaded or read."""


def _how_to_get() -> str:
    return (f"download {CFG.weights_url} and pass --inception PATH or set {CFG.weights_env}=PATH "
            f"(or put it into {os.path.join(torch.hub.get_dir(), 'checkpoints')})")


def load_inception(path: str | None = None, device="cpu") -> nn.Module:
    """The FID Inception with the released weights, in eval mode on `device`.

    Looks in order at `path`, $FID_INCEPTION_WEIGHTS, the torch hub cache, then downloads into that
    cache; a path that is given but missing is an error (no silent download). Raises
    InceptionUnavailable with a one-line message saying how to get the file."""
    path = path or os.environ.get(CFG.weights_env) or None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if path is not None and not os.path.isfile(path):
        raise InceptionUnavailable(f"FID Inception weights '{path}' not found; {_how_to_get()}")
    if path is None and os.path.isfile(cached):
        path = cached
    try:
        if path is None:  # as pytorch-fid: no hash check; the strict key/shape match below checks the file
            state = torch.hub.load_state_dict_from_url(CFG.weights_url, map_location="cpu", progress=True,
                                                       weights_only=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        where = path or CFG.weights_url
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InceptionUnavailable(f"cannot load FID Inception weights from {where} ({reason}); "
                                   f"{_how_to_get()}") from None
    with torch.device("meta"):  # no random init: every tensor comes from the file
        net = FIDInception()
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InceptionUnavailable(f"'{path}' is not the FID Inception weights file "
                                   f"({str(e).splitlines()[0]}); {_how_to_get()}") from None
    return net.to(device).eval().requires_grad_(False)


def weights_fingerprint(net: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the network's state dict: names the feature extractor."""
    h = hashlib.sha256()
    for name, v in net.state_dict().items():
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Features


@contextmanager
def _precision_mode(device: torch.device, precision: str):
    """fp32: no TF32 in CUDA convolutions/matmuls (PyTorch's default allows TF32 in cuDNN convolutions);
    tf32: allow it; bf16: autocast the network to bfloat16 (CPU or CUDA)."""
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be fp32, tf32 or bf16, not '{precision}'")
    if device.type != "cuda":
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
        return
    # the switches jobs.enable_tf32 uses: set_float32_matmul_precision keeps every backend in one state, so
    # torch.get_float32_matmul_precision() and torch.backends.cuda.matmul.allow_tf32 stay readable for all
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _as_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    return images


def _to_inception_input(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 or [-1, 1] (B, C, H, W) -> float32 (B, 3, 299, 299) in [-1, 1], exactly as pytorch-fid."""
    x = x.float() / 255 if x.dtype == torch.uint8 else (x.float() + 1) / 2  # (B, C, H, W) in [0, 1]
    x = x.expand(-1, 3, -1, -1)                                              # greyscale -> RGB
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (2 * x - 1).contiguous(memory_format=torch.channels_last)         # (B, 3, 299, 299)


def inception_features(images, net: nn.Module, batch_size: int = CFG.batch_size, device=None,
                       progress: bool = True, precision: str = CFG.precision) -> np.ndarray:
    """Pool3 features, float64 (N, 2048), of uint8 (N, C, H, W) images or floats in [-1, 1].

    1-channel images are repeated to 3. Batches run on `device` (default: the network's) under
    inference_mode; `precision` "fp32" is the exact default (see _precision_mode). Each image's
    features do not depend on the batch it is in."""
    images = _as_images(images)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net = net.eval().to(memory_format=torch.channels_last)  # in place, same values: faster convolutions
    out = np.empty((len(images), 2048), dtype=np.float64)
    bar = tqdm(total=len(images), unit="img", desc="inception features", disable=not progress, leave=False)
    with torch.inference_mode(), _precision_mode(device, precision):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True)   # uint8 travels: 4x less to copy
            f = net(_to_inception_input(x, CFG.resolution))              # (B, 2048)
            out[i:i + len(x)] = f.float().cpu().numpy()
            bar.update(len(x))
    bar.close()
    return out


def pixel_features(images) -> np.ndarray:
    """Pixel-space features for tiny images (8x8 digits): float64 (N, C*H*W).

    uint8 images are scaled to [-1, 1] (x / 127.5 - 1); float images are taken as already in [-1, 1]."""
    images = _as_images(images)
    x = images.double() / 127.5 - 1 if images.dtype == torch.uint8 else images.double()
    return x.reshape(len(x), -1).cpu().numpy()  # (N, C*H*W)


# ----------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance

_warned_few = False


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, np.cov with ddof 1) of (N, D) features.

    Warns once per process (stderr) when N < D, i.e. fewer than 2048 images for Inception features:
    the covariance is then singular and FID biased (and possibly complex)."""
    global _warned_few
    feats = np.asarray(feats, dtype=np.float64)
    n, d = feats.shape
    if n < d and not _warned_few:
        _warned_few = True
        print(f"fid: warning: only {n} images for {d}-d features (use at least {d}; for Inception FID the standard "
              "is 50,000): the covariance is singular, FID is biased upwards and may be complex", file=sys.stderr)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) from symmetric eigenvalues: with sigma1 = G G^T (pivoted Cholesky, G of
    shape (D, rank)), the nonzero eigenvalues of sigma1 sigma2 are those of the PSD G^T sigma2 G."""
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma1, lower=1)   # P^T sigma1 P = L L^T
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK dpstrf info {info})")
    g = np.zeros((len(sigma1), rank))
    g[piv - 1] = np.tril(c)[:, :rank]                                    # (D, rank), sigma1 = g g^T
    m = g.T @ sigma2 @ g                                                 # (rank, rank)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())  # round-off negatives -> 0


def _trace_sqrt_product_torch(sigma1: np.ndarray, sigma2: np.ndarray, device) -> float:
    """tr((sigma1 sigma2)^(1/2)) in float64 on `device` (a GPU: a second for 2048 dims, where scipy's sqrtm
    takes ~40 CPU-s): with s = sigma1^(1/2) from its eigenvectors, sigma1 sigma2 is similar to the PSD
    s sigma2 s, whose eigenvalues' square roots sum to the trace."""
    a = torch.as_tensor(sigma1, dtype=torch.float64, device=device)
    b = torch.as_tensor(sigma2, dtype=torch.float64, device=device)
    w, v = torch.linalg.eigh((a + a.T) / 2)
    s = (v * w.clamp(min=0).sqrt()) @ v.T                                # sigma1^(1/2), symmetric
    m = s @ b @ s
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())  # round-off negatives -> 0


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = CFG.eps, method: str = CFG.fd_method,
                     device=None) -> float:
    """Fréchet distance of two Gaussians (Dowson & Landau 1982; FID, Heusel et al. 2017, eq. 6):

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    method "sqrtm" (default) is pytorch-fid's: scipy.linalg.sqrtm, eps*I added to both covariances when
    the root is not finite, a complex root accepted (real part kept) only if its diagonal's imaginary
    parts are within 1e-3, else ValueError. method "eigh" takes the trace from symmetric eigenvalues
    (no fallbacks needed; exact also for the singular covariances of fewer images than dimensions): on the
    CPU by LAPACK's pivoted Cholesky when device is None, else with torch on that device."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_sqrt = (_trace_sqrt_product_eigh(sigma1, sigma2) if device is None else
                   _trace_sqrt_product_torch(sigma1, sigma2, device))
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)
    if method != "sqrtm":
        raise ValueError(f"method must be sqrtm or eigh, not '{method}'")
    if len(sigma1) >= 1024:  # a long wait is said before it starts
        print(f"fid: scipy's sqrtm of {len(sigma1)}x{len(sigma1)} matrices takes a minute or more on a CPU "
              "(--fd eigh: seconds)", file=sys.stderr)
    with warnings.catch_warnings():  # singular products are handled below (pytorch-fid: disp=False)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            print(f"fid: sqrtm of sigma1 sigma2 is not finite; adding {eps} to the covariance diagonals",
                  file=sys.stderr)
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=CFG.imag_atol):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in the matrix square root; "
                             f"use more images (at least {CFG.min_images})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------------
# Precision, recall, density and coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020)
#
# The manifold of a set is the union of balls around its points, each with radius = distance to the
# k-th nearest other point of the set (the tie rule: module docstring). With real points X_1..X_N, fake
# points Y_1..Y_M and B(p, r) the ball of radius r around p (Naeem et al. 2020, eqs. 1-4):
#
#   precision = 1/M   sum_j 1[Y_j in some real ball]          recall   = 1/N sum_i 1[X_i in some fake ball]
#   density   = 1/(kM) sum_j #{i : Y_j in B(X_i, r_i)}         coverage = 1/N sum_i 1[some Y_j in B(X_i, r_i)]
#
# Precision and recall are those of Kynkäänniemi et al. (fld's PrecisionRecall); density counts how many
# real balls hold each fake point (expectation 1 when real and fake follow one distribution, Naeem et
# al. Lemma 1), coverage counts the real balls that hold any fake point (its expectation: see
# expected_coverage). Distances are float32 torch.cdist in (chunk x chunk) blocks on the device, as fld.


def _blocks(x: torch.Tensor, chunk: int):
    return torch.split(x, chunk)


def _radii(m: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(M,) distance of each point of m to its k-th nearest other point (k+1-th smallest, self included)."""
    if len(m) < k + 1:
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} images per set, got {len(m)}")
    radii = []
    for a in _blocks(m, chunk):
        best = None                                                      # (A, <= k+1) smallest so far
        for b in _blocks(m, chunk):
            d = torch.cdist(a, b) if best is None else torch.cat([best, torch.cdist(a, b)], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def _ball_counts(real, fake, r_real, r_fake, chunk: int, inclusive: bool):
    """One pass over the (chunk x chunk) blocks of real-fake distances. Returns
    n_balls (M,): how many real balls hold each fake point; recalled (N,): each real point lies in some
    fake ball; covered (N,): each real point's ball holds some fake point."""
    inside = torch.le if inclusive else torch.lt                          # the tie rule
    n_balls = torch.zeros(len(fake), dtype=torch.int64, device=real.device)
    recalled = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    i = 0
    for a, ra in zip(_blocks(real, chunk), _blocks(r_real, chunk)):
        j = 0
        for b, rb in zip(_blocks(fake, chunk), _blocks(r_fake, chunk)):
            d = torch.cdist(a, b)                                        # (A, B)
            in_real_ball = inside(d, ra[:, None])                        # (A, B): fake j in the ball of real i
            n_balls[j:j + len(b)] += in_real_ball.sum(0)
            covered[i:i + len(a)] |= in_real_ball.any(1)
            recalled[i:i + len(a)] |= inside(d, rb[None]).any(1)        # real i in the ball of fake j
            j += len(b)
        i += len(a)
    return n_balls, recalled, covered


def prdc(real_feats, fake_feats, k: int = CFG.k, device=None, chunk: int = CFG.chunk,
         inclusive: bool = False) -> dict:
    """Precision, recall, density and coverage of fake vs real (N, D) features, in any feature space.

    k: neighbours of the radii (the paper: 3); inclusive False: inside = strictly closer than the radius
    (fld, the paper's numbers), True: closer or equal (Kynkäänniemi et al.'s code); see the module docstring.
    Returns {"precision", "recall", "density", "coverage"} as floats (density can exceed 1)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    with torch.inference_mode(), _precision_mode(device, "fp32"):
        r_real, r_fake = _radii(real, k, chunk), _radii(fake, k, chunk)
        n_balls, recalled, covered = _ball_counts(real, fake, r_real, r_fake, chunk, inclusive)
    return {"precision": (n_balls > 0).double().mean().item(), "recall": recalled.double().mean().item(),
            "density": n_balls.sum().item() / (k * len(fake)), "coverage": covered.double().mean().item()}


def precision_recall(real_feats, fake_feats, k: int = CFG.k, device=None,
                     chunk: int = CFG.chunk) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake vs real (N, D) features (see prdc)."""
    m = prdc(real_feats, fake_feats, k, device, chunk)
    return m["precision"], m["recall"]


def expected_coverage(n_real: int, n_fake: int, k: int = CFG.k) -> float:
    """E[coverage] when real and fake are samples of one distribution (Naeem et al. 2020, Lemma 2):

        1 - prod_{i=1..k} (N - i) / (N + M - i)         (N real, M fake points)

    (for N = M = 1,797 and k = 3: 0.875; a ball is empty when its k nearest of the N - 1 + M others are real)."""
    return 1.0 - math.prod((n_real - i) / (n_real + n_fake - i) for i in range(1, k + 1))


# ----------------------------------------------------------------------------------------------------
# The class histogram, all metrics at once, and the noise floor


def class_metrics(pred, real_labels, n_classes: int, min_frac: float = CFG.min_frac) -> dict:
    """How the classes of generated images (pred, e.g. classifier.predict) compare with the real labels.

    class_tv: total variation distance between the two class distributions, 1/2 sum_c |p_c - q_c| (0: the same
    shares, 1: disjoint); class_hist: the count of each class in pred; classes: the number of classes
    produced, i.e. whose count in pred exceeds min_frac times the count its real share predicts
    (len(pred) * q_c); min_frac 0 counts every class with a count above 0."""
    pred, real = np.asarray(pred, dtype=np.int64), np.asarray(real_labels, dtype=np.int64)
    hist = np.bincount(pred, minlength=n_classes)                        # (n_classes,)
    p = hist / len(pred)
    q = np.bincount(real, minlength=n_classes) / len(real)
    if len(hist) != n_classes or len(q) != n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    return {"class_tv": float(0.5 * np.abs(p - q).sum()), "classes": int((hist > min_frac * q * len(pred)).sum()),
            "class_hist": hist.tolist()}


def feature_metrics(real_feats, fake_feats, k: int = CFG.k, device=None, fd_method: str = "eigh",
                    real_stats: tuple | None = None, fd_device=None) -> dict:
    """Fréchet distance and precision, recall, density, coverage of fake vs real (N, D) features.

    fd_method "eigh" by default: exact for the singular covariances of small feature spaces (classifier
    features with units that never fire, 8x8 pixels that are always black); its square root on fd_device
    (None: LAPACK on the CPU). The distance is to real_stats (mu, sigma) when given (e.g. of a larger real
    set than the k-NN metrics use), else to real_feats' own. FD is "fd" in the dict."""
    fd = frechet_distance(*feature_stats(fake_feats), *(real_stats or feature_stats(real_feats)), method=fd_method,
                          device=fd_device)
    return {"fd": fd, **prdc(real_feats, fake_feats, k, device)}  # (prdc computes in float32, as fld)


def noise_floor(real_feats, n_fake: int | None = None, n_ref: int | None = None, splits: int = CFG.floor_splits,
                seed: int = 0, labels=None, n_classes: int | None = None, k: int = CFG.k, device=None,
                fd_method: str = "eigh", fd_device=None) -> dict:
    """What two independent real sets of n_fake and n_ref points score against each other: the level a
    perfect generator reaches with those sizes, as {metric: [mean, standard deviation]}.

    Measured over `splits` random pairs of disjoint halves of real_feats (N // 2 points each, at most
    floor_max_half; numpy PCG64 from seed). FD's sampling bias shrinks as 1/N in either set: for two sets of one distribution E[FD] ~ b (1/n1 +
    1/n2) (the squared mean difference exactly, the covariance term to first order), so each split's FD x half / 2
    estimates b, and the level and spread at (n_fake, n_ref) are b's mean and sd times (1/n_fake + 1/n_ref).
    Precision, recall, density and coverage are given at the halves' size (in the digits' feature spaces they
    do not move with N). class_tv (with labels): a perfect generator's, n_fake labels drawn from the real labels'
    shares, against those shares. n_fake and n_ref default to the halves' size; fd_device as feature_metrics'."""
    feats = np.asarray(real_feats, dtype=np.float64)
    half = min(len(feats) // 2, CFG.floor_max_half)
    n_fake, n_ref = n_fake or half, n_ref or half
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(splits):
        perm = rng.permutation(len(feats))
        r = feature_metrics(feats[perm[:half]], feats[perm[half:2 * half]], k, device, fd_method, fd_device=fd_device)
        runs.append({**r, "fd": r["fd"] * half / 2 * (1 / n_fake + 1 / n_ref)})
    out = {key: [float(np.mean(v)), float(np.std(v, ddof=1))] for key in runs[0] for v in [[r[key] for r in runs]]}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        q = np.bincount(labels, minlength=n_classes or 0) / len(labels)
        tv = [0.5 * np.abs(rng.multinomial(n_fake, q) / n_fake - q).sum() for _ in range(splits)]
        out["class_tv"] = [float(np.mean(tv)), float(np.std(tv, ddof=1))]
    return {**out, "n_fake": n_fake, "n_ref": n_ref, "n_half": half, "splits": splits, "seed": seed}


def nearest_distances(queries, points, device=None, chunk: int = CFG.chunk) -> np.ndarray:
    """(M,) Euclidean distance of each query (M, D) to its nearest point of `points` (N, D), in float32."""
    q, p = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in (queries, points))
    best = [torch.stack([torch.cdist(a, b).min(1).values for b in _blocks(p, chunk)]).min(0).values  # (A,)
            for a in _blocks(q, chunk)]
    return torch.cat(best).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# Reference statistics, cached with what they were computed from


class ReferenceMismatch(ValueError):
    """A cached reference file was computed from other images or with another feature extractor."""


def images_sha256(images) -> str:
    """sha256 of a uint8 (N, C, H, W) image tensor: its shape and its bytes in NCHW order."""
    x = _as_images(images).cpu().contiguous()
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


def _extractor(net) -> dict:
    if net is None:
        return {"kind": "pixel", "extractor": "pixels uint8/127.5-1"}
    return {"kind": "inception", "extractor": f"{PROTOCOL}; weights sha256 {weights_fingerprint(net)}"}


def load_reference(path: str, expect: dict | None = None) -> dict:
    """Read a reference .npz; ReferenceMismatch if any provenance field differs from `expect`."""
    with np.load(path, allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    for k in ("name", "split", "count", "sha256", "kind", "extractor"):
        ref[k] = ref[k].item()
    for k, want in (expect or {}).items():
        if ref.get(k) != want:
            raise ReferenceMismatch(f"reference '{path}' was computed with {k} = {ref.get(k)!r}, not {want!r}; "
                                    "delete it or choose another file to recompute it")
    return ref


def reference(images, name: str, path: str | None, net: nn.Module | None = None, device=None,
              split: str = "train", batch_size: int = CFG.batch_size, progress: bool = True) -> dict:
    """Reference statistics of `images` (uint8 (N, C, H, W)): dict with mu, sigma, features and provenance.

    Inception features with `net`, pixel features when net is None. If `path` exists its provenance
    (name, split, count, sha256 of the images, feature extractor) must match, else ReferenceMismatch;
    if it does not exist the statistics are computed and written there atomically; path None: no cache."""
    images = _as_images(images)
    expect = {"name": name, "split": split, "count": len(images), "sha256": images_sha256(images), **_extractor(net)}
    if path is not None and os.path.exists(path):
        return load_reference(path, expect)
    feats = pixel_features(images) if net is None else inception_features(images, net, batch_size, device, progress)
    mu, sigma = feature_stats(feats)
    ref = {"mu": mu, "sigma": sigma, "features": feats.astype(np.float32), **expect}
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:  # a file object: np.savez then keeps the name as it is
                np.savez(f, **ref)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return ref


# ----------------------------------------------------------------------------------------------------
# Command line


def _features_of(images, net, args) -> np.ndarray:
    return pixel_features(images) if net is None else inception_features(images, net, args.batch, args.device)


def _cmd_ref(args, net) -> dict:
    from data import load_images

    images = load_images(args.data, root=args.root, n=args.n)
    split = args.split or ("train" if args.data == "cifar10" else "all")
    cached = os.path.exists(args.out)  # reused if it was computed from the same images, else refused
    ref = reference(images, args.data, args.out, net, args.device, split, args.batch)
    return {"out": args.out, "cached": cached, "name": ref["name"], "split": ref["split"], "n": ref["count"],
            "kind": ref["kind"], "sha256": ref["sha256"]}


def _cmd_calc(args, net) -> dict:
    from data import load_images

    if len(args.images) > 2 or (len(args.images) == 2 and (args.data or args.ref)):
        raise ValueError("calc takes IMAGES and a reference: a second image set (as pytorch-fid), or --ref / --data")
    if len(args.images) == 2:  # pytorch-fid's form: calc A B, B the reference
        args.data = args.images[1]
    if args.ref is None and args.data is None:
        raise ValueError("calc needs a reference: a second image set, --ref REF.npz and/or --data SPEC")
    if args.data is not None:  # (re)computes the reference, cached in --ref when given, checked against it
        real = load_images(args.data, root=args.root, n=args.n_ref)
        split = args.split or ("train" if args.data == "cifar10" else "all")
        ref = reference(real, args.data, args.ref, net, args.device, split, args.batch)
    else:  # only the feature extractor can be checked
        ref = load_reference(args.ref, _extractor(net))
    fake = load_images(args.images[0], root=args.root, n=args.n)
    feats = _features_of(fake, net, args)
    mu, sigma = feature_stats(feats)
    fid = frechet_distance(mu, sigma, ref["mu"], ref["sigma"], method=args.fd)
    precision, recall = precision_recall(ref["features"], feats, args.k, args.device)
    return {"fid": fid, "precision": precision, "recall": recall, "n": len(fake), "n_ref": int(ref["count"]),
            "ref": ref["name"], "split": ref["split"], "k": args.k, "fd": args.fd, "features": ref["extractor"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="FID, precision and recall (pytorch-fid Inception path).")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--inception", default=None,
                        help=f"weights file (else ${CFG.weights_env}, the torch hub cache, the download)")
    common.add_argument("--pixel", action="store_true", help="pixel-space features instead of Inception (tiny images)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--batch", type=int, default=CFG.batch_size, help="images per Inception batch")
    common.add_argument("--root", default="data", help="download folder of named datasets")
    common.add_argument("--split", default=None,
                        help="split recorded in the reference (default: train for cifar10, else all)")
    r = sub.add_parser("ref", parents=[common], help="write reference statistics and features of --data")
    r.add_argument("--data", required=True, help="cifar10 | digits | mnist | fashion-mnist | folder | .zip | .npz/.npy")
    r.add_argument("--out", required=True, help="output .npz")
    r.add_argument("--n", type=int, default=None, help="use the first n images")
    c = sub.add_parser("calc", parents=[common], help="FID, precision, recall of IMAGES vs a reference")
    c.add_argument("images", nargs="+", metavar="IMAGES", help="generated images (folder | .zip | .npz/.npy), and "
                   "optionally the reference set after them, as pytorch-fid takes two sets")
    c.add_argument("--ref", default=None, help="reference .npz (written by 'ref', or cached here with --data)")
    c.add_argument("--data", default=None, help="reference dataset (checked against --ref when both are given)")
    c.add_argument("--n", type=int, default=None, help="use the first n generated images")
    c.add_argument("--n-ref", type=int, default=None, help="use the first n reference images")
    c.add_argument("--k", type=int, default=CFG.k, help="neighbours of the precision/recall radius")
    c.add_argument("--fd", choices=("sqrtm", "eigh"), default=CFG.fd_method, help="matrix square root method")
    args = p.parse_args(argv)
    try:
        net = None if args.pixel else load_inception(args.inception, args.device)
        t0 = time.perf_counter()
        out = _cmd_ref(args, net) if args.cmd == "ref" else _cmd_calc(args, net)
        out["seconds"] = round(time.perf_counter() - t0, 2)
    except (InceptionUnavailable, ValueError, OSError) as e:  # DataError, ReferenceMismatch are ValueErrors
        print(f"fid.py: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
