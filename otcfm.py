"""otcfm.py -- OT conditional flow matching (OT-CFM), exact to torchcfm's released CIFAR-10 checkpoint.

Paper: A. Tong, N. Malkin, G. Huguet, Y. Zhang, J. Rector-Brooks, K. Fatras, G. Wolf, Y. Bengio,
"Improving and generalizing flow-based generative models with minibatch optimal transport" (TMLR 2024,
arXiv 2302.00482). It is the flow-matching model of Bertrand et al. (ICLR 2024), who retrained the
released 400k-step CIFAR-10 checkpoint of the torchcfm library and sampled it with dopri5.

The idea in three lines:
  - draw a batch of noise x0 ~ N(0, I) and a batch of data x1, and pair them by the exact optimal transport
    plan of the batch under squared Euclidean cost (minibatch OT: Tong et al.'s OT-CFM);
  - regress a network v(t, x) on the constant velocity of the straight path from x0 to x1, with the mean
    squared error (the conditional flow matching objective);
  - sample by integrating dx/dt = v(t, x) from noise at t = 0 to data at t = 1.

This file holds:
  - Config / PRESETS / make_config: "paper" (torchcfm's train_cifar10.py) and "small" (8x8 digits on a CPU);
  - UNet: torchcfm's U-Net (a port of guided-diffusion's), with its module names, so torchcfm's state dicts
    load strictly; called as net(t, x) with t in [0, 1];
  - ot_pairing, conditional_path and cfm_loss: minibatch OT as an assignment problem, the straight path,
    the loss, each beside its equation;
  - the samplers euler, midpoint, heun (fixed step) and dopri5 (adaptive, torchdiffeq);
  - device plumbing (speed profile, NHWC weights, torch.compile's eager fallback, Adam state), word for word
    as in ddpm.py and edm.py; Model: training (under torchrun, the OT plan of the global batch: ot_pairs),
    EMA, sampling, checkpoints, and the CUDA profile it resolved (Model.profile);
  - load_official: torchcfm's checkpoint file -> UNet.

Run:
    python retrain.py --model otcfm --preset small --lam 1 --iters 20                 # digits, CPU
    python retrain.py --model otcfm --preset paper --data cifar10 --init official ... # CIFAR-10, GPU
    python -m pytest tests/test_otcfm.py
"""

import argparse
import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchdiffeq
from scipy.optimize import linear_sum_assignment

# Sources quoted below: [Tong] Tong et al., TMLR 2024 (above), equations numbered as the authors' torchcfm cites
# them; [Lipman] Lipman, Chen, Ben-Hamu, Nickel, Le, "Flow Matching for Generative Modeling", ICLR 2023.

# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    # data (retrain.py sets the shape from the dataset)
    img_channels: int = 3             # image channels (CIFAR-10: 3; digits: 1)
    img_resolution: int = 32          # pixels per side (CIFAR-10: 32; digits: 8)
    xflip: bool = False               # random horizontal flips by retrain.py (Bertrand et al. fine-tune without;
                                      # torchcfm's own pretraining used RandomHorizontalFlip)
    # network: torchcfm UNetModelWrapper as built by train_cifar10.py
    channels: int = 128               # base width in channels (num_channels=128)
    channel_mult: tuple = (1, 2, 2, 2)  # width multiplier per resolution level (32, 16, 8, 4 px)
    num_res_blocks: int = 2           # residual blocks per level in the encoder (decoder: one more)
    attn_resolutions: tuple = (16,)   # resolutions in pixels with self-attention (attention_resolutions="16")
    head_channels: int = 64           # channels per attention head (num_head_channels=64; -1: use num_heads)
    num_heads: int = 4                # heads per attention block, used only when head_channels == -1
    dropout: float = 0.1              # dropout probability inside residual blocks (train_cifar10.py --dropout)
    norm_groups: int = 32             # GroupNorm groups (torchcfm's GroupNorm32: always 32)
    conv_resample: bool = True        # a 3x3 conv in each down- and upsampling (conv_resample=True); False: 2x2
                                      # average pooling down, nearest-neighbour up, no weights
    # flow matching (torchcfm ExactOptimalTransportConditionalFlowMatcher)
    sigma: float = 0.0                # std of the Gaussian around the straight path (train_cifar10.py: 0.0)
    ot: bool = True                   # pair noise and data by the exact minibatch OT plan (False: independent, I-CFM)
    ot_resample: bool = True          # draw the batch's pairs from the plan with replacement, as torchcfm does
    # optimisation (train_cifar10.py)
    batch: int = 128                  # images per optimizer step (--batch_size 128)
    batch_gpu: int = 0                # images per forward/backward pass on one process; 0: its whole share of batch.
                                      # Smaller values accumulate gradients over micro-batches: the same update in
                                      # less memory [EDM: --batch-gpu]
    lr: float = 2e-4                  # Adam learning rate, betas (0.9, 0.999), eps 1e-8 (--lr 2e-4)
    warmup_steps: int = 5000          # linear lr warm-up from 0 in optimizer steps, from scratch only (--warmup 5000)
    grad_clip: float = 1.0            # max global gradient norm, 0 = off (--grad_clip 1.0)
    ema_decay: float = 0.9999         # EMA decay per step, from step 0 (--ema_decay 0.9999)
    ema_warmup: bool = False          # ramp the decay as min(ema_decay, (1 + step) / (10 + step)), as ddpm.py does;
                                      # torchcfm does not (off), short runs from scratch need it (see "small")
    pretrain_kimg: float = 51200.128  # from-scratch budget in thousands of images: 400,001 steps x 128
    kimg: float = 50.0                # fine-tuning budget per retraining iteration (Bertrand et al.: 50 kimg)
    # sampling (compute_fid.py; Bertrand et al. sample the EMA with dopri5, rtol = atol = 1e-5)
    sampler: str = "dopri5"           # "dopri5" (adaptive; its network runs in float32 whatever amp says, see amp)
                                      # | "euler" | "midpoint" | "heun" (fixed step; the network under amp)
    steps: int = 100                  # steps of the fixed-step samplers (compute_fid.py --integration_steps 100)
    rtol: float = 1e-5                # dopri5 relative tolerance (compute_fid.py --tol 1e-5)
    atol: float = 1e-5                # dopri5 absolute tolerance (compute_fid.py --tol 1e-5)
    sample_batch: int = 512           # images per generate() call (Bertrand et al.'s sampling batch)
    sample_ema: bool = True           # sample from the EMA weights (compute_fid.py loads ema_model)
    # engineering: the same four fields in ddpm.py, edm.py and otcfm.py; Model.profile holds their resolved values
    amp: str = "auto"                 # autocast dtype of the network: "auto" (bf16 on CUDA, fp32 elsewhere) | "bf16"
                                      # | "fp32". Training and the fixed-step samplers only: dopri5 always runs the
                                      # network in float32, as the paper samples; bf16 rounding inflates its adaptive
                                      # error estimate (measured: 110 evaluations per image against 20 in float32)
    channels_last: str = "auto"       # NHWC weights and activations: "auto" (on CUDA) | "true" | "false"
    fused_adam: str = "auto"          # one fused kernel for all of Adam: "auto" (on CUDA) | "true" | "false"
    compile: bool = False             # torch.compile the network (eager, with a warning, if compiling fails)


PRESETS = {
    "paper": {},  # the defaults above: torchcfm's CIFAR-10 U-Net (35,746,307 parameters) as Bertrand et al. train it
    # 8x8 digits on a 2-core CPU in float32 (1,797 images). A first trial (pixel FD, EMA from step 0, midpoint-5):
    # 0.143 / 0.107 / 0.098 / 0.096 / 0.091 after 3k / 4k / 5k / 6k / 8k steps; midpoint-10 (NFE 20) and dopri5
    # (NFE 110) 0.088 after 8k, Euler-10 0.132, Heun-5 0.258. A second, in the digits classifier's feature space
    # (retrain.py's default there): without the EMA warm-up FD 11.7 after 2k steps (0.999**2000 = 14% of the EMA
    # is still the random initial weights) and 0.45 after 6k; with it 1.29 after 2k and 0.83 / 0.79 / 0.75 after
    # 3k with midpoint 10 / 6 / 4 steps (pixel FD 0.108 / 0.109 / 0.113).
    "small": dict(
        img_channels=1, img_resolution=8,  # xflip stays False: digits are not mirror-symmetric
        channels=16,             # 16 channels at 8x8, 32 at 4x4: 176,849 parameters, 8.2 MFLOP per image forward
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),   # attention at 4x4 (16 tokens) and in the middle block, 2 heads of 16 channels
        head_channels=16,
        norm_groups=8,           # 2-4 channels per group; with one channel per group the norm would remove the
                                 # per-channel time shift of every residual block, leaving the output blind to t
        dropout=0.0,             # a few thousand steps on 1,797 images: no dropout needed
        lr=2e-3,                 # small network: a large step (the digits trial of a 274k U-Net used 2e-3)
        warmup_steps=100,        # short warm-up from scratch; fine-tuning continues the step counter
        ema_decay=0.995,         # with the warm-up below: reached after 1,790 steps; a half-life of 138 steps, so
                                 # the EMA follows each 100-step iteration. At 0.999 (~460 steps, ~5 iterations)
                                 # iteration 0 was as good (FD 0.40 / 1.06 / 1.18 against 0.47 / 0.90 / 1.17, seeds
                                 # 0 / 1 / 2), but the fully synthetic loop's FD grew 2.6-fold in 20 iterations,
                                 # against 16-fold now (README's digits results)
        ema_warmup=True,         # see above: a short run from scratch must forget its initial weights
        pretrain_kimg=768.0,     # 6,000 steps x 128
        kimg=12.8,               # 100 steps x 128 per retraining iteration
        sampler="midpoint",      # as good as dopri5 here (see above) at a tenth of the NFE
        steps=5,                 # NFE 10, see above
        sample_batch=512,        # measured faster than the whole digits set in one call on one CPU thread
    ),
    # 32x32 greyscale (MNIST, Fashion-MNIST padded) on a 2-core CPU, float32: 16 channels at 32x32, 32 at 16x16, 64 at
    # 8x8 (the size ddpm.py's mnist trial chose). A trial on 1,000 MNIST training images, 600 steps of 64 on one CPU
    # thread each (~1 s/step): classifier-space FD of 1,000 samples against 1,000 test digits 161, where DDPM's
    # mnist preset reached 229 (L_simple 371) at the same cost (real vs real: 4.8 +- 2.0). reproduce.py mnist.
    "mnist": dict(
        img_channels=1, img_resolution=32, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
        attn_resolutions=(8,), head_channels=16, norm_groups=8, dropout=0.0, batch=64, lr=2e-3,
        warmup_steps=100, ema_decay=0.995, ema_warmup=True,
        pretrain_kimg=320.0,     # 5,000 steps x 64, what reproduce.py mnist affords on 2 cores
        kimg=6.4,                # 100 steps x 64 per retraining iteration
        sampler="midpoint", steps=5,  # from the EMA weights: the trials of raw weights and more steps in
        sample_batch=250,             # docs/performance.md ("How the mnist presets came to be")
    ),
}


RANGES = {**dict.fromkeys(("channels", "num_res_blocks", "num_heads", "norm_groups", "batch", "lr", "pretrain_kimg",
                             "kimg", "steps", "rtol", "atol", "sample_batch"), "> 0"),
          **dict.fromkeys(("batch_gpu", "sigma", "warmup_steps", "grad_clip"), ">= 0"), "dropout": "in [0, 1)",
          "ema_decay": "in [0, 1]"}  # what make_config accepts of each number


def _check_ranges(cfg) -> None:
    """Every number of RANGES within its range: a ValueError naming the field otherwise."""
    rules = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1,
             "in [0, 1]": lambda v: 0 <= v <= 1}
    for name, rule in RANGES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and rules[rule](value)):
            raise ValueError(f"{name} {value!r}: must be {rule}")


def make_config(preset: str, **overrides) -> Config:
    """The Config of a preset, with field overrides; an unknown preset or field raises ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (have: {', '.join(PRESETS)})")
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {**PRESETS[preset], **overrides}
    for key in values:
        if key not in fields:
            raise ValueError(f"unknown Config field '{key}' for otcfm (have: {', '.join(sorted(fields))})")
    for key in ("channel_mult", "attn_resolutions"):  # lists from JSON / command lines -> tuples
        if key in values:
            values[key] = tuple(values[key])
    for key in ("channels_last", "fused_adam"):  # Python bools -> "true" / "false"
        if isinstance(values.get(key), bool):
            values[key] = "true" if values[key] else "false"
    cfg = Config(**values)
    _check_ranges(cfg)
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{cfg.sampler}' (have: {', '.join(SAMPLERS)})")
    if cfg.amp not in ("auto", "bf16", "fp32"):
        raise ValueError(f"amp must be auto, bf16 or fp32, not '{cfg.amp}'")
    for key in ("channels_last", "fused_adam"):
        if getattr(cfg, key) not in ("auto", "true", "false"):
            raise ValueError(f"{key} must be auto, true or false, not '{getattr(cfg, key)}'")
    return cfg


# The released OT-CFM checkpoint (torchcfm examples/images/cifar10/README.md, release tag 1.0.4; MIT licence).
OFFICIAL_URLS = {
    "cifar10": "https://github.com/atong01/conditional-flow-matching/releases/download/1.0.4/"
               "otcfm_cifar10_weights_step_400000.pt",
}

# ----------------------------------------------------------------------------------------------------
# Network: torchcfm's U-Net. Module names follow torchcfm (time_embed, input_blocks, middle_block,
# output_blocks, out; in_layers / emb_layers / out_layers / skip_connection; norm / qkv / proj_out; op; conv)
# so that its state dicts load strictly. Registration order follows it too, so the same torch seed gives
# the same initial weights.


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] as is (no x1000): [cos(t f_i), sin(t f_i)], f_i = P^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (torchcfm: 32 groups), eps 1e-5, computed in float32 (also under autocast)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def zero_module(m: nn.Module) -> nn.Module:
    """Zero all parameters of m (output layers start as the zero map)."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """h = conv(silu(norm(x))) + Linear(silu(emb)); out = skip(x) + conv(dropout(silu(norm(h))))."""

    def __init__(self, cin: int, cout: int, emb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, cout))
        self.out_layers = nn.Sequential(GroupNorm32(groups, cout), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)  # (B, cout, H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # per-channel shift by the time embedding
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels, torchcfm's legacy layout: per head [q(ch), k(ch), v(ch)]."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W)  # (B, C, T)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        ch = C // self.heads
        q, k, v = qkv.reshape(B * self.heads, 3 * ch, H * W).split(ch, dim=1)  # each (B*heads, ch, T)
        scale = ch ** -0.25  # 1/sqrt(ch) split between q and k
        w = torch.bmm((q * scale).transpose(1, 2), k * scale)  # (B*heads, T, T): w[t, s] = q_t . k_s
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)  # softmax over s, in float32
        a = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H * W)  # (B, C, T): a_t = sum_s w[t, s] v_s
        return (x + self.proj_out(a)).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (use_conv), else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (use_conv)."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """Sequential that hands the time embedding to the residual blocks."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """torchcfm's UNetModelWrapper (unconditional), called as net(t, x): t (B,) or 0-dim in [0, 1]."""

    def __init__(self, cfg: Config):
        super().__init__()
        C, mult, res, G = cfg.channels, cfg.channel_mult, cfg.img_resolution, cfg.norm_groups
        emb_ch = 4 * C
        heads = lambda ch: ch // cfg.head_channels if cfg.head_channels > 0 else cfg.num_heads  # noqa: E731
        self.channels = C
        self.time_embed = nn.Sequential(nn.Linear(C, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        ch = mult[0] * C
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.img_channels, ch, 3, padding=1))])
        skip_chs = [ch]  # channels of every encoder output, consumed by the decoder in reverse
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, m * C, emb_ch, cfg.dropout, G)]
                ch = m * C
                if res in cfg.attn_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), G))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chs.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch, cfg.conv_resample)))
                skip_chs.append(ch)
                res //= 2
        self.middle_block = TimestepSequential(ResBlock(ch, ch, emb_ch, cfg.dropout, G),
                                               AttentionBlock(ch, heads(ch), G),
                                               ResBlock(ch, ch, emb_ch, cfg.dropout, G))
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), m * C, emb_ch, cfg.dropout, G)]
                ch = m * C
                if res in cfg.attn_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), G))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, cfg.conv_resample))
                    res *= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(G, ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, cfg.img_channels, 3, padding=1)))

    def forward(self, t, x):
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.repeat(x.shape[0])  # one time for the whole batch
        emb = self.time_embed(timestep_embedding(t, self.channels))  # (B, 4C)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)  # (B, C_img, H, W): the velocity


# ----------------------------------------------------------------------------------------------------
# Training loss: minibatch OT pairing, the straight path and its velocity, L_CFM


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """perm minimising sum_i |x0[i] - x1[perm[i]]|^2: the exact OT plan pi of two equal uniform batches, the
    coupling q(z) = pi(x0, x1) of OT-CFM [Tong Eq. 17].

    With weights 1/B on both sides the transport polytope is the Birkhoff polytope, whose vertices are the
    permutation matrices / B, so the linear program has a permutation among its optimal solutions: it is an
    assignment problem, solved exactly by scipy's linear_sum_assignment. torchcfm solves the same LP with
    POT's network simplex (ot.emd), whose vertex solution is again pi = P / B (under ties, another optimal
    permutation), then draws B pairs (i, j) from pi with replacement. Each draw is thus one of the B matched
    pairs, uniformly: its batch is a bootstrap resample of this pairing, with some pairs twice and on average
    (1 - 1/B)^B ~ 37% of them left out. Config.ot_resample = True does the same; False uses every matched
    pair once (the same expected loss, with less variance)."""
    cost = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()).square()  # (B, B) squared distances
    _, perm = linear_sum_assignment(cost.cpu().numpy())
    return torch.from_numpy(perm).to(x1.device)


def gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """(world * B, ...): every process's x (B, ...), rank 0's rows first. Data only: no gradient flows back."""
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    torch.distributed.all_gather(list(out.chunk(world)), x.contiguous())  # each chunk is one rank's rows
    return out


def ot_pairs(x0: torch.Tensor, x1: torch.Tensor, resample: bool):
    """This process's B pairs (x0, x1) from the exact OT plan of the GLOBAL batch: x0, x1 (B, C, H, W) are its
    share, every process holding the same B.

    The plan is a property of the whole batch of cfg.batch images that one optimizer step averages over, not of
    how torchrun splits it: with 8 processes, pairing each rank's 16 images alone would solve eight assignment
    problems of 16 instead of one of 128, a coarser plan (less straight pairs) that changes with the number of
    GPUs. So every rank gathers the noise and the data of all ranks (all_gather, in rank order), solves the same
    assignment over the global batch (the solver is deterministic: every rank finds the same permutation, with
    no further communication), and keeps its share: without resampling, rank r trains on matched pairs
    r*B:(r+1)*B (its own noise rows, each with the data it was matched to); with resampling it draws its B pairs
    uniformly from all the global batch's matched pairs. The draws have the batch as leading dimension, in the
    same order for any number of processes; with one process nothing is gathered."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    B = x0.shape[0]  # this process's share
    if world > 1:
        x0, x1 = gather_rows(x0, world), gather_rows(x1, world)  # (world * B, C, H, W): the global batch
    x1 = x1[ot_pairing(x0, x1)]  # x0[i] is paired with x1[i]
    if resample:  # B draws with replacement from the global plan, as torchcfm (see ot_pairing)
        idx = torch.randint(x0.shape[0], (B,), device=x0.device)  # uniform over the global batch's pairs
        return x0[idx], x1[idx]
    return x0[rank * B:(rank + 1) * B], x1[rank * B:(rank + 1) * B]


def conditional_path(x0, x1, t, sigma: float = 0.0, eps=None):
    """x_t = t x1 + (1 - t) x0 + sigma eps, a draw of p_t(x | z) = N(x | t x1 + (1 - t) x0, sigma^2) [Tong Eq. 14],
    and its velocity u_t(x | z) = x1 - x0 [Tong Eq. 15]; z = (x0, x1), t (B,), eps ~ N(0, I) like x1."""
    tb = t.reshape(-1, *[1] * (x1.dim() - 1))  # (B, 1, 1, 1)
    xt = tb * x1 + (1 - tb) * x0
    if sigma > 0:
        xt = xt + sigma * eps
    return xt, x1 - x0


def cfm_loss(net, x0, x1, t, sigma: float = 0.0, eps=None) -> torch.Tensor:
    """L_CFM = mean ||v(t, x_t) - u_t||^2 over pixels and batch, in float32: the conditional flow matching loss
    [Lipman Eq. 9] with the condition z = (x0, x1) of Tong et al. (OT-CFM when the pairs come from the OT plan,
    I-CFM when they are independent). net(t, x) is the velocity network v."""
    xt, ut = conditional_path(x0, x1, t, sigma, eps)  # (B, C, H, W) each
    return (net(t, xt).float() - ut).square().mean()


# ----------------------------------------------------------------------------------------------------
# Samplers: integrate dx/dt = f(t, x) from t = 0 (noise) to t = 1 (data). Each returns (x at t = 1, NFE).
# The fixed-step ones use the grid linspace(0, 1, steps + 1), as torchdiffeq / torchdyn do.


def euler(f, x, cfg):
    """Euler's method, cfg.steps steps (NFE = steps)."""
    ts = torch.linspace(0, 1, cfg.steps + 1, dtype=x.dtype, device=x.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * f(t, x)
    return x, cfg.steps


def midpoint(f, x, cfg):
    """Explicit midpoint rule (2nd-order Runge-Kutta), cfg.steps steps (NFE = 2 steps)."""
    ts = torch.linspace(0, 1, cfg.steps + 1, dtype=x.dtype, device=x.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        x = x + h * f(t + h / 2, x + h / 2 * f(t, x))
    return x, 2 * cfg.steps


def heun(f, x, cfg):
    """Heun's method (explicit trapezoid, 2nd-order Runge-Kutta), cfg.steps steps (NFE = 2 steps)."""
    ts = torch.linspace(0, 1, cfg.steps + 1, dtype=x.dtype, device=x.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        d = f(t, x)
        x = x + h / 2 * (d + f(t_next, x + h * d))
    return x, 2 * cfg.steps


def dopri5(f, x, cfg):
    """Dormand-Prince 5(4) with adaptive steps (torchdiffeq), tolerances cfg.rtol / cfg.atol (NFE varies)."""
    nfe = 0

    def counted(t, y):
        nonlocal nfe
        nfe += 1
        return f(t, y)

    ts = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    x = torchdiffeq.odeint(counted, x, ts, rtol=cfg.rtol, atol=cfg.atol, method="dopri5")[-1]
    return x, nfe


SAMPLERS = {"dopri5": dopri5, "euler": euler, "midpoint": midpoint, "heun": heun}

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


class Model:
    """OT-CFM: the U-Net, its EMA copy, Adam, and the step counter that drives the warm-up."""

    def __init__(self, cfg: Config, device):
        self.cfg, self.device = cfg, torch.device(device)
        # the speed profile, resolved once against the device ("auto": on for CUDA, off elsewhere)
        on_cuda = self.device.type == "cuda"
        self.amp = "bf16" if cfg.amp == "bf16" or (cfg.amp == "auto" and on_cuda) else "fp32"
        self.channels_last = _resolve(cfg.channels_last, on_cuda)
        self.fused_adam = _resolve(cfg.fused_adam, on_cuda)
        self.net = _to_device(UNet(cfg), self.device, self.channels_last)  # before Adam
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, fused=self.fused_adam)
        self.step, self.nfe = 0, 0
        train_net = self.net
        if torch.distributed.is_initialized():  # the OT pairing still runs over the global batch (ot_pairs)
            ids = None if self.device.index is None else [self.device.index]
            train_net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        # the network calls of training and of sampling (by sample_ema), through torch.compile when cfg.compile
        self._train_fwd = _compiled(train_net, cfg.compile)
        self._sample_fwd = {False: _compiled(self.net, cfg.compile), True: _compiled(self.ema, cfg.compile)}

    @property
    def profile(self) -> dict:
        """The resolved speed settings (retrain.py prints them at start)."""
        return {"amp": self.amp, "channels_last": self.channels_last, "fused_adam": self.fused_adam,
                "compile": bool(self.cfg.compile)}

    def _autocast(self, enabled: bool = True):
        """bf16 autocast of the network when amp is bf16 (and enabled: dopri5 samples in float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled and self.amp == "bf16")

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) as the network takes it: NHWC in memory when channels_last (the same values)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, x1: torch.Tensor) -> torch.Tensor:
        """cfm_loss of the training network on a data batch x1 (B, C, H, W) in [-1, 1], 0-dim float32: noise x0
        paired with x1 by the minibatch OT plan (cfg.ot), times t uniform on [0, 1].

        Under torchrun x1 is this process's share of the global batch; the OT plan is solved over the global
        batch all the same (see ot_pairs), so training does not depend on the number of processes."""
        return self._loss(*self._draw(x1))

    def _draw(self, x1: torch.Tensor) -> tuple:
        """The loss's inputs for x1, its random draws included, each with the batch first: (x0, x1, t, eps), x0[i]
        paired with x1[i]. The OT plan couples the whole batch: it is solved here, before any micro-batch split."""
        cfg = self.cfg
        x0 = torch.randn_like(x1)  # (B, C, H, W) noise
        if cfg.ot:
            x0, x1 = ot_pairs(x0, x1, cfg.ot_resample)  # x0[i] is paired with x1[i]
        t = torch.rand(len(x1), device=x1.device)  # (B,) uniform on [0, 1]
        eps = torch.randn_like(x1) if cfg.sigma > 0 else None
        return x0, x1, t, eps

    def _loss(self, x0, x1, t, eps) -> torch.Tensor:
        """The loss of the training network on _draw's inputs, 0-dim float32."""
        with self._autocast():  # the network's input goes NHWC (channels_last), the target u_t stays as it is
            return cfm_loss(lambda t, xt: self._train_fwd(t, self._input(xt)), x0, x1, t, self.cfg.sigma, eps)

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
        """One optimizer step on x (B, C, H, W) in [-1, 1]. Returns the loss (this process's mean) as a detached
        0-dim float32 tensor on the model's device: nothing here waits for the device (retrain.py reads the loss
        every few steps). One exception is inherent to exact OT: the cost matrix goes to scipy on the host."""
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self._backward(self._draw(x))  # all of x's draws first: the same update whatever batch_gpu
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self._update(x.shape[0] * world)
        return loss

    def _update(self, batch: int) -> None:
        """Everything after backward: gradient clipping, the lr warm-up, Adam, the EMA, the counter, in a number of
        kernels that does not grow with the number of parameter tensors (foreach clipping and EMA; Adam when
        fused_adam). batch = images in this step over all processes (unused here: the warm-up and the EMA count
        optimizer steps, as torchcfm)."""
        cfg = self.cfg
        params = list(self.net.parameters())
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        # warm-up: update k (counted from 0) uses lr * min(k, W) / W, so the very first update uses lr 0
        warm = min(self.step, cfg.warmup_steps) / cfg.warmup_steps if cfg.warmup_steps > 0 else 1.0
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * warm
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step)) if cfg.ema_warmup else cfg.ema_decay
        with torch.no_grad():  # ema <- decay * ema + (1 - decay) * net, every step; buffers (the U-Net has none) copied
            torch._foreach_lerp_(list(self.ema.parameters()), params, 1 - decay)
            ema_buffers = list(self.ema.buffers())
            if ema_buffers:
                torch._foreach_copy_(ema_buffers, list(self.net.buffers()))
        self.step += 1

    def generate(self, seeds: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1]; image i starts from noise seeded by seeds[i] alone, scaled by the
        temperature.

        With the fixed-step samplers image i depends only on seeds[i]. dopri5 chooses one step-size sequence
        for the whole call (its error norm runs over the batch, as in torchcfm's and the paper's sampling), so
        there an image also depends on the others in its call, at the level of the tolerances rtol / atol.
        dopri5 runs the network in float32 whatever cfg.amp says (see Config.amp); the others under amp."""
        cfg = self.cfg
        (self.ema if cfg.sample_ema else self.net).eval()
        fwd = self._sample_fwd[cfg.sample_ema]
        amp = cfg.sampler != "dopri5"
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        with torch.inference_mode():
            x0 = torch.stack([torch.randn(shape, generator=torch.Generator(self.device).manual_seed(int(s)),
                                          device=self.device) for s in seeds])  # (N, C, H, W) float32
            if temperature != 1:
                x0 = x0 * temperature

            def f(t, x):
                with self._autocast(enabled=amp):
                    return fwd(t, self._input(x)).float()  # the ODE state stays float32

            x, self.nfe = SAMPLERS[cfg.sampler](f, x0, cfg)
        return x.clamp(-1, 1).contiguous()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.net.load_state_dict(d["net"])
        self.ema.load_state_dict(d["ema"])
        _load_adam_state(self.opt, d["opt"])
        self.step = int(d["step"])

    def load_pretrained(self, path: str) -> None:
        """torchcfm's checkpoint: net_model -> net, ema_model -> EMA (either one for both if only one is there),
        Adam's moments when they fit (as Bertrand et al. resume it; its lr and options stay this Config's), and
        a step counter past the warm-up."""
        ckpt = read_official(path)
        net_sd = ckpt.get("net_model", ckpt.get("ema_model"))
        self.net.load_state_dict(net_sd)
        self.ema.load_state_dict(ckpt.get("ema_model", net_sd))
        if "optim" in ckpt:
            adam, params = ckpt["optim"], list(self.net.parameters())  # torchcfm registers them in this order
            groups = adam.get("param_groups", [])
            fits = len(groups) == 1 and groups[0]["params"] == list(range(len(params))) and all(
                "exp_avg" in s and s["exp_avg"].shape == params[i].shape for i, s in adam.get("state", {}).items())
            if fits:
                _load_adam_state(self.opt, adam)
            else:
                warnings.warn(f"optimizer state of '{path}' does not fit this network; starting Adam afresh")
        self.step = max(int(ckpt.get("step", 0)) + 1, self.cfg.warmup_steps)  # file's step = last update index


# ----------------------------------------------------------------------------------------------------
# Official checkpoints: torchcfm's torch.save({"net_model", "ema_model", "sched", "optim", "step"}) in
# train_cifar10.py


def read_official(path) -> dict:
    """torchcfm's checkpoint file as a dict, with any DataParallel "module." prefix removed from the weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not ({"net_model", "ema_model"} & ckpt.keys()):
        raise ValueError("not a torchcfm checkpoint (no 'net_model' / 'ema_model' entry)")
    for key in ("net_model", "ema_model"):
        if key in ckpt:
            ckpt[key] = {k.removeprefix("module."): v for k, v in ckpt[key].items()}
    return ckpt


def load_official(path, cfg: Config | None = None, ema: bool = True) -> UNet:
    """The network of a torchcfm checkpoint (EMA weights by default), in eval mode, called as net(t, x).

    cfg defaults to the paper preset (torchcfm's CIFAR-10 U-Net); the weights load strictly."""
    ckpt = read_official(path)
    net = UNet(cfg or make_config("paper"))
    net.load_state_dict(ckpt["ema_model" if ema and "ema_model" in ckpt else "net_model"])
    return net.eval()


# ----------------------------------------------------------------------------------------------------
# Command line: a summary of the network and the sampler of a preset

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=list(PRESETS))
    args = p.parse_args()
    cfg = make_config(args.preset)
    net = UNet(cfg)
    print(f"otcfm {args.preset}: {cfg.img_channels}x{cfg.img_resolution}x{cfg.img_resolution} images, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters, {len(net.state_dict())} state-dict entries")
    print(f"sampler {cfg.sampler}, " + ("adaptive steps" if cfg.sampler == "dopri5" else f"{cfg.steps} steps"))
