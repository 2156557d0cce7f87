"""settings.py -- what a run uses, resolved and validated once before anything is written, and its run folder.

retrain.py's command line becomes one Settings object: the model's Config (its preset, the data's shape, --set),
the real data and the set the samples are measured against, the regime (regimes.py), the lambdas and what each
iteration draws, and config.json's content, which records all of it in the run folder. --resume continues a
folder only with the settings it was started with (check_folder). The run folder's files are written
atomically: a kill leaves the old file or the new one.

    run folder/config.json      the settings (and the metrics' feature space and noise floor)
              /iter0.pt         iteration 0: the model, its samples and metrics (shared by a sweep's lambdas)
              /ckpt.pt          the last completed iteration (lam_X/ckpt.pt in a sweep): what --resume starts from
              /metrics.jsonl    one line of metrics per iteration
"""

import argparse
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

import data
import regimes
from jobs import UserError, rank_world

N_EVAL_PAPER = 50_000   # samples evaluated per iteration (paper: 50k, against the 50k CIFAR-10 training images)
CKPT_FORMAT = "retrain-v1"


# ----------------------------------------------------------------------------------------------------
# Settings


def parse_lam(s: str) -> float:
    try:
        lam = float(s)
    except ValueError:
        raise UserError(f"--lam '{s}' is not a number; give values like 0, 0.5, 1 or inf") from None
    if math.isnan(lam) or lam < 0:
        raise UserError(f"--lam {s} is invalid; lambda is a non-negative number of synthetic images per real one, or inf")
    return lam


def parse_overrides(items: list[str], base) -> dict:
    """--set FIELD=VALUE pairs, each value converted to the type of the field's value in `base` (a Config, the
    preset's, or the Config class: its defaults)."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UserError(f"--set {item}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        default = getattr(base, key)
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
            now = "default" if isinstance(base, type) else "the preset's"
            raise UserError(f"--set {item}: cannot read '{value}' as the type of {key} ({now} {default!r}{how})") from None
    return out


@dataclasses.dataclass
class Settings:
    args: argparse.Namespace  # the command line as given (a sweep's processes are started from it)
    model: str                # the model's name: ddpm, edm, otcfm, gaussian
    module: object            # its file
    cfg: object               # its Config
    regime: regimes.Regime
    config: dict              # config.json's content
    real: torch.Tensor        # the n real images (uint8 (n, C, H, W)) or vectors (float64 (n, d))
    reference: tuple          # (images, labels) the samples are measured against: the test split, else the training set
    whole: tuple | None       # (images, labels): the whole training split (real is its first n); None for vectors
    truth: tuple | None       # the Gaussian's true (mu, Sigma)
    lams: list                # the lambdas of the run
    iters: int                # the last iteration
    seed: int                 # the seed of everything: initial weights, training batches, samples
    n_synth: dict             # {lam: synthetic samples per training set}
    n_gen: dict               # {lam: samples drawn per iteration}
    out: str                  # the run folder
    cache: str                # the folder of what later runs reuse: iterations 0, the metrics' classifier
    device: torch.device
    world: int
    progress: bool

    @property
    def main(self) -> bool:
        return rank_world()[0] == 0

    @property
    def is_image(self) -> bool:
        return self.real.dtype == torch.uint8


DATA_PRESETS = {"digits": "small", "mnist": "mnist", "fashion-mnist": "mnist"}  # --preset auto; cifar10: by the device


def choose_preset(args, device: torch.device) -> tuple[str, str]:
    """(preset, data) of --preset auto: the preset built for the named data (DATA_PRESETS); for other data, or none,
    the paper's on CUDA (CIFAR-10 when no --data) and the small one on a CPU (the digits)."""
    preset, data_spec = args.preset, args.data
    if preset == "auto":
        if data_spec in DATA_PRESETS and args.model != "gaussian":
            preset, why = DATA_PRESETS[data_spec], f"built for {data_spec}"
        else:
            preset = "paper" if device.type == "cuda" else "small"
            why = "a CUDA device is present" if device.type == "cuda" else "no CUDA device"
        if data_spec is None:
            data_spec = "gaussian" if args.model == "gaussian" else ("cifar10" if preset == "paper" else "digits")
        if rank_world()[0] == 0:
            print(f"retrain.py: --preset auto -> '{preset}' on {data_spec} ({why}); "
                  f"choose with --preset paper|small|mnist and --data cifar10|digits|mnist|fashion-mnist|PATH")
    if data_spec is None:
        data_spec = "gaussian" if args.model == "gaussian" else ("cifar10" if preset != "small" else "digits")
    return preset, data_spec


def load_real(args, data_spec: str) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple | None]:
    """(real, whole, test, truth): the n real images, uint8 (n, C, H, W), the whole labelled training split they are
    the first n of, (images, labels or None), and the first --n-ref images of the test split of a named dataset
    (else None); or for --data gaussian n float64 vectors, None, None and the true (mu, Sigma)."""
    if data_spec == "gaussian":
        import gaussian

        n = 1000 if args.n_real is None else args.n_real
        if n < 2:
            raise UserError(f"--n-real {n}: need at least 2 samples")
        return gaussian.make_data(args.dim, n, seed=args.seed), None, None, gaussian.truth(args.dim)
    try:
        whole = data.load_labelled(data_spec, root=args.data_root)
        test = data.load_labelled(data_spec, root=args.data_root, split="test") if data_spec in data.NAMED else None
    except data.DataError as e:
        raise UserError(str(e)) from None
    if test is not None and args.n_ref is not None:
        if not 2 <= args.n_ref <= len(test[0]):
            raise UserError(f"--n-ref {args.n_ref}: the test split of '{data_spec}' holds {len(test[0])} images; "
                            f"give 2 to {len(test[0])}")
        test = data.first(data_spec, *test, args.n_ref)
    if args.n_real is not None and not 1 <= args.n_real <= len(whole[0]):
        raise UserError(f"--n-real {args.n_real}: '{data_spec}' holds {len(whole[0])} images; give 1 to {len(whole[0])}")
    return data.first(data_spec, *whole, args.n_real)[0], whole, test, None


def model_config(args, module, preset: str, real: torch.Tensor):
    """The model's Config: the preset, the data's shape, then --set and --compile."""
    is_image = real.dtype == torch.uint8
    shape = {"img_channels": real.shape[1], "img_resolution": real.shape[-1]} if is_image else {"dim": real.shape[1]}
    if is_image and real.shape[-2] != real.shape[-1]:
        raise UserError(f"images are {real.shape[-2]}x{real.shape[-1]}; the models need square images")
    try:
        overrides = parse_overrides(args.overrides, module.make_config(preset, **shape))  # the preset's values
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.compile:
        if "compile" not in {f.name for f in dataclasses.fields(module.Config)}:
            raise UserError(f"--compile: model {args.model} has no network to compile")
        overrides["compile"] = True
    if set(overrides) & set(shape):
        raise UserError(f"--set {', '.join(set(overrides) & set(shape))}: set from the data, not from the command line")
    try:  # each model checks its fields' ranges
        return module.make_config(preset, **shape, **overrides)
    except ValueError as e:
        raise UserError(f"{e} (see --set)") from None


def resolve(args, world: int, device: torch.device, command: str | None = None) -> Settings:
    """Everything the run will use, and config.json's content (command: the command line that makes this run)."""
    lams = [parse_lam(s) for s in args.lam]
    if len(set(lams)) != len(lams):
        raise UserError("--lam lists a value twice")
    if args.iters < 0:
        raise UserError(f"--iters {args.iters} is negative; give 0 or more retraining iterations")
    if args.kimg is not None and not args.kimg > 0:
        raise UserError(f"--kimg {args.kimg:g}: give a positive number of thousands of images per iteration")
    module = importlib.import_module(args.model)
    preset, data_spec = choose_preset(args, device)
    if preset not in module.PRESETS:
        raise UserError(f"model {args.model} has no preset '{preset}'; choose from {', '.join(module.PRESETS)}")
    if data_spec == "gaussian" and args.model != "gaussian":
        raise UserError("--data gaussian is vector data for --model gaussian; image models need images (digits, cifar10, a path)")
    real, whole, test, truth = load_real(args, data_spec)
    # the samples are measured against real images no model has seen, the test split; without one, against the
    # whole training set (as the paper measures FID), of which --n-real takes the first n
    reference = test if test is not None else whole if whole is not None else (real, None)
    cfg = model_config(args, module, preset, real)
    if getattr(cfg, "batch", world) % world:  # each process trains on batch / world images of every step
        raise UserError(f"batch {cfg.batch} does not divide among {world} processes; use a multiple of {world} "
                        "(--set batch=N) or another process count")
    regime = regimes.Regime(**{f: getattr(args, f) for f in regimes.FLAGS}).check(data_spec, real, lams, args.iters, whole)
    kimg = args.kimg if args.kimg is not None else getattr(cfg, "pretrain_kimg" if regime.start == "scratch" else "kimg", 0)
    n = len(real)
    if args.inception_every < 0:
        raise UserError(f"--inception-every {args.inception_every}: give 0 (never) or a number of iterations")
    if args.n_eval is not None and args.n_eval < 4:
        raise UserError(f"--n-eval {args.n_eval}: precision and recall need 4 samples or more")
    n_eval = args.n_eval or min(n, N_EVAL_PAPER)
    n_synth = {lam: n if math.isinf(lam) else round(lam * n) for lam in lams}
    out = args.out or os.path.join("runs", f"{args.model}-{os.path.basename(data_spec.rstrip('/'))}")
    config = {"command": command,
              "model": args.model, "preset": preset, "data": data_spec, "n_real": n,
              "reference": "test" if test is not None else "train", "n_reference": len(reference[0]),
              "n_eval": n_eval, "lams": [lam_label(lam) for lam in lams], "iters": args.iters, "kimg": kimg,
              **regime.config(), "seed": args.seed, "init": args.init, "metrics": args.metrics,
              "inception_every": args.inception_every, "world_size": world,
              "device": device.type, "model_config": dataclasses.asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}}
    return Settings(args, args.model, module, cfg, regime, config, real, reference, whole, truth, lams, args.iters, args.seed,
                    n_synth, {lam: max(n_eval, n_synth[lam]) for lam in lams}, out,
                    args.cache or os.path.join(os.path.dirname(os.path.abspath(out)), "cache"), device, world,
                    rank_world()[0] == 0 and not args.no_progress and sys.stderr.isatty())  # bars on a terminal only


def check_folder(s: Settings) -> None:
    """A run folder is continued only with --resume and the settings it was started with; the number of processes
    and the device may change (samples depend on their seeds alone, training on the global batch)."""
    args, path = s.args, os.path.join(s.out, "config.json")
    if os.path.exists(path) and args.resume:
        with open(path) as f:
            saved = json.load(f)
        # older runs: the paper's loop, measured against their real set, without the later fields
        old = {**regimes.DEFAULTS, "n_reference": saved.get("n_real"), "reference": "train", "inception_every": 0, **saved}
        new = json.loads(json.dumps(s.config))
        differ = []
        for key in new:
            if key in ("world_size", "device") and old.get(key) != new[key] and s.main:
                print(f"retrain.py: --resume with {key} {new[key]} (the run began with {old.get(key)})")
            elif key not in ("command", "iters", "started", "versions", "world_size", "device") and old.get(key) != new[key]:
                pairs = ([(f"{key}.{k}", old[key].get(k), new[key].get(k)) for k in new[key] if old[key].get(k) != new[key][k]]
                         if isinstance(old.get(key), dict) and isinstance(new[key], dict) else [(key, old.get(key), new[key])])
                differ += [f"{name} {a!r} there, {b!r} now" for name, a, b in pairs]
        if differ:
            raise UserError(f"--resume: the run in '{s.out}' has other settings: {'; '.join(differ)} (use another --out, "
                            "or --force to start over)")
    elif args.resume and not os.path.exists(s.out):
        raise UserError(f"--resume: there is no run in '{s.out}' (without --resume, a run starts there)")
    elif (os.path.exists(s.out) and os.listdir(s.out) and not args.force
          and not (args.resume and os.path.exists(os.path.join(s.out, "iter0.pt")))):  # a sweep's lambda, side by side
        raise UserError(f"run folder '{s.out}' exists; add --resume to continue it or --force to start over")


def lam_label(lam: float) -> str:
    return "inf" if math.isinf(lam) else f"{lam:g}"


def lam_folder(out: str, lams: list, lam: float) -> str:
    """Where one lambda of a run with `lams` keeps its iterations: the run folder itself, or lam_X/ in a sweep."""
    return out if len(lams) == 1 else os.path.join(out, f"lam_{lam_label(lam)}")


# ----------------------------------------------------------------------------------------------------
# The run folder: checkpoints, the initial model


def set_aside(out: str) -> str | None:
    """--force: an existing run folder moved aside to OUT.replaced rather than deleted, so that a new run that fails
    before its iteration 0 can put it back (put_back)."""
    if not os.path.exists(out):
        return None
    old = out.rstrip("/") + ".replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    return old


def put_back(old: str | None, out: str | None) -> None:
    """The folder set aside back in out's place (the new run's folder removed), or deleted when out is None."""
    if old is None:
        return
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(old, out)
    else:
        shutil.rmtree(old)


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


def init_path(s: Settings) -> str:
    """The file that --init names; for 'official', the released checkpoint, downloaded by rank 0 into the torch
    hub cache when it is not there (run inside on_every_rank, whose end the other ranks wait at)."""
    path, model = s.args.init, s.model
    if path == "official":
        key = s.config["data"]  # the released-checkpoint key: cifar10, ffhq64, ...
        if key != "cifar10":
            base = os.path.basename(key.rstrip("/"))
            key = "ffhq64" if "ffhq" in base.lower() and s.real.shape[-1] == 64 else base
        url = s.module.OFFICIAL_URLS.get(key)
        if url is None:
            raise UserError(f"no released {model} checkpoint for data '{key}' (have: {', '.join(s.module.OFFICIAL_URLS) or 'none'})")
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.exists(path) and s.main:
            print(f"downloading {url} -> {path}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, path)
            except Exception as e:
                raise UserError(f"could not download {url} ({e}); download it by hand and pass --init PATH") from None
    return path


def load_init(s: Settings, model, path: str) -> str:
    """The --init file into `model`: a retrain.py checkpoint, or a released checkpoint file."""
    name = s.model
    if not os.path.isfile(path):
        raise UserError(f"--init '{path}' not found: give a checkpoint file or 'official'")
    try:  # torch.save files are zips; anything else (EDM's .pkl) goes to the model's own loader
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if zipfile.is_zipfile(path) else None
        if isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT:
            if ckpt["model"] != name:
                raise ValueError(f"it holds a {ckpt['model']} model, not {name}")
            model.load_state_dict(ckpt["state"])
        else:
            model.load_pretrained(path)
    except Exception as e:
        raise UserError(f"--init '{path}' does not fit this {name} model: {str(e).splitlines()[0]}") from None
    return f"init {path}"
