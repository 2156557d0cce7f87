"""retrain.py -- retrain a generative model, again and again, on real data plus its own samples.

Bertrand, Bose, Duplessis, Jiralerspong & Gidel, "On the Stability of Iterative Retraining of
Generative Models on their Own Data" (ICLR 2024, arXiv 2310.00429). The procedure:

    iteration 0   the initial model: --init PATH (or `official`), else trained from scratch on the
                  n real images for the model's pretraining budget
    t = 1..T      draw round(lam * n) fresh samples from the model of t-1 (they replace earlier ones),
                  fine-tune that model (weights, EMA and optimizer carried over, no re-warm-up) on the
                  n real images plus those samples for --kimg thousand images seen, then evaluate
    lam = 0       the control: real data only.   lam = inf: the fully synthetic loop (n samples, no real data)

Beyond the paper, flags change what each iteration trains on (--pool replace | accumulate |
accumulate-subsample, --real fixed | fresh | none, --start warm | scratch) and how its samples are drawn
(--temperature, --curate K with --reward); their defaults are the paper's loop. See the section
"Self-consuming regimes" below, and gaussian.py for each regime in closed form.

One sampling pass per iteration serves both purposes: the samples that evaluate model t are the
ones that train model t+1. Each image has its own seed (seed, iteration, index), so the synthetic set
does not depend on batch size or GPU count; images are quantized to uint8 exactly as a saved PNG
would be and kept in memory. With several lambdas, iteration 0 is computed once and shared.

    python retrain.py --model ddpm --lam 1 --iters 20                  # CPU: small U-Net on the 8x8 digits
    python retrain.py --model edm --preset paper --data cifar10 --init official --lam 0 1 inf --iters 20
    python retrain.py --model gaussian --data gaussian --lam inf 1 --iters 300 --n-real 20
    torchrun --nproc_per_node=8 retrain.py --model edm --preset paper --init official --lam 1

The model interface (ddpm.py, edm.py, otcfm.py and gaussian.py all implement it; README has a guide):

    Config        dataclass of hyperparameters with img_channels, img_resolution, batch, xflip,
                  pretrain_kimg, kimg, sample_batch (retrain.py reads these; a closed-form model
                  needs only sample_batch)
    PRESETS       {"paper": {...}, "small": {...}, ...}: overrides of Config
    make_config(preset, **overrides) -> Config
    OFFICIAL_URLS {"cifar10": url, ...}: released checkpoints for --init official
    Model(cfg, device)
      .train_step(x) -> loss    one optimizer step on x, float32 (B, C, H, W) in [-1, 1]; returns the loss
                                as a 0-dim tensor on the device, which the loop reads every LOSS_EVERY steps
                                (or .fit(x) for a closed-form model, called once per iteration)
      .generate(seeds) -> x     float32 (N, C, H, W) in [-1, 1]; image i depends only on seeds[i]
                                (with --temperature only: generate(seeds, temperature), the initial noise scaled)
      .nfe                      network evaluations per image in the last generate()
      .state_dict() / .load_state_dict(d)   plain dicts (torch.load(weights_only=True) reads them)
      .load_pretrained(path)    a released checkpoint file into the network and its EMA
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import fid

MODELS = ("gaussian", "ddpm", "edm", "otcfm")
N_EVAL_PAPER = 50_000   # samples evaluated per iteration (paper: 50k, against the 50k CIFAR-10 training images)
CKPT_FORMAT = "retrain-v1"


class UserError(Exception):
    """A problem with the user's input or run folder: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise UserError(f"{message} (see --help)")


def parse_lam(s: str) -> float:
    try:
        lam = float(s)
    except ValueError:
        raise UserError(f"--lam '{s}' is not a number; give values like 0, 0.5, 1 or inf") from None
    if math.isnan(lam) or lam < 0:
        raise UserError(f"--lam {s} is invalid; lambda is a non-negative number of synthetic images per real one, or inf")
    return lam


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ddpm", choices=MODELS, help="the generative model")
    p.add_argument("--lam", nargs="+", default=["1"], help="synthetic images per real image; several run one after another; inf = fully synthetic")
    p.add_argument("--iters", type=int, default=20, help="retraining iterations after iteration 0")
    p.add_argument("--data", default=None, help="cifar10 | digits | mnist | fashion-mnist (padded to 32x32) | gaussian | "
                   "folder | .zip | .npy/.npz (default: chosen by --preset auto)")
    p.add_argument("--data-root", default="data", help="where cifar10 is downloaded")
    p.add_argument("--n-real", type=int, default=None, help="use only the first N real images (gaussian: draw N; default 1000)")
    p.add_argument("--dim", type=int, default=2, help="dimension of --data gaussian")
    p.add_argument("--kimg", type=float, default=None, help="thousands of images seen per retraining iteration (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help=f"samples evaluated per iteration (default: {N_EVAL_PAPER}, or all of a smaller data set)")
    p.add_argument("--init", default=None, help="initial model: a checkpoint path, or 'official' to download the released one")
    p.add_argument("--preset", default="auto", help="auto | paper | small (or another preset of the model); auto: paper on CUDA, small on CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="override a field of the model's Config (repeatable)")
    p.add_argument("--metrics", default="auto", choices=("auto", "inception", "classifier", "pixel"),
                   help="feature space of the metrics; auto: a classifier trained on the labels for labelled images "
                   "under 32 px or in greyscale (digits, mnist), Inception for other images of 32 px or more when "
                   "its weights are available, else pixels")
    p.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth (else downloaded)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL-DATA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last completed iteration")
    p.add_argument("--force", action="store_true", help="delete an existing --out folder and start over")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (training batches, noise, samples)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="independent replicates, iteration 0 included: one run per seed in --out/seed_S, then "
                   "--out/metrics.png (mean and spread) and --out/seeds.json (default --out: runs/MODEL-seeds-S1-S2-..)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores that are free now, at least 1)")
    p.add_argument("--lam-jobs", type=int, default=None, metavar="N",
                   help="a sweep over several --lam on the CPU runs N of them side by side after iteration 0, each in "
                   "its own process with threads / N threads (default: as many as threads allow; 1 = one after another)")
    p.add_argument("--cache", default=None, help="folder of pretrained iterations 0 reused across runs "
                   "(default: 'cache' beside the --out folder)")
    p.add_argument("--no-cache", action="store_true", help="train iteration 0 again even when the cache has it")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (same as --set compile=true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = p.add_argument_group("self-consuming regimes beyond the paper (the defaults are the paper's loop)")
    r.add_argument("--pool", default="replace", choices=("replace", "accumulate", "accumulate-subsample"),
                   help="synthetic data across iterations: replace (each generation's samples replace the previous "
                   "ones), accumulate (every generation's samples are kept), accumulate-subsample (of all kept "
                   "samples, round(lam n) are drawn each iteration: replace's training-set size)")
    r.add_argument("--real", default="fixed", choices=("fixed", "fresh", "none"),
                   help="real data of each iteration: fixed (the same n), fresh (n new ones: new draws for --data "
                   "gaussian, the next n images of the data set otherwise), none (round(lam n) synthetic samples alone)")
    r.add_argument("--start", default="warm", choices=("warm", "scratch"),
                   help="each iteration fine-tunes the previous model (warm), or trains iteration 0's initial "
                   "weights again (scratch; --kimg then defaults to the preset's pretraining budget)")
    r.add_argument("--temperature", type=float, default=1.0, metavar="TAU",
                   help="scale of the samplers' initial noise (gaussian: samples of N(mu, tau^2 Sigma)); 1 = unbiased")
    r.add_argument("--curate", type=int, default=1, metavar="K",
                   help="keep one of K samples, candidate i with probability softmax(reward) over the K; 1 = no curation")
    r.add_argument("--reward", default=None, choices=("linear", "quadratic", "class", "confidence"),
                   help="the reward of --curate, also recorded each iteration: linear beta . x or quadratic "
                   "-gamma |x|^2 / 2 (vectors); the digits classifier's log p(--reward-class | x) or max_c log p(c | x) (images)")
    r.add_argument("--beta", type=float, nargs="+", default=[1.0], metavar="B", help="linear reward: one coefficient, or one per coordinate")
    r.add_argument("--gamma", type=float, default=1.0, metavar="G", help="quadratic reward: the pull toward 0")
    r.add_argument("--reward-class", type=int, default=0, metavar="C", help="the class of --reward class")
    return p


def parse_overrides(items: list[str], cfg_cls) -> dict:
    """--set FIELD=VALUE pairs, each value converted to the type of the field's default."""
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UserError(f"--set {item}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, (int, float, str)):
                out[key] = type(default)(value)
            else:
                out[key] = json.loads(value)  # lists, tuples, None: JSON
        except ValueError:
            how = "" if isinstance(default, (bool, int, float, str)) else f", written as JSON: {json.dumps(default)}"
            raise UserError(f"--set {item}: cannot read '{value}' as the type of {key} "
                            f"(default {default!r}{how})") from None
    return out


# ----------------------------------------------------------------------------------------------------
# Seeds: one per image, one per iteration


def image_seeds(seed: int, it: int, n: int) -> torch.Tensor:
    """The seed of image i of iteration it: (seed * 1000 + it) * 10^7 + i."""
    return (seed * 1000 + it) * 10**7 + torch.arange(n, dtype=torch.int64)


def train_seed(seed: int, it: int) -> int:
    """Seeds training batches and the model's own noise in iteration it (kept apart from image seeds)."""
    return (seed * 1000 + it) * 10**7 + 10**7 - 1


# ----------------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; otherwise a single process


def enable_tf32() -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (training only: fid.py turns them off for
    its exact features). Through the long-standing switches, so that torch.get_float32_matmul_precision() and
    torch.backends.cuda.matmul.allow_tf32 stay readable for torch.compile and other libraries; the
    fp32_precision attributes would make those reads raise ("mix of the legacy and new APIs")."""
    torch.set_float32_matmul_precision("high")  # = torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def setup_device(name: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); on CUDA also TF32 (enable_tf32) and cuDNN's autotuner (the batch shapes
    repeat, so the fastest convolution algorithm is searched once per shape)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and name != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        rank = dist.get_rank()
    else:
        if name is None:
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"device '{name}' is not usable here ({str(e).splitlines()[0]})") from None
        rank = 0
    if device.type == "cuda":
        enable_tf32()
        torch.backends.cudnn.benchmark = True
    return rank, world, device


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores(seconds: float = 0.5, stat: str = "/proc/stat") -> tuple[float, str]:
    """How many of the cores this process may run on (its affinity) other jobs keep busy now, and how that was
    measured: the share of non-idle time of each of those cores in /proc/stat over `seconds` (Linux), else
    the 1-minute load average, which lags (a job that ended a minute ago, pip or a test run, still counts)
    and counts the whole machine."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def idle_and_total():  # {core: (idle, total)} from the lines cpuN user nice system idle iowait irq softirq ...
        ticks = {}
        with open(stat) as f:
            for line in f:
                name, *values = line.split()
                if not name.startswith("cpu"):
                    break  # the per-core lines come first
                if name[3:].isdigit() and (allowed is None or int(name[3:]) in allowed):
                    values = [int(v) for v in values]
                    ticks[int(name[3:])] = (values[3] + values[4], sum(values))
        return ticks

    try:
        before = idle_and_total()
        time.sleep(seconds)
        after = idle_and_total()
        if not before:
            raise ValueError("no per-core lines")
        return sum(1 - (after[c][0] - before[c][0]) / max(after[c][1] - before[c][1], 1) for c in before), "busy now"
    except (OSError, ValueError, IndexError, KeyError):
        return (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), "load"


def cpu_threads(requested: int | None, world: int) -> str:
    """Set torch's CPU threads and say why: --threads, else OMP_NUM_THREADS, else the cores free right now.
    Small networks on a CPU run ~1.2x faster on 2 idle cores than on 1, but many times slower when a thread
    has to share its core with another job (threads wait for each other at every operation), so the
    default never takes a busy core: the cores minus those busy now, at least 1, per process."""
    if requested:
        torch.set_num_threads(requested)
        return f"{plural(requested, 'CPU thread')} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{plural(torch.get_num_threads(), 'CPU thread')} (OMP_NUM_THREADS)"
    cores = cpu_cores()
    busy, how = busy_cores()
    threads = max(1, min(cores, round(cores - busy)) // world)
    torch.set_num_threads(threads)
    return f"{plural(threads, 'CPU thread')} ({cores} cores, {busy:.1f} {how}; --threads to choose)"


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def on_every_rank():
    """A block that may fail on some processes only (a file missing on one machine, rank 0's reference cache,
    rank 0's metrics): when it fails anywhere, every process raises the same one-line error, instead of
    the others waiting in their next collective until the NCCL timeout. Also a barrier."""
    error = None
    try:
        yield
    except UserError as e:
        error = str(e)
    except Exception as e:  # a bug, not the user's input: its traceback on this rank, its line on every rank
        import traceback

        traceback.print_exc()
        error = f"rank {rank_world()[0]}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)


# ----------------------------------------------------------------------------------------------------
# Training, sampling, evaluation


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as a PNG writer would store it: round(127.5 x + 127.5), halves rounded up."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


LOSS_EVERY = 25  # training steps between reads of the loss: the one host synchronisation of the training loop
PROBE_SECONDS = 10.0  # the run's clock times one whole sampling batch when a batch of 64 says it takes less than this
#                      (EDM on a 2-core AVX2 CPU: 11.9 ms/sample in a batch of 64, 8.5 in one of 512, 4.4 s)


class RunClock:
    """Says once, after the first 2 x LOSS_EVERY training steps of the run, how long the whole run will take:
    measured seconds per step and per sample times the steps and samples still to come (metrics, plots and
    checkpoints not counted)."""

    def __init__(self, per_sample: float, probe: int, work: list[tuple[str, int, int]]):
        self.per_sample, self.probe, self.work, self.said = per_sample, probe, work, False

    def first_steps(self, per_step: float, steps: int, it: int) -> None:
        if self.said or rank_world()[0] != 0:
            return
        self.said = True
        parts = [(what, n_steps * per_step + n_samples * self.per_sample) for what, n_steps, n_samples in self.work]
        total = sum(seconds for _, seconds in parts)
        tqdm.write(f"estimate: {total / 60:.1f} min in all, " + " + ".join(f"{what} {sec / 60:.1f} min"
                                                                          for what, sec in parts)
                   + f" (measured here: {per_step:.3f} s/step over {steps} steps of iteration {it}, "
                   f"{self.per_sample * 1000:.1f} ms/sample over {self.probe} samples)")


CLOCK: RunClock | None = None  # set by run() for its training loop


def batch_plan(n: int, batch: int, steps: int, gen: torch.Generator, device):
    """The training batches as blocks of LOSS_EVERY steps, each one copy to the device: (indices (k, batch),
    flips (k, batch)). Epoch by epoch without replacement; the same on every rank (gen is shared)."""
    order, pos = torch.randperm(n, generator=gen), 0
    for first in range(0, steps, LOSS_EVERY):
        idx, flips = [], []
        for _ in range(min(LOSS_EVERY, steps - first)):
            take = []  # this step's indices, continuing into the next epoch when this one runs out
            while sum(map(len, take)) < batch:
                if pos == n:
                    order, pos = torch.randperm(n, generator=gen), 0
                k = min(batch - sum(map(len, take)), n - pos)
                take.append(order[pos:pos + k])
                pos += k
            idx.append(torch.cat(take))
            flips.append(torch.rand(batch, generator=gen) < 0.5)
        yield torch.stack(idx).to(device), torch.stack(flips).to(device)


def train(model, train_set: torch.Tensor, kimg: float, cfg, seed: int, it: int, progress: bool, desc: str) -> dict:
    """Train `model` on `train_set` (uint8 images, or float vectors) for `kimg` thousand images seen.

    Under torchrun each rank trains on its slice of the same global batch. The step itself never waits
    for the device: the loss stays there and is read (averaged over ranks, checked finite) every
    LOSS_EVERY steps."""
    if hasattr(model, "fit"):  # closed form (gaussian.py): one fit on the whole set
        model.fit(train_set.float() / 127.5 - 1 if train_set.dtype == torch.uint8 else train_set)
        return {"steps": 0}
    rank, world = rank_world()
    torch.manual_seed(train_seed(seed, it) + rank)  # the model's noise, t, sigma, dropout
    gen = torch.Generator().manual_seed(train_seed(seed, it))  # batch indices and flips: the same on every rank
    steps = max(1, round(kimg * 1000 / cfg.batch))
    mine = slice(rank * (cfg.batch // world), (rank + 1) * (cfg.batch // world))
    total = 0.0
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for first, (idx, flips) in zip(range(0, steps, LOSS_EVERY), batch_plan(len(train_set), cfg.batch, steps, gen,
                                                                            train_set.device)):
        t_window, losses = time.time(), []
        for j in range(len(idx)):
            x = train_set[idx[j, mine]].float() / 127.5 - 1  # (B, C, H, W) in [-1, 1]
            if cfg.xflip:
                x = torch.where(flips[j, mine, None, None, None], x.flip(3), x)
            losses.append(model.train_step(x))  # 0-dim tensors on the device
        window = torch.stack(losses).double().sum()
        if world > 1:
            dist.all_reduce(window)
        window = window.item() / world  # the host waits here, once per LOSS_EVERY steps
        if not math.isfinite(window):
            raise UserError(f"non-finite loss in steps {first}-{first + len(idx) - 1} of iteration {it}; stopped, "
                            "the last good checkpoint is kept (lower the learning rate or use --set amp=fp32)")
        total += window
        bar.update(len(idx))
        bar.set_postfix(loss=f"{window / len(idx):.4f}", refresh=False)
        if CLOCK is not None and (first == LOSS_EVERY or first + len(idx) >= steps):  # the second window: the first
            CLOCK.first_steps((time.time() - t_window) / len(idx), len(idx), it)  # pays one-time costs (up to 1.6x)
    bar.close()
    return {"steps": steps, "loss": total / steps}


def sample(model, n: int, seed: int, it: int, chunk: int, is_image: bool, progress: bool,
           temperature: float = 1.0) -> torch.Tensor:
    """n samples of iteration `it` on the CPU: uint8 images, or float64 vectors; a temperature other than 1
    scales the sampler's initial noise (--temperature; the models' generate(seeds, temperature)).

    The seeds are cut into chunks of `chunk` by global index; rank r generates chunks r, r + world, ...
    so every chunk is computed the same way whatever the number of processes."""
    rank, world = rank_world()
    seeds = image_seeds(seed, it, n)
    chunks = list(torch.split(seeds, chunk))
    mine = {}
    for k in tqdm(range(rank, len(chunks), world), desc=f"sample it {it}", disable=not progress, leave=False, dynamic_ncols=True):
        x = model.generate(chunks[k]) if temperature == 1 else model.generate(chunks[k], temperature=temperature)
        mine[k] = (to_uint8(x) if is_image else x.to(torch.float64)).cpu()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return torch.cat([mine[k] for k in range(len(chunks))]) if chunks else torch.zeros(0)


class Evaluator:
    """The metrics of samples against the real training set, in one feature space (recorded as `features`):

        inception   Inception-v3 pool features (FID): images of 32 px or more, when the weights are available
        classifier  the penultimate features of a small classifier trained on the real set's labels
                    (classifier.py): the default for labelled images under 32 px or in greyscale (the digits,
                    MNIST), where Inception's 299-px colour view means little and raw pixels judge poorly
        pixel       raw pixels (--metrics pixel, or small images without labels)
        raw         the vectors of --data gaussian

    In each: the Frechet distance ("fid" for Inception, else "fd") against the whole real set; precision,
    recall, density and coverage (k = 3) against its first n_eval points, so both sets hold as many points
    as the paper's 50k vs 50k. In classifier space also the samples' classes (the classifier's argmax):
    the total variation distance of their histogram to the real labels' (class_tv), the number of classes
    produced (classes) and the histogram (class_hist); and the pixel-space metrics as a second view
    (pixel_fd, pixel_precision, ...). `floor` holds the same metrics between two disjoint sets of real
    images (n_eval each, at most half the set): what sampling noise alone gives. Under torchrun every rank
    extracts the Inception features of its share of the samples; rank 0 computes the metrics."""

    def __init__(self, real: torch.Tensor, labels: torch.Tensor | None, choice: str, inception: str | None,
                 n_eval: int, device, progress: bool, cache: str, classifier_cache: str, seed: int):
        self.device, self.progress, self.net, self.clf, self.n_eval = device, progress, None, None, n_eval
        self.main = rank_world()[0] == 0
        is_image = real.dtype == torch.uint8
        small = is_image and (real.shape[-1] < 32 or real.shape[1] == 1)  # digits, MNIST: not Inception's kind of image
        if choice == "classifier" or (choice == "auto" and small and labels is not None):
            if labels is None or not is_image:
                raise UserError("--metrics classifier needs labelled images (digits, mnist, fashion-mnist, cifar10, "
                                "or an .npz with labels)")
            self.kind = "classifier"
        elif choice == "inception" or (choice == "auto" and is_image and real.shape[-1] >= 32):
            try:
                self.net = fid.load_inception(inception, device=device)
            except fid.InceptionUnavailable as e:
                if choice == "inception":
                    raise UserError(str(e)) from None
                if self.main:
                    print(f"retrain.py: Inception weights unavailable, using pixel-space metrics ({e})")
            self.kind = "inception" if self.net is not None else "pixel"
        else:
            self.kind = "pixel" if is_image else "raw"
        self.fd_key = "fid" if self.kind == "inception" else "fd"
        self.floor = {}  # rank 0's, below
        if not self.main:
            return
        if self.kind == "classifier":
            import classifier

            self.clf, self.clf_info = classifier.get(real, labels, classifier_cache, progress=progress)
            self.labels, self.n_classes = labels.numpy(), int(labels.max()) + 1
            self.pixel_real = fid.pixel_features(real)
            self.pixel_stats = fid.feature_stats(self.pixel_real)
        if self.net is not None:
            try:
                ref = fid.reference(real, name=f"train-{len(real)}", path=cache, net=self.net, device=device,
                                    progress=progress)
            except fid.ReferenceMismatch as e:
                raise UserError(str(e)) from None
            self.real_feats, self.real_stats = ref["features"], (ref["mu"], ref["sigma"])
        else:
            self.real_feats = self.features(real)
            self.real_stats = fid.feature_stats(self.real_feats)
        self.floor = self.noise_floor(seed)

    def features(self, x: torch.Tensor) -> np.ndarray | None:
        """Features of x on rank 0 (None on the others). Inception: each rank extracts its share, and rank 0
        gathers them as one tensor (float32, which the features are, padded to the largest share)."""
        if self.kind == "classifier":
            import classifier

            return classifier.features(self.clf, x)
        if self.net is None:
            return fid.pixel_features(x) if x.dtype == torch.uint8 else x.reshape(len(x), -1).numpy().astype(np.float64)
        rank, world = rank_world()
        shares = torch.tensor_split(x, world)
        f = fid.inception_features(shares[rank], self.net, device=self.device, progress=self.progress)
        if world == 1:
            return f
        size = len(shares[0])  # tensor_split: the first share is the largest
        mine = torch.zeros(size, f.shape[1], dtype=torch.float32, device=self.device)
        mine[:len(f)] = torch.from_numpy(f).to(self.device, torch.float32)
        parts = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        dist.gather(mine, parts, dst=0)
        if rank != 0:
            return None
        return torch.cat([p[:len(s)] for p, s in zip(parts, shares)]).cpu().double().numpy()

    def space_metrics(self, fake_feats: np.ndarray, real_feats: np.ndarray, real_stats: tuple) -> dict:
        """Frechet distance against real_stats; precision, recall, density, coverage against real_feats' first
        n_eval points. The matrix square root from symmetric eigenvalues: on a GPU with torch (a second for
        Inception's 2048 dimensions, where scipy's sqrtm takes ~40 CPU-s), on a CPU with LAPACK."""
        return fid.feature_metrics(real_feats[:self.n_eval], fake_feats, k=3, device=self.device,
                                   real_stats=real_stats, fd_device=self.device if self.device.type == "cuda" else None)

    def __call__(self, fake: torch.Tensor) -> dict:
        """The metrics of `fake` on rank 0 ({} on the other ranks, which only help with the features)."""
        f = self.features(fake) if self.main or self.net is not None else None
        if not self.main:
            return {}
        r = self.space_metrics(f, self.real_feats, self.real_stats)
        r = {self.fd_key: r.pop("fd"), **r, "features": self.kind}
        if self.kind == "classifier":
            import classifier

            r.update(fid.class_metrics(classifier.predict(self.clf, fake), self.labels, self.n_classes))
            pixel = self.space_metrics(fid.pixel_features(fake), self.pixel_real, self.pixel_stats)
            r.update({f"pixel_{k}": v for k, v in pixel.items()})
        return r

    def noise_floor(self, seed: int) -> dict:
        """The metrics between two disjoint random sets of the real images (n_eval each, at most half of them), in
        the keys the samples' metrics use, with `n_half`: the floor under which a sample's distance, and above
        which its precision, recall, density and coverage, cannot be told from sampling noise."""
        m = min(self.n_eval, len(self.real_feats) // 2)
        labelled = self.kind == "classifier"
        r = fid.noise_floor(self.real_feats[:2 * m], seed=seed, labels=self.labels[:2 * m] if labelled else None,
                            n_classes=self.n_classes if labelled else None, device=self.device)
        r = {self.fd_key: r.pop("fd"), **r}
        if labelled:
            pixel = fid.noise_floor(self.pixel_real[:2 * m], seed=seed, device=self.device)
            r.update({f"pixel_{k}": pixel[k] for k in ("fd", "precision", "recall", "density", "coverage")})
        return r


# ----------------------------------------------------------------------------------------------------
# Files: atomic checkpoints, metrics, sample grids, plots


def save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    if path.endswith(".pt"):
        torch.save(obj, tmp)
    else:
        with open(tmp, "w") as f:
            f.write(obj)
    os.replace(tmp, path)  # atomic: a kill leaves the old file or the new one, never half of one


def load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint '{path}' ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"'{path}' is not a checkpoint written by retrain.py")
    return ckpt


def save_grid(samples: torch.Tensor, path: str, n: int = 64, title: str = "") -> None:
    """The first n images as one PNG (tiny images are enlarged, pixels kept square), under a line of title."""
    from PIL import Image, ImageDraw

    x = samples[:n]
    c, h, w = x.shape[1:]
    cols = math.ceil(math.sqrt(len(x)))
    rows = math.ceil(len(x) / cols)
    grid = torch.zeros(c, rows * (h + 1) + 1, cols * (w + 1) + 1, dtype=torch.uint8)
    for i, img in enumerate(x):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    scale = max(1, 256 // grid.shape[-1])
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(arr)
    if title:  # a white strip above the grid, the title in PIL's built-in font
        titled = Image.new(image.mode, (image.width, image.height + 14), 255 if c == 1 else (255, 255, 255))
        titled.paste(image, (0, 14))
        ImageDraw.Draw(titled).text((2, 1), title, fill=0 if c == 1 else (0, 0, 0))
        image = titled
    image.save(path)


PANELS = {"fid": "FID (Inception)", "fd": "Frechet distance", "precision": "precision", "recall": "recall",
          "density": "density", "coverage": "coverage", "class_tv": "class histogram: TV to real",
          "classes": "classes produced", "pixel_fd": "pixel Frechet distance", "pixel_precision": "pixel precision",
          "pixel_recall": "pixel recall", "mean_err": "|mu - mu*|", "cov_err": "|Sigma - Sigma*|", "logdet": "log det Sigma"}
BEST = {"fid": 0, "fd": 0, "pixel_fd": 0, "class_tv": 0, "precision": 1, "recall": 1, "coverage": 1, "density": 1,
        "pixel_precision": 1, "pixel_recall": 1}  # the ideal value: the floor band runs from it to two real halves'


def plot_metrics(histories: dict[str, list], path: str, title: str = "", floor: dict | None = None) -> None:
    """One panel per metric against iteration, one line per lambda. A history may also be a list of histories
    (several seeds): then its mean, with a band of one standard deviation. The noise floor (two halves of the
    real set, Evaluator.noise_floor) is a grey band from the ideal value to the floor's: moves inside it
    cannot be told from sampling noise. With one lambda and class histograms, a last panel shows the
    samples' count per class (columns) at each iteration (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = {label: h if h and isinstance(h[0], list) else [h] for label, h in histories.items()}  # label: seeds
    keys = [k for k in PANELS if any(k in r for hs in runs.values() for h in hs for r in h)]
    strip = len(runs) == 1 and any("class_hist" in r for r in next(iter(runs.values()))[0])
    cols = min(4, len(keys) + strip)
    rows = math.ceil((len(keys) + strip) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.5), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, hs in runs.items():
            iters = sorted({r["iter"] for h in hs for r in h if key in r})
            values = np.array([[next((r[key] for r in h if r["iter"] == i and key in r), np.nan) for i in iters]
                               for h in hs], dtype=float)  # (seeds, iterations)
            mean = np.nanmean(values, axis=0)
            line, = ax.plot(iters, mean, marker="o" if len(iters) < 30 else None, ms=3,
                            label=f"lam {label}" + (f" ({len(hs)} seeds)" if len(hs) > 1 else ""))
            if len(hs) > 1:
                std = np.nanstd(values, axis=0, ddof=1)
                ax.fill_between(iters, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        if floor and key in floor and key in BEST:
            ax.axhspan(min(BEST[key], floor[key]), max(BEST[key], floor[key]), color="0.88", zorder=0,
                       label="two real halves")
        elif floor and key in floor:
            ax.axhline(floor[key], color="0.6", ls="--", lw=1, label="two real halves")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(PANELS[key], fontsize=10)
        if key in ("mean_err", "cov_err"):
            ax.set_yscale("log")
    if strip:
        ax = axes.flat[len(keys)]
        h = [r for r in next(iter(runs.values()))[0] if "class_hist" in r]
        counts = np.array([r["class_hist"] for r in h], dtype=float)  # (iterations, classes)
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(-0.5, counts.shape[1] - 0.5, h[-1]["iter"] + 0.5, h[0]["iter"] - 0.5))
        ax.set_xlabel("class")
        ax.set_ylabel("iteration")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title("samples per class", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    for ax in list(axes.flat)[len(keys) + strip:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / fig.get_figheight())
    # fixed margins, in inches: tight_layout measured every tick label, two thirds of a plot's time
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.25 / width, bottom=0.5 / height, top=1 - 0.75 / height,
                        wspace=0.8 / 2.8, hspace=0.8 / 2.1)  # gaps between panels / panel size
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def lam_label(lam: float) -> str:
    return "inf" if math.isinf(lam) else f"{lam:g}"


# ----------------------------------------------------------------------------------------------------
# Settings: what --preset auto chooses, the model's Config, the run folder's config.json


def resolve(args, device: torch.device) -> dict:
    """Everything the run will use, validated, before anything is written."""
    lams = [parse_lam(s) for s in args.lam]
    if len(set(lams)) != len(lams):
        raise UserError("--lam lists a value twice")
    if args.iters < 0:
        raise UserError(f"--iters {args.iters} is negative; give 0 or more retraining iterations")
    module = importlib.import_module(args.model)
    preset, data_spec = args.preset, args.data
    if preset == "auto":
        preset = "paper" if device.type == "cuda" else "small"
        why = "a CUDA device is present" if device.type == "cuda" else "no CUDA device"
        if data_spec is None:
            data_spec = "gaussian" if args.model == "gaussian" else ("cifar10" if preset == "paper" else "digits")
        if rank_world()[0] == 0:
            print(f"retrain.py: --preset auto -> '{preset}' on {data_spec} ({why}); "
                  f"choose with --preset paper|small and --data cifar10|digits|PATH")
    if data_spec is None:
        data_spec = "gaussian" if args.model == "gaussian" else ("cifar10" if preset != "small" else "digits")
    if preset not in module.PRESETS:
        raise UserError(f"model {args.model} has no preset '{preset}'; choose from {', '.join(module.PRESETS)}")
    if data_spec == "gaussian" and args.model != "gaussian":
        raise UserError("--data gaussian is vector data for --model gaussian; image models need images (digits, cifar10, a path)")
    return {"lams": lams, "module": module, "preset": preset, "data": data_spec}


def load_real(args, data_spec: str) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None, tuple | None]:
    """The real training set: uint8 images (N, C, H, W) with their int64 labels (N,) when the data set has
    them (else None), or float64 vectors and the true (mu, Sigma) for --data gaussian; and the whole data set
    the images are the first --n-real of, (images, labels), loaded once (None for the Gaussian): what the
    samples are measured against, the source of fresh real data and the reward classifier's training set."""
    if data_spec == "gaussian":
        import gaussian

        n = args.n_real or 1000
        if n < 2:
            raise UserError(f"--n-real {n}: need at least 2 samples")
        return gaussian.make_data(args.dim, n, seed=args.seed), None, gaussian.truth(args.dim), None
    try:
        whole = data.load_labelled(data_spec, root=args.data_root)
        return *data.first(data_spec, *whole, args.n_real), None, whole
    except data.DataError as e:
        raise UserError(str(e)) from None


def dataset_name(data_spec: str, real: torch.Tensor) -> str:
    """The released-checkpoint key of a data set: cifar10, ffhq64, ... (for --init official)."""
    if data_spec == "cifar10":
        return "cifar10"
    if "ffhq" in os.path.basename(data_spec.rstrip("/")).lower() and real.shape[-1] == 64:
        return "ffhq64"
    return os.path.basename(data_spec.rstrip("/"))


def check_same(old: dict, new: dict, out: str) -> None:
    """--resume continues a run only with the settings it was started with. The number of processes and the
    device may change: samples depend on their seeds alone and training on the global batch (another
    device changes the float rounding, not the method)."""
    old = {**REGIME_DEFAULTS, "n_reference": old.get("n_real"), **old}  # a run begun before the regime flags existed
    #                                      ran the paper's loop, and measured its samples against its real set
    for key in new:
        if key in ("world_size", "device") and old.get(key) != new[key] and rank_world()[0] == 0:
            print(f"retrain.py: --resume with {key} {new[key]} (the run began with {old.get(key)})")
        elif key not in ("iters", "started", "versions", "world_size", "device") and old.get(key) != new[key]:
            raise UserError(f"--resume: {key} differs from the run in '{out}' ({old.get(key)!r} there, {new[key]!r} now); "
                            "use another --out, or --force to start over")


# ----------------------------------------------------------------------------------------------------
# The loop


def init_path(args, s: dict, real: torch.Tensor) -> str:
    """The file that --init names; for 'official', the released checkpoint, downloaded by rank 0 into the torch
    hub cache when it is not there (run inside on_every_rank, whose end the other ranks wait at)."""
    path = args.init
    if path == "official":
        key = dataset_name(s["data"], real)
        url = s["module"].OFFICIAL_URLS.get(key)
        if url is None:
            raise UserError(f"no released {args.model} checkpoint for data '{key}' (have: {', '.join(s['module'].OFFICIAL_URLS) or 'none'})")
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.exists(path) and rank_world()[0] == 0:
            print(f"downloading {url} -> {path}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, path)
            except Exception as e:
                raise UserError(f"could not download {url} ({e}); download it by hand and pass --init PATH") from None
    return path


def load_init(args, model, path: str) -> str:
    """The --init file into `model`: a retrain.py checkpoint, or a released checkpoint file."""
    if not os.path.isfile(path):
        raise UserError(f"--init '{path}' not found: give a checkpoint file or 'official'")
    try:  # torch.save files are zips; anything else (EDM's .pkl) goes to the model's own loader
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if zipfile.is_zipfile(path) else None
        if isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT:
            if ckpt["model"] != args.model:
                raise ValueError(f"it holds a {ckpt['model']} model, not {args.model}")
            model.load_state_dict(ckpt["state"])
        else:
            model.load_pretrained(path)
    except Exception as e:
        raise UserError(f"--init '{path}' does not fit this {args.model} model: {str(e).splitlines()[0]}") from None
    return f"init {path}"


def iter0_cache(args, s: dict, out: str, cfg, real: torch.Tensor, n_samples: int, device, world: int) -> str | None:
    """The file that keeps a pretrained iteration 0 for later runs (another lambda, more iterations): named by a
    hash of all it depends on (model, Config, real data, seed, number of samples, device type, processes,
    and the code of the model file and of this one). None with --init (loading is fast anyway), --no-cache,
    or a closed-form model (fitting is instant)."""
    if args.init or args.no_cache or not hasattr(cfg, "pretrain_kimg"):
        return None
    code = [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in (getattr(s["module"], "__file__", None),
                                                                          __file__) if f]
    key = {"format": CKPT_FORMAT, "model": args.model, "config": dataclasses.asdict(cfg), "seed": args.seed,
           "data": hashlib.sha256(real.cpu().contiguous().numpy().tobytes()).hexdigest(), "samples": n_samples,
           "device": device.type, "world": world, "code": code, "torch": torch.__version__}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_folder(args, out), f"{args.model}-iter0-{name}.pt")


def cache_folder(args, out: str) -> str:
    """Where what later runs can reuse is kept (pretrained iterations 0, the metrics' classifier): --cache, else
    cache/ beside the run folder."""
    return args.cache or os.path.join(os.path.dirname(os.path.abspath(out)), "cache")


def lam_folder(out: str, lams: list[float], lam: float) -> str:
    """Where one lambda's iterations go: the run folder itself, or lam_X/ in a sweep."""
    return out if len(lams) == 1 else os.path.join(out, f"lam_{lam_label(lam)}")


def run_clock(args, model, cfg, lams, out: str, n_gen: dict, kimg: float, pretraining: bool) -> RunClock | None:
    """The run's clock (see RunClock): the work still to do, and the sampler's measured speed on seeds that no
    iteration uses: a batch of 64, then, where that says it costs under PROBE_SECONDS, a whole batch of the
    size the iterations sample in. None for closed-form models and on ranks other than 0."""
    if rank_world()[0] != 0 or not hasattr(cfg, "batch"):
        return None
    work = [("pretraining", round(cfg.pretrain_kimg * 1000 / cfg.batch), max(n_gen.values()))] if pretraining else []
    for lam in lams:
        log = os.path.join(lam_folder(out, lams, lam), "metrics.jsonl")
        done = sum(1 for _ in open(log)) - 1 if os.path.exists(log) else 0
        if args.iters > done:
            work.append((f"lam {lam_label(lam)}: {args.iters - done} iterations",
                         (args.iters - done) * max(1, round(kimg * 1000 / cfg.batch)), (args.iters - done) * n_gen[lam]))

    def seconds_per_sample(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(image_seeds(args.seed, 999, n))  # iteration 999 of this seed: never a real iteration's seeds
        return (time.perf_counter() - t0) / n

    probe = min(cfg.sample_batch, 64)
    per_sample = seconds_per_sample(probe)
    batch = min(cfg.sample_batch, max(n_gen.values()))  # the batch the iterations sample in: on a CPU a batch of 512
    if batch > probe and per_sample * batch < PROBE_SECONDS:  # ran 1.25x faster per sample than one of 64
        probe, per_sample = batch, seconds_per_sample(batch)
    return RunClock(per_sample, probe, work)


def pretrain(args, model, real: torch.Tensor, cfg, progress: bool) -> str:
    """Iteration 0 without --init: train from scratch on the real data for the preset's pretraining budget."""
    kimg = getattr(cfg, "pretrain_kimg", 0)
    steps = round(kimg * 1000 / cfg.batch) if hasattr(cfg, "batch") else 0
    if rank_world()[0] == 0:
        print(f"iteration 0: training from scratch on {len(real)} real images"
              + (f" for {kimg:g} kimg ({steps} steps of {cfg.batch})" if steps else " (closed form)"))
    return "pretrain " + json.dumps(train(model, real, kimg, cfg, args.seed, 0, progress, "pretrain"))


def prepare(args, world: int, device: torch.device) -> dict:
    """Settings, real data, the model's Config, config.json's content and the run folder, all validated
    before anything is written."""
    s = resolve(args, device)
    real, labels, truth, whole = load_real(args, s["data"])
    # the samples are measured against the distribution the model is to learn: with --n-real on a data set, the
    # whole set (as FID is measured against a whole training set; fresh real data is also drawn from it)
    reference = whole if whole is not None else (real, labels)
    is_image, n, module = real.dtype == torch.uint8, len(real), s["module"]
    shape = {"img_channels": real.shape[1], "img_resolution": real.shape[-1]} if is_image else {"dim": real.shape[1]}
    if is_image and real.shape[-2] != real.shape[-1]:
        raise UserError(f"images are {real.shape[-2]}x{real.shape[-1]}; the models need square images")
    overrides = parse_overrides(args.overrides, module.Config)
    if args.compile:
        if "compile" not in {f.name for f in dataclasses.fields(module.Config)}:
            raise UserError(f"--compile: model {args.model} has no network to compile")
        overrides["compile"] = True
    if set(overrides) & set(shape):
        raise UserError(f"--set {', '.join(set(overrides) & set(shape))}: set from the data, not from the command line")
    try:
        cfg = module.make_config(s["preset"], **shape, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    regime = make_regime(args, s["data"], real, s["lams"], whole)
    kimg = args.kimg if args.kimg is not None else getattr(cfg, "pretrain_kimg" if regime.start == "scratch" else "kimg", 0)
    n_eval = args.n_eval or min(n, N_EVAL_PAPER)
    out = args.out or os.path.join("runs", f"{args.model}-{os.path.basename(s['data'].rstrip('/'))}")
    config = {"model": args.model, "preset": s["preset"], "data": s["data"], "n_real": n, "n_reference": len(reference[0]),
              "n_eval": n_eval,
              "lams": [lam_label(lam) for lam in s["lams"]], "iters": args.iters, "kimg": kimg, **regime.config(), "seed": args.seed,
              "init": args.init, "metrics": args.metrics, "world_size": world, "device": device.type,
              "model_config": dataclasses.asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}}
    config_path = os.path.join(out, "config.json")
    if os.path.exists(config_path) and args.resume:
        with open(config_path) as f:
            check_same(json.load(f), json.loads(json.dumps(config)), out)
    elif (os.path.exists(out) and os.listdir(out) and not args.force
          and not (args.resume and os.path.exists(os.path.join(out, "iter0.pt")))):  # a sweep's lambda, side by side
        raise UserError(f"run folder '{out}' exists; add --resume to continue it or --force to start over")
    return {"s": s, "real": real, "reference": reference, "truth": truth, "cfg": cfg, "config": config, "out": out,
            "regime": regime}


def run(args) -> None:
    rank, world, device = setup_device(args.device)
    threads = (cpu_threads(args.threads, world) if device.type == "cpu" else
               plural(torch.get_num_threads(), "CPU thread"))
    main_rank = rank == 0
    progress = main_rank and not args.no_progress
    with on_every_rank():  # settings, data and run folder: any rank's error stops every rank
        settings = prepare(args, world, device)
    s, real, reference, truth, cfg, config, out = (settings[k] for k in ("s", "real", "reference", "truth", "cfg",
                                                                         "config", "out"))
    module, lams, kimg, n_eval = s["module"], s["lams"], config["kimg"], config["n_eval"]
    is_image, n = real.dtype == torch.uint8, len(real)
    n_synth = {lam: n if math.isinf(lam) else round(lam * n) for lam in lams}
    n_gen = {lam: max(n_eval, n_synth[lam]) for lam in lams}
    config_path = os.path.join(out, "config.json")

    with on_every_rank():
        torch.manual_seed(args.seed)  # the network's initial weights: the same on every rank and in every run
        model = module.Model(cfg, device)
        real = real.to(device) if is_image else real
    ckpt0_path = os.path.join(out, "iter0.pt")
    keep = args.resume or not args.force  # --force without --resume starts over
    how = None
    if args.init and not (keep and os.path.exists(ckpt0_path)):
        with on_every_rank():  # rank 0 downloads 'official'; the others wait at the end of the block
            path = init_path(args, s, real)
        with on_every_rank():
            how = load_init(args, model, path)
    if dataclasses.asdict(cfg) != config["model_config"]:  # the released file set some fields (EDM: its preconditioning)
        config["model_config_after_init"] = dataclasses.asdict(cfg)
    if main_rank:
        if args.force and not args.resume and os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        save_atomic(json.dumps(config, indent=2) + "\n", config_path)
        print(f"retrain.py: {args.model} ({s['preset']}) on {s['data']}: n={n} real, lam={', '.join(config['lams'])}, "
              f"{args.iters} iterations of {kimg:g} kimg, {n_eval} samples evaluated per iteration"
              + (f" against all {config['n_reference']} images" if config["n_reference"] != n else "")
              + f", device {device}" + (f" x {world} processes" if world > 1 else "") + f" -> {out}")
        profile = getattr(model, "profile", {})
        print("retrain.py: " + ", ".join([*(f"{k} {v}" for k, v in profile.items()), threads])
              + (", TF32 matmuls" if device.type == "cuda" else ""))
    barrier()  # the run folder is ready before any rank looks into it
    with on_every_rank():  # rank 0 alone reads or computes the real set's reference features
        evaluate = Evaluator(reference[0], reference[1], args.metrics, args.inception, n_eval, device,
                             progress, cache=os.path.join(out, "real-features.npz"),
                             classifier_cache=cache_folder(args, out),
                             seed=args.seed)
    if main_rank:  # what the metrics are measured with, and their noise floor, beside the run's settings
        config["features"] = evaluate.kind
        if evaluate.clf is not None:
            config["classifier"] = {k: evaluate.clf_info[k] for k in ("accuracy", "hash", "n_train", "n_test")}
        config["noise_floor"] = evaluate.floor
        save_atomic(json.dumps(config, indent=2) + "\n", config_path)

    def record(it, lam, seconds, samples, extra) -> dict:
        r = {"iter": it, "lam": lam_label(lam), "n_real": 0 if math.isinf(lam) and it > 0 else n,
             "n_synth": 0 if it == 0 else n_synth[lam], "seconds": round(seconds, 2), **extra}
        with on_every_rank():  # rank 0 computes the metrics
            r.update(evaluate(samples[:n_eval]))
        if truth is not None:
            import gaussian

            r.update(gaussian.errors(model, *truth))
        return r

    # iteration 0: computed once, shared by every lambda, and cached across runs when it was pretrained here
    cache = iter0_cache(args, s, out, cfg, real, max(n_gen.values()), device, world)
    cached = cache is not None and not os.path.exists(ckpt0_path) and os.path.exists(cache)
    jobs = lam_jobs(args, lams, device, world, evaluate.kind)
    if jobs > 1 and main_rank:
        print(f"retrain.py: after iteration 0 the {len(lams)} lambdas run side by side, {jobs} at a time with "
              f"{plural(max(1, torch.get_num_threads() // jobs), 'thread')} each (--lam-jobs 1: one after another)")
    global CLOCK  # side by side, each lambda's process says its own estimate
    CLOCK = run_clock(args, model, cfg, lams if jobs == 1 else [], out, n_gen, kimg,
                      pretraining=not (how or cached or os.path.exists(ckpt0_path)))
    if os.path.exists(ckpt0_path):
        ckpt0 = load_checkpoint(ckpt0_path)
    elif cached:
        ckpt0 = load_checkpoint(cache)
        rec = record(0, lams[0], ckpt0["record"]["seconds"], ckpt0["samples"], {"nfe": ckpt0["record"]["nfe"]})
        ckpt0 = {**ckpt0, "record": rec, "how": f"{ckpt0['how']} (cached in {cache})"}
        if main_rank:
            save_atomic(ckpt0, ckpt0_path)
            print(f"iteration 0: from the cache, {cache} (pretrained by an earlier run with the same model, "
                  "settings, data, seed and code; --no-cache trains it again)")
            print(log_line(rec))
    else:
        t0 = time.time()
        how = how or pretrain(args, model, real, cfg, progress)
        samples = sample(model, max(n_gen.values()), args.seed, 0, cfg.sample_batch, is_image, progress)
        rec = record(0, lams[0], time.time() - t0, samples, {"nfe": model.nfe})
        ckpt0 = {"format": CKPT_FORMAT, "model": args.model, "config": dataclasses.asdict(cfg), "iter": 0,
                 "state": copy.deepcopy(model.state_dict()), "samples": samples, "record": rec, "how": how}
        if main_rank:
            save_atomic(ckpt0, ckpt0_path)
            if cache is not None:
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                save_atomic(ckpt0, cache)
            print(log_line(rec))
    if ckpt0["samples"].shape[0] < max(n_gen.values()):
        raise UserError(f"'{ckpt0_path}' holds {ckpt0['samples'].shape[0]} samples; this run needs {max(n_gen.values())}")
    if ckpt0["record"].get("features", evaluate.kind) != evaluate.kind:  # a run begun with other metrics
        raise UserError(f"--resume: the run in '{out}' measured its metrics in {ckpt0['record']['features']} space, "
                        f"this one would use {evaluate.kind}; add --metrics {ckpt0['record']['features']}")

    histories = {}
    title = f"{args.model} ({s['preset']}) on {s['data']}: metrics against iteration; {evaluate.kind} features"
    plot = functools.partial(plot_metrics, title=title, floor=evaluate.floor)
    if jobs > 1:
        histories = side_by_side(args, lams, out, jobs)
        plot(histories, os.path.join(out, "metrics.png"))
        return
    for lam in lams:
        lam_dir = lam_folder(out, lams, lam)
        histories[lam_label(lam)] = retrain_one(args, lam, lam_dir, ckpt0, model, real, cfg, kimg, n_gen[lam],
                                                n_synth[lam], is_image, progress, record, main_rank, settings["regime"],
                                                plot=plot, cache_dir=cache_folder(args, out))
        if main_rank and len(lams) > 1:
            plot(histories, os.path.join(out, "metrics.png"))
    barrier()


def log_line(r: dict) -> str:
    metrics = " ".join(f"{k} {r[k]:.4g}" for k in ("fid", "fd", "precision", "recall", "density", "coverage", "class_tv",
                                                   "classes", "mean_err", "cov_err", "logdet") if k in r)
    loss = f" loss {r['loss']:.4f}" if "loss" in r else ""
    return (f"iter {r['iter']:3d} lam {r['lam']:>4}: {r['n_real']} real + {r['n_synth']} synthetic{loss} | "
            f"{metrics} ({r['features']}) | nfe {r['nfe']} | {r['seconds']:.1f} s")


# ----------------------------------------------------------------------------------------------------
# Self-consuming regimes beyond the paper: what each iteration trains on, how its samples are drawn
#
#   --pool   replace (the paper): generation t-1's samples replace the earlier ones; accumulate: every
#            generation's samples are kept (Gerstgrasser et al. 2024), the training set grows by
#            round(lam n) per iteration (and so does ckpt.pt, which holds them for --resume);
#            accumulate-subsample: of all kept samples, round(lam n) drawn without replacement each
#            iteration, replace's training-set size (Kazdan et al. 2024)
#   --real   fixed (the paper): the same n real points every iteration; fresh: n new ones each iteration
#            (images: chunk t of the data set, chunk 0 being iteration 0's real set; --data gaussian: new
#            draws); none: no real data, round(lam n) samples alone. Alemohammad et al. 2024's three loops.
#            lam = inf means no real data whatever --real says, as it always has
#   --start  warm (the paper): fine-tune the previous model; scratch: iteration 0's initial weights again
#            (seeded by --seed; step counters, EMA and Adam's moments afresh), trained for --kimg, whose
#            default is then the preset's pretraining budget, the same as iteration 0's. (The Gaussian's fit
#            is from scratch anyway; its init_* perturbations then apply to every fit.)
#   --temperature  tau scales the samplers' initial noise (the Gaussian: samples of N(mu, tau^2 Sigma)). Model
#            0 is sampled again at tau and evaluated again: the shared iteration 0 is sampled at 1
#   --curate K     each kept sample is one of K candidates, candidate i kept with probability softmax(r)_i
#            over the K, for the reward r of --reward (Ferbach et al. 2024). The candidates are the
#            iteration's samples (K round(lam n) of them are drawn), whose first n_eval are evaluated as usual
# Each record adds the training set's make-up, n_synth_by_gen {generation: samples} (and n_pool, the
# accumulated samples, with accumulate-subsample); with a reward, "reward" (mean over the iteration's
# samples) and "reward_kept" (mean over the curated samples it trained on). The defaults take none of the
# branches below: they draw nothing that the paper's loop does not, and give its results bit for bit.

REGIME_DEFAULTS = {"pool": "replace", "real": "fixed", "start": "warm", "temperature": 1.0, "curate": 1, "reward": None}
FRESH_REAL, SUBSAMPLE, CURATE = 1, 2, 3  # which regime seed (regime_seed)


@dataclasses.dataclass
class Regime:
    """The regime flags, checked (make_regime). config() gives config.json's fields."""

    pool: str = "replace"
    real: str = "fixed"
    start: str = "warm"
    temperature: float = 1.0
    curate: int = 1                       # K candidates per kept sample; 1 = no curation
    reward: dict | None = None            # {"kind": linear, "beta": [..]} | {"kind": quadratic, "gamma": g} |
    #                                       {"kind": class, "class": c} | {"kind": confidence}; recorded each iteration
    fresh: torch.Tensor | None = None     # --real fresh on images: the whole data set, cut into chunks of n
    labelled: tuple | None = None         # --reward class | confidence: (images, labels) to train the classifier on

    def config(self) -> dict:
        return {key: getattr(self, key) for key in REGIME_DEFAULTS}


def regime_seed(seed: int, it: int, what: int) -> int:
    """Seeds the regime's own draws in iteration it (fresh Gaussian data, subsample, curation): below
    train_seed, above every image seed of the iteration."""
    return train_seed(seed, it) - what


def make_regime(args, data_spec: str, real: torch.Tensor, lams: list[float], whole: tuple | None) -> Regime:
    """The regime flags, checked against each other and against the data before the run starts. whole: the
    data set (images, labels) that real was taken from (load_real), for the reward's classifier and fresh data."""
    is_image, n = real.dtype == torch.uint8, len(real)
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--temperature {args.temperature}: give a positive number (1 = no sampling bias)")
    if args.curate < 1:
        raise UserError(f"--curate {args.curate}: give the number of candidates per kept sample, 1 or more (1 = no curation)")
    reward, labelled = None, None
    if args.reward in ("linear", "quadratic"):
        if is_image:
            raise UserError(f"--reward {args.reward} is for vector data (--data gaussian); images take --reward class or confidence")
        if len(args.beta) not in (1, real.shape[1]):
            raise UserError(f"--beta has {len(args.beta)} values; give one, or one per coordinate ({real.shape[1]})")
        reward = {"kind": "linear", "beta": args.beta} if args.reward == "linear" else {"kind": "quadratic", "gamma": args.gamma}
    elif args.reward is not None:
        if not is_image:
            raise UserError(f"--reward {args.reward} scores images with the digits classifier; vectors take --reward linear or quadratic")
        labelled = whole
        if labelled[1] is None:
            raise UserError(f"--reward {args.reward} needs class labels to train the classifier, and '{data_spec}' has none "
                            "(digits, mnist, fashion-mnist, cifar10 or an .npz with 'labels' have them)")
        n_classes = int(labelled[1].max()) + 1
        if args.reward == "class" and not 0 <= args.reward_class < n_classes:
            raise UserError(f"--reward-class {args.reward_class}: '{data_spec}' has classes 0..{n_classes - 1}")
        reward = {"kind": "class", "class": args.reward_class} if args.reward == "class" else {"kind": "confidence"}
    if args.curate > 1 and reward is None:
        raise UserError(f"--curate {args.curate} keeps samples by a reward: add --reward "
                        + ("class or confidence" if is_image else "linear or quadratic"))
    with_real = [lam for lam in lams if not math.isinf(lam)]
    if args.real == "none" and 0 in with_real:
        raise UserError("--real none with --lam 0 leaves nothing to train on; give lam > 0 (synthetic samples per real image)")
    fresh = None
    if args.real == "fresh" and with_real and is_image:
        fresh = whole[0]
        if (args.iters + 1) * n > len(fresh):
            raise UserError(f"--real fresh needs {args.iters + 1} disjoint sets of {n} images (iterations 0..{args.iters}), "
                            f"{(args.iters + 1) * n} in all, and '{data_spec}' has {len(fresh)}; lower --n-real or --iters")
    return Regime(args.pool, args.real, args.start, args.temperature, args.curate, reward, fresh, labelled)


def image_reward(reward: dict, labelled: tuple[torch.Tensor, torch.Tensor], device, cache_dir: str | None):
    """The reward of uint8 images (N, C, H, W) -> float64 (N,): the log-probability of class reward["class"], or of
    the most likely class ("confidence"), under the digits classifier of classifier.py, trained on the whole
    labelled data set (seconds on the digits; the same weights from its seed on every rank and at --resume),
    once: later runs load it from cache_dir."""
    import classifier

    with torch.random.fork_rng(devices=[]):  # whatever global randomness its training draws: the same net every time
        torch.manual_seed(0)
        net = classifier.get(*labelled, cache_dir)[0].to(device)

    def reward_of(images: torch.Tensor) -> torch.Tensor:
        log_p = torch.from_numpy(classifier.log_probs(net, images))  # (N, classes) float64
        return log_p[:, reward["class"]] if reward["kind"] == "class" else log_p.max(1).values

    return reward_of


def reward_function(regime: Regime, is_image: bool, device, cache_dir: str | None = None):
    """The regime's reward as a function of samples (uint8 images or float64 vectors) -> float64 (N,), or None."""
    if regime.reward is None:
        return None
    if is_image:
        return image_reward(regime.reward, regime.labelled, device, cache_dir)
    import gaussian

    return gaussian.Reward(regime.reward["kind"], beta=tuple(regime.reward.get("beta", (1.0,))),
                           gamma=regime.reward.get("gamma", 1.0))


def real_part(regime: Regime, lam: float, real: torch.Tensor, seed: int, it: int) -> torch.Tensor | None:
    """The real data of iteration it's training set: the run's real set (fixed), the it-th set of n (fresh:
    chunk it of the data set, or n new draws of --data gaussian), or None."""
    if math.isinf(lam) or regime.real == "none":
        return None
    if regime.real == "fixed" or it == 0:
        return real
    n = len(real)
    if regime.fresh is not None:
        return regime.fresh[it * n:(it + 1) * n].to(real.device)
    import gaussian

    return gaussian.make_data(real.shape[1], n, seed=regime_seed(seed, it, FRESH_REAL))


def curate(samples: torch.Tensor, rewards: torch.Tensor, n_keep: int, k: int, seed: int, it: int) -> torch.Tensor:
    """n_keep samples, sample i one of the k candidates samples[i k:(i + 1) k], candidate j kept with probability
    softmax(rewards)_j over the k (drawn on the CPU, the same on every rank)."""
    gen = torch.Generator().manual_seed(regime_seed(seed, it, CURATE))
    pick = torch.multinomial(torch.softmax(rewards[:n_keep * k].view(n_keep, k), 1), 1, generator=gen)[:, 0]
    if dist.is_initialized():  # rank 0's choice: rewards computed on different machines may differ in the last bits
        shared = [pick]
        dist.broadcast_object_list(shared, src=0)
        pick = shared[0]
    return samples[:n_keep * k].view(n_keep, k, *samples.shape[1:])[torch.arange(n_keep), pick]


def synthetic_part(regime: Regime, gens: list[torch.Tensor], n_synth: int, seed: int, it: int):
    """The synthetic data of iteration it's training set from the kept samples of generations 0..it-1 (gens;
    replace holds the last one only) and its make-up {generation: count}: all of them, or n_synth drawn
    without replacement (accumulate-subsample)."""
    first = it - len(gens)  # the generation of gens[0]
    origin = torch.cat([torch.full((len(g),), first + k) for k, g in enumerate(gens)])
    synth = torch.cat(gens) if len(gens) > 1 else gens[0]
    if regime.pool == "accumulate-subsample" and len(gens) > 1:
        keep = torch.randperm(len(synth), generator=torch.Generator().manual_seed(regime_seed(seed, it, SUBSAMPLE)))
        keep = keep[:n_synth].sort().values
        synth, origin = synth[keep], origin[keep]
    gen_ids, counts = origin.unique(return_counts=True)
    return synth, {str(g): c for g, c in zip(gen_ids.tolist(), counts.tolist())}


def retrain_one(args, lam, lam_dir, ckpt0, model, real, cfg, kimg, n_gen, n_synth, is_image, progress, record, main_rank,
                regime: Regime | None = None, plot=plot_metrics, cache_dir: str | None = None):
    """Iterations 1..T for one lambda, resuming from lam_dir/ckpt.pt when it exists (cache_dir: where the
    reward's classifier is kept).

    Iteration t trains on real_part (the real data of the iteration) plus synthetic_part: the kept samples
    of generation t-1 (the first n_synth of its samples, or n_synth curated from K n_synth candidates), with
    those of earlier generations when accumulating (gens, kept in the checkpoint for --resume)."""
    regime = regime or Regime()  # the paper's loop
    ckpt_path = os.path.join(lam_dir, "ckpt.pt")
    n_gen = max(n_gen, regime.curate * n_synth)  # curation: K candidates per kept sample
    reward = reward_function(regime, is_image, real.device, cache_dir)
    resumed = os.path.exists(ckpt_path)
    if resumed:
        ckpt = load_checkpoint(ckpt_path)
        if main_rank:
            print(f"lam {lam_label(lam)}: resuming after iteration {ckpt['iter']}")
    else:
        ckpt = {**ckpt0, "lam": lam_label(lam), "history": [{**ckpt0["record"], "lam": lam_label(lam)}]}
    model.load_state_dict(copy.deepcopy(ckpt["state"]))  # a copy: training must not touch iteration 0's state
    samples, history, gens = ckpt["samples"], ckpt["history"], ckpt.get("pool", [])
    if isinstance(history, str):  # metrics.jsonl's text, as checkpoints hold it (older ones: a list of records)
        history = [json.loads(line) for line in history.splitlines()]
    if not resumed:  # iteration 0 as this regime sees it: its samples at the temperature, K per kept one
        if regime.temperature != 1 or len(samples) < n_gen:
            t0 = time.time()
            samples = sample(model, n_gen, args.seed, 0, cfg.sample_batch, is_image, progress, regime.temperature)
            if regime.temperature != 1:  # other samples than the shared iteration 0's: evaluated again
                history[0] = {**history[0], **record(0, lam, time.time() - t0, samples, {"nfe": model.nfe})}
                if main_rank:
                    print(f"{log_line(history[0])}   (sampled again at temperature {regime.temperature:g})")
        history[0] = {**history[0], "n_synth_by_gen": {}}
        if reward is not None:
            history[0]["reward"] = reward(samples).mean().item()
    if regime.start == "scratch":  # the initial weights of iteration 0, the start of every iteration
        torch.manual_seed(args.seed)
        blank = type(model)(cfg, real.device).state_dict()  # (the images are on the model's device)
    lines = [json.dumps(r) + "\n" for r in history]  # metrics.jsonl, each record serialized once
    if main_rank:
        os.makedirs(os.path.join(lam_dir, "samples"), exist_ok=True)
        if is_image:
            save_grid(samples, os.path.join(lam_dir, "samples", "iter000.png"),
                      title=f"{args.model}, lam {lam_label(lam)}, iteration 0")
        save_atomic("".join(lines), os.path.join(lam_dir, "metrics.jsonl"))
    last_plot = time.time()  # the plot is redrawn every 30 s and at the end
    for it in range(ckpt["iter"] + 1, args.iters + 1):
        t0 = time.time()
        kept, kept_reward = samples[:n_synth], {}  # generation it-1's share of the training set
        if regime.curate > 1 and n_synth:
            kept = curate(samples, reward(samples), n_synth, regime.curate, args.seed, it)
            kept_reward = {"reward_kept": reward(kept).mean().item()}
        gens = [*gens, kept] if regime.pool != "replace" else [kept]
        synth, by_gen = synthetic_part(regime, gens, n_synth, args.seed, it)
        synth = synth.to(real.device)
        real_t = real_part(regime, lam, real, args.seed, it)
        train_set = synth if real_t is None else torch.cat([real_t, synth])
        made = {"n_real": 0 if real_t is None else len(real_t), "n_synth": len(synth), "n_synth_by_gen": by_gen,
                **({"n_pool": sum(map(len, gens))} if regime.pool == "accumulate-subsample" else {}), **kept_reward}
        if regime.start == "scratch":
            model.load_state_dict(blank)
        stats = train(model, train_set, kimg, cfg, args.seed, it, progress, f"train it {it} lam {lam_label(lam)}")
        samples = sample(model, n_gen, args.seed, it, cfg.sample_batch, is_image, progress, regime.temperature)
        if reward is not None:
            made["reward"] = reward(samples).mean().item()
        rec = record(it, lam, time.time() - t0, samples, {**made, **stats, "nfe": model.nfe})
        history.append(rec)
        lines.append(json.dumps(rec) + "\n")
        if main_rank:  # the history as one string: pickling hundreds of records cost more than the Gaussian's iteration
            text = "".join(lines)
            save_atomic({"format": CKPT_FORMAT, "model": args.model, "config": ckpt["config"], "iter": it,
                         "lam": lam_label(lam), "state": model.state_dict(), "samples": samples,
                         "history": text, **({"pool": gens} if regime.pool != "replace" else {})}, ckpt_path)
            save_atomic(text, os.path.join(lam_dir, "metrics.jsonl"))
            if is_image:
                save_grid(samples, os.path.join(lam_dir, "samples", f"iter{it:03d}.png"),
                          title=f"{args.model}, lam {lam_label(lam)}, iteration {it}")
            if time.time() - last_plot > 30:
                plot({lam_label(lam): history}, os.path.join(lam_dir, "metrics.png"))
                last_plot = time.time()
            print(log_line(rec))
    if main_rank:
        plot({lam_label(lam): history}, os.path.join(lam_dir, "metrics.png"))
    return history


def lam_jobs(args, lams: list[float], device, world: int, features: str) -> int:
    """How many lambdas of a sweep run side by side: --lam-jobs, else on the CPU (one process, not Inception,
    whose real-set features each process would compute again, and a model that retrain.py's command line
    knows, since each lambda's process is started from it) one per thread, at most one per lambda."""
    if len(lams) < 2 or world > 1 or device.type != "cpu":
        return 1
    if args.lam_jobs is not None:
        return max(1, min(args.lam_jobs, len(lams)))
    if features == "inception" or args.model not in MODELS:
        return 1
    return min(len(lams), torch.get_num_threads())


def child_argv(args, lam: float, lam_dir: str, threads: int, cache: str) -> list[str]:
    """The command line of one lambda of a sweep as its own run in lam_dir: every option the user gave (rebuilt
    from args) but the sweep's own; it resumes from the iteration 0 placed in lam_dir, and finds the metrics'
    classifier in the sweep's cache folder."""
    own = {"lam", "out", "seed", "seeds", "threads", "lam_jobs", "resume", "force", "no_progress", "cache", "help"}
    argv = []
    for action in build_parser()._actions:
        value = getattr(args, action.dest, action.default)
        if action.dest in own or not action.option_strings or value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true
            argv.append(flag)
        elif isinstance(value, list):
            argv += [x for v in value for x in (flag, str(v))] if action.nargs is None else [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return [*argv, "--lam", lam_label(lam), "--out", lam_dir, "--seed", str(args.seed), "--threads", str(threads),
            "--cache", cache, "--resume", "--no-progress"]


def side_by_side(args, lams: list[float], out: str, jobs: int) -> dict:
    """Iterations 1..T of each lambda as its own retrain.py process (jobs at a time, the threads shared out), each
    starting from a copy of out/iter0.pt in its lam_X/ folder and logging to lam_X/log.txt; their iteration lines
    are relayed here. The same seeds make the same numbers as one after another (up to the thread count's
    rounding). Returns {lam: history}."""
    threads = max(1, torch.get_num_threads() // jobs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # their lines reach the log as they are printed
    waiting, running, histories = list(lams), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                lam = waiting.pop(0)
                lam_dir = lam_folder(out, lams, lam)
                os.makedirs(lam_dir, exist_ok=True)
                if not os.path.exists(os.path.join(lam_dir, "iter0.pt")):
                    shutil.copyfile(os.path.join(out, "iter0.pt"), os.path.join(lam_dir, "iter0.pt"))
                log = open(os.path.join(lam_dir, "log.txt"), "a")
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                         *child_argv(args, lam, lam_dir, threads, cache_folder(args, out))],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                running[lam] = {"proc": proc, "log": log, "reader": open(log.name), "tail": ""}
            time.sleep(0.5)
            for lam, job in list(running.items()):
                finished = job["proc"].poll() is not None  # before reading: its last lines are then in the file
                *lines, job["tail"] = (job["tail"] + job["reader"].read()).split("\n")  # complete lines only
                for line in lines:  # its iterations, estimate and errors
                    if line.startswith(("iter", "estimate", "lam", "retrain.py: error")):
                        print(line, flush=True)
                if not finished:
                    continue
                job["log"].close()
                job["reader"].close()
                del running[lam]
                if job["proc"].returncode:
                    raise UserError(f"lam {lam_label(lam)} stopped with exit code {job['proc'].returncode}; see "
                                    f"{job['log'].name} (--resume goes on after the last completed iteration)")
                with open(os.path.join(lam_folder(out, lams, lam), "metrics.jsonl")) as f:
                    histories[lam_label(lam)] = [json.loads(line) for line in f]
    finally:
        for job in running.values():  # an error or Ctrl-C: stop the others too
            job["proc"].terminate()
            job["proc"].wait()
            job["log"].close()
            job["reader"].close()
    return {lam_label(lam): histories[lam_label(lam)] for lam in lams}


def run_seeds(args) -> None:
    """--seeds: the same run once per seed, each in its own folder, then the mean and spread over seeds."""
    base = args.out or os.path.join("runs", f"{args.model}-seeds-" + "-".join(map(str, args.seeds)))
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError("--seeds lists a seed twice")
    for seed in args.seeds:
        one = copy.copy(args)
        one.seed, one.seeds, one.out = seed, None, os.path.join(base, f"seed_{seed}")
        if rank_world()[0] == 0:
            print(f"retrain.py: seed {seed} of {', '.join(map(str, args.seeds))} -> {one.out}")
        run(one)
    if rank_world()[0] == 0:
        summarize_seeds(base, args.seeds)


def summarize_seeds(base: str, seeds: list[int]) -> dict:
    """Per lambda and iteration, the mean and standard deviation over seeds of every metric, into
    base/seeds.json and base/metrics.png, and the last iteration's as lines of text."""
    configs = [json.load(open(os.path.join(base, f"seed_{seed}", "config.json"))) for seed in seeds]
    lams = configs[0]["lams"]
    histories = {}
    for lam in lams:
        logs = [os.path.join(lam_folder(os.path.join(base, f"seed_{seed}"), lams, float(lam)), "metrics.jsonl")
                for seed in seeds]
        histories[lam] = [[json.loads(line) for line in open(log)] for log in logs]
    summary = {"seeds": seeds, "features": configs[0].get("features"), "noise_floor": configs[0].get("noise_floor"),
               "lams": {}}
    for lam, hs in histories.items():
        rows = []
        for it in sorted({r["iter"] for h in hs for r in h}):
            recs = [r for h in hs for r in h if r["iter"] == it]
            keys = [k for k in PANELS if all(k in r for r in recs)]
            rows.append({"iter": it, "seeds": len(recs),
                         **{k: [float(np.mean([r[k] for r in recs])),
                                float(np.std([r[k] for r in recs], ddof=1)) if len(recs) > 1 else 0.0] for k in keys}})
        summary["lams"][lam] = rows
        last = rows[-1]
        print(f"seeds {', '.join(map(str, seeds))}, lam {lam}, iteration {last['iter']} ({last['seeds']} seeds): "
              + ", ".join(f"{k} {last[k][0]:.4g} +- {last[k][1]:.2g}" for k in PANELS if k in last))
    save_atomic(json.dumps(summary, indent=1) + "\n", os.path.join(base, "seeds.json"))
    c = configs[0]
    plot_metrics(histories, os.path.join(base, "metrics.png"), floor=c.get("noise_floor"),
                 title=f"{c['model']} ({c['preset']}) on {c['data']}: mean and one standard deviation over "
                       f"{len(seeds)} seeds; {c.get('features', '')} features")
    return summary


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.seeds:
            run_seeds(args)
        else:
            run(args)
    except UserError as e:
        print(f"retrain.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retrain.py: interrupted; rerun with --resume to continue after the last completed iteration", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():  # under torchrun: leave without tearing the process group down, since another rank
        sys.stdout.flush()     # may have exited already, and gloo's teardown then aborts this process
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
