"""retrain.py -- retrain a generative model, again and again, on real data plus its own samples.

Bertrand, Bose, Duplessis, Jiralerspong & Gidel, "On the Stability of Iterative Retraining of
Generative Models on their Own Data" (ICLR 2024, arXiv 2310.00429). The procedure:

    iteration 0   the initial model: --init PATH (or `official`), else trained from scratch on the
                  n real images for the model's pretraining budget
    t = 1..T      draw round(lam * n) fresh samples from the model of t-1 (they replace earlier ones),
                  fine-tune that model (weights, EMA and optimizer carried over, no re-warm-up) on the
                  n real images plus those samples for --kimg thousand images seen, then evaluate
    lam = 0       the control: real data only.   lam = inf: the fully synthetic loop (n samples, no real data)

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
      .train_step(x) -> float   one optimizer step on x, float32 (B, C, H, W) in [-1, 1]; returns the loss
                                (or .fit(x) for a closed-form model, called once per iteration)
      .generate(seeds) -> x     float32 (N, C, H, W) in [-1, 1]; image i depends only on seeds[i]
      .nfe                      network evaluations per image in the last generate()
      .state_dict() / .load_state_dict(d)   plain dicts (torch.load(weights_only=True) reads them)
      .load_pretrained(path)    a released checkpoint file into the network and its EMA
"""

import argparse
import contextlib
import copy
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
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
    p.add_argument("--data", default=None, help="cifar10 | digits | gaussian | folder | .zip | .npy/.npz (default: chosen by --preset auto)")
    p.add_argument("--data-root", default="data", help="where cifar10 is downloaded")
    p.add_argument("--n-real", type=int, default=None, help="use only the first N real images (gaussian: draw N; default 1000)")
    p.add_argument("--dim", type=int, default=2, help="dimension of --data gaussian")
    p.add_argument("--kimg", type=float, default=None, help="thousands of images seen per retraining iteration (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help=f"samples evaluated per iteration (default: {N_EVAL_PAPER}, or all of a smaller data set)")
    p.add_argument("--init", default=None, help="initial model: a checkpoint path, or 'official' to download the released one")
    p.add_argument("--preset", default="auto", help="auto | paper | small (or another preset of the model); auto: paper on CUDA, small on CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="override a field of the model's Config (repeatable)")
    p.add_argument("--metrics", default="auto", choices=("auto", "inception", "pixel"), help="feature space of FD/precision/recall; auto: Inception for images of 32 px or more when its weights are available")
    p.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth (else downloaded)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL-DATA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last completed iteration")
    p.add_argument("--force", action="store_true", help="delete an existing --out folder and start over")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (training batches, noise, samples)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (same as --set compile=true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
            raise UserError(f"--set {item}: cannot read '{value}' as the type of {key} (default {default!r})") from None
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
    total, t0 = 0.0, time.time()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for first, (idx, flips) in zip(range(0, steps, LOSS_EVERY), batch_plan(len(train_set), cfg.batch, steps, gen,
                                                                            train_set.device)):
        losses = []
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
        if it == 0 and first == 0 and rank == 0 and steps > LOSS_EVERY:
            per_step = (time.time() - t0) / len(idx)
            tqdm.write(f"  pretraining: {per_step:.3f} s/step x {steps} steps ~ {per_step * steps / 60:.1f} min "
                       f"(measured over the first {len(idx)} steps)")
    bar.close()
    return {"steps": steps, "loss": total / steps}


def sample(model, n: int, seed: int, it: int, chunk: int, is_image: bool, progress: bool) -> torch.Tensor:
    """n samples of iteration `it` on the CPU: uint8 images, or float64 vectors.

    The seeds are cut into chunks of `chunk` by global index; rank r generates chunks r, r + world, ...
    so every chunk is computed the same way whatever the number of processes."""
    rank, world = rank_world()
    seeds = image_seeds(seed, it, n)
    chunks = list(torch.split(seeds, chunk))
    mine = {}
    for k in tqdm(range(rank, len(chunks), world), desc=f"sample it {it}", disable=not progress, leave=False, dynamic_ncols=True):
        x = model.generate(chunks[k])
        mine[k] = (to_uint8(x) if is_image else x.to(torch.float64)).cpu()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return torch.cat([mine[k] for k in range(len(chunks))]) if chunks else torch.zeros(0)


class Evaluator:
    """Frechet distance, precision and recall (k=3) of samples against the real training set.

    Inception-v3 pool features (FID) when the weights are available and the images are 32 px or
    more; otherwise raw pixels (or raw vectors), which is what tiny images and --metrics pixel get.
    The Frechet distance uses the statistics of the whole real set; precision and recall its first
    n_eval images, so both manifolds hold as many points as the paper's 50k vs 50k. Under torchrun
    every rank extracts the Inception features of its share of the samples; rank 0 computes the metrics."""

    def __init__(self, real: torch.Tensor, choice: str, inception: str | None, n_eval: int, device, progress: bool,
                 cache: str):
        self.device, self.progress, self.net, self.n_eval = device, progress, None, n_eval
        self.main = rank_world()[0] == 0
        is_image = real.dtype == torch.uint8
        if choice == "inception" or (choice == "auto" and is_image and real.shape[-1] >= 32):
            try:
                self.net = fid.load_inception(inception, device=device)
            except fid.InceptionUnavailable as e:
                if choice == "inception":
                    raise UserError(str(e)) from None
                if self.main:
                    print(f"retrain.py: Inception weights unavailable, using pixel-space metrics ({e})")
        self.kind = "inception" if self.net is not None else ("pixel" if is_image else "raw")
        if not self.main:
            return
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

    def features(self, x: torch.Tensor) -> np.ndarray | None:
        """Features of x on rank 0 (None on the others). Inception: each rank extracts its share, and rank 0
        gathers them as one tensor (float32, which the features are, padded to the largest share)."""
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

    def __call__(self, fake: torch.Tensor) -> dict:
        """The metrics of `fake` on rank 0 ({} on the other ranks, which only help with the features). The
        Frechet distance's matrix square root from symmetric eigenvalues: on a GPU with torch (a second for
        Inception's 2048 dimensions, where scipy's sqrtm takes ~40 CPU-s), on a CPU with LAPACK."""
        f = self.features(fake) if self.main or self.net is not None else None
        if not self.main:
            return {}
        fd = fid.frechet_distance(*fid.feature_stats(f), *self.real_stats, method="eigh",
                                  device=self.device if self.device.type == "cuda" else None)
        precision, recall = fid.precision_recall(self.real_feats[:self.n_eval], f, k=3, device=self.device)
        return {"fid" if self.kind == "inception" else "fd": fd, "precision": precision, "recall": recall,
                "features": self.kind}


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


def write_metrics(history: list[dict], path: str) -> None:
    save_atomic("".join(json.dumps(r) + "\n" for r in history), path)


def save_grid(samples: torch.Tensor, path: str, n: int = 64) -> None:
    """The first n images as one PNG (tiny images are enlarged, pixels kept square)."""
    from PIL import Image

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
    Image.fromarray(arr).save(path)


def plot_metrics(histories: dict[str, list[dict]], path: str) -> None:
    """One panel per metric against iteration, one line per lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fid", "fd", "precision", "recall", "mean_err", "cov_err", "logdet")
            if any(k in r for h in histories.values() for r in h)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, h in histories.items():
            pts = [(r["iter"], r[key]) for r in h if key in r]
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=label)
        ax.set_xlabel("iteration")
        ax.set_title(key if key != "fd" else f"fd ({h[0].get('features', '')})")
        if key in ("mean_err", "cov_err"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
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


def load_real(args, data_spec: str) -> tuple[torch.Tensor, tuple | None]:
    """The real training set: uint8 images (N, C, H, W), or float64 vectors for --data gaussian."""
    if data_spec == "gaussian":
        import gaussian

        n = args.n_real or 1000
        if n < 2:
            raise UserError(f"--n-real {n}: need at least 2 samples")
        return gaussian.make_data(args.dim, n, seed=args.seed), gaussian.truth(args.dim)
    try:
        return data.load_images(data_spec, root=args.data_root, n=args.n_real), None
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
    real, truth = load_real(args, s["data"])
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
    kimg = args.kimg if args.kimg is not None else getattr(cfg, "kimg", 0)
    n_eval = args.n_eval or min(n, N_EVAL_PAPER)
    out = args.out or os.path.join("runs", f"{args.model}-{os.path.basename(s['data'].rstrip('/'))}")
    config = {"model": args.model, "preset": s["preset"], "data": s["data"], "n_real": n, "n_eval": n_eval,
              "lams": [lam_label(lam) for lam in s["lams"]], "iters": args.iters, "kimg": kimg, "seed": args.seed,
              "init": args.init, "metrics": args.metrics, "world_size": world, "device": device.type,
              "model_config": dataclasses.asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}}
    config_path = os.path.join(out, "config.json")
    if os.path.exists(config_path) and args.resume:
        with open(config_path) as f:
            check_same(json.load(f), json.loads(json.dumps(config)), out)
    elif os.path.exists(out) and os.listdir(out) and not args.force:
        raise UserError(f"run folder '{out}' exists; add --resume to continue it or --force to start over")
    return {"s": s, "real": real, "truth": truth, "cfg": cfg, "config": config, "out": out}


def run(args) -> None:
    rank, world, device = setup_device(args.device)
    main_rank = rank == 0
    progress = main_rank and not args.no_progress
    with on_every_rank():  # settings, data and run folder: any rank's error stops every rank
        settings = prepare(args, world, device)
    s, real, truth, cfg, config, out = (settings[k] for k in ("s", "real", "truth", "cfg", "config", "out"))
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
              f"{args.iters} iterations of {kimg:g} kimg, {n_eval} samples evaluated per iteration, device {device}"
              + (f" x {world} processes" if world > 1 else "") + f" -> {out}")
        if hasattr(model, "profile"):
            print("retrain.py: " + ", ".join(f"{k} {v}" for k, v in model.profile.items())
                  + f", {torch.get_num_threads()} CPU threads" + (", TF32 matmuls" if device.type == "cuda" else ""))
    barrier()  # the run folder is ready before any rank looks into it
    with on_every_rank():  # rank 0 alone reads or computes the real set's reference features
        evaluate = Evaluator(real.cpu() if is_image else real, args.metrics, args.inception, n_eval, device, progress,
                             cache=os.path.join(out, "real-features.npz"))

    def record(it, lam, seconds, samples, extra) -> dict:
        r = {"iter": it, "lam": lam_label(lam), "n_real": 0 if math.isinf(lam) and it > 0 else n,
             "n_synth": 0 if it == 0 else n_synth[lam], "seconds": round(seconds, 2), **extra}
        with on_every_rank():  # rank 0 computes the metrics
            r.update(evaluate(samples[:n_eval]))
        if truth is not None:
            import gaussian

            r.update(gaussian.errors(model, *truth))
        return r

    # iteration 0: computed once, shared by every lambda
    if os.path.exists(ckpt0_path):
        ckpt0 = load_checkpoint(ckpt0_path)
    else:
        t0 = time.time()
        how = how or pretrain(args, model, real, cfg, progress)
        samples = sample(model, max(n_gen.values()), args.seed, 0, cfg.sample_batch, is_image, progress)
        rec = record(0, lams[0], time.time() - t0, samples, {"nfe": model.nfe})
        ckpt0 = {"format": CKPT_FORMAT, "model": args.model, "config": dataclasses.asdict(cfg), "iter": 0,
                 "state": copy.deepcopy(model.state_dict()), "samples": samples, "record": rec, "how": how}
        if main_rank:
            save_atomic(ckpt0, ckpt0_path)
            print(log_line(rec))
    if ckpt0["samples"].shape[0] < max(n_gen.values()):
        raise UserError(f"'{ckpt0_path}' holds {ckpt0['samples'].shape[0]} samples; this run needs {max(n_gen.values())}")

    histories = {}
    for lam in lams:
        lam_dir = out if len(lams) == 1 else os.path.join(out, f"lam_{lam_label(lam)}")
        histories[lam_label(lam)] = retrain_one(args, lam, lam_dir, ckpt0, model, real, cfg, kimg, n_gen[lam],
                                                n_synth[lam], is_image, progress, record, main_rank)
        if main_rank and len(lams) > 1:
            plot_metrics(histories, os.path.join(out, "metrics.png"))
    barrier()


def log_line(r: dict) -> str:
    metrics = " ".join(f"{k} {r[k]:.4g}" for k in ("fid", "fd", "precision", "recall", "mean_err", "cov_err", "logdet") if k in r)
    loss = f" loss {r['loss']:.4f}" if "loss" in r else ""
    return (f"iter {r['iter']:3d} lam {r['lam']:>4}: {r['n_real']} real + {r['n_synth']} synthetic{loss} | "
            f"{metrics} ({r['features']}) | nfe {r['nfe']} | {r['seconds']:.1f} s")


def retrain_one(args, lam, lam_dir, ckpt0, model, real, cfg, kimg, n_gen, n_synth, is_image, progress, record, main_rank):
    """Iterations 1..T for one lambda, resuming from lam_dir/ckpt.pt when it exists."""
    ckpt_path = os.path.join(lam_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if main_rank:
            print(f"lam {lam_label(lam)}: resuming after iteration {ckpt['iter']}")
    else:
        ckpt = {**ckpt0, "lam": lam_label(lam), "history": [{**ckpt0["record"], "lam": lam_label(lam)}]}
    model.load_state_dict(copy.deepcopy(ckpt["state"]))  # a copy: training must not touch iteration 0's state
    samples, history = ckpt["samples"], ckpt["history"]
    if main_rank:
        os.makedirs(os.path.join(lam_dir, "samples"), exist_ok=True)
        if is_image:
            save_grid(samples, os.path.join(lam_dir, "samples", "iter000.png"))
        write_metrics(history, os.path.join(lam_dir, "metrics.jsonl"))
    last_plot = time.time()  # the plot is redrawn every 30 s and at the end
    for it in range(ckpt["iter"] + 1, args.iters + 1):
        t0 = time.time()
        synth = samples[:n_synth].to(real.device)
        train_set = synth if math.isinf(lam) else torch.cat([real, synth])
        stats = train(model, train_set, kimg, cfg, args.seed, it, progress, f"train it {it} lam {lam_label(lam)}")
        samples = sample(model, n_gen, args.seed, it, cfg.sample_batch, is_image, progress)
        rec = record(it, lam, time.time() - t0, samples, {**stats, "nfe": model.nfe})
        history.append(rec)
        if main_rank:
            save_atomic({"format": CKPT_FORMAT, "model": args.model, "config": ckpt["config"], "iter": it,
                         "lam": lam_label(lam), "state": model.state_dict(), "samples": samples, "history": history},
                        ckpt_path)
            write_metrics(history, os.path.join(lam_dir, "metrics.jsonl"))
            if is_image:
                save_grid(samples, os.path.join(lam_dir, "samples", f"iter{it:03d}.png"))
            if time.time() - last_plot > 30:
                plot_metrics({lam_label(lam): history}, os.path.join(lam_dir, "metrics.png"))
                last_plot = time.time()
            print(log_line(rec))
    if main_rank:
        plot_metrics({lam_label(lam): history}, os.path.join(lam_dir, "metrics.png"))
    return history


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
