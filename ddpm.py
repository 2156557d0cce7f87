"""ddpm.py -- DDPM (Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020) in one file.

The DDPM of the retraining paper (Bertrand et al., ICLR 2024) is tqch/ddpm-torch's CIFAR-10 model,
sampled with 100-step DDIM (Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021).
This file holds, top to bottom:

    Config, PRESETS      hyperparameters; "paper" = tqch's CIFAR-10 config, "small" = 8x8 digits on a CPU,
                         "mnist" = 32x32 greyscale on a CPU
    UNet                 Ho et al.'s U-Net with tqch/ddpm-torch's module names, so its checkpoints load strictly
    training loss        linear beta schedule, q(x_t | x_0), ddpm_loss: L_simple (optionally min-SNR weighted)
    samplers             ancestral DDPM (fixed-large variance), DDIM (eta = 0), DPM-Solver++(2M); float64 time grid
    device plumbing      speed profile, NHWC weights, torch.compile's eager fallback, Adam state: as in edm.py, otcfm.py
    Model                the interface retrain.py uses: train_step, generate, state dicts, load_pretrained, profile
    load_official        a released tqch/ddpm-torch checkpoint file -> UNet

Run:
    python retrain.py --model ddpm --preset small --lam 1 --iters 20            # 8x8 digits, CPU
    python retrain.py --model ddpm --preset paper --data cifar10 --init official --lam 1 --iters 5
    python ddpm.py --preset paper                                                # network summary
    python -m pytest tests/test_ddpm.py
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

# Sources quoted below: [Ho] Ho et al. 2020; [DDIM] Song et al. 2021; [Lu] Lu et al., "DPM-Solver++: Fast
# Solver for Guided Sampling of Diffusion Probabilistic Models", 2022; [tqch] tqch/ddpm-torch
# configs/cifar10.json, train.py, generate.py, ddim.py; [QB3] the retraining paper's code;
# [Hang] Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023;
# [digits] a CPU sizing trial on the 8x8 digits.
# [digits-2] a second one, judged in the digits classifier's feature space (retrain.py's default there):
#           classifier-space FD of 1,797 EMA samples against the 1,797 digits, one seed, on a 2-core CPU.
# [mnist] a sizing trial on MNIST 32x32 (1,000 training images, batch 64, one CPU thread each): classifier-space FD
#         of 1,000 samples against 1,000 test digits (real vs real: 4.8 +- 2.0). 16/32/64 channels: 109 after 1,600
#         steps (0.84 s/step); 32/64/64: 182 after 750 (2.1 s/step), the same CPU time; at 600 steps min-SNR 229,
#         L_simple 371, OT-CFM's mnist preset 161 (reproduce.py mnist runs OT-CFM).

# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    # data (retrain.py sets these from the data set)
    img_channels: int = 3  # image channels (CIFAR-10: 3)
    img_resolution: int = 32  # image height = width in pixels (CIFAR-10: 32)
    # network: the keyword arguments of tqch's UNet
    hid_channels: int = 128  # channels at level 0 [Ho, tqch]
    ch_multipliers: tuple = (1, 2, 2, 2)  # channels of level i = hid_channels * ch_multipliers[i] [Ho, tqch]
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up) [Ho, tqch]
    apply_attn: tuple = (False, True, False, False)  # self-attention after each block of level i (16x16) [Ho, tqch]
    drop_rate: float = 0.1  # dropout probability inside residual blocks [Ho, tqch]
    norm_groups: int = 32  # GroupNorm groups; every level's channels must be a multiple [Ho, tqch: 32]
    resample_conv: bool = True  # a 3x3 conv in each down- and upsampling [Ho: resamp_with_conv]; False: 2x2 average
    #                             pooling down, nearest-neighbour up, no weights
    # diffusion
    timesteps: int = 1000  # T, number of noise levels [Ho Sec. 4]
    beta_1: float = 1e-4  # first beta of the linear schedule [Ho Sec. 4]
    beta_T: float = 0.02  # last beta of the linear schedule [Ho Sec. 4]
    # training
    batch: int = 128  # images per optimizer step [Ho, tqch]
    batch_gpu: int = 0  # images per forward/backward pass on one process; 0: its whole share of batch. Smaller values
    #                     accumulate gradients over micro-batches: the same update in less memory [EDM: --batch-gpu]
    lr: float = 2e-4  # Adam learning rate (betas 0.9/0.999, eps 1e-8) [Ho, tqch]
    warmup: int = 5000  # optimizer steps of linear lr warm-up, lr * min((step + 1) / warmup, 1) [tqch]
    grad_clip: float = 1.0  # max global gradient norm, 0 = off [Ho, tqch]
    ema_decay: float = 0.9999  # EMA decay per step, ramped as min(decay, (1 + n) / (10 + n)) [tqch]
    min_snr: float = 0.0  # 0: L_simple [Ho]; gamma > 0: each image's loss weighted min(SNR_t, gamma) / SNR_t [Hang]
    xflip: bool = True  # random horizontal flips of training images [Ho, tqch]
    pretrain_kimg: float = 49920.0  # thousand images to train from scratch: 1000 epochs x 390 steps x 128,
    #                                 the epoch-1000 checkpoint the paper started from [QB3]
    kimg: float = 50.0  # thousand images of fine-tuning per retraining iteration (the project's paper presets)
    # sampling
    sampler: str = "ddim"  # "ddim" (eta 0) | "ddpm" (ancestral, fixed-large variance) | "dpm2m" (2nd order) [QB3: DDIM]
    sample_steps: int = 100  # network evaluations per image [QB3]; ddpm, 1000, uniform = Ho et al.'s sampler
    skip_schedule: str = "quadratic"  # time grid: "quadratic" (ends at t = 0.8 T) | "uniform" [QB3, DDIM]
    sample_batch: int = 512  # images per generate() call; memory only, images depend on their seed alone
    sample_ema: bool = True  # sample the EMA weights; the paper's DDPM runs sampled the raw ones (no --use-ema) [QB3]
    # engineering: speed only, resolved once against the device into Model.profile
    amp: str = "auto"  # autocast dtype of the network: "auto" (bf16 on CUDA, fp32 elsewhere) | "bf16" | "fp32";
    #                    bf16 also selects PyTorch's fused attention kernel, fp32 the explicit float32 softmax
    channels_last: str = "auto"  # NHWC weights and activations: "auto" (on CUDA) | "true" | "false"
    fused_adam: str = "auto"  # one fused kernel for all of Adam: "auto" (on CUDA) | "true" | "false"
    compile: bool = False  # torch.compile the network (eager, with a warning, if compiling fails)


PRESETS = {
    "paper": {},  # the defaults above: tqch's configs/cifar10.json, 35,746,307 parameters
    "small": dict(  # 8x8 digits on a 2-core CPU, float32
        img_channels=1,
        img_resolution=8,
        hid_channels=16,  # 16 channels at 8x8, 32 at 4x4: 163,985 parameters, 7.7 MFLOP per image forward
        ch_multipliers=(1, 2),  # two levels: 8x8 and 4x4
        num_res_blocks=1,
        apply_attn=(False, False),  # attention only in the 4x4 middle block
        drop_rate=0.0,  # [digits-2]: without dropout, FD after 2k / 3k steps 6.0 / 4.2 instead of 7.6 / 4.9
        norm_groups=8,  # 2-4 channels per group
        xflip=False,  # a mirrored digit is not a digit
        lr=2e-3,  # [digits]: Adam 2e-3 trained this size well
        min_snr=5.0,  # [digits-2]: with the 2M sampler, FD 1.71 after 6k steps against L_simple's 1.99 (seeds 0-2)
        warmup=100,  # short warm-up; the run is only thousands of steps
        ema_decay=0.999,  # ramped (see Config): 0.9985 after 6,000 steps, a half-life of ~460 steps, ~5 iterations
        pretrain_kimg=768.0,  # 6,000 steps of 128 [digits-2]: FD 1.29 / 1.69 / 2.16 for seeds 0 / 1 / 2, against
        #                      1.60 / 1.81 / 2.31 after 5k and 1.17 / 1.51 / 2.11 after 7k; L_simple with DDIM-25 took
        #                      7k steps to reach 1.63 / 1.91 / 2.88, at 0.01 higher precision (README)
        kimg=12.8,  # 100 steps of 128 per retraining iteration (3.6 epochs of the 3,594 images at lam = 1)
        sampler="dpm2m",  # [digits-2]: after the same 7k steps, 12 steps of DPM-Solver++(2M) gave FD 1.59 (min-SNR)
        sample_steps=12,  # and 1.85 (L_simple), DDIM-25 1.85 and 2.14, DDIM-12 2.94 (seeds 0-2; README)
        sample_batch=512,  # measured 1.5x faster than one call of 2,048 on one CPU thread
    ),
    "mnist": dict(  # 32x32 greyscale (MNIST, Fashion-MNIST padded) on a 2-core CPU, float32
        img_channels=1,
        img_resolution=32,
        hid_channels=16,  # 16 channels at 32x32, 32 at 16x16, 64 at 8x8: 0.69M parameters [mnist]
        ch_multipliers=(1, 2, 4),
        num_res_blocks=1,
        apply_attn=(False, False, True),  # attention at 8x8 (64 tokens) and in the middle block
        drop_rate=0.0,
        norm_groups=8,
        xflip=False,  # mirrored digits are not digits
        batch=64,  # more steps per CPU-minute than 128
        lr=2e-3,  # as "small"
        min_snr=5.0,  # as "small"
        warmup=100,
        ema_decay=0.995,  # a half-life of 138 steps: the EMA follows each 100-step iteration
        pretrain_kimg=320.0,  # 5,000 steps of 64, as otcfm.py's mnist preset
        kimg=6.4,  # 100 steps of 64 per retraining iteration
        sampler="dpm2m",  # as "small"
        sample_steps=12,
        sample_batch=250,
    ),
}


RANGES = {**dict.fromkeys(("hid_channels", "num_res_blocks", "norm_groups", "timesteps", "batch", "lr",
                             "pretrain_kimg", "kimg", "sample_steps", "sample_batch"), "> 0"),
          **dict.fromkeys(("batch_gpu", "warmup", "grad_clip", "min_snr"), ">= 0"), "drop_rate": "in [0, 1)",
          "ema_decay": "in [0, 1]"}  # what make_config accepts of each number


def _check_ranges(cfg) -> None:
    """Every number of RANGES within its range: a ValueError naming the field otherwise."""
    rules = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1,
             "in [0, 1]": lambda v: 0 <= v <= 1}
    for name, rule in RANGES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and rules[rule](value)):
            raise ValueError(f"{name} {value!r}: must be {rule}")


def make_config(preset: str = "paper", **overrides) -> Config:
    """The preset's Config with field overrides; unknown presets or fields raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; choose from {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(Config)}
    for key in overrides:
        if key not in names:
            raise ValueError(f"unknown Config field '{key}' for ddpm")
    cfg = Config(**{**PRESETS[preset], **overrides})
    _check_ranges(cfg)
    cfg.ch_multipliers, cfg.apply_attn = tuple(cfg.ch_multipliers), tuple(bool(a) for a in cfg.apply_attn)
    if len(cfg.apply_attn) != len(cfg.ch_multipliers):
        raise ValueError(f"apply_attn has {len(cfg.apply_attn)} entries for {len(cfg.ch_multipliers)} levels")
    if any(cfg.hid_channels * m % cfg.norm_groups for m in cfg.ch_multipliers):
        raise ValueError(f"hid_channels x ch_multipliers must be multiples of norm_groups ({cfg.norm_groups})")
    if cfg.img_resolution % 2 ** (len(cfg.ch_multipliers) - 1):
        raise ValueError(f"img_resolution {cfg.img_resolution} does not halve {len(cfg.ch_multipliers) - 1} times")
    if cfg.amp not in ("auto", "bf16", "fp32"):
        raise ValueError(f"amp '{cfg.amp}': choose auto, bf16 or fp32")
    for name in ("channels_last", "fused_adam"):  # Python bools accepted, stored as "true" / "false"
        value = getattr(cfg, name)
        if isinstance(value, bool):
            setattr(cfg, name, "true" if value else "false")
        elif value not in ("auto", "true", "false"):
            raise ValueError(f"{name} '{value}': choose auto, true or false")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler '{cfg.sampler}': choose from {', '.join(SAMPLERS)}")
    if cfg.skip_schedule not in ("quadratic", "uniform"):
        raise ValueError(f"skip_schedule '{cfg.skip_schedule}': choose quadratic or uniform")
    return cfg


OFFICIAL_URLS = {  # tqch/ddpm-torch's released checkpoint (2040 epochs = 795.6k steps, FID 3.19 per its README)
    "cifar10": "https://github.com/tqch/ddpm-torch/releases/download/checkpoints/cifar10_2040.pt",
}


# ----------------------------------------------------------------------------------------------------
# Network: the U-Net of Ho et al. (their Appendix B), named as in tqch/ddpm-torch


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids of the integer step t (B,) -> (B, dim): all sines, then all cosines [Ho App. B]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


class GroupNorm(nn.GroupNorm):
    """GroupNorm (32 groups in Ho et al.) with eps 1e-6 (TensorFlow's default), always computed in float32."""

    def __init__(self, channels: int, groups: int):
        super().__init__(groups, channels, eps=1e-6)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)


class ResidualBlock(nn.Module):
    """x + conv(dropout(act(norm(conv(act(norm(x))) + dense(act(emb)))))), 1x1 skip when channels change."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, drop_rate: float, groups: int = 32):
        super().__init__()
        self.norm1 = GroupNorm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.fc = nn.Linear(emb_ch, out_ch)
        self.norm2 = GroupNorm(out_ch, groups)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):  # x (B, C_in, H, W), emb = act(time embedding) (B, E)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.fc(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual; q, k, v from one fused 1x1 conv.
    fused: PyTorch's attention kernel; Model sets it to follow amp (on in bf16, off in fp32)."""

    def __init__(self, ch: int, fused: bool = False, groups: int = 32):
        super().__init__()
        self.fused = fused
        self.norm = GroupNorm(ch, groups)
        self.project_in = nn.Conv2d(ch, 3 * ch, 1)  # output channels: q, k, v
        self.project_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        q, k, v = self.project_in(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
        h = attention(q, k, v, fused=self.fused)  # (B, C, HW)
        return x + self.project_out(h.reshape(B, C, H, W))


def attention(q, k, v, fused: bool) -> torch.Tensor:
    """softmax(q . k / sqrt(C)) over the key positions, applied to v; q, k, v (B, C, HW) -> (B, C, HW).
    fused: PyTorch's attention kernel (any device; scores and softmax kept in float32 inside, which in bf16
    is both faster and more accurate than rounding the scores to bf16), else the explicit float32 softmax
    (the fp32 reference path; both agree with the reference within float32 rounding)."""
    if fused:
        return F.scaled_dot_product_attention(q.mT[:, None], k.mT[:, None], v.mT[:, None])[:, 0].mT
    w = torch.bmm(q.mT, k).float() / math.sqrt(q.shape[1])  # (B, HW query, HW key)
    w = torch.softmax(w, dim=-1)
    return torch.bmm(v, w.mT.to(v.dtype))  # sum over keys of v * weight


class ResAttn(nn.ModuleList):
    """A residual block followed by attention (module indices 0 and 1, as in tqch)."""

    def forward(self, x, emb):
        return self[1](self[0](x, emb))


class SamePad(nn.Module):
    """TensorFlow's "SAME" padding of a 3x3 stride-2 conv on even sizes: 0 top/left, 1 bottom/right."""

    def forward(self, x):
        return F.pad(x, (0, 1, 0, 1))


class UNet(nn.Module):
    """Ho et al.'s epsilon-prediction U-Net; net(x (B, C, H, W), t (B,) integer steps 0..T-1) -> eps."""

    def __init__(self, in_channels=3, hid_channels=128, out_channels=3, ch_multipliers=(1, 2, 2, 2),
                 num_res_blocks=2, apply_attn=(False, True, False, False), drop_rate=0.1, fused_attn=False,
                 norm_groups=32, resample_conv=True):
        super().__init__()
        G = norm_groups
        self.hid_channels, self.levels, self.num_res_blocks = hid_channels, len(ch_multipliers), num_res_blocks
        emb_ch = 4 * hid_channels

        def block(cin, cout, attn):
            res = ResidualBlock(cin, cout, emb_ch, drop_rate, G)
            return ResAttn([res, AttentionBlock(cout, fused_attn, G)]) if attn else res

        self.embed = nn.Sequential(nn.Linear(hid_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.in_conv = nn.Conv2d(in_channels, hid_channels, 3, padding=1)
        ch, skips = hid_channels, [hid_channels]  # channels of the activations kept for the up path
        self.downsamples = nn.ModuleDict()
        for i, mult in enumerate(ch_multipliers):
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(block(ch, hid_channels * mult, apply_attn[i]))
                ch = hid_channels * mult
                skips.append(ch)
            if i < self.levels - 1:  # index 0 of the Sequential is the padding
                level.append(nn.Sequential(SamePad(), nn.Conv2d(ch, ch, 3, stride=2)) if resample_conv
                             else nn.AvgPool2d(2))
                skips.append(ch)
            self.downsamples[f"level_{i}"] = level
        self.middle = nn.ModuleList([block(ch, ch, False), AttentionBlock(ch, fused_attn, G), block(ch, ch, False)])
        ups = {}
        for i in reversed(range(self.levels)):
            level = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.append(block(ch + skips.pop(), hid_channels * ch_multipliers[i], apply_attn[i]))
                ch = hid_channels * ch_multipliers[i]
            if i > 0:  # index 0 of the Sequential is the upsampling
                up = nn.Upsample(scale_factor=2, mode="nearest")
                level.append(nn.Sequential(up, nn.Conv2d(ch, ch, 3, padding=1)) if resample_conv else up)
            ups[f"level_{i}"] = level
        self.upsamples = nn.ModuleDict({f"level_{i}": ups[f"level_{i}"] for i in range(self.levels)})
        self.out_conv = nn.Sequential(GroupNorm(ch, G), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform weights, zero biases; layers ending a residual branch near zero (gain 1e-5) [Ho, tqch]."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        branch_ends = [m.conv2 for m in self.modules() if isinstance(m, ResidualBlock)]
        branch_ends += [m.project_out for m in self.modules() if isinstance(m, AttentionBlock)] + [self.out_conv[2]]
        for layer in branch_ends:
            nn.init.xavier_uniform_(layer.weight, gain=1e-5)

    def forward(self, x, t):  # x (B, C, H, W), t (B,) int64
        emb = F.silu(self.embed(timestep_embedding(t.expand(x.shape[0]), self.hid_channels)))  # (B, 4 hid)
        hs = [self.in_conv(x)]  # (B, hid, H, W)
        for i in range(self.levels):
            level = self.downsamples[f"level_{i}"]
            for j in range(self.num_res_blocks):
                hs.append(level[j](hs[-1], emb))
            if i < self.levels - 1:
                hs.append(level[-1](hs[-1]))  # (B, C, H/2, W/2)
        h = self.middle[2](self.middle[1](self.middle[0](hs[-1], emb)), emb)
        for i in reversed(range(self.levels)):
            level = self.upsamples[f"level_{i}"]
            for j in range(self.num_res_blocks + 1):
                h = level[j](torch.cat([h, hs.pop()], dim=1), emb)
            if i > 0:
                h = level[-1](h)  # (B, C, 2H, 2W)
        return self.out_conv(h)  # (B, C_out, H, W)


def build_net(cfg: Config, fused_attn: bool = False) -> UNet:
    return UNet(cfg.img_channels, cfg.hid_channels, cfg.img_channels, cfg.ch_multipliers, cfg.num_res_blocks,
                cfg.apply_attn, cfg.drop_rate, fused_attn, cfg.norm_groups, cfg.resample_conv)


# ----------------------------------------------------------------------------------------------------
# Training loss: the beta schedule, the forward process q(x_t | x_0), L_simple [Ho]


def linear_betas(cfg: Config) -> torch.Tensor:
    """beta_1..beta_T linearly spaced, float64 (T,) [Ho Sec. 4]; index t = 0..T-1 is step t + 1."""
    return torch.linspace(cfg.beta_1, cfg.beta_T, cfg.timesteps, dtype=torch.float64, device="cpu")


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, a draw of q(x_t | x_0) [Ho Eq. 4]."""
    a = alphas_bar.to(x0.device)[t][:, None, None, None]  # (B, 1, 1, 1) float64
    return a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise


def ddpm_loss(net, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_bar: torch.Tensor,
              min_snr: float = 0.0) -> torch.Tensor:
    """L_simple = mean ||noise - eps_theta(x_t, t)||^2 over pixels and batch, in float32 [Ho Eq. 14]. With
    min_snr = gamma > 0, each image's mean is first weighted min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t):
    the min-SNR-gamma loss for noise prediction [Hang], which stops the nearly clean steps from dominating."""
    eps = net(q_sample(x0, t, noise, alphas_bar), t).float()  # (B, C, H, W)
    if min_snr == 0:
        return F.mse_loss(eps, noise)
    a = alphas_bar.to(x0.device)[t]  # (B,) float64
    snr = a / (1 - a)
    weight = (snr.clamp(max=min_snr) / snr).float()  # (B,), 1 where SNR_t <= gamma
    return (weight * (eps - noise).square().mean(dim=(1, 2, 3))).mean()


# ----------------------------------------------------------------------------------------------------
# Samplers: sampler(eps_fn, x_T, alphas_bar, timesteps, gens) -> x_0. eps_fn(x, t) is the network in float32 at
# step t (a Python int), timesteps the increasing int64 grid (one network call each, last first), gens one
# torch.Generator per image. The grid and its abar are read on the host once (.tolist() of the two inputs, no
# other tensor op): every coefficient is then a Python float and nothing per step reads a tensor.

NOISE_BLOCK = 50  # steps of noise drawn at once per image: one randn kernel per image per block, not per step


def time_grid(schedule: str, steps: int, T: int) -> torch.Tensor:
    """The steps visited, increasing int64 (steps,), computed in float64: the paper's quadratic grid
    round(linspace(0, sqrt(0.8 T), steps)^2) [tqch ddim.py], or uniform floor(i T / steps) [DDIM Sec. 4.2]."""
    if schedule == "quadratic":
        return (torch.linspace(0, math.sqrt(0.8 * T), steps, dtype=torch.float64, device="cpu") ** 2).round().long()
    return (torch.arange(steps, dtype=torch.float64, device="cpu") * (T / steps)).floor().long()


def _x0_hat(x, eps, a: float) -> torch.Tensor:
    """x_0 predicted from eps, clipped to the data range: (x_t - sqrt(1 - abar) eps) / sqrt(abar) [Ho Eq. 15]."""
    return (math.sqrt(1 / a) * x - math.sqrt(1 / a - 1) * eps).clamp(-1, 1)


def _host_grid(alphas_bar: torch.Tensor, timesteps: torch.Tensor):
    """The grid's steps as Python ints and their abar as Python floats."""
    steps, abar = timesteps.tolist(), alphas_bar.tolist()
    return steps, [abar[t] for t in steps]


def noise_blocks(gens, shape, steps: int, device):
    """`steps` draws of per-image noise (N, *shape), one per step, made NOISE_BLOCK steps at a time: one randn of
    (k, *shape) per image and block from that image's own generator, so image i depends on gens[i] alone."""
    for start in range(0, steps, NOISE_BLOCK):
        k = min(NOISE_BLOCK, steps - start)
        block = torch.stack([torch.randn((k, *shape), generator=g, device=device) for g in gens])  # (N, k, *shape)
        yield from block.unbind(1)  # k views (N, *shape)


def ddpm_sampler(eps_fn, x, alphas_bar, timesteps, gens):
    """Ancestral DDPM sampling [Ho Alg. 2] with fixed-large variance beta_t, on the grid's abar (respaced)."""
    steps, a_all = _host_grid(alphas_bar, timesteps)
    noise = noise_blocks(gens, x.shape[1:], len(steps) - 1, x.device)  # every step but the last adds noise
    for i in reversed(range(len(steps))):
        a, a_prev = a_all[i], a_all[i - 1] if i > 0 else 1.0
        beta = 1 - a / a_prev  # the step's beta (= betas[t] on the full grid)
        x0 = _x0_hat(x, eps_fn(x, steps[i]), a)
        # posterior mean of q(x_{t-1} | x_t, x_0) [Ho Eq. 7]
        x = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x
        if i > 0:  # fixed-large variance sigma_t^2 = beta_t [Ho Sec. 3.2]; no noise at the last step
            x = x + math.sqrt(beta) * next(noise)  # noise (N, C, H, W)
    return x


def ddim_sampler(eps_fn, x, alphas_bar, timesteps, gens):
    """DDIM with eta = 0 [DDIM Eq. 12], x_0 clipped first and eps re-derived from it, as tqch/ddpm-torch does."""
    steps, a_all = _host_grid(alphas_bar, timesteps)
    for i in reversed(range(len(steps))):
        a, a_prev = a_all[i], a_all[i - 1] if i > 0 else 1.0
        x0 = _x0_hat(x, eps_fn(x, steps[i]), a)
        # x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        c2 = math.sqrt(1 - a) * math.sqrt(1 - a_prev) / (1 - a)
        c1 = math.sqrt(a_prev) * (1 - math.sqrt(a / a_prev) * c2)
        x = c1 * x0 + c2 * x
    return x


def dpm2m_sampler(eps_fn, x, alphas_bar, timesteps, gens):
    """DPM-Solver++(2M) [Lu Alg. 2]: the probability-flow ODE solved in lambda = log(alpha / sigma)
    with x_0 predictions (clipped, as in DDIM) extrapolated linearly from the previous step; second order at one
    network call per step. Its first step and its last (to abar = 1) are DDIM's."""
    steps, a_all = _host_grid(alphas_bar, timesteps)
    x0_last, h_last = None, None
    for i in reversed(range(len(steps))):
        a, a_prev = a_all[i], a_all[i - 1] if i > 0 else 1.0
        x0 = _x0_hat(x, eps_fn(x, steps[i]), a)
        if i == 0:  # sigma_prev = 0: the step lands on x_0 itself
            return x0
        lam, lam_prev = 0.5 * math.log(a / (1 - a)), 0.5 * math.log(a_prev / (1 - a_prev))  # log(alpha / sigma)
        h = lam_prev - lam
        # x_0 at the step's midpoint in lambda, extrapolated from the last step's; first order on the first
        # step and after a repeated grid step (the quadratic grid repeats steps from 50 steps on), whose h is 0
        d = x0 if not h_last else x0 + (h / (2 * h_last)) * (x0 - x0_last)
        # x_prev = (sigma_prev / sigma) x + alpha_prev (1 - e^-h) d; with d = x0 this is DDIM's step
        x = math.sqrt((1 - a_prev) / (1 - a)) * x + math.sqrt(a_prev) * -math.expm1(-h) * d
        x0_last, h_last = x0, h
    return x


SAMPLERS = {"ddpm": ddpm_sampler, "ddim": ddim_sampler, "dpm2m": dpm2m_sampler}


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
    """DDPM training and sampling: the network, its EMA, Adam, and the step counter."""

    def __init__(self, cfg: Config, device):
        self.cfg, self.device = cfg, torch.device(device)
        # the speed profile, resolved once against the device ("auto": on for CUDA, off elsewhere)
        on_cuda = self.device.type == "cuda"
        self.amp = "bf16" if cfg.amp == "bf16" or (cfg.amp == "auto" and on_cuda) else "fp32"
        self.channels_last = _resolve(cfg.channels_last, on_cuda)
        self.fused_adam = _resolve(cfg.fused_adam, on_cuda)
        net = build_net(cfg, fused_attn=self.amp == "bf16")  # PyTorch's fused attention kernel in bf16
        self.net = _to_device(net, self.device, self.channels_last)  # before Adam
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=self.fused_adam)
        self.step, self.nfe = 0, 0
        self.betas = linear_betas(cfg)  # float64 (T,), on the CPU: samplers read python floats from it
        self.alphas_bar = torch.cumprod(1 - self.betas, dim=0)  # abar_t = prod_{s <= t} (1 - beta_s) [Ho Sec. 2]
        self._alphas_bar_dev = self.alphas_bar.to(self.device)
        train_net = self.net
        if torch.distributed.is_initialized():  # device_ids=None: the module's own device, CPU or one GPU
            train_net = torch.nn.parallel.DistributedDataParallel(self.net)
        # the network calls of training and of sampling (by sample_ema), through torch.compile when cfg.compile
        self._train_fwd = _compiled(train_net, cfg.compile)
        self._sample_fwd = {False: _compiled(self.net, cfg.compile), True: _compiled(self.ema, cfg.compile)}

    @property
    def profile(self) -> dict:
        """The resolved speed settings (retrain.py prints them at start)."""
        return {"amp": self.amp, "channels_last": self.channels_last, "fused_adam": self.fused_adam,
                "compile": bool(self.cfg.compile)}

    def _autocast(self):
        """bf16 autocast of the network when amp is bf16."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16")

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) as the network takes it: NHWC in memory when channels_last (the same values)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """L_simple (or min-SNR) of the training network on x (B, C, H, W) in [-1, 1] at uniform random steps, 0-dim
        float32."""
        return self._loss(*self._draw(x))

    def _draw(self, x: torch.Tensor) -> tuple:
        """The loss's inputs for x, its random draws included, each with the batch first: (x, t (B,), noise)."""
        t = torch.randint(0, self.cfg.timesteps, (x.shape[0],), device=self.device)  # uniform steps [Ho Alg. 1]
        return x, t, torch.randn_like(x)  # noise (B, C, H, W)

    def _loss(self, x, t, noise) -> torch.Tensor:
        """The loss of the training network on _draw's inputs, 0-dim float32."""
        with self._autocast():
            return ddpm_loss(self._train_fwd, self._input(x), t, noise, self._alphas_bar_dev, self.cfg.min_snr)

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
        """One Adam step on the loss for x (B, C, H, W) in [-1, 1], then the EMA update. Returns the detached
        loss (0-dim float32, this process's mean) on the device: nothing here waits for the device."""
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self._backward(self._draw(x))  # all of x's draws first: the same update whatever batch_gpu
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self._update(x.shape[0] * world)
        return loss

    def _update(self, batch: int) -> None:
        """Everything after backward, in a fixed number of kernels however many parameter tensors: clipping,
        the warm-up lr, Adam, the EMA, the step counter. batch (images in this step over all processes) is
        unused: DDPM's warm-up and EMA ramp count optimizer steps."""
        cfg, params = self.cfg, list(self.net.parameters())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * min((self.step + 1) / cfg.warmup, 1.0)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():  # ema <- decay ema + (1 - decay) net, in float32 (the U-Net has no buffers)
            torch._foreach_lerp_(list(self.ema.parameters()), params, 1 - decay)
        self.step += 1

    @torch.inference_mode()
    def generate(self, seeds: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Samples (N, C, H, W) in [-1, 1]; image i depends only on seeds[i] (its own generator). A temperature
        scales the initial noise x_T (the ancestral sampler's later noise is not scaled)."""
        cfg = self.cfg
        (self.ema if cfg.sample_ema else self.net).eval()
        fwd = self._sample_fwd[cfg.sample_ema]
        gens = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds.tolist()]
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        x = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in gens])  # x_T (N, C, H, W)
        if temperature != 1:
            x = x * temperature
        grid = time_grid(cfg.skip_schedule, cfg.sample_steps, cfg.timesteps)

        def eps_fn(x, t):  # network call in bf16 or fp32; the sampler's state stays float32
            with self._autocast():  # t, a Python int, filled in on the device: no host-to-device copy
                t = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
                return fwd(self._input(x), t).float()

        x = SAMPLERS[cfg.sampler](eps_fn, x, self.alphas_bar, grid, gens)
        self.nfe = len(grid)
        return x.clamp(-1, 1).contiguous()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step, "config": dataclasses.asdict(self.cfg)}

    def load_state_dict(self, d: dict) -> None:
        self.net.load_state_dict(d["net"])
        self.ema.load_state_dict(d["ema"])
        _load_adam_state(self.opt, d["opt"])  # a run saved in another profile (e.g. begun on the CPU) too
        self.step = int(d["step"])

    def load_pretrained(self, path: str) -> None:
        """A tqch/ddpm-torch checkpoint file, as tqch's --resume reads it: model weights into the net, EMA weights
        into the EMA (a file with one set fills both), Adam's moments when present, and the step counter
        past the warm-up."""
        raw, ema, updates, adam = read_official(path)
        check_keys(self.net, raw if raw is not None else ema, path)
        check_keys(self.net, ema if ema is not None else raw, path)
        self.net.load_state_dict(raw if raw is not None else ema)
        self.ema.load_state_dict(ema if ema is not None else raw)
        self.step = max(self.step, self.cfg.warmup, updates)
        if adam is not None:
            params = list(self.net.parameters())  # tqch registers its modules in this same order
            fits = len(adam["param_groups"]) == 1 and len(adam["param_groups"][0]["params"]) == len(params) and all(
                tuple(s["exp_avg"].shape) == tuple(params[i].shape) for i, s in adam["state"].items())
            if fits:  # the moments only; learning rate and options stay this Config's
                _load_adam_state(self.opt, adam)
            else:
                warnings.warn(f"'{path}': its optimizer state does not fit this network; Adam starts afresh")


# ----------------------------------------------------------------------------------------------------
# Official checkpoints: tqch/ddpm-torch's {"model", "optimizer", "ema": {"decay", "shadow", "num_updates"},
# "scheduler", "epoch", ...}; "model" keys carry "module." when trained with DDP, "shadow" keys never do.


def read_official(path: str):
    """(model weights, EMA weights, EMA update count, Adam state) of a tqch checkpoint or a bare state dict;
    None for what the file lacks."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint dict")

    def strip(sd):
        return {k.removeprefix("module."): v for k, v in sd.items()} if isinstance(sd, dict) else None

    if "model" not in ckpt and "ema" not in ckpt:  # a bare state dict
        if not all(torch.is_tensor(v) for v in ckpt.values()):
            raise ValueError(f"'{path}' is neither a tqch/ddpm-torch checkpoint (with 'model' / 'ema') nor a state "
                             f"dict; its keys: {', '.join(list(map(str, ckpt))[:6])}")
        return strip(ckpt), None, 0, None
    ema = ckpt.get("ema")
    shadow = strip(ema.get("shadow")) if isinstance(ema, dict) else None
    updates = int(ema.get("num_updates", 0)) if isinstance(ema, dict) else 0
    return strip(ckpt.get("model")), shadow, updates, ckpt.get("optimizer")


def check_keys(net: nn.Module, sd: dict, path: str) -> None:
    """Raise a ValueError naming the missing, unexpected and mis-shaped keys of sd for net."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shape:
        def some(names):
            return ", ".join(names[:4]) + (f" ... ({len(names)} in all)" if len(names) > 4 else "")
        parts = [f"{what}: {some(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("shape (file vs net)", shape)) if names]
        raise ValueError(f"'{path}' is not a tqch/ddpm-torch UNet of this configuration; " + "; ".join(parts))


def load_official(path: str, cfg: Config | None = None) -> UNet:
    """A tqch/ddpm-torch checkpoint -> this file's UNet in eval mode, float32, on the CPU (EMA weights when the
    file has them, else the model's); cfg describes the architecture (default: the paper preset)."""
    raw, ema, _, _ = read_official(path)
    sd = ema if ema is not None else raw
    if sd is None:
        raise ValueError(f"'{path}' has neither 'ema.shadow' nor 'model' weights")
    net = build_net(cfg or make_config("paper"))
    check_keys(net, sd, path)
    net.load_state_dict(sd)
    return net.eval()


# ----------------------------------------------------------------------------------------------------
# Command line: a summary of the network and the sampler of a preset

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=list(PRESETS))
    args = p.parse_args()
    cfg = make_config(args.preset)
    net = build_net(cfg)
    grid = time_grid(cfg.skip_schedule, cfg.sample_steps, cfg.timesteps)
    print(f"ddpm {args.preset}: {cfg.img_channels}x{cfg.img_resolution}x{cfg.img_resolution} images, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters, {len(net.state_dict())} state-dict entries")
    print(f"sampler {cfg.sampler}, {len(grid)} network evaluations per image, {cfg.skip_schedule} grid "
          f"{grid[:6].tolist()} ... {grid[-3:].tolist()}")
