"""edm.py -- EDM (Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022) in one file, as the strongest model of the retraining study (Bertrand et al., "On the
Stability of Iterative Retraining of Generative Models on their Own Data", ICLR 2024).

What is here, top to bottom:
  - Config / PRESETS / make_config / OFFICIAL_URLS: hyperparameters ("paper" = CIFAR-10 as released by NVIDIA,
    "ffhq64" = FFHQ 64x64 as released, "small" = 8x8 digits on a CPU).
  - The DDPM++ U-Net ("SongUNet") with the module names of NVIDIA's release, so that its state dicts load strictly.
  - The VP and EDM preconditioners of Table 1 (D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)), the EDM and VP
    training losses, the Heun sampler (Algorithms 1 and 2) in float64 with one random generator per image, and
    DPM-Solver++(2M) on the same noise levels at one network call per level.
  - Device plumbing (speed profile, NHWC weights, torch.compile's eager fallback, Adam state), word for word as
    in ddpm.py and otcfm.py; Model: the training / sampling object that retrain.py drives.
  - load_official: NVIDIA's released .pkl networks read with a restricted unpickler that runs no code from the
    file; the preconditioning is taken from the class name stored in the file, never from the file name.

Commands:
    python retrain.py --model edm --preset small --lam 1 --iters 20        # 8x8 digits, CPU, ~10 minutes
    python retrain.py --model edm --preset paper --init official ...       # fine-tune NVIDIA's CIFAR-10 network
    python edm.py edm-cifar10-32x32-uncond-vp.pkl                           # what a released .pkl holds (runs no code)
    pytest tests/test_edm.py
"""

import argparse
import collections
import contextlib
import dataclasses
import io
import math
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    # ---- data (retrain.py sets img_channels / img_resolution from the dataset)
    img_channels: int = 3                 # image channels; CIFAR-10: 3
    img_resolution: int = 32              # pixels per side; CIFAR-10: 32
    xflip: bool = False                   # retrain.py flips training images at random; EDM's dataset --xflip is off
    # ---- network: DDPM++ U-Net as built by EDM's train.py --arch=ddpmpp
    model_channels: int = 128             # channels of the first level
    channel_mult: tuple = (2, 2, 2)       # channels per level = 128 * mult; CIFAR-10: 32, 16, 8 px, 256 channels each
    channel_mult_emb: int = 4             # embedding width = 4 * 128 = 512
    channel_mult_noise: int = 1           # noise-level embedding width = 1 * 128
    num_blocks: int = 4                   # residual blocks per level (decoder: num_blocks + 1)
    attn_resolutions: tuple = (16,)       # resolutions (px) whose blocks carry self-attention
    augment_dim: int = 9                  # augment-label inputs: the released nets were trained with EDM's augment
    #                                       pipe (p = 0.12, 9 labels). Training here feeds zero labels (no augment
    #                                       pipe): the same output as none, since map_augment has no bias, and
    #                                       map_augment still gets a (zero) gradient, which DDP needs at every step;
    #                                       sampling passes none, as in EDM. 0 = no map_augment layer.
    dropout: float = 0.13                 # dropout probability before each block's second conv; EDM CIFAR-10 default
    precond: str = "edm"                  # "edm": EDM preconditioning + EDM loss; "vp": VP + VP loss (Table 1)
    sigma_data: float = 0.5               # data standard deviation in EDM's c_skip/c_out/c_in and loss weight (Table 1)
    P_mean: float = -1.2                  # EDM loss: ln(sigma) ~ N(P_mean, P_std^2) (Table 1, "noise distribution")
    P_std: float = 1.2                    # EDM loss, see P_mean
    # ---- optimisation (EDM train.py defaults for CIFAR-10)
    batch: int = 512                      # images per optimizer step (all ranks together); EDM CIFAR-10 default
    batch_gpu: int = 0                    # images per forward/backward pass on one process; 0: its whole share of
    #                                       batch. Smaller values accumulate gradients over micro-batches: the same
    #                                       update in less memory [EDM: --batch-gpu]
    lr: float = 1e-3                      # Adam learning rate after the ramp-up; EDM CIFAR-10 default
    lr_rampup_kimg: float = 10000.0       # lr = lr * min(images seen / ramp, 1) (EDM: 10 Mimg). "images seen" is
    #                                       carried over in the state dict and set past the ramp by load_pretrained,
    #                                       so fine-tuning never restarts it (EDM's --transfer restarts it each time)
    adam_betas: tuple = (0.9, 0.999)      # Adam betas; EDM default
    adam_eps: float = 1e-8                # Adam epsilon; EDM default
    grad_clip: float = 0.0                # max global gradient norm, 0 = off (EDM: no clipping, only nan_to_num)
    ema_halflife_kimg: float = 500.0      # EMA half-life in thousands of images, used for pretraining AND fine-tuning
    #                                       (EDM --ema=0.5 Mimg, kept under --transfer in the paper's fine-tuning:
    #                                       at kimg=50 the EMA moves only 1 - 0.5**(50/500) = 7% per iteration)
    ema_rampup_ratio: float = 0.05        # half-life capped at ratio * images seen (EDM default); 0 = off. After
    #                                       load_pretrained the cap is far above the half-life, i.e. inactive
    pretrain_kimg: float = 200000.0       # thousands of images from scratch: EDM --duration=200 Mimg (2 days on 8
    #                                       V100s); use retrain.py --init official instead
    kimg: float = 50.0                    # thousands of images per retraining iteration (paper code: --num_mimg 0.05)
    # ---- sampling: Heun, Algorithm 1 (Algorithm 2 when S_churn > 0); EDM generate.py defaults
    sampler: str = "heun"                 # "heun" (2N - 1 network evaluations) | "dpm2m" (N; Lu et al. 2022, no churn)
    num_steps: int = 18                   # noise levels N: 2N - 1 = 35 network evaluations per image (CIFAR-10)
    sigma_min: float = 0.002              # smallest noise level of the grid (Eq. 5)
    sigma_max: float = 80.0               # largest noise level of the grid (Eq. 5)
    rho: float = 7.0                      # grid warping exponent (Eq. 5)
    S_churn: float = 0.0                  # stochasticity (Algorithm 2); 0 = deterministic
    S_min: float = 0.0                    # churn only for S_min <= sigma <= S_max
    S_max: float = float("inf")           # see S_min
    S_noise: float = 1.0                  # std of the added noise relative to the churn (Algorithm 2)
    sample_batch: int = 1000              # images per generate() call; a speed setting only
    sample_ema: bool = True               # sample from the EMA weights (EDM samples its EMA network)
    # ---- engineering: speed only, resolved against the device once by Model (Model.profile)
    amp: str = "auto"                     # autocast dtype of the network: "auto" (bf16 on CUDA, fp32 elsewhere) |
    #                                       "bf16" | "fp32"; the preconditioning and the sampler stay float32/64
    channels_last: str = "auto"           # NHWC weights and activations: "auto" (on CUDA) | "true" | "false"
    fused_adam: str = "auto"              # one fused kernel for all of Adam: "auto" (on CUDA) | "true" | "false"
    compile: bool = False                 # torch.compile the network (eager, with a warning, if compiling fails)


PRESETS = {
    # CIFAR-10 32x32 unconditional DDPM++ exactly as released (edm-cifar10-32x32-uncond-vp.pkl): 55,733,891 params.
    "paper": {},
    # FFHQ 64x64 unconditional (edm-ffhq-64x64-uncond-vp.pkl, EDM README recipe): 61,805,571 params, 40 steps = 79 NFE.
    "ffhq64": dict(img_resolution=64, channel_mult=(1, 2, 2, 2), dropout=0.05, lr=2e-4, batch=256, num_steps=40,
                   sample_batch=500),
    # 8x8 digits on a 2-core CPU in float32: 16 channels at 8x8, 32 at 4x4 (188,769 params, 9.4 MFLOP per image
    # forward). A trial judged by the classifier-space FD of 1,797 EMA samples against the 1,797 digits (one seed,
    # retrain.py's default metrics there): after 2k / 3k / 4k steps 2.47 / 1.12 / 1.82, where the 32-channel network
    # of before gave 2.11 / 1.37 / 0.86 and 1.23 after 6k (the short EMA makes single checkpoints noisy); Heun with
    # 12 steps gave 1.77 after 4k (18 steps: 1.82, 9 steps: 1.99), its pixel-space FD 0.135 (18 steps: 0.110).
    # This preset after 5k steps: 0.97 / 1.54 / 1.48 for seeds 0 / 1 / 2 (README's digits results).
    "small": dict(img_channels=1, img_resolution=8, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                  attn_resolutions=(4,), augment_dim=0, dropout=0.0, batch=128, lr=2e-3,
                  lr_rampup_kimg=12.8,        # 100 steps of ramp, once (images seen carry over)
                  ema_halflife_kimg=10.0,     # ~80 steps: follows each 100-step fine-tune (0.5**1.28 = 41% left)
                  pretrain_kimg=640.0,        # 5,000 steps, see above
                  kimg=12.8,                  # 100 steps per retraining iteration
                  num_steps=12,               # 23 NFE, see above
                  sample_batch=512),          # 1.5x faster than all 1,797 in one call on one CPU thread
    # 32x32 greyscale (MNIST, Fashion-MNIST padded) on a 2-core CPU: the network shape of ddpm.py's "mnist" (16, 32,
    # 64 channels at 32, 16, 8 pixels; attention at 8x8), its batch, schedule and budgets; not trialled on its own.
    "mnist": dict(img_channels=1, img_resolution=32, model_channels=16, channel_mult=(1, 2, 4), num_blocks=1,
                  attn_resolutions=(8,), augment_dim=0, dropout=0.0, batch=64, lr=2e-3,
                  lr_rampup_kimg=6.4,         # 100 steps of ramp, once
                  ema_halflife_kimg=6.4,      # ~100 steps: follows each 100-step fine-tune
                  pretrain_kimg=320.0, kimg=6.4, num_steps=12, sample_batch=250),
}

# Public addresses of NVIDIA's released networks (EDM README, "Pre-trained models"), by dataset name.
OFFICIAL_URLS = {
    "cifar10": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
    "ffhq64": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-ffhq-64x64-uncond-vp.pkl",
}


def _coerce(value, default):
    """Turn a command-line string (or list) into the type of a Config default."""
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        return tuple(type(default[0])(v) if default else v for v in value)
    if isinstance(value, str) and not isinstance(default, str):
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"not a boolean: {value!r}")
            return value.lower() in ("1", "true", "yes")
        return type(default)(float(value)) if isinstance(default, int) else type(default)(value)
    return value


RANGES = {**dict.fromkeys(("model_channels", "channel_mult_emb", "channel_mult_noise", "num_blocks", "sigma_data",
                             "batch", "lr", "adam_eps", "pretrain_kimg", "kimg", "sigma_min", "sigma_max", "rho",
                             "sample_batch"), "> 0"),
          **dict.fromkeys(("batch_gpu", "augment_dim", "lr_rampup_kimg", "grad_clip", "ema_halflife_kimg",
                           "ema_rampup_ratio"), ">= 0"),
          "dropout": "in [0, 1)"}  # what make_config accepts of each number


def _check_ranges(cfg) -> None:
    """Every number of RANGES within its range: a ValueError naming the field otherwise."""
    rules = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1,
             "in [0, 1]": lambda v: 0 <= v <= 1}
    for name, rule in RANGES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and rules[rule](value)):
            raise ValueError(f"{name} {value!r}: must be {rule}")


def make_config(preset: str = "paper", **overrides) -> Config:
    """Config of a preset with field overrides; an unknown preset or field raises ValueError naming it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown edm preset '{preset}' (choose from {', '.join(PRESETS)})")
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    values = {**PRESETS[preset], **overrides}
    for name in values:
        if name not in fields:
            raise ValueError(f"unknown edm Config field '{name}'")
    cfg = Config(**{k: _coerce(v, fields[k]) for k, v in values.items()})
    _check_ranges(cfg)
    if cfg.precond not in ("edm", "vp"):
        raise ValueError(f"precond must be 'edm' or 'vp', not '{cfg.precond}'")
    for name in ("channels_last", "fused_adam"):  # Python bools are accepted too
        if isinstance(getattr(cfg, name), bool):
            setattr(cfg, name, "true" if getattr(cfg, name) else "false")
    for name, allowed in (("amp", ("auto", "bf16", "fp32")), ("channels_last", ("auto", "true", "false")),
                          ("fused_adam", ("auto", "true", "false"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    if cfg.num_steps < 2:
        raise ValueError("num_steps must be at least 2")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {cfg.sampler!r}")
    if cfg.sampler == "dpm2m" and cfg.S_churn > 0:
        raise ValueError("S_churn > 0 needs sampler 'heun' (Algorithm 2); DPM-Solver++(2M) is deterministic")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Network: the DDPM++ U-Net (Song et al. 2021, as configured by EDM). Class and attribute names follow NVIDIA's
# release so that state-dict keys match: model.map_layer0.weight, model.enc.32x32_block0.conv0.weight, ...


class Linear(nn.Module):
    """Fully connected layer; xavier-uniform weights times init_weight, zero bias."""

    def __init__(self, in_features, out_features, bias=True, init_weight=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # (out, in)
        nn.init.xavier_uniform_(self.weight.data).mul_(init_weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """Same-padded conv, optionally preceded by up- or down-sampling with a separable FIR filter ([1,1]: box)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 init_weight=1.0):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        if kernel:
            nn.init.xavier_uniform_(self.weight.data).mul_(init_weight)  # fan = channels * kernel^2
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2  # (1, 1, k, k), sums to 1; [1,1] -> all 0.25
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H', W')
        if self.up or self.down:
            C, f = x.shape[1], self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.up:  # [1,1]: nearest-neighbour x2
                x = F.conv_transpose2d(x, (4 * f).tile(C, 1, 1, 1), stride=2, padding=pad, groups=C)
            if self.down:  # [1,1]: 2x2 average pooling
                x = F.conv2d(x, f.tile(C, 1, 1, 1), stride=2, padding=pad, groups=C)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C // 4) groups, computed in float32 also under autocast."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the noise label, ordered [sin, cos] as DDPM++ uses it."""

    def __init__(self, num_channels, max_positions=10000, endpoint=True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, c):  # (B,) -> (B, num_channels)
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=c.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs  # f_i = 10000^(-i / (half - 1))
        arg = c.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class UNetBlock(nn.Module):
    """DDPM++ residual block: norm-silu-conv, + affine(emb), norm-silu-dropout-conv, skip, optional attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, dropout=0.0,
                 resample_filter=(1, 1), eps=1e-6, skip_scale=math.sqrt(0.5)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 1 if attention else 0
        self.dropout, self.skip_scale = dropout, skip_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if attention:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)

    def forward(self, x, emb):  # x (B, Cin, H, W), emb (B or 1, E) -> (B, Cout, H', W')
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))  # additive conditioning
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            h = (self.proj(self.attention(self.norm2(h))) + h) * self.skip_scale
        return h

    def attention(self, h):  # (B, C, H, W) -> (B, C, H, W), self-attention over the H*W positions
        B, C, H, W = h.shape
        q, k, v = self.qkv(h).reshape(B * self.num_heads, C // self.num_heads, 3, H * W).unbind(2)  # (B*heads, Ch, HW)
        with torch.autocast(h.device.type, enabled=False):  # logits and softmax in float32
            w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(q.shape[1])).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", w.to(v.dtype), v)  # (B*heads, Ch, HW)
        return a.reshape(B, C, H, W)


class SongUNet(nn.Module):
    """DDPM++ U-Net (positional noise embedding, standard encoder and decoder) F(x; c_noise) of EDM."""

    def __init__(self, img_resolution, in_channels, out_channels, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.1,
                 channel_mult_noise=1, resample_filter=(1, 1)):
        super().__init__()
        self.arch = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                         augment_dim=augment_dim, model_channels=model_channels, channel_mult=tuple(channel_mult),
                         channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                         attn_resolutions=tuple(attn_resolutions), dropout=dropout,
                         channel_mult_noise=channel_mult_noise)  # constructor arguments, for comparisons
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        blk = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)
        # mapping network: noise label (+ augment labels) -> embedding
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        # encoder: every output is kept for the decoder's skip connections
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [block.out_channels for block in self.enc.values()]
        # decoder: two middle blocks, then num_blocks + 1 blocks per level, each fed [x, skip]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
        res = img_resolution
        self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, init_weight=1e-5)

    def forward(self, x, noise_labels, augment_labels=None):  # x (B, C, H, W), noise_labels (B or 1,) -> (B, C, H, W)
        emb = self.map_noise(noise_labels)  # (B, noise_channels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))  # (B, emb_channels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                x = block(x)
            elif name.endswith("aux_conv"):
                x = block(F.silu(x))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return x


# ----------------------------------------------------------------------------------------------------
# Preconditioning (Karras et al. 2022, Table 1): D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise)

VP_BETA_D, VP_BETA_MIN, VP_M, VP_EPSILON_T = 19.9, 0.1, 1000, 1e-5  # VP constants (Table 1; Song et al. 2021)


def vp_sigma(t, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN):
    """VP noise schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (Table 1, "schedule")."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN):
    """Inverse of vp_sigma: t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


class Precond(nn.Module):
    """Wraps the U-Net F as the denoiser D(x, sigma); subclasses give the coefficients of Table 1."""

    sigma_min, sigma_max = 0.0, float("inf")  # noise levels the denoiser supports

    def __init__(self, model: SongUNet):
        super().__init__()
        self.model = model
        self.use_bf16 = False  # bf16 autocast inside the U-Net (set by Model from its resolved amp)
        self.channels_last = False  # NHWC input, to match NHWC weights (set by Model from its resolved profile)

    def forward(self, x, sigma, augment_labels=None):  # x (B, C, H, W), sigma scalar / (B,) / (B,1,1,1) -> (B, C, H, W)
        x = x.to(torch.float32)
        if self.channels_last:  # the same values, laid out NHWC in memory
            x = x.contiguous(memory_format=torch.channels_last)
        # a tensor sigma already on the device (the sampler's, the losses') is only cast, never copied from the host
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            F_x = self.model(c_in * x, c_noise.flatten(), augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)


class VPPrecond(Precond):
    """VP preconditioning (Table 1, "VP" column)."""

    def __init__(self, model, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN, M=VP_M, epsilon_t=VP_EPSILON_T):
        super().__init__(model)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        # range of the schedule, computed in float32: 0.0009765625 and 152.16698
        self.sigma_min = float(vp_sigma(torch.tensor(epsilon_t, dtype=torch.float32), beta_d, beta_min))
        self.sigma_max = float(vp_sigma(torch.tensor(1.0, dtype=torch.float32), beta_d, beta_min))

    def coefficients(self, sigma):  # (B,1,1,1) -> c_skip, c_out, c_in, c_noise
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise


class EDMPrecond(Precond):
    """EDM preconditioning (Table 1, "EDM (ours)" column)."""

    def __init__(self, model, sigma_data=0.5, sigma_min=0.0, sigma_max=float("inf")):
        super().__init__(model)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def coefficients(self, sigma):  # (B,1,1,1) -> c_skip, c_out, c_in, c_noise
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond}


def build_denoiser(cfg: Config) -> Precond:
    """The preconditioned DDPM++ denoiser D(x, sigma) that cfg describes (random initialisation)."""
    unet = SongUNet(img_resolution=cfg.img_resolution, in_channels=cfg.img_channels, out_channels=cfg.img_channels,
                    augment_dim=cfg.augment_dim, model_channels=cfg.model_channels,
                    channel_mult=tuple(cfg.channel_mult), channel_mult_emb=cfg.channel_mult_emb,
                    num_blocks=cfg.num_blocks, attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout,
                    channel_mult_noise=cfg.channel_mult_noise)
    return EDMPrecond(unet, sigma_data=cfg.sigma_data) if cfg.precond == "edm" else VPPrecond(unet)


# ----------------------------------------------------------------------------------------------------
# Training loss: lambda(sigma) * ||D(y + n; sigma) - y||^2, n ~ N(0, sigma^2 I) (Eq. 2 and Table 1)


def loss_draws(y, precond):
    """The random numbers of one loss on y (B, C, H, W), per image: r (B, 1, 1, 1), standard normal for "edm" (ln
    sigma) or uniform on [0, 1) for "vp" (t), and e ~ N(0, I) like y (the noise before scaling by sigma)."""
    r = (torch.randn if precond == "edm" else torch.rand)(y.shape[0], 1, 1, 1, device=y.device)
    return r, torch.randn_like(y)


def edm_loss(D, y, cfg, draws=None):
    """EDM loss: ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2; per element.
    draws: loss_draws(y, "edm"), drawn here when None."""
    r, e = loss_draws(y, "edm") if draws is None else draws
    sigma = (r * cfg.P_std + cfg.P_mean).exp()  # (B, 1, 1, 1)
    weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2
    n = e * sigma
    return weight * (D(y + n, sigma) - y) ** 2  # (B, C, H, W)


def vp_loss(D, y, cfg, draws=None):
    """VP loss: sigma = sigma_VP(t), t ~ U(epsilon_t, 1), lambda = 1 / sigma^2; per element. draws:
    loss_draws(y, "vp"), drawn here when None."""
    r, e = loss_draws(y, "vp") if draws is None else draws
    t = 1 + r * (VP_EPSILON_T - 1)  # (B, 1, 1, 1)
    sigma = vp_sigma(t)
    weight = 1 / sigma ** 2
    n = e * sigma
    return weight * (D(y + n, sigma) - y) ** 2  # (B, C, H, W)


LOSSES = {"edm": edm_loss, "vp": vp_loss}


# ----------------------------------------------------------------------------------------------------
# Samplers: Eq. 5's noise levels, Heun (Algorithms 1 and 2), DPM-Solver++(2M); each returns (x, NFE), float64


def time_steps(num_steps, sigma_min, sigma_max, rho):
    """Noise levels of Eq. 5, t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then t_N = 0.
    Computed on the CPU whatever the default device, so that the grid has the same bits on every machine."""
    i = torch.arange(num_steps, dtype=torch.float64, device="cpu")
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device="cpu")])  # (N + 1,) float64


def noise_levels(D, cfg, device) -> torch.Tensor:
    """The samplers' grid (N + 1,) float64 on the device: Eq. 5 between the Config's sigma_min and sigma_max, kept
    within the range the denoiser supports (VP preconditioning has its own), then 0."""
    sigma_min = max(cfg.sigma_min, getattr(D, "sigma_min", 0.0))
    sigma_max = min(cfg.sigma_max, getattr(D, "sigma_max", float("inf")))
    return time_steps(cfg.num_steps, sigma_min, sigma_max, cfg.rho).to(device)


NOISE_BLOCK = 50  # S_churn > 0: each image's noise is drawn for up to this many steps at once (one kernel per image)


def heun_sampler(D, latents, cfg, generators=None):
    """EDM Heun sampler, Algorithm 2 of Karras et al. 2022 (Algorithm 1 when S_churn = 0); returns (x, nfe).

    Runs in float64. The noise levels live on the device from the start and D gets them as 0-dim device tensors:
    no host-to-device copy per network call, and torch.compile does not specialise on their values. With
    generators (one per image), the churn noise of image n comes from generators[n] alone."""
    t = noise_levels(D, cfg, latents.device)  # (N + 1,) float64: t_0 .. t_N
    # churn (Algorithm 2): t_hat_i = (1 + gamma_i) t_i, gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= t_i <= S_max
    in_range = ((t >= cfg.S_min) & (t <= cfg.S_max)).to(torch.float64)
    gamma = in_range * min(cfg.S_churn / cfg.num_steps, math.sqrt(2) - 1)  # (N + 1,), all 0 when S_churn = 0
    t_hat = t * (1 + gamma)  # (N + 1,)
    step = t[1:] - t_hat[:-1]  # (N,) t_{i+1} - t_hat_i
    churn = (t_hat ** 2 - t ** 2).sqrt() * cfg.S_noise  # (N + 1,) std of the noise that raises t_i to t_hat_i
    x_next, nfe = latents.to(torch.float64) * t[0], 0  # (B, C, H, W) float64

    def denoise(x, sigma):  # sigma: a 0-dim float64 tensor on the device
        return D(x, sigma).to(torch.float64)

    def noise_block(i):  # (B, k, C, H, W): every image's churn noise for steps i .. i + k - 1, one draw per image
        k, shape = min(NOISE_BLOCK, cfg.num_steps - i), x_next.shape[1:]
        if generators is None:
            return torch.randn((x_next.shape[0], k, *shape), dtype=torch.float64, device=x_next.device)
        return torch.stack([torch.randn((k, *shape), generator=g, dtype=torch.float64, device=x_next.device)
                            for g in generators])

    for i in range(cfg.num_steps):
        x_cur = x_next
        x_hat = x_cur
        if cfg.S_churn > 0:  # noise for every step, also where gamma_i = 0, so each seed's stream stays aligned
            if i % NOISE_BLOCK == 0:
                eps = noise_block(i)
            x_hat = x_cur + churn[i] * eps[:, i % NOISE_BLOCK]  # x_hat = x_i + sqrt(t_hat^2 - t_i^2) S_noise eps
        d_cur = (x_hat - denoise(x_hat, t_hat[i])) / t_hat[i]  # Euler step
        x_next = x_hat + step[i] * d_cur
        nfe += 1
        if i < cfg.num_steps - 1:  # 2nd-order correction, except for the step to sigma = 0
            d_prime = (x_next - denoise(x_next, t[i + 1])) / t[i + 1]
            x_next = x_hat + step[i] * (0.5 * d_cur + 0.5 * d_prime)
            nfe += 1
    return x_next, nfe


def dpm2m_sampler(D, latents, cfg, generators=None):
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022, on Eq. 5's noise levels; returns (x, nfe).

    Algorithm 1's ODE, dx/dsigma = (x - D(x; sigma)) / sigma, solved exactly in lambda = -log(sigma) for a denoised
    image held fixed over a step, that image extrapolated linearly in lambda from the previous level's D: second
    order at one network call per level (N in all, against Heun's 2N - 1). The first step is first order, and so
    is the last, to sigma = 0, which lands on D itself, as Heun's last (Euler) step does. Float64; deterministic
    (generators are unused)."""
    t = noise_levels(D, cfg, latents.device)  # (N + 1,) float64: t_0 .. t_N
    x = latents.to(torch.float64) * t[0]  # (B, C, H, W) float64
    D_last, h_last = None, None
    for i in range(cfg.num_steps):
        D_i = D(x, t[i]).to(torch.float64)  # (B, C, H, W)
        if i == cfg.num_steps - 1:  # t_N = 0
            return D_i, cfg.num_steps
        h = torch.log(t[i] / t[i + 1])  # lambda_{i+1} - lambda_i > 0
        ratio = t[i + 1] / t[i]  # sigma_{i+1} / sigma_i = e^-h
        # D at the step's midpoint in lambda, D_i + (h_i / 2 h_{i-1}) (D_i - D_{i-1}); plain D_i on the first step
        d = D_i if D_last is None else D_i + (h / (2 * h_last)) * (D_i - D_last)
        x = ratio * x + (1 - ratio) * d  # x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) d
        D_last, h_last = D_i, h


SAMPLERS = {"heun": heun_sampler, "dpm2m": dpm2m_sampler}  # each (D, latents, cfg, generators) -> (x, nfe)


# ----------------------------------------------------------------------------------------------------
# Device plumbing: the same helpers, word for word, in ddpm.py, edm.py and otcfm.py


def _resolve(value, on_cuda: bool) -> bool:
    """A channels_last / fused_adam setting ("auto" | "true" | "false", or a bool) -> on or off; "auto" is on
    for CUDA only."""
    return on_cuda if value == "auto" else value in (True, "true")


def _to_device(net: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """net.to(device), its 4-D weights NHWC in memory when channels_last (faster convolutions, the same values).
    Written out with .data because Module.to cannot swap FakeTensor parameters (tests/test_cuda_path.py builds
    the paper model on fake CUDA tensors). Call it before building Adam: its moments take the weights' layout."""
    with torch.no_grad():
        for p in [*net.parameters(), *net.buffers()]:
            layout = torch.channels_last if channels_last and p.dim() == 4 else torch.preserve_format
            p.data = p.data.to(device, memory_format=layout)
    return net


def _compiled(net: nn.Module, enabled: bool):
    """net itself, or when enabled _Compiled(net): torch.compile(net) falling back to net."""
    return _Compiled(net) if enabled else net


class _Compiled:
    """torch.compile(net), called as net is. If compiling fails: one warning, and net runs eagerly from then on.
    Compiling failed when the call raises a torch._dynamo.exc.TorchDynamoException, the base of TorchDynamo's
    own errors (Unsupported, TorchRuntimeError, ...) and of BackendCompilerFailed, which wraps the backend's
    failure (inductor's InductorError: no working C++ compiler, no Triton, a kernel that does not build). An
    error of the compiled code as it runs, such as torch.OutOfMemoryError, is none of these: it propagates."""

    def __init__(self, net: nn.Module):
        self.net, self.fn = net, torch.compile(net)

    def __call__(self, *args):
        if self.fn is not self.net:
            try:
                return self.fn(*args)
            except torch._dynamo.exc.TorchDynamoException as e:
                first_line = (str(e).splitlines() or [""])[0]
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {first_line}); running eagerly")
                self.fn = self.net
        return self.net(*args)

    def __getattr__(self, name):  # the net's attributes, as torch.compile's wrapper gives them (edm: sigma_min)
        return getattr(self.net, name)


def _load_adam_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Adam's per-parameter state (moments, step) from a saved optimizer state dict, under opt's own lr, betas,
    eps and kernel choice (torch's load_state_dict would take the file's, e.g. fused=False from a CPU run). Each
    moment then takes its parameter's strides: a file saved from NCHW weights (a CPU run, a released checkpoint)
    holds NCHW moments, which CUDA's fused Adam refuses next to channels_last weights; the values are unchanged."""
    mine = opt.state_dict()["param_groups"]
    groups = [{**g, "params": s["params"]} for g, s in zip(mine, saved["param_groups"])]  # the file's numbering
    opt.load_state_dict({"state": saved["state"], "param_groups": groups})
    for p, state in opt.state.items():
        for key, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[key] = torch.empty_like(p).copy_(v)  # empty_like keeps p's layout


# ----------------------------------------------------------------------------------------------------
# Model: the interface retrain.py uses


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor as a 1-D view, in the order they lie in memory: no copy, also for channels_last
    tensors (whose reshape(-1) would copy). Dims sorted by decreasing stride are a contiguous permutation of t."""
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d))).view(-1)


class Model:
    """EDM denoiser, its EMA and Adam; train_step / generate / state_dict as retrain.py expects."""

    def __init__(self, cfg: Config, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        # the speed profile, resolved once against the device ("auto": on for CUDA, off elsewhere)
        on_cuda = self.device.type == "cuda"
        self.amp = "bf16" if cfg.amp == "bf16" or (cfg.amp == "auto" and on_cuda) else "fp32"
        self.channels_last = _resolve(cfg.channels_last, on_cuda)
        self.fused_adam = _resolve(cfg.fused_adam, on_cuda)
        self.step = 0  # optimizer steps taken, carried over
        self.nimg = 0  # training images seen, carried over: drives the lr ramp-up and the EMA ramp-up
        self.nfe = 0  # network evaluations per image of the last generate()
        self._build()

    @property
    def profile(self) -> dict:
        """The resolved speed settings (retrain.py prints them at start)."""
        return {"amp": self.amp, "channels_last": self.channels_last, "fused_adam": self.fused_adam,
                "compile": bool(self.cfg.compile)}

    def _build(self):
        """The denoiser, its EMA, Adam and the network calls for cfg.precond (built again when that changes)."""
        cfg = self.cfg
        self.net = net = _to_device(build_denoiser(cfg), self.device, self.channels_last)  # raw weights, trained
        # the EMA: a second denoiser holding a copy of the weights (copy.deepcopy would move FakeTensor parameters
        # into a fake mode of their own, see tests/test_cuda_path.py); its own random init leaves the RNG as it was
        with torch.random.fork_rng(devices=[]):
            self.ema = _to_device(build_denoiser(cfg), self.device, self.channels_last)
        for D in (net, self.ema):  # the rest of the profile lives in the denoiser: bf16 autocast, NHWC input
            D.use_bf16, D.channels_last = self.amp == "bf16", self.channels_last
        self.ema.load_state_dict(net.state_dict())
        self.ema.eval().requires_grad_(False)
        self.opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                    fused=self.fused_adam)
        self._params, self._ema_params = list(net.parameters()), list(self.ema.parameters())
        self._net_buffers, self._ema_buffers = list(net.buffers()), list(self.ema.buffers())
        train_net = net
        if dist.is_available() and dist.is_initialized():  # inputs are already on the module's device
            train_net = nn.parallel.DistributedDataParallel(net)
        # the network calls of training and of sampling (by sample_ema), through torch.compile when cfg.compile
        self._train_fwd = _compiled(train_net, cfg.compile)
        self._sample_fwd = {False: _compiled(net, cfg.compile), True: _compiled(self.ema, cfg.compile)}

    def lr(self) -> float:
        """Learning rate of the next step: linear ramp-up over lr_rampup_kimg images seen, then constant."""
        ramp = self.cfg.lr_rampup_kimg * 1000
        return self.cfg.lr * (min(self.nimg / ramp, 1.0) if ramp > 0 else 1.0)

    def ema_beta(self, batch: int) -> float:
        """EMA decay per step: 0.5 ** (batch / half-life in images), half-life capped by the ramp-up ratio."""
        halflife = self.cfg.ema_halflife_kimg * 1000
        if self.cfg.ema_rampup_ratio > 0:
            halflife = min(halflife, self.cfg.ema_rampup_ratio * self.nimg)
        return 0.5 ** (batch / max(halflife, 1e-8))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training objective on x (B, C, H, W) in [-1, 1], 0-dim: the weighted squared error of the EDM or
        VP loss (cfg.precond), summed over pixels and averaged over images, as EDM's training loop reduces it."""
        return self._loss(*self._draw(x))

    def _draw(self, x: torch.Tensor) -> tuple:
        """The loss's inputs for x, its random draws included, each with the batch first: (x, *loss_draws)."""
        return x, *loss_draws(x, self.cfg.precond)

    def _loss(self, x, r, e) -> torch.Tensor:
        """The loss of the training network on _draw's inputs, 0-dim float32."""
        labels = None
        if self.net.model.map_augment is not None:
            # zero augment labels: the same output as none (map_augment has no bias), but map_augment joins the
            # graph, so every parameter gets a gradient at every step, as DistributedDataParallel requires
            labels = torch.zeros(x.shape[0], self.cfg.augment_dim, device=self.device)  # (B, augment_dim)
        loss = LOSSES[self.cfg.precond](lambda x_noisy, sigma: self._train_fwd(x_noisy, sigma, labels), x, self.cfg,
                                        (r, e))
        return loss.sum() / x.shape[0]  # loss: (B, C, H, W) float32

    def _backward(self, drawn: tuple) -> torch.Tensor:
        """Gradients of the mean loss over _draw's inputs, in micro-batches of cfg.batch_gpu images (0: all at once):
        each micro-batch's loss is weighted by its share of the images, so the gradients add up to the whole batch's.
        Under DistributedDataParallel only the last backward all-reduces. Dropout masks are drawn per micro-batch.
        Returns the mean loss, detached (0-dim, on the device)."""
        n = len(drawn[0])
        size = self.cfg.batch_gpu or n
        no_sync = getattr(self._train_fwd, "no_sync", None)  # DistributedDataParallel's (through _Compiled too)
        total = 0
        for i in range(0, n, size):
            part = [None if d is None else d[i:i + size] for d in drawn]  # None: a draw not made
            skip_sync = no_sync is not None and i + size < n
            with no_sync() if skip_sync else contextlib.nullcontext():
                loss = self._loss(*part) * (len(part[0]) / n)  # the micro-batch's share of the mean
                loss.backward()
            total = total + loss.detach()
        return total

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One Adam step on x (B, C, H, W) in [-1, 1]. Returns this process's mean per-element weighted loss as a
        detached 0-dim float32 tensor on the device: nothing here waits for the device (retrain.py reads the loss
        every few steps and averages it over processes itself)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self._backward(self._draw(x))  # all of x's draws first: the same update whatever batch_gpu
        self._update(x.shape[0] * world)  # images in this step, all ranks together
        return loss / x[0].numel()  # per element, as EDM reports it

    def _update(self, batch: int) -> None:
        """Everything after backward, in a number of kernels that does not grow with the number of parameter
        tensors: gradient cleaning and clipping, the lr, Adam, the EMA, the counters."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:  # EDM: nan -> 0, +-inf -> +-1e5, on all gradients at once (there is no foreach nan_to_num)
            flat = torch.cat([_flat_view(g) for g in grads])
            torch.nan_to_num_(flat, nan=0.0, posinf=1e5, neginf=-1e5)
            torch._foreach_copy_([_flat_view(g) for g in grads], flat.split([g.numel() for g in grads]))
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip, foreach=True)  # the CPU default loops
        lr = self.lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        beta = self.ema_beta(batch)
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params, self._params, 1 - beta)  # p_ema <- beta p_ema + (1 - beta) p
            if self._net_buffers:  # (the resample filters: constants, copied as EDM does)
                torch._foreach_copy_(self._ema_buffers, self._net_buffers)
        self.nimg += batch
        self.step += 1

    def generate(self, seeds: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Images (N, C, H, W) float32 in [-1, 1]; image i depends only on seeds[i] (its own generator). A
        temperature scales the initial noise (the latents; S_churn's later noise is not scaled)."""
        cfg = self.cfg
        (self.ema if cfg.sample_ema else self.net).eval()
        D = self._sample_fwd[cfg.sample_ema]
        with torch.inference_mode():
            gens = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds.tolist()]
            latents = torch.stack([torch.randn(cfg.img_channels, cfg.img_resolution, cfg.img_resolution,
                                               generator=g, device=self.device) for g in gens])  # (N, C, H, W)
            if temperature != 1:
                latents = latents * temperature
            x, self.nfe = SAMPLERS[cfg.sampler](D, latents, cfg, gens)
        return x.clamp(-1, 1).to(torch.float32, memory_format=torch.contiguous_format)  # NCHW also after NHWC nets

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step, "nimg": self.nimg, "precond": self.cfg.precond}

    def load_state_dict(self, d: dict) -> None:
        if d.get("precond", self.cfg.precond) != self.cfg.precond:
            self.cfg.precond = d["precond"]  # in place: the caller's Config records it too
            self._build()
        self.net.load_state_dict(d["net"])
        self.ema.load_state_dict(d["ema"])
        _load_adam_state(self.opt, d["opt"])
        self.step, self.nimg = int(d["step"]), int(d["nimg"])

    def load_pretrained(self, path: str) -> None:
        """NVIDIA's released .pkl -> weights into net and EMA; images seen set past the ramp-ups."""
        net = load_official(path)
        kind = {EDMPrecond: "edm", VPPrecond: "vp"}[type(net)]
        got = {("img_channels" if k == "in_channels" else k): v for k, v in net.model.arch.items()
               if k not in ("out_channels", "dropout")}  # dropout is a training setting: cfg.dropout applies
        if kind == "edm":
            got["sigma_data"] = net.sigma_data
        mismatch = [f"{k}={v} (config: {getattr(self.cfg, k)})" for k, v in got.items()
                    if v != getattr(self.cfg, k)]
        if mismatch:
            raise ValueError(f"{path} holds a different network: {', '.join(mismatch)}; "
                             "use the matching preset (paper for CIFAR-10, ffhq64 for FFHQ-64)")
        if kind != self.cfg.precond:  # the preconditioning follows the class stored in the file
            print(f"edm: {path} holds {type(net).__name__}; training with precond='{kind}'")
            self.cfg.precond = kind  # in place: the caller's Config records it too
            self._build()
        self.net.load_state_dict(net.state_dict())
        self.ema.load_state_dict(net.state_dict())
        self.nimg = max(self.nimg, int(self.cfg.lr_rampup_kimg * 1000))  # no lr ramp-up again
        self.step = max(self.step, self.nimg // self.cfg.batch)


# ----------------------------------------------------------------------------------------------------
# Official checkpoints: NVIDIA's released .pkl files, read without running code from them
#
# A snapshot is a plain pickle of dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...). Every object of
# a "persistent class" pickles as torch_utils.persistence._reconstruct_persistent_obj(meta), where meta holds the
# class name, the object's __dict__ and the full source of its module, which the normal unpickler exec()s. Here each
# of those becomes an inert _Persistent holding only the class name and __dict__; tensors are rebuilt by torch's own
# weights-only loader; every other global in the file is refused.


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for something a released EDM network pickle never contains."""


class _Persistent:
    """Stand-in for an object of a persistent class: class name and __dict__ only; its source is never run."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state


class _ModuleDictStub:
    """Stand-in for torch.nn.ModuleDict (pickled by reference, rebuilt with __setstate__): keeps the __dict__."""

    def __setstate__(self, state):
        self.state = state


class _NumpyDType:
    """Stand-in for numpy.dtype(name, align, copy) + its byte-order state; numeric kinds only."""

    def __init__(self, name, align=False, copy=False):
        self.name, self.byteorder = str(name), "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            self.byteorder = state[1]


def _persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UnsafePickleError("unexpected persistent-object record (expected type='class' with a state dict)")
    return _Persistent(str(meta.get("class_name")), meta["state"])  # meta['module_src'] is ignored


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise UnsafePickleError("unexpected numpy scalar record")
    dt = np.dtype(dtype.name)
    if dt.kind not in "biuf":
        raise UnsafePickleError(f"refusing numpy scalar of dtype {dtype.name!r}")
    order = dtype.byteorder if dtype.byteorder in "<>" else "="
    return np.frombuffer(data, dtype=dt.newbyteorder(order))[0].item()  # plain Python number


def _load_storage(data):
    if not isinstance(data, bytes):
        raise UnsafePickleError("storage record is not bytes")
    storage = torch.load(io.BytesIO(data), weights_only=True)  # torch's own restricted loader
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError("storage record does not hold a storage")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError("tensor record without a storage")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("parameter record without a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStub,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1.x writers
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x writers
    ("numpy", "dtype"): _NumpyDType,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refusing to load '{module}.{name}': not something an EDM network pickle "
                                    "holds (the file may be corrupt or malicious); nothing was executed")
        return _ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id: not something an EDM network pickle holds")


def _tensors_of(obj, prefix="", out=None) -> dict:
    """State dict of a pickled module tree: parameters, then persistent buffers, then children, as nn.Module does."""
    out = collections.OrderedDict() if out is None else out
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise UnsafePickleError(f"module '{prefix[:-1]}' has no state")
    skip = state.get("_non_persistent_buffers_set") or set()
    named = [*state.get("_parameters", {}).items(),
             *((k, v) for k, v in state.get("_buffers", {}).items() if k not in skip)]
    for name, t in named:
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise UnsafePickleError(f"'{prefix}{name}' is not a tensor")
            out[prefix + name] = t
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            _tensors_of(child, f"{prefix}{name}.", out)
    return out


def read_official(path):
    """(class name, constructor kwargs, state dict) of the 'ema' network in an EDM .pkl; runs no code."""
    with open(path, "rb") as f:
        data = _RestrictedUnpickler(f).load()
    if not isinstance(data, dict) or not isinstance(data.get("ema"), _Persistent):
        raise ValueError(f"{path}: not an EDM network snapshot (no persistent 'ema' object)")
    ema = data["ema"]
    kwargs = ema.state.get("_init_kwargs")
    if not isinstance(kwargs, dict) or ema.state.get("_init_args"):
        raise ValueError(f"{path}: the 'ema' object has no constructor kwargs")
    return ema.class_name, dict(kwargs), _tensors_of(ema)


def denoiser_from_kwargs(class_name, kwargs) -> Precond:
    """This file's denoiser for the reference constructor call <class_name>(**kwargs) (DDPM++ only)."""
    if class_name not in ("EDMPrecond", "VPPrecond"):
        raise ValueError(f"unsupported preconditioner '{class_name}' (supported: EDMPrecond, VPPrecond)")
    kw = dict(kwargs)
    fixed = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                 decoder_type="standard", label_dim=0)
    for key, want in fixed.items():
        if kw.pop(key, want) != want:
            raise ValueError(f"unsupported network: {key}={kwargs[key]!r} (only unconditional DDPM++ is built here)")
    kw.pop("use_fp16", None)  # precision is chosen by cfg.amp here
    kw.pop("label_dropout", None)  # only used with class labels
    own = {"EDMPrecond": ("sigma_data", "sigma_min", "sigma_max"),
           "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t")}[class_name]
    pre = {k: kw.pop(k) for k in own if k in kw}
    unet_keys = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                 "attn_resolutions", "dropout", "channel_mult_noise", "resample_filter")
    unet = {k: kw.pop(k) for k in unet_keys if k in kw}
    res, ch = kw.pop("img_resolution"), kw.pop("img_channels")
    if kw:
        raise ValueError(f"unsupported constructor arguments: {sorted(kw)}")
    for k in ("channel_mult", "attn_resolutions", "resample_filter"):
        if k in unet:
            unet[k] = tuple(unet[k])
    model = SongUNet(img_resolution=res, in_channels=ch, out_channels=ch, **unet)
    return PRECONDS["edm" if class_name == "EDMPrecond" else "vp"](model, **pre)


def load_official(path) -> Precond:
    """NVIDIA's released .pkl -> this file's preconditioned denoiser D(x, sigma) with its weights (CPU, eval)."""
    class_name, kwargs, state = read_official(path)
    net = denoiser_from_kwargs(class_name, kwargs)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Command line: a summary of the network and the sampler of a preset, or what released .pkl files hold

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=list(PRESETS))
    p.add_argument("pkl", nargs="*", help="released .pkl files to describe instead (no code in them is run)")
    args = p.parse_args()
    for pkl in args.pkl:
        name, kwargs, sd = read_official(pkl)
        print(f"{pkl}: {name}, {len(sd)} tensors, {sum(t.numel() for t in sd.values()):,} elements")
        print(f"  kwargs: {kwargs}")
    if not args.pkl:
        cfg = make_config(args.preset)
        D = build_denoiser(cfg)
        print(f"edm {args.preset}: {cfg.img_channels}x{cfg.img_resolution}x{cfg.img_resolution} images, "
              f"{sum(p.numel() for p in D.parameters()):,} parameters, {len(D.state_dict())} state-dict entries")
        print(f"sampler {cfg.sampler}, {cfg.num_steps} noise levels, "
              f"{2 * cfg.num_steps - 1 if cfg.sampler == 'heun' else cfg.num_steps} network evaluations per image")
