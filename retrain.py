"""retrain.py -- retrain a generative model, again and again, on real data plus its own samples.

Bertrand, Bose, Duplessis, Jiralerspong & Gidel, "On the Stability of Iterative Retraining of
Generative Models on their Own Data" (ICLR 2024, arXiv 2310.00429). The procedure:

    iteration 0   the initial model theta_0: --init PATH (or `official`), else trained from scratch on the
                  n real images for the model's pretraining budget
    t = 1..T      draw round(lam n) samples of theta_{t-1} (they replace earlier ones), fine-tune theta_{t-1}
                  (weights, EMA and optimizer carried over, no re-warm-up) on the n real images plus those
                  samples for --kimg thousand images seen, then evaluate theta_t
    lam = 0       the control: real data only.   lam = inf: the fully synthetic loop (n samples, no real data)

One sampling pass per iteration serves both purposes: the samples that evaluate model t are the ones that
train model t+1. Each image has its own seed (seed, iteration, index), so the synthetic set does not depend
on batch size or GPU count; images are quantized to uint8 exactly as a saved PNG would be. With several
lambdas, iteration 0 is computed once and shared, and kept in a cache for later runs. What each iteration
trains on beyond the paper's loop (--pool, --real, --start, --temperature, --curate) is regimes.py's; one
training run and one sampling pass are training.py's, the settings and run folder settings.py's, the metrics
metrics.py's, the plots figures.py's, and running side by side is jobs.py's.

    python retrain.py --model gaussian --lam 0 1 inf --iters 10        # seconds: the closed-form Gaussian
    python retrain.py --model ddpm --lam 1 --iters 20                   # CPU: small U-Net on the 8x8 digits
    python retrain.py --model edm --preset paper --data cifar10 --init official --lam 0 1 inf --iters 20
    torchrun --nproc_per_node=8 retrain.py --model edm --preset paper --init official --lam 1

The model interface (ddpm.py, edm.py, otcfm.py and gaussian.py all implement it; README has a guide):

    Config        dataclass of hyperparameters with img_channels, img_resolution, batch, xflip,
                  pretrain_kimg, kimg, sample_batch (a closed-form model needs only sample_batch)
    PRESETS       {"paper": {...}, "small": {...}, ...}: overrides of Config
    make_config(preset, **overrides) -> Config
    OFFICIAL_URLS {"cifar10": url, ...}: released checkpoints for --init official
    Model(cfg, device)
      .train_step(x) -> loss    one optimizer step on x, float32 (B, C, H, W) in [-1, 1]; the loss as a 0-dim
                                tensor on the device (or .fit(x) for a closed-form model, once per iteration)
      .generate(seeds, temperature=1) -> x   float32 (N, C, H, W) in [-1, 1]; image i depends only on seeds[i]
      .nfe                      network evaluations per image in the last generate()
      .state_dict() / .load_state_dict(d)   plain dicts (torch.load(weights_only=True) reads them)
      .load_pretrained(path)    a released checkpoint file into the network and its EMA
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import time

import torch
import torch.distributed as dist

import jobs
import regimes
from figures import plot_metrics, save_grid
from jobs import UserError, barrier, on_every_rank, rank_world
from metrics import Evaluator, summarize_seeds
from training import Snapshots, run_clock, sample, train, train_seed
from settings import (CKPT_FORMAT, N_EVAL_PAPER, Settings, check_folder, init_path, lam_folder, lam_label,
                      load_checkpoint, load_init, put_back, resolve, save_atomic, set_aside)

MODELS = ("gaussian", "ddpm", "edm", "otcfm")


# ----------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise UserError(f"{message} (see --help)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": such flags say in words what they default to
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--model", default="ddpm", choices=MODELS, help="the generative model")
    p.add_argument("--lam", nargs="+", default=["1"], help="synthetic images per real image; inf = fully synthetic; "
                   "several share iteration 0 and run side by side on the CPU (--lam-jobs)")
    p.add_argument("--iters", type=int, default=20, help="retraining iterations after iteration 0")
    p.add_argument("--data", default=None, help="cifar10 | digits | mnist | fashion-mnist (padded to 32x32) | gaussian | "
                   "folder | .zip | .npy/.npz (default: chosen by --preset auto)")
    p.add_argument("--data-root", default="data", help="where cifar10, mnist and fashion-mnist are downloaded or found")
    p.add_argument("--n-real", type=int, default=None, help="use only the first N real images (gaussian: draw N; default 1000)")
    p.add_argument("--dim", type=int, default=2, help="dimension of --data gaussian")
    p.add_argument("--kimg", type=float, default=None, help="thousands of images seen per retraining iteration (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help=f"samples evaluated per iteration (default: {N_EVAL_PAPER}, or all of a smaller data set)")
    p.add_argument("--n-ref", type=int, default=None, help="measure against the first N images of the test split (default: all)")
    p.add_argument("--init", default=None, help="initial model: a checkpoint path, or 'official' to download the released one")
    p.add_argument("--preset", default="auto", help="auto | paper | small | mnist (or another preset of the model); auto: the one built for the --data named "
                   "(digits: small, mnist and fashion-mnist: mnist), else paper on CUDA, small on CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="override a field of the model's Config (repeatable)")
    p.add_argument("--metrics", default="auto", choices=("auto", "inception", "classifier", "pixel"),
                   help="feature space of the metrics; auto: a classifier trained on the labels for labelled images "
                   "under 32 px or in greyscale (digits, mnist), Inception for other images of 32 px or more when "
                   "its weights are available, else pixels")
    p.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth (else downloaded)")
    p.add_argument("--inception-every", type=int, default=0, metavar="K",
                   help="with other --metrics: also Inception FID, precision, recall at iteration 0 and every K-th")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL-DATA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last completed iteration")
    p.add_argument("--force", action="store_true", help="delete an existing --out folder and start over")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (training batches, noise, samples)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="independent replicates, iteration 0 included: one run per seed in --out/seed_S, then "
                   "--out/metrics.png (mean and spread) and --out/seeds.json (default --out: runs/MODEL-seeds-S1-S2-..)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--deterministic", action="store_true", help="on CUDA: deterministic algorithms and no cuDNN "
                   "autotuner (slower), so that a rerun or resume on the same GPUs repeats bit for bit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores that are free now, at least 1)")
    p.add_argument("--lam-jobs", type=int, default=None, metavar="N",
                   help="a sweep over several --lam on the CPU runs N of them side by side after iteration 0, each in "
                   "its own process with threads / N threads (default: as many as threads allow; 1 = one after another)")
    p.add_argument("--cache", default=None, help="folder of pretrained iterations 0 reused across runs "
                   "(default: 'cache' beside the --out folder)")
    p.add_argument("--no-cache", action="store_true", help="train iteration 0 again even when the cache has it")
    p.add_argument("--save-every", type=float, default=10.0, metavar="MIN",
                   help="minutes of pretraining between snapshots of its state (pretrain.pt), which --resume goes on "
                   "from; 0: none")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (same as --set compile=true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are drawn only when stderr is a terminal)")
    add_regime_flags(p.add_argument_group("self-consuming regimes beyond the paper (regimes.py; the defaults are "
                                          "the paper's loop)"))
    return p


def add_regime_flags(r) -> None:
    r.add_argument("--pool", default="replace", choices=("replace", "accumulate", "accumulate-subsample"),
                   help="synthetic data across iterations: replace (each generation's samples replace the previous "
                   "ones), accumulate (every generation's samples are kept), accumulate-subsample (of all kept "
                   "samples, round(lam n) are drawn each iteration: replace's training-set size)")
    r.add_argument("--real", default="fixed", choices=("fixed", "fresh", "none"),
                   help="real data of each iteration: fixed (the same n), fresh (n new ones: new draws for --data "
                   "gaussian, the next n images of the data set otherwise), none (round(lam n) synthetic samples alone)")
    r.add_argument("--budget", default="fixed", choices=("fixed", "epochs"),
                   help="training per iteration: fixed (--kimg whatever the training set's size) or epochs (--kimg "
                   "times the training set's size over n + round(lam n): accumulate trains on its whole pool)")
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


# ----------------------------------------------------------------------------------------------------
# A record of metrics.jsonl


def log_line(r: dict) -> str:
    metrics = " ".join(f"{k} {r[k]:.4g}" for k in ("fid", "fd", "precision", "recall", "density", "coverage", "class_tv",
                                                   "classes", "mean_err", "cov_err", "logdet") if k in r)
    loss = f" loss {r['loss']:.4f}" if "loss" in r else ""
    return (f"iter {r['iter']:3d} lam {lam_label(float(r['lam'])):>4}: {r['n_real']} real + {r['n_synth']} synthetic{loss} | "
            f"{metrics} ({r['features']}) | nfe {r['nfe']} | {r['seconds']:.1f} s")


def record(s: Settings, evaluate, model, it: int, lam: float, seconds: float, samples, extra: dict) -> dict:
    """Iteration it's line of metrics.jsonl: what it trained on, its metrics (rank 0's; {} elsewhere)."""
    r = {"iter": it, "lam": lam, "n_real": 0 if math.isinf(lam) and it > 0 else len(s.real),
         "n_synth": 0 if it == 0 else s.n_synth[lam], "seconds": round(seconds, 2), **extra}
    with on_every_rank():  # rank 0 computes the metrics
        r.update(evaluate(samples[:s.config["n_eval"]], it))
    if s.truth is not None:
        import gaussian

        r.update(gaussian.errors(model, *s.truth))
    return r


# ----------------------------------------------------------------------------------------------------
# Iteration 0: --init, the cache, or pretraining


def iter0_cache(s: Settings) -> str | None:
    """The file that keeps a pretrained iteration 0 for later runs (another lambda, more iterations): named by a
    hash of all it depends on (model, Config, real data, seed, samples, device type, processes, and the code of
    the model's file, of this one and of training.py). None with --init, --no-cache, or a closed-form model (fitting is instant)."""
    if s.args.init or s.args.no_cache or not hasattr(s.cfg, "pretrain_kimg"):
        return None
    files = (getattr(s.module, "__file__", None), __file__, os.path.join(os.path.dirname(__file__), "training.py"))
    code = [hashlib.sha256(pathlib.Path(f).read_bytes()).hexdigest() for f in files if f]
    key = {"format": CKPT_FORMAT, "model": s.model, "config": dataclasses.asdict(s.cfg), "seed": s.seed,
           "data": hashlib.sha256(s.real.cpu().contiguous().numpy().tobytes()).hexdigest(),
           "samples": max(s.n_gen.values()), "device": s.device.type, "world": s.world, "code": code,
           "torch": torch.__version__}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(s.cache, f"{s.model}-iter0-{name}.pt")


def iteration_zero(s: Settings, model, evaluate, how: str | None, cache: str | None, clock) -> dict:
    """Iteration 0's checkpoint (state, samples, record): the run folder's iter0.pt when resuming, else the cache's,
    else the --init model (`how` says so) or the model pretrained here, sampled and evaluated, then saved to both."""
    path = os.path.join(s.out, "iter0.pt")
    if os.path.exists(path):
        return load_checkpoint(path)
    if cache is not None and os.path.exists(cache):
        ckpt0 = load_checkpoint(cache)
        rec = record(s, evaluate, model, 0, s.lams[0], ckpt0["record"]["seconds"], ckpt0["samples"],
                     {"nfe": ckpt0["record"]["nfe"]})
        ckpt0 = {**ckpt0, "record": rec, "how": f"{ckpt0['how']} (cached in {cache})"}
        if s.main:
            save_atomic(ckpt0, path)
            print(f"iteration 0: from the cache, {cache} (pretrained by an earlier run with the same model, "
                  "settings, data, seed and code; --no-cache trains it again)")
            print(log_line(rec))
        return ckpt0
    t0, cfg = time.time(), s.cfg
    if how is None:  # pretrain: from scratch on the real data for the preset's pretraining budget
        kimg = getattr(cfg, "pretrain_kimg", 0)
        steps = round(kimg * 1000 / cfg.batch) if hasattr(cfg, "batch") else 0
        if s.main:
            print(f"iteration 0: training from scratch on {len(s.real)} real {'images' if s.is_image else 'points'}"
                  + (f" for {kimg:g} kimg ({steps} steps of {cfg.batch})" if steps else " (closed form)"))
        snapshots = Snapshots(os.path.join(s.out, "pretrain.pt"), s.args.save_every) if s.args.save_every > 0 else None
        how = "pretrain " + json.dumps(train(model, s.real, kimg, cfg, s.seed, 0, s.progress, "pretrain", clock, snapshots))
    samples = sample(model, max(s.n_gen.values()), s.seed, 0, cfg.sample_batch, s.is_image, s.progress)
    rec = record(s, evaluate, model, 0, s.lams[0], time.time() - t0, samples, {"nfe": model.nfe})
    ckpt0 = {"format": CKPT_FORMAT, "model": s.model, "config": dataclasses.asdict(cfg), "iter": 0,
             "state": copy.deepcopy(model.state_dict()), "samples": samples, "record": rec, "how": how}
    if s.main:
        save_atomic(ckpt0, path)
        if cache is not None:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            save_atomic(ckpt0, cache)
        if os.path.exists(os.path.join(s.out, "pretrain.pt")):  # iteration 0 is whole: its snapshot is spent
            os.remove(os.path.join(s.out, "pretrain.pt"))
        print(log_line(rec))
    return ckpt0


# ----------------------------------------------------------------------------------------------------
# The loop: iterations 1..T of one lambda


def start_lambda(s: Settings, lam: float, n_gen: int, ckpt0: dict, model, evaluate, reward) -> dict:
    """The state a lambda's loop starts from: its ckpt.pt when resuming, else iteration 0 as this regime sees it
    (its samples at the temperature, K per kept one with curation), written out as the lambda's iteration 0."""
    folder, regime, lab = lam_folder(s.out, s.lams, lam), s.regime, lam_label(lam)
    if os.path.exists(os.path.join(folder, "ckpt.pt")):
        ckpt = load_checkpoint(os.path.join(folder, "ckpt.pt"))
        if s.main:
            print(f"lam {lab}: resuming after iteration {ckpt['iter']}")
        model.load_state_dict(copy.deepcopy(ckpt["state"]))
        history = ckpt["history"]  # metrics.jsonl's text (older checkpoints: a list of records)
        history = [json.loads(line) for line in history.splitlines()] if isinstance(history, str) else history
        return {**ckpt, "history": history, "pool": ckpt.get("pool", [])}
    model.load_state_dict(copy.deepcopy(ckpt0["state"]))  # a copy: training must not touch iteration 0's state
    samples, first = ckpt0["samples"], {**ckpt0["record"], "lam": lam}
    if regime.temperature != 1 or len(samples) < n_gen:
        t0 = time.time()
        samples = sample(model, n_gen, s.seed, 0, s.cfg.sample_batch, s.is_image, s.progress, regime.temperature)
        if regime.temperature != 1:  # other samples than the shared iteration 0's: evaluated again
            first = {**first, **record(s, evaluate, model, 0, lam, time.time() - t0, samples, {"nfe": model.nfe})}
            if s.main:
                print(f"{log_line(first)}   (sampled again at temperature {regime.temperature:g})")
    first = {**first, "n_synth_by_gen": {}, **({"reward": reward(samples).mean().item()} if reward else {})}
    if s.main and s.is_image:  # (retrain_lambda made the folder)
        save_grid(samples, os.path.join(folder, "samples", "iter000.png"), title=f"{s.model}, lam {lab}, iteration 0")
    return {**ckpt0, "lam": lab, "samples": samples, "history": [first], "pool": []}


def retrain_lambda(s: Settings, lam: float, ckpt0: dict, model, evaluate, clock=None) -> list[dict]:
    """Iterations 1..T for one lambda: theta_t = fine-tune theta_{t-1} on D_t = real data + samples of theta_{t-1},
    every iteration checkpointed (ckpt.pt: --resume goes on after the last one). Returns the metrics' history."""
    folder, lab, regime, cfg = lam_folder(s.out, s.lams, lam), lam_label(lam), s.regime, s.cfg
    n_synth, n_gen = s.n_synth[lam], max(s.n_gen[lam], regime.curate * s.n_synth[lam])  # curation: K per kept one
    reward = regimes.reward_function(regime, s.is_image, s.real.device, s.cache)
    if s.main:
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
    state = start_lambda(s, lam, n_gen, ckpt0, model, evaluate, reward)
    samples, history, pool = state["samples"], state["history"], state["pool"]
    if state["iter"] >= s.iters and s.main:
        print(f"lam {lab}: complete, iterations 0 to {state['iter']}; --resume with --iters above {state['iter']} extends it")
    lines = [json.dumps(r) + "\n" for r in history]  # metrics.jsonl, each record serialized once
    if s.main:
        save_atomic("".join(lines), os.path.join(folder, "metrics.jsonl"))
    if regime.start == "scratch":  # the initial weights of iteration 0, the start of every iteration
        torch.manual_seed(s.seed)
        blank = type(model)(cfg, s.real.device).state_dict()
    last_plot = time.time()  # the plot is redrawn every 30 s and at the end
    for t in range(state["iter"] + 1, s.iters + 1):
        t0 = time.time()
        # D_t: the real data plus n_synth samples of theta_{t-1} (and earlier generations' when accumulating)
        train_set, pool, made = regimes.training_set(regime, lam, s.real, samples, pool, n_synth, reward,
                                                     train_seed(s.seed, t), t)
        if regime.start == "scratch":
            model.load_state_dict(blank)
        # theta_t: theta_{t-1} trained on D_t for kimg thousand images (--budget epochs: as many epochs as the paper's D_t)
        kimg = s.config["kimg"] * (len(train_set) / regimes.paper_size(regime, lam, len(s.real), n_synth)
                                   if regime.budget == "epochs" else 1)
        stats = train(model, train_set, kimg, cfg, s.seed, t, s.progress, f"train it {t} lam {lab}", clock)
        # samples of theta_t: they measure it, and train theta_{t+1}
        samples = sample(model, n_gen, s.seed, t, cfg.sample_batch, s.is_image, s.progress, regime.temperature)
        if reward is not None:
            made["reward"] = reward(samples).mean().item()
        rec = record(s, evaluate, model, t, lam, time.time() - t0, samples, {**made, **stats, "nfe": model.nfe})
        history.append(rec)
        lines.append(json.dumps(rec) + "\n")
        if s.main:  # the history as one string: pickling hundreds of records cost more than the Gaussian's iteration
            save_atomic({"format": CKPT_FORMAT, "model": s.model, "config": state["config"], "iter": t, "lam": lab,
                         "state": model.state_dict(), "samples": samples, "history": "".join(lines),
                         **({"pool": pool} if regime.pool != "replace" else {})}, os.path.join(folder, "ckpt.pt"))
            save_atomic("".join(lines), os.path.join(folder, "metrics.jsonl"))
            if s.is_image:
                save_grid(samples, os.path.join(folder, "samples", f"iter{t:03d}.png"),
                          title=f"{s.model}, lam {lab}, iteration {t}")
            if time.time() - last_plot > 30:
                plot(s, {lab: history}, os.path.join(folder, "metrics.png"))
                last_plot = time.time()
            print(log_line(rec))
    if s.main:
        plot(s, {lab: history}, os.path.join(folder, "metrics.png"))
    return history


def plot(s: Settings, histories: dict, path: str) -> None:
    c = s.config
    plot_metrics(histories, path, floor=c.get("noise_floor"),
                 title=f"{c['model']} ({c['preset']}) on {c['data']}: metrics against iteration; {c.get('features')} features")


# ----------------------------------------------------------------------------------------------------
# A run: settings, folder, model, metrics, iteration 0, then each lambda


@jobs.ends_every_rank()  # an error on any rank, in any phase, ends every rank with one line, wherever they wait
def run(args) -> None:
    t_start = time.time()
    rank, world, device = jobs.setup_device(args.device, args.deterministic)
    threads = jobs.cpu_threads(args.threads, world) if device.type == "cpu" else jobs.plural(torch.get_num_threads(), "CPU thread")
    with on_every_rank():  # settings, data and run folder: any rank's error stops every rank
        s = resolve(args, world, device, "python retrain.py " + shlex.join(argv_of(args, leave_out={"resume", "force"})))
        check_folder(s)
    # not on_every_rank: its gather would meet DDP's constructor's collectives on the ranks that did not fail
    torch.manual_seed(s.seed)  # the network's initial weights: the same on every rank and in every run
    try:
        model = s.module.Model(s.cfg, device)
    except ValueError as e:  # a Config the model refuses (torch's optimizers check lr, betas, ...)
        raise UserError(f"{s.model} does not accept its Config: {e} (see --set)") from None
    if s.is_image:
        s.real = s.real.to(device)
    how = None
    if args.init and not ((args.resume or not args.force) and os.path.exists(os.path.join(s.out, "iter0.pt"))):
        with on_every_rank():  # rank 0 downloads 'official'; the others wait at the end of the block
            path = init_path(s)
        with on_every_rank():
            how = load_init(s, model, path)
    if dataclasses.asdict(s.cfg) != s.config["model_config"]:  # the released file set some fields (EDM: its preconditioning)
        s.config["model_config_after_init"] = dataclasses.asdict(s.cfg)
    old = set_aside(s.out) if s.main and args.force and not args.resume else None
    try:  # --force: the old run is deleted once the new one has its iteration 0, and put back if it fails before
        evaluate, n_jobs, clock, ckpt0 = start_run(s, model, how, threads)
    except BaseException:  # (a pretraining snapshot is worth keeping: then the new run is kept)
        put_back(old, None if os.path.exists(os.path.join(s.out, "pretrain.pt")) else s.out)
        raise
    put_back(old, None)
    if n_jobs > 1:
        histories = side_by_side(s, n_jobs)
        plot(s, histories, os.path.join(s.out, "metrics.png"))
    else:
        histories = {}
        for lam in s.lams:
            histories[lam_label(lam)] = retrain_lambda(s, lam, ckpt0, model, evaluate, clock)
            if s.main and len(s.lams) > 1:
                plot(s, histories, os.path.join(s.out, "metrics.png"))
    barrier()
    if s.main:
        say_summary(s, histories, time.time() - t_start)


def start_run(s: Settings, model, how: str | None, threads: str):
    """The run folder and config.json, the metrics (Evaluator), the clock and iteration 0."""
    if s.main:
        os.makedirs(s.out, exist_ok=True)
        save_atomic(json.dumps(s.config, indent=2) + "\n", os.path.join(s.out, "config.json"))
        say_settings(s, model, threads)
    barrier()  # the run folder is ready before any rank looks into it
    with on_every_rank():  # rank 0 alone reads or computes the real set's reference features
        evaluate = Evaluator(s.reference, s.whole if s.config["reference"] == "test" else None, len(s.real), s.args.metrics,
                             s.args.inception, s.config["n_eval"], s.device, s.progress, cache=s.cache,
                             classifier_cache=s.cache, seed=s.seed, inception_every=s.args.inception_every)
    if s.main:  # what the metrics are measured with, and their noise floor, beside the run's settings
        s.config["features"] = evaluate.kind
        if evaluate.clf is not None:
            s.config["classifier"] = {k: evaluate.clf_info[k] for k in ("accuracy", "hash", "n_train", "n_test")}
        s.config["noise_floor"] = evaluate.floor
        save_atomic(json.dumps(s.config, indent=2) + "\n", os.path.join(s.out, "config.json"))
    n_jobs = lam_jobs(s.args, s.lams, s.device, s.world, evaluate.kind)
    if n_jobs > 1 and s.main:
        print(f"retrain.py: after iteration 0 the {len(s.lams)} lambdas run side by side, {n_jobs} at a time with "
              f"{jobs.plural(max(1, torch.get_num_threads() // n_jobs), 'thread')} each (--lam-jobs 1: one after another)")
    cache = iter0_cache(s)
    cached = os.path.exists(os.path.join(s.out, "iter0.pt")) or (cache is not None and os.path.exists(cache))
    clock = run_clock(s, model, s.lams if n_jobs == 1 else [], pretraining=not (how or cached))
    ckpt0 = iteration_zero(s, model, evaluate, how, cache, clock)
    if ckpt0["samples"].shape[0] < max(s.n_gen.values()):
        raise UserError(f"'{s.out}/iter0.pt' holds {ckpt0['samples'].shape[0]} samples; this run needs {max(s.n_gen.values())}")
    if ckpt0["record"].get("features", evaluate.kind) != evaluate.kind:  # a run begun with other metrics
        raise UserError(f"--resume: the run in '{s.out}' measured its metrics in {ckpt0['record']['features']} space, "
                        f"this one would use {evaluate.kind}; add --metrics {ckpt0['record']['features']}")
    return evaluate, n_jobs, clock, ckpt0


def say_settings(s: Settings, model, threads: str) -> None:
    c = s.config
    budget = f" of {c['kimg']:g} kimg" if hasattr(s.cfg, "batch") else " (closed-form fits)"
    print(f"retrain.py: {c['model']} ({c['preset']}) on {c['data']}: n={c['n_real']} real, lam={', '.join(c['lams'])}, "
          f"{c['iters']} iterations{budget}, {c['n_eval']} samples evaluated per iteration"
          + (f" against the {c['n_reference']} images of the test split" if c["reference"] == "test"
             else f" against all {c['n_reference']} images" if c["n_reference"] != c["n_real"] else "")
          + f", device {s.device}" + (f" x {s.world} processes" if s.world > 1 else "") + f" -> {s.out}")
    print("retrain.py: " + ", ".join([*(f"{k} {v}" for k, v in getattr(model, "profile", {}).items()), threads])
          + (", TF32 matmuls" if s.device.type == "cuda" else ""))


def say_summary(s: Settings, histories: dict, seconds: float) -> None:
    """The run's last lines: its main metrics at iteration 0 and at the last one for each lambda, and its files."""
    print(f"retrain.py: done in {seconds / 60:.1f} min; iteration 0 -> {s.iters}:")
    for lab, h in histories.items():
        keys = [k for k in ("fid", "fd", "mean_err", "logdet", "precision", "recall") if k in h[0] and k in h[-1]][:3]
        print(f"  lam {lab:>4}: " + ", ".join(f"{k} {h[0][k]:.4g} -> {h[-1][k]:.4g}" for k in keys))
    where = "lam_*/" if len(s.lams) > 1 else ""
    print(f"  {s.out}/: metrics.png (the curves), {where}metrics.jsonl (every number)"
          + (f", {where}samples/iterNNN.png (the samples)" if s.is_image else ""))


# ----------------------------------------------------------------------------------------------------
# Side by side: a sweep's lambdas as processes of their own (jobs.py), and replicates over seeds


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


def argv_of(args, leave_out=()) -> list[str]:
    """The command line that gives `args`: every option that differs from its default, but those left out."""
    argv = []
    for action in build_parser()._actions:
        value = getattr(args, action.dest, action.default)
        if action.dest in {*leave_out, "help"} or not action.option_strings or value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true
            argv.append(flag)
        elif isinstance(value, list):
            argv += [x for v in value for x in (flag, str(v))] if action.nargs is None else [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def continued(parser, argv: list[str]):
    """The parsed command line; with --resume --out RUN, over the command line RUN was made with (its config.json):
    `--resume --out RUN` alone continues the run, `--iters N` extends it, and another flag is checked against it."""
    args = parser.parse_args(argv)
    path = os.path.join(args.out or "", "config.json")
    command = json.load(open(path)).get("command") if args.resume and args.out and os.path.exists(path) else None
    if command:  # options not given now keep the run's values (argparse sets defaults only where none is set)
        args = parser.parse_args(argv, namespace=parser.parse_args(shlex.split(command)[2:]))
    return args


def child_argv(args, lam: float, lam_dir: str, threads: int, cache: str) -> list[str]:
    """The command line of one lambda of a sweep as its own run in lam_dir: every option the user gave but the
    sweep's own; it resumes from the iteration 0 placed in lam_dir, and finds the metrics' classifier in the
    sweep's cache folder."""
    own = {"lam", "out", "seed", "seeds", "threads", "lam_jobs", "resume", "force", "no_progress", "cache"}
    return [*argv_of(args, own), "--lam", lam_label(lam), "--out", lam_dir, "--seed", str(args.seed), "--threads", str(threads),
            "--cache", cache, "--resume", "--no-progress"]


def side_by_side(s: Settings, n_jobs: int) -> dict:
    """Iterations 1..T of each lambda as its own retrain.py process (n_jobs at a time, the threads shared out), each
    starting from a copy of iter0.pt in its lam_X/ folder and logging to lam_X/log.txt; their iteration lines are
    relayed here. The same seeds make the same numbers as one after another. Returns {lam: history}."""
    threads, todo = max(1, torch.get_num_threads() // n_jobs), []
    for lam in s.lams:
        folder = lam_folder(s.out, s.lams, lam)
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(os.path.join(folder, "iter0.pt")):
            shutil.copyfile(os.path.join(s.out, "iter0.pt"), os.path.join(folder, "iter0.pt"))
        todo.append(jobs.Job(f"lam {lam_label(lam)}", [os.path.abspath(__file__),
                                                       *child_argv(s.args, lam, folder, threads, s.cache)],
                             log=os.path.join(folder, "log.txt")))
    def relay(name, line):  # their iterations, estimate and errors
        if line.startswith(("iter", "estimate", "lam", "retrain.py: error")):
            print(line, flush=True)

    try:
        jobs.run_jobs(todo, n_jobs, relay=relay, say=None)
    except jobs.JobFailed as e:
        raise UserError(f"{e} (--resume goes on after the last completed iteration)") from None
    histories = {}
    for lam in s.lams:
        with open(os.path.join(lam_folder(s.out, s.lams, lam), "metrics.jsonl")) as f:
            histories[lam_label(lam)] = [json.loads(line) for line in f]
    return histories


def run_seeds(args) -> None:
    """--seeds: the same run once per seed, each in its own folder, then the mean and spread over seeds."""
    base = args.out or os.path.join("runs", f"{args.model}-seeds-" + "-".join(map(str, args.seeds)))
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError("--seeds lists a seed twice")
    for seed in args.seeds:
        one = copy.copy(args)
        one.seed, one.seeds, one.out = seed, None, os.path.join(base, f"seed_{seed}")
        one.resume = args.resume and os.path.exists(one.out)  # a seed not begun yet starts
        if os.environ.get("RANK", "0") == "0":  # torchrun's rank: the first seed's run starts the process group
            print(f"retrain.py: seed {seed} of {', '.join(map(str, args.seeds))} -> {one.out}")
        run(one)
    if rank_world()[0] == 0:
        summarize_seeds(base, args.seeds)


def main(argv=None) -> int:
    try:
        args = continued(build_parser(), sys.argv[1:] if argv is None else list(argv))
        if args.seeds:
            run_seeds(args)
        else:
            run(args)
    except UserError as e:
        print(f"retrain.py: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # an output folder that cannot be written
        print(f"retrain.py: error: cannot write '{e.filename}' ({e.strerror}); choose another --out or --cache",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retrain.py: interrupted; --resume --out RUN goes on after the last completed iteration, or in iteration 0 "
              "from pretraining's last snapshot (--save-every)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():  # under torchrun: leave without tearing the process group down, since another rank
        sys.stdout.flush()     # may have exited already, and gloo's teardown then aborts this process
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
