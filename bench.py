"""bench.py -- how fast the retraining loop's parts run here, and what one retraining iteration would cost.

Bertrand et al., "On the Stability of Iterative Retraining of Generative Models on their Own Data"
(ICLR 2024) retrain DDPM, EDM and OT-CFM on CIFAR-10 for 20 iterations, each of: 50 kimg of fine-tuning,
50,000 samples, and FID + precision + recall of those samples. This file measures the pieces that cost
(through the same calls retrain.py makes) and prints tables, optionally also as JSON:

    models      per model file at a preset: Model.train_step images/s at a batch, Model.generate images/s
                with the sampler's network evaluations (NFE), FLOPs per image, model-FLOP utilization
                (MFU, CUDA only: achieved FLOP/s over the GPU's dense bf16 peak), peak memory
    fid         fid.inception_features images/s (Inception-v3 with random weights: same speed as the
                released ones), and the metric arithmetic (covariance, Frechet distance, precision/recall)
    projection  one retraining iteration at the paper's settings from those rates, and 20 of them
    raw         the bare networks, forward+backward (train mode, batch 16) and forward (eval, no_grad,
                batch 64), beside the CPU figures of the reference implementations (2 threads, float32),
                shown when the run is comparable: paper preset, CPU, 2 threads (any --dtype)

The GPU acceptance check, which runs these measurements at the paper presets and asserts on what they
return, is a pytest file: `python -m pytest -m gpu -v` (tests/test_gpu_check.py).

Every rate is the median over timed repetitions after warm-up. Where a sampler is too slow to run in
full (the paper networks on a CPU), generate() is timed with a few network evaluations and scaled to the
sampler's NFE; the table says so ("projected") next to each such number.

    python bench.py                                    # all models, paper presets, default device
    python bench.py --quick                            # CPU, one thread, small presets: well under two minutes
    python bench.py --model edm --ffhq64 --dtype bf16 --compile --json bench.json
    python bench.py --only raw --device cpu --threads 2 --dtype fp32     # the reference-comparable rows
    python bench.py --model otcfm --set otcfm.sampler=euler              # any Config field of a model
    python bench.py --demo                             # the small presets on the CPU, README's command
    python -m pytest tests/test_bench.py
"""

import argparse
import ast
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import fid
import jobs
import reproduce

# ----------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Config:
    # the retraining iteration that is projected: the paper's CIFAR-10 settings
    kimg: float = 50.0            # thousand images of fine-tuning per iteration [paper; every paper preset's kimg]
    n_samples: int = 50_000       # synthetic images drawn per iteration [paper]
    n_eval: int = 50_000          # generated images whose Inception features are extracted per iteration [paper];
    #                               the real images' features are computed once and cached (fid.reference)
    iterations: int = 20          # retraining iterations of one run [paper]
    feat_dim: int = 2048          # Inception pool3 feature size (FID)
    # the bare-network rows, as the reference CPU figures were measured
    ref_train_batch: int = 16     # images per forward+backward pass, train mode, loss mean(out^2)
    ref_eval_batch: int = 64      # images per forward pass, eval mode, under no_grad
    ref_threads: int = 2          # torch threads of the reference figures
    # timing
    short_nfe: int = 3            # network evaluations of the shortened sampler whose time is scaled to the NFE


CFG = Config()
MODELS = ("ddpm", "edm", "otcfm")

# images/s of the reference implementations' networks at the paper configurations on a 2-vCPU machine of
# the kind this project is developed for: torch CPU build, 2 threads, float32, 32x32 inputs, median after
# warm-up. fwd+bwd: train mode, batch 16, backward of mean(out^2); fwd: eval mode, no_grad, batch 64.
REFERENCE_CPU = {
    ("ddpm", "fwd+bwd"): 7.7,     # tqch/ddpm-torch UNet (7.4 including the Adam step)
    ("ddpm", "fwd"): 23.5,
    ("edm", "fwd+bwd"): 2.3,      # NVlabs EDM: EDMPrecond + SongUNet (DDPM++)
    ("edm", "fwd"): 7.0,
    ("otcfm", "fwd+bwd"): 7.4,    # torchcfm UNetModelWrapper
    ("otcfm", "fwd"): 23.5,
    ("fid", "fwd"): 12.7,         # pytorch-fid InceptionV3, 32x32 input resized to 299
}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a piece of the name
# torch.cuda.get_device_name() reports; the first match wins, so the specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),              # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name (TFLOP/s), None when not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float | None):
    """Model-FLOP utilization: achieved FLOP/s over the peak; "n/a" without a known peak."""
    if peak_tflops is None:
        return "n/a"
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


def project_iteration(train_img_s: float, sample_img_s: float, feat_img_s: float, metrics_s: float,
                      cfg: Config = CFG) -> dict:
    """Seconds of one retraining iteration at the paper's settings from measured rates:
    kimg * 1000 / train + n_samples / sample + n_eval / features + metrics, and of cfg.iterations of them."""
    parts = {"train_s": cfg.kimg * 1000 / train_img_s, "sample_s": cfg.n_samples / sample_img_s,
             "features_s": cfg.n_eval / feat_img_s, "metrics_s": metrics_s}
    iteration = sum(parts.values())
    return {**parts, "iteration_s": iteration, "run_s": cfg.iterations * iteration}


# ----------------------------------------------------------------------------------------------------
# Measuring: timing, memory, FLOPs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones (the median is the figure used)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class PeakMemory:
    """Peak memory of a stretch of code in MiB: CUDA max_memory_allocated, or on the CPU the process's peak
    resident set size (getrusage), whose high-water mark Linux lets a process reset (/proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cuda" or self._clear_refs()
        self.kind = ("CUDA max_memory_allocated" if device.type == "cuda" else
                     "process peak RSS" + ("" if self.resettable else " since start (not resettable here)"))

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def count_flops(fn) -> int:
    """FLOPs of the matrix products and convolutions fn() runs (torch.utils.flop_counter: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------
# The model files: building one at a preset, calling its bare network, shortening its sampler


def model_config(name: str, preset: str, overrides: dict, amp: str, compile_: bool):
    """(module, Config) of a model file at a preset, with bench's precision and compile settings."""
    module = importlib.import_module(name)
    return module, module.make_config(preset, **{**overrides, "amp": amp, "compile": compile_})


def call_net(name: str, net, x: torch.Tensor, cfg) -> torch.Tensor:
    """The model's bare network on a batch x (B, C, H, W) with random conditioning of the right kind."""
    B = x.shape[0]
    if name == "ddpm":  # eps(x_t, t), integer step t
        return net(x, torch.randint(0, cfg.timesteps, (B,), device=x.device))
    if name == "edm":  # D(x; sigma), ln sigma ~ N(P_mean, P_std^2) as in training
        return net(x, (torch.randn(B, device=x.device) * cfg.P_std + cfg.P_mean).exp())
    if name == "otcfm":  # v(t, x), t in [0, 1]
        return net(torch.rand(B, device=x.device), x)
    raise ValueError(name)


def sampler_name(name: str, cfg) -> str:
    """The sampler a model's Config selects, e.g. "ddim-100", "heun-18", "dopri5"."""
    if name == "ddpm":
        return f"{cfg.sampler}-{cfg.sample_steps}"
    if name == "edm":
        return f"{cfg.sampler}-{cfg.num_steps}" + (f" churn {cfg.S_churn:g}" if cfg.S_churn > 0 else "")
    if name == "otcfm":
        return "dopri5" if cfg.sampler == "dopri5" else f"{cfg.sampler}-{cfg.steps}"
    raise ValueError(name)


def short_sampler(name: str, cfg, k: int) -> dict:
    """Config fields that make generate() take about k network evaluations per image (same work per evaluation)."""
    if name == "ddpm":
        return {"sample_steps": k}                      # DDIM, DDPM, DPM-Solver++(2M): one evaluation per step
    if name == "edm":
        if cfg.sampler == "dpm2m":
            return {"num_steps": max(2, k)}             # DPM-Solver++(2M): N evaluations
        return {"num_steps": max(2, (k + 1) // 2)}       # Heun: 2 N - 1 evaluations
    if name == "otcfm":
        return {"sampler": "euler", "steps": k}          # Euler: one evaluation per step
    raise ValueError(name)


@contextlib.contextmanager
def changed(obj, **values):
    """Set attributes of obj for the duration of a with-block, then restore them."""
    saved = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# ----------------------------------------------------------------------------------------------------
# The measurements


def bench_model(name: str, preset: str, s: dict) -> tuple[dict, list[dict]]:
    """One model at a preset: (its row of training / sampling figures, its bare-network rows)."""
    device, bf16 = s["device"], s["dtype"] == "bf16"
    module, cfg = model_config(name, preset, s["overrides"].get(name, {}), s["dtype"], s["compile"])
    torch.manual_seed(0)
    mem = s["mem"]
    model = module.Model(cfg, device)
    shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    row = {"model": row_name(name, preset), "preset": preset, "resolution": cfg.img_resolution,
           "channels": cfg.img_channels,
           "params_M": sum(p.numel() for p in model.net.parameters()) / 1e6,
           "profile": dict(model.profile) if hasattr(model, "profile") else None}

    # FLOPs per image: one forward (eval) and one forward+backward (train mode) of the bare network, fp32
    net = model.net
    x1 = torch.rand(1, *shape, device=device) * 2 - 1
    net.eval()
    with torch.no_grad():
        fwd_flops = count_flops(lambda: call_net(name, net, x1, cfg))
    net.train()
    train_flops = count_flops(lambda: call_net(name, net, x1, cfg).float().square().mean().backward())
    net.zero_grad(set_to_none=True)
    row.update(fwd_gflop=fwd_flops / 1e9, train_gflop=train_flops / 1e9)
    peak = s["peak_tflops"]

    if s["only"] != "raw":
        # training: Model.train_step on random [-1, 1] images at the chosen batch
        batch = s["batch"] or (cfg.batch if device.type == "cuda" else CFG.ref_train_batch)
        x = torch.rand(batch, *shape, device=device) * 2 - 1
        losses = []  # what train_step returned (0-dim tensors on the device), read once the timing is done
        mem.reset()
        times = time_calls(lambda: losses.append(model.train_step(x)), s["warmup"], s["iters"], device)
        t = statistics.median(times)
        row.update(train_batch=batch, train_img_s=batch / t, train_peak_mib=mem.read(), train_times_s=times,
                   train_losses=[float(v) for v in losses])
        row["train_mfu"] = mfu(train_flops, row["train_img_s"], peak)

    if s["only"] != "raw" and s["sample"]:
        # sampling: Model.generate, in full or with a shortened sampler scaled to the full NFE
        n = s["sample_n"] or (cfg.sample_batch if device.type == "cuda" else 8)
        seeds = torch.arange(n, dtype=torch.int64)
        sample_iters = s["sample_iters"] or min(s["iters"], 3)
        out = {}  # the last call's images

        def generate():
            out["x"] = model.generate(seeds)

        mem.reset()
        if s["sample_mode"] == "full":
            times = time_calls(generate, 1, sample_iters, device)
            t = statistics.median(times)
            row.update(nfe=model.nfe, sample_img_s=n / t, sample_basis=f"measured, {n} images per call")
        else:
            model.generate(seeds[:1])  # one image through the full sampler: its NFE
            nfe = model.nfe
            with changed(model.cfg, **short_sampler(name, model.cfg, CFG.short_nfe)):
                times = time_calls(generate, 1, sample_iters, device)
                k = model.nfe
            t = statistics.median(times)
            row.update(nfe=nfe, sample_img_s=n * k / (t * nfe),
                       sample_basis=f"projected from {k}-NFE generate() of {n} images")
        row.update(sample_batch=n, sampler=sampler_name(name, cfg), sample_times_s=times,
                   nfe_img_s=row["sample_img_s"] * row["nfe"])  # network evaluations of one image per second
        row["sample_peak_mib"] = mem.read()
        row["sample_mfu"] = mfu(fwd_flops * row["nfe"], row["sample_img_s"], peak)
        last = out["x"]  # (n, C, H, W)
        row["samples"] = {"shape": list(last.shape), "finite": bool(torch.isfinite(last).all()),
                          "min": float(last.min()), "max": float(last.max())}

    raw = []
    if s["only"] != "models":
        raw = bench_raw(name, preset, lambda xb: call_net(name, net, xb, cfg), net, shape, fwd_flops, train_flops,
                        bf16, s)
    del model, net
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, raw


def bench_raw(name, preset, call, net, shape, fwd_flops, train_flops, bf16, s) -> list[dict]:
    """The bare network: forward+backward in train mode and forward in eval mode under no_grad."""
    device, mem, rows = s["device"], s["mem"], []
    fn = torch.compile(call) if s["compile"] else call
    for kind, batch, flops in (("fwd+bwd", s["raw_train_batch"], train_flops), ("fwd", s["raw_eval_batch"], fwd_flops)):
        x = torch.rand(batch, *shape, device=device) * 2 - 1

        def step():
            with autocast(device, bf16):
                out = fn(x)
            out.float().square().mean().backward()
            net.zero_grad(set_to_none=True)

        def forward():
            with torch.no_grad(), autocast(device, bf16):
                fn(x)

        net.train(kind == "fwd+bwd")
        mem.reset()
        times = time_calls(step if kind == "fwd+bwd" else forward, s["warmup"], s["iters"], device)
        rows.append(raw_row(name, preset, kind, batch, times, flops, mem.read(), s))
    net.eval()
    return rows


def row_name(name: str, preset: str) -> str:
    return name if preset == "paper" else f"{name}/{preset}"


def raw_row(name, preset, kind, batch, times, flops_per_image, peak_mib, s) -> dict:
    """A bare-network row from the seconds of its timed calls, with the reference CPU figure beside it where
    it applies (paper preset, reference batch, CPU, as many threads; any dtype, to show what bf16 changes)."""
    t = statistics.median(times)
    img_s = batch / t
    ref_batch = CFG.ref_train_batch if kind == "fwd+bwd" else CFG.ref_eval_batch
    comparable = (preset == "paper" and batch == ref_batch and s["device"].type == "cpu"
                  and s["threads"] == CFG.ref_threads)
    ref = REFERENCE_CPU.get((name, kind)) if comparable else None
    return {"network": row_name(name, preset), "pass": kind, "batch": batch, "s_per_iter": t,
            "spread": max(times) / min(times), "times_s": times, "img_s": img_s,
            "tflop_s": flops_per_image * img_s / 1e12, "mfu": mfu(flops_per_image, img_s, s["peak_tflops"]),
            "peak_mib": peak_mib,
            "ref_img_s": ref if ref is not None else "n/a", "vs_ref": img_s / ref if ref is not None else "n/a"}


def bench_fid(s: dict) -> tuple[dict | None, list[dict]]:
    """fid.inception_features on uint8 32x32 images (as retrain.py passes its samples), the metric
    arithmetic, and the bare Inception forward row."""
    device, mem = s["device"], s["mem"]
    torch.manual_seed(0)
    net = fid.FIDInception().eval().requires_grad_(False).to(device)  # random weights: the same speed
    x1 = torch.zeros(1, 3, fid.CFG.resolution, fid.CFG.resolution, device=device)
    with torch.no_grad():
        flops = count_flops(lambda: net(x1))
    row, raw = None, []
    if s["fid"]:
        batch = s["feat_batch"] or (fid.CFG.batch_size if device.type == "cuda" else CFG.ref_eval_batch)
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)  # on the CPU, as the samples are
        mem.reset()
        times = time_calls(lambda: fid.inception_features(images, net, batch_size=batch, device=device, progress=False,
                                                        precision=s["feat_precision"]),
                           s["warmup"], s["iters"], device)
        row = {"network": "fid", "feat_batch": batch, "precision": s["feat_precision"], "gflop": flops / 1e9,
               "feat_img_s": batch / statistics.median(times), "feat_peak_mib": mem.read(), "feat_times_s": times}
        row["feat_mfu"] = mfu(flops, row["feat_img_s"], s["peak_tflops"])
        row.update(bench_metrics(s["metric_n"], s["metric_dim"], s["fd_dim"], device))
    if s["fid_raw"]:
        batch = s["raw_eval_batch"]
        x = torch.randint(0, 256, (batch, 3, 32, 32), device=device).float() / 127.5 - 1  # (B, 3, 32, 32)

        def forward():
            with torch.no_grad(), autocast(device, s["dtype"] == "bf16"):
                net(fid._to_inception_input(x, fid.CFG.resolution))  # (B, 3, 299, 299) -> (B, 2048)

        mem.reset()
        times = time_calls(forward, s["warmup"], s["iters"], device)
        raw.append(raw_row("fid", "paper", "fwd", batch, times, flops, mem.read(), s))
    del net
    gc.collect()
    return row, raw


def bench_metrics(n: int, dim: int, fd_dim: int, device: torch.device, cfg: Config = CFG) -> dict:
    """Seconds of the metric arithmetic for cfg.n_eval generated images against as many real ones, measured on
    random features and scaled: covariance of the generated features (n x dim, ~ n d^2), the Frechet distance
    (fd_dim, ~ d^3, fid.CFG.fd_method), precision/recall with k = 3 (n x dim against n x dim, ~ n^2 d)."""
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((n, dim)), rng.standard_normal((n, dim)) * 1.1 + 0.1
    t0 = time.perf_counter()
    fid.feature_stats(fake)
    t_cov = time.perf_counter() - t0
    a, b = rng.standard_normal((2 * fd_dim, fd_dim)), rng.standard_normal((2 * fd_dim, fd_dim))
    stats_a, stats_b = fid.feature_stats(a), fid.feature_stats(b)
    t0 = time.perf_counter()
    fid.frechet_distance(*stats_a, *stats_b)
    t_fd = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    fid.precision_recall(real, fake, k=3, device=device)
    sync(device)
    t_pr = time.perf_counter() - t0
    N, D = cfg.n_eval, cfg.feat_dim
    metrics_s = t_cov * (N / n) * (D / dim) ** 2 + t_fd * (D / fd_dim) ** 3 + t_pr * (N / n) ** 2 * (D / dim)
    basis = f"P/R and covariance on {n:,} x {dim}, FD at {fd_dim}"
    if (n, dim, fd_dim) != (N, D, D):
        basis += f"; scaled to {N:,} x {D}"
    return {"metrics_s": metrics_s, "metrics_basis": basis,
            "metrics_measured": {"cov_s": t_cov, "fd_s": t_fd, "pr_s": t_pr, "n": n, "dim": dim, "fd_dim": fd_dim}}


def mfu_note(s: dict) -> list[str]:
    """Why the MFU column is empty, if it is."""
    if s["device"].type != "cuda":
        return ["MFU: n/a off CUDA (no bf16 peak to compare with)"]
    if s["peak_tflops"] is None:
        return [f"MFU: n/a, '{s['device_name']}' is not in the bf16 peak table"]
    return []


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["all"], choices=["all", *MODELS, "fid"],
                   help="what to measure (several allowed); any model brings the FID rows for the projection")
    p.add_argument("--preset", default=None, help="model preset (default: paper; --quick: small)")
    p.add_argument("--ffhq64", action="store_true", help="also EDM at its ffhq64 preset (64x64)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the preset's on CUDA, 16 on CPU)")
    p.add_argument("--sample-n", type=int, default=None,
                   help="seeds per generate() call (default: the preset's sample_batch on CUDA, 8 on CPU)")
    p.add_argument("--sample-mode", choices=["auto", "full", "scaled"], default="auto",
                   help=f"full: time whole generate() calls; scaled: time a {CFG.short_nfe}-NFE sampler and scale "
                        "to the NFE (auto: full on CUDA and with --quick, scaled otherwise)")
    p.add_argument("--feat-batch", type=int, default=None,
                   help="images per Inception batch (default: fid.py's on CUDA, 64 on CPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="networks in float32 or under bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--feat-precision", choices=["fp32", "tf32", "bf16"], default=fid.CFG.precision,
                   help="precision of the Inception features (default: fid.py's, which retrain.py uses)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (cfg.compile)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 2 CUDA, 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls, median taken (default: 10 CUDA, 3 CPU)")
    p.add_argument("--only", choices=["models", "raw"], default=None,
                   help="models: training/sampling/FID rows only; raw: the bare-network rows only")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.FIELD=VALUE",
                   help="override a model's Config field, e.g. otcfm.sampler=euler (repeatable)")
    p.add_argument("--quick", action="store_true", help="CPU, small presets, tiny batches, few repetitions")
    p.add_argument("--demo", action="store_true",
                   help="the CPU demo: the small presets at their own batches, and the projected minutes of "
                        "README's command (python retrain.py --model M --lam 1 --iters 20) and of reproduce.py digits")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return p


def parse_sets(items: list[str]) -> dict:
    """["edm.num_steps=9", ...] -> {"edm": {"num_steps": 9}}; values read as Python literals, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, field = key.partition(".")
        if not sep or not dot or model not in MODELS:
            raise SystemExit(f"bench.py: --set {item!r}: expected MODEL.FIELD=VALUE with MODEL in {', '.join(MODELS)}")
        lower = value.strip().lower()
        if lower in ("true", "false"):
            parsed = lower == "true"
        else:
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
        out.setdefault(model, {})[field] = parsed
    return out


def resolve(args) -> dict:
    """The settings of a run from the command line: device, sizes, repetitions."""
    quick = args.quick
    name = args.device or ("cpu" if quick or not torch.cuda.is_available() else "cuda")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cores = jobs.cpu_cores()
    # quick mode's 8x8 networks run many tiny operations: one thread is faster, and far faster on shared cores
    torch.set_num_threads(args.threads or (1 if quick else cores))
    cuda = device.type == "cuda"
    if cuda:  # as retrain.py trains (fid.py turns TF32 off for its features)
        jobs.enable_tf32()
        torch.backends.cudnn.benchmark = True  # cuDNN's autotuner: the warm-up calls absorb its search
    models = list(MODELS) if "all" in args.model else [m for m in MODELS if m in args.model]
    preset = args.preset or ("small" if quick else "paper")
    runs = [(m, preset) for m in models]
    if args.ffhq64 and "edm" in models and not quick:
        runs.append(("edm", "ffhq64"))
    s = {"device": device, "threads": torch.get_num_threads(), "dtype": args.dtype or ("bf16" if cuda else "fp32"),
         "feat_precision": args.feat_precision, "compile": args.compile, "runs": runs,
         "fid": args.only != "raw" and (bool(models) or "fid" in args.model or "all" in args.model),
         "fid_raw": args.only != "models" and ("fid" in args.model or "all" in args.model), "only": args.only,
         "overrides": parse_sets(args.set), "quick": quick,
         "batch": args.batch, "sample_n": args.sample_n, "feat_batch": args.feat_batch,
         "warmup": args.warmup if args.warmup is not None else (2 if cuda else 1),
         "iters": args.iters or (10 if cuda else 3),
         "raw_train_batch": CFG.ref_train_batch, "raw_eval_batch": CFG.ref_eval_batch,
         "metric_n": 10_000 if cuda else 2_500, "metric_dim": CFG.feat_dim, "fd_dim": CFG.feat_dim}
    s["sample_mode"] = args.sample_mode if args.sample_mode != "auto" else ("full" if cuda or quick else "scaled")
    s.update(sample=True, sample_iters=None)  # bench_model: time generate() (at most 3 timed calls unless set)
    if quick:  # small presets (8x8 networks), a few Inception images, short metric matrices
        s.update(iters=args.iters or 2, warmup=args.warmup if args.warmup is not None else 1,
                 feat_batch=args.feat_batch or 4, sample_n=args.sample_n or 16, fd_dim=1024)
    s["device_name"] = torch.cuda.get_device_name(device) if cuda else cpu_name()
    s["peak_tflops"] = bf16_peak_tflops(s["device_name"]) if cuda else None
    s["mem"] = PeakMemory(device)
    return s


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> list[float]:
    return [round(v, 2) for v in (os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3)]


def header_of(s: dict) -> dict:
    """What a run ran on and with: the header of the report and of the JSON."""
    return {"device": s["device_name"], "device_type": s["device"].type, "torch": torch.__version__,
            "threads": s["threads"], "dtype": s["dtype"], "feat_precision": s["feat_precision"],
            "compile": s["compile"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_1_5_15": load_avg(), "quick": s["quick"],
            "bf16_peak_tflops": s["peak_tflops"] if s["peak_tflops"] is not None else "n/a",
            "memory": s["mem"].kind, "warmup": s["warmup"], "iters": s["iters"],
            "sample_mode": s["sample_mode"]}


def run(s: dict) -> dict:
    """All measurements of a run: {"header", "models", "fid", "projection", "raw", "notes"}."""
    header = header_of(s)
    t_start = time.perf_counter()
    models, raw = [], []
    for name, preset in s["runs"]:
        row, rows = bench_model(name, preset, s)
        if s["only"] != "raw":
            models.append(row)
        raw += rows
    fid_row = None
    if s["fid"] or s["fid_raw"]:
        fid_row, rows = bench_fid(s)
        raw += rows
    projection = []
    if fid_row is not None:
        for row in models:
            p = project_iteration(row["train_img_s"], row["sample_img_s"], fid_row["feat_img_s"], fid_row["metrics_s"])
            projection.append({"model": row["model"], "nfe": row["nfe"], **p})
    header["load_avg_end"] = load_avg()
    header["bench_s"] = time.perf_counter() - t_start
    res = {"header": header, "models": models, "fid": fid_row, "projection": projection, "raw": raw}
    res["notes"] = notes(s, res)
    return res


def notes(s: dict, res: dict) -> list[str]:
    """What the figures of a run are, in words."""
    out = [f"medians of {s['iters']} timed calls after {s['warmup']} warm-up call(s)"
           + (" (sampling: at most 3 timed)" if res["models"] else "")]
    if res["models"]:
        out += ["training: Model.train_step on random [-1, 1] images (optimizer, EMA, OT pairing included)",
                "sampling: Model.generate; a 'projected' rate times a shortened sampler and scales it by the NFE"]
    if any(r["sampler"] == "dopri5" for r in res["models"]):
        out.append("dopri5: its adaptive NFE here is that of an untrained network; a trained one's differs "
                   "(the JSON's nfe_img_s, images x NFE per second, converts to any NFE)")
    if res["fid"]:
        out.append("features: fid.inception_features on uint8 32x32 images, Inception with random weights")
    if res["projection"]:
        out.append("projection: kimg*1000/train + samples/sample + eval/features + metrics (covariance, FD, P/R)")
    if res["raw"]:
        out.append("bare networks: loss mean(out^2); bf16 = autocast; max/min = spread of the timed calls")
    out.append(f"peak memory: {s['mem'].kind}")
    cores = jobs.cpu_cores()
    load = res["header"]["load_avg_1_5_15"][0]
    if s["device"].type == "cpu" and load + s["threads"] > cores + 0.5:
        out.append(f"busy machine: load average {load:.2f} at the start, {s['threads']} threads on {cores} cores; "
                   "other jobs can slow these figures several-fold (see the spread of the timed calls)")
    out += mfu_note(s)
    if s["quick"]:
        out.append("quick mode: small presets and tiny batches; the projection applies the paper's settings to "
                   "these rates, so it is a check of the arithmetic, not a paper-scale estimate")
    return out


# ----------------------------------------------------------------------------------------------------
# Printing


def fmt(v, digits: int = 3) -> str:
    """Numbers to `digits` significant figures (no exponent for ordinary sizes); strings as they are."""
    if isinstance(v, str):
        return v
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 10 ** 7 or abs(v) < 10 ** -3):
        return f"{v:.{digits - 1}e}"
    decimals = max(0, digits - 1 - (math.floor(math.log10(abs(v))) if v else 0))
    return f"{v:,.{decimals}f}"


def pct(v) -> str:
    return v if isinstance(v, str) else f"{100 * v:.1f}%"


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def table(title: str, columns: list[tuple[str, str, callable]], rows: list[dict]) -> str:
    """A plain-text table: columns of (key, header, formatter), numbers right-aligned."""
    cells = [[f(r[k]) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    line = "  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def mib(v) -> str:
    return f"{v:,.0f}"


# (key, header, formatter) of each printed table
MODEL_TABLE = [("model", "model", str), ("params_M", "params M", fmt), ("train_batch", "batch", fmt),
               ("train_img_s", "train img/s", fmt), ("train_gflop", "GFLOP/img fwd+bwd", fmt),
               ("train_mfu", "train MFU", pct), ("train_peak_mib", "train peak MiB", mib),
               ("sampler", "sampler", str), ("nfe", "NFE", fmt), ("sample_batch", "seeds", fmt),
               ("sample_img_s", "sample img/s", fmt), ("sample_basis", "sample basis", str),
               ("fwd_gflop", "GFLOP/img fwd", fmt), ("sample_mfu", "sample MFU", pct),
               ("sample_peak_mib", "sample peak MiB", mib)]
FID_TABLE = [("network", "network", str), ("feat_batch", "batch", fmt), ("precision", "precision", str),
             ("feat_img_s", "features img/s", fmt), ("gflop", "GFLOP/img", fmt), ("feat_mfu", "MFU", pct),
             ("feat_peak_mib", "peak MiB", mib), ("metrics_s", "metrics s", fmt),
             ("metrics_basis", "metrics basis", str)]
PROJECTION_TABLE = [("model", "model", str), ("nfe", "NFE", fmt), ("train_s", "train s", fmt),
                    ("sample_s", "sample s", fmt), ("features_s", "features s", fmt), ("metrics_s", "metrics s", fmt),
                    ("iteration_s", "1 iter s", fmt), ("iter", "1 iter", str), ("run", f"{CFG.iterations} iters", str)]
RAW_TABLE = [("network", "network", str), ("pass", "pass", str), ("batch", "batch", fmt), ("s_per_iter", "s/iter", fmt),
             ("spread", "max/min", fmt), ("img_s", "img/s", fmt), ("tflop_s", "TFLOP/s", fmt), ("mfu", "MFU", pct),
             ("peak_mib", "peak MiB", mib), ("ref_img_s", "reference img/s", fmt), ("vs_ref", "x reference", fmt)]

def report(res: dict) -> str:
    """The header line, the tables and the notes of a run, as text."""
    h = res["header"]
    lines = [f"bench.py  {h['date']}  device: {h['device']}  torch {h['torch']}  threads {h['threads']}  "
             f"dtype {h['dtype']}  features {h['feat_precision']}  compile {h['compile']}  "
             f"load avg {h['load_avg_1_5_15'][0]:.2f} (end {h['load_avg_end'][0]:.2f})", ""]
    if res["models"]:
        lines += [table("Models: Model.train_step and Model.generate", MODEL_TABLE, res["models"]), ""]
    if res["fid"]:
        lines += [table("FID: fid.inception_features, and the metric arithmetic of 50k vs 50k", FID_TABLE,
                        [res["fid"]]), ""]
    if res["projection"]:
        rows = [{**p, "iter": duration(p["iteration_s"]), "run": duration(p["run_s"])} for p in res["projection"]]
        title = (f"Projected retraining iteration: {CFG.kimg:g} kimg of training + {CFG.n_samples:,} samples + "
                 f"features of {CFG.n_eval:,} + metrics")
        lines += [table(title, PROJECTION_TABLE, rows), ""]
    if res["raw"]:
        title = "Bare networks: fwd+bwd (train mode) and fwd (eval, no_grad); reference figures: CPU, 2 threads, fp32"
        lines += [table(title, RAW_TABLE, res["raw"]), ""]
    lines += ["notes:"] + [f"  - {n}" for n in res["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The CPU demo (--demo): how long README's first command takes here


DIGITS = 1797  # scikit-learn's 8x8 digits: the real set, the samples per iteration and the evaluated ones


def demo_row(name: str, threads: int, repeats: int, preset: str = "small", n: int = DIGITS, iters: int = 20) -> dict:
    """One model's preset as retrain.py runs it on n real images: s/step at its batch, ms/sample at its sample_batch,
    and the projected minutes of pretraining, of one retraining iteration (n samples), of `retrain.py --model NAME
    --lam 1 --iters 20` and of one seed of a sweep over 4 lambdas x `iters` iterations (training + sampling; metrics,
    plots and checkpoints add a second or two per iteration)."""
    torch.set_num_threads(threads)
    module = importlib.import_module(name)
    cfg = module.make_config(preset)
    torch.manual_seed(0)
    model = module.Model(cfg, "cpu")
    x = torch.rand(cfg.batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution) * 2 - 1
    step_s = statistics.median(time_calls(lambda: model.train_step(x), 3, repeats, torch.device("cpu")))
    seeds = torch.arange(cfg.sample_batch)
    sample_s = statistics.median(time_calls(lambda: model.generate(seeds), 1, max(1, repeats // 3),
                                            torch.device("cpu"))) / len(seeds)
    pre_steps, it_steps = round(cfg.pretrain_kimg * 1000 / cfg.batch), round(cfg.kimg * 1000 / cfg.batch)
    pre = pre_steps * step_s + n * sample_s
    it = it_steps * step_s + n * sample_s
    return {"model": name, "preset": preset, "threads": threads, "batch": cfg.batch, "step_s": step_s,
            "sample_ms": sample_s * 1e3, "nfe": model.nfe, "pretrain_steps": pre_steps, "iter_steps": it_steps,
            "pretrain_min": pre / 60, "iter_s": it, "readme_min": (pre + 20 * it) / 60,
            "sweep_min": (pre + 4 * iters * it) / 60}  # per seed: one pretraining and lambda 0, 0.5, 1, inf


DEMO_TABLE = [("model", "model", str), ("preset", "preset", str), ("threads", "threads", fmt), ("batch", "batch", fmt),
              ("step_s", "s/step", fmt), ("sample_ms", "ms/sample", fmt), ("nfe", "NFE", fmt),
              ("pretrain_steps", "pretrain steps", fmt), ("pretrain_min", "pretrain min", fmt),
              ("iter_steps", "steps/iter", fmt), ("iter_s", "1 iter s", fmt),
              ("readme_min", "lam 1 x 20 min", fmt), ("sweep_min", "4 lams min/seed", fmt)]


def inception_rate(threads: int, n: int = 16) -> float:
    """Images per second of fid.inception_features on 32x32 greyscale images (random weights: the same speed)."""
    torch.set_num_threads(threads)
    net = fid.FIDInception().eval().requires_grad_(False)
    images = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8)
    return n / statistics.median(time_calls(lambda: fid.inception_features(images, net, batch_size=n, progress=False),
                                            1, 2, torch.device("cpu")))


def demo(args) -> dict:
    """--demo: every model's small preset (demo_row) at 1 thread and at all cores, the mnist preset of reproduce.py
    mnist's model and Inception's rate beside them, and the projected minutes of reproduce.py digits and mnist."""
    header = {"device": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "load_avg_1_5_15": [round(v, 2) for v in (os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0))]}
    cores = jobs.cpu_cores()
    models = [m for m in MODELS if "all" in args.model or m in args.model]
    threads = sorted({1, args.threads or cores})
    rows = [demo_row(m, t, args.iters or 5) for m in models for t in threads]
    # reproduce.py digits --jobs 2: per seed 3 pretrainings and 12 lambda runs, two at a time on one thread each
    one = [r for r in rows if r["threads"] == 1]
    stage = sum(r["sweep_min"] for r in one) * len(reproduce.DIGITS_SEEDS) / 2 if len(one) == 3 else None
    res = {"header": header, "demo": rows, "reproduce_digits_min_jobs2": stage}
    if reproduce.REAL_MODEL in models:  # reproduce.py mnist: pretraining on all threads, then the lambdas two at a time
        n, its = reproduce.REAL_EVAL, reproduce.REAL_ITERS  # on one each; Inception: the real sets, 9 x n samples
        mnist = [demo_row(reproduce.REAL_MODEL, t, args.iters or 3, "mnist", n, its) for t in threads]
        res["inception_img_s"] = {t: inception_rate(t) for t in threads}
        res["reproduce_mnist_min"] = (mnist[-1]["pretrain_min"] + (mnist[0]["sweep_min"] - mnist[0]["pretrain_min"]) / 2
                                      + 11 * n / res["inception_img_s"][threads[-1]] / 60)
        res["demo"] += mnist
    return res


def demo_report(res: dict) -> str:
    h = res["header"]
    lines = [f"bench.py --demo  {h['date']}  CPU: {h['device']} ({h['capability']})  torch {h['torch']}  "
             f"load avg {h['load_avg_1_5_15'][0]:.2f}", "",
             table("The presets as retrain.py runs them, small on the 1,797 digits, mnist on 1,000 MNIST digits "
                   "(projected from measured rates)",
                   DEMO_TABLE, res["demo"]), ""]
    if res["reproduce_digits_min_jobs2"] is not None:
        lines.append(f"reproduce.py digits --jobs 2 (3 models x lambda 0, 0.5, 1, inf x 20 iterations x "
                     f"{len(reproduce.DIGITS_SEEDS)} seeds, one thread a job): "
                     f"~{res['reproduce_digits_min_jobs2']:.0f} min")
    if "reproduce_mnist_min" in res:
        lines.append("Inception features of 32x32 greyscale images: "
                     + ", ".join(f"{rate:.1f} img/s on {t} thread(s)" for t, rate in res["inception_img_s"].items())
                     + f"; reproduce.py mnist ({reproduce.REAL_MODEL}, mnist preset, 4 lambdas x {reproduce.REAL_ITERS} "
                       f"iterations, {reproduce.REAL_EVAL} samples per iteration): ~{res['reproduce_mnist_min']:.0f} min")
    lines.append("notes: training + sampling only (metrics, plots, checkpoints: about a second per iteration); "
                 "a busy machine slows every figure (see the load average)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.demo:
        res = demo(args)
        print(demo_report(res), flush=True)
    else:
        res = run(resolve(args))
        print(report(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()

