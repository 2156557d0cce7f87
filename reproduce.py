"""reproduce.py -- regenerate every CPU figure and table of README's results section with one command.

A stage is a list of jobs, each one retrain.py command (all of them are listed in STAGES below); a job
may wait for another: the digits' lambda runs start from their model's pretrained iteration 0. The jobs
run as subprocesses, --jobs at a time with the CPU cores shared out between them, each logging into
runs/reproduce/logs/NAME.log. Then the figures are drawn into results/ and the wall time is recorded
in results/times.json. The commands carry --resume: rerun after an interruption and each run goes on
after its last finished iteration; --restart deletes the stage's runs first.

    python reproduce.py all --jobs 2           # everything below, on 2 CPU cores (see README for the time)
    python reproduce.py theory                 # the Gaussian warm-up: contraction rate and collapse (minutes)
    python reproduce.py digits --jobs 2        # ddpm, edm, otcfm on the 8x8 digits: 4 lambdas, 20 iterations, 3 seeds
    python reproduce.py regimes-gaussian --jobs 2  # pools, real data, temperature, curation on the 1-D Gaussian (minutes)
    python reproduce.py regimes-digits --jobs 2    # the same regimes, and warm start vs from scratch, on the digits
    python reproduce.py all --dry-run          # print the commands and check that they parse, run nothing
    python reproduce.py digits --figures-only  # redraw a stage's figures and table from its finished runs
"""

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

import retrain

RUNS, RESULTS = os.path.join("runs", "reproduce"), "results"
PY = "python retrain.py --no-progress --resume"
THEORY_LAMS = (0.25, 0.5, 1, 2)
COLLAPSE_N = (10, 20, 50, 100)
DIGITS_MODELS = ("ddpm", "edm", "otcfm")  # slowest first: the pool starts jobs in list order
DIGITS_LAMS = ("0", "0.5", "1", "inf")
DIGITS_ITERS = 20
DIGITS_SEEDS = (0, 1, 2)  # independent replicates, iteration 0 included: the table gives mean +- sd over them
# The self-consuming regimes on the Gaussian, in 1-D: gaussian.py's closed forms are 1-D, and there
# log det Sigma_t = log s2_t and mean_err = |mu_t - mu*| (metrics.jsonl)
REGIMES = f"{RUNS}/regimes-gaussian"
GAUSS_1D = "--model gaussian --data gaussian --dim 1"
SEEDS = 20  # independent loops per setting (--seeds 0..19): the closed forms are expectations over loops
POOLS, POOL_N, POOL_ITERS = ("replace", "accumulate", "accumulate-subsample"), 20, 300
REALS, TAUS, MAD_N, MAD_LAM, MAD_ITERS = ("none", "fixed", "fresh"), (1, 0.9), 100, 1, 100
CURATE_LAMS, BETAS, CURATE_N, CURATE_K, CURATE_ITERS, CURATE_SEEDS = ("inf", "1"), (0.2, 0.5), 500, 100, 30, 3
# The same regimes on the digits, with one image model (seed 0; its noise floor in each run's config.json)
DIGITS_REGIMES, RD_MODEL = f"{RUNS}/regimes-digits", "ddpm"
RD_POOL_ITERS = 20  # fully synthetic, all 1,797 digits' worth of samples per generation
RD_MAD_N, RD_MAD_ITERS = 160, 10  # fresh real data needs 11 disjoint sets of 160 of the 1,797 digits
RD_MAD_EVAL = 1797  # samples per iteration in those loops, measured against all 1,797 digits (160 are trained on)
RD_CURATE_K, RD_CURATE_CLASS, RD_CURATE_ITERS = 4, 0, 10  # keep 1 of 4 by softmax(log p(class 0 | x))
RD_START_ITERS = 3  # from scratch, every iteration costs a whole pretraining (6,000 steps)


class Job(NamedTuple):
    name: str  # also the name of its log file
    cmd: str  # a retrain.py command line
    after: str | None = None  # the job that must finish first


def digits_jobs(m: str) -> list[Job]:
    """Model m's iterations 0 for every seed, trained once and kept in the stage's cache (runs/reproduce/
    digits-m/cache), then one job per lambda over the same seeds, each starting from its seed's iteration 0
    (the same numbers as one `--lam 0 0.5 1 inf` sweep, which would run the lambdas one after another)."""
    run, seeds = f"{RUNS}/digits-{m}", " ".join(map(str, DIGITS_SEEDS))
    small = f"--model {m} --preset small --data digits --seeds {seeds} --cache {run}/cache"
    return [Job(f"{m}-pretrain", f"{PY} {small} --lam 0 --iters 0 --out {run}/pretrain"),
            *(Job(f"{m}-lam{lam}", f"{PY} {small} --lam {lam} --iters {DIGITS_ITERS} --out {run}/lam_{lam}",
                  after=f"{m}-pretrain") for lam in DIGITS_LAMS)]


def regimes_gaussian_jobs() -> list[Job]:
    """One retrain.py job per regime, each over several seeds: the synthetic pool (fully synthetic, n = 20),
    Alemohammad et al.'s three loops (no, fixed or fresh real data) at temperature 1 and 0.9, and curation by
    a linear reward without and with the real data, at a beta below and one above the fixed-point threshold
    of gaussian.py's (C5). (--start scratch is left out: the Gaussian's fit is from scratch in every regime.)
    The pools come first, as the slowest: accumulate's records and pool grow with every iteration."""
    def job(name, flags, seeds=SEEDS):
        return Job(f"gauss-{name}", f"{PY} {GAUSS_1D} {flags} --seeds {' '.join(map(str, range(seeds)))} "
                                    f"--out {REGIMES}/{name}")

    return [*(job(f"pool-{pool}", f"--n-real {POOL_N} --lam inf --pool {pool} --iters {POOL_ITERS}") for pool in POOLS),
            *(job(f"curate-lam{lam}-beta{beta:g}", f"--n-real {CURATE_N} --lam {lam} --curate {CURATE_K} --reward linear "
                                                    f"--beta {beta:g} --iters {CURATE_ITERS}", CURATE_SEEDS)
              for lam in CURATE_LAMS for beta in BETAS),
            *(job(f"real-{real}-tau{tau:g}", f"--n-real {MAD_N} --lam {MAD_LAM} --real {real} --temperature {tau:g} "
                                              f"--iters {MAD_ITERS}") for tau in TAUS for real in REALS)]


def regimes_digits_jobs() -> list[Job]:
    """The regimes of regimes-gaussian on the digits with RD_MODEL's small preset: the pools (fully synthetic), the
    three loops of Alemohammad et al. at temperature 1 and 0.9 (n = RD_MAD_N, so that fresh data lasts), curation
    toward one class without and with the real data, and retraining from scratch against fine-tuning. Each group
    starts from one iteration 0, pretrained by its first job and found by the others in the stage's cache."""
    base = f"{PY} --model {RD_MODEL} --preset small --data digits --cache {DIGITS_REGIMES}/cache"

    def job(name, flags, after="rd-pretrain"):
        return Job(f"rd-{name}", f"{base} {flags} --out {DIGITS_REGIMES}/{name}", after)

    mad = f"--n-real {RD_MAD_N} --lam {MAD_LAM} --n-eval {RD_MAD_EVAL}"
    curate = f"--curate {RD_CURATE_K} --reward class --reward-class {RD_CURATE_CLASS} --iters {RD_CURATE_ITERS}"
    return [job("pretrain", "--lam 0 --iters 0", None),
            job("pretrain-mad", f"{mad} --iters 0", None),
            *(job(f"start-scratch-lam{lam}", f"--lam {lam} --start scratch --iters {RD_START_ITERS}") for lam in ("inf", "1")),
            *(job(f"pool-{pool}", f"--lam inf --pool {pool} --iters {RD_POOL_ITERS}") for pool in POOLS),
            *(job(f"curate-lam{lam}", f"--lam {lam} {curate}") for lam in CURATE_LAMS),
            job("start-warm-lam1", f"--lam 1 --iters {RD_START_ITERS}"),
            *(job(f"real-{real}-tau{tau:g}", f"{mad} --real {real} --temperature {tau:g} --iters {RD_MAD_ITERS}",
                  "rd-pretrain-mad") for tau in TAUS for real in REALS)]


STAGES = {
    "theory": [
        Job("gauss-contraction",
            f"{PY} --model gaussian --data gaussian --n-real 100000 --lam {' '.join(map(str, THEORY_LAMS))} --iters 8 "
            f"--n-eval 1000 --set init_mean_shift=3 --out {RUNS}/gauss-contraction"),
        *(Job(f"gauss-collapse-n{n}", f"{PY} --model gaussian --data gaussian --n-real {n} --lam inf 1 --iters 300 "
                                      f"--out {RUNS}/gauss-collapse-n{n}") for n in COLLAPSE_N),
    ],
    "digits": [job for m in DIGITS_MODELS for job in digits_jobs(m)],
    "regimes-gaussian": regimes_gaussian_jobs(),
    "regimes-digits": regimes_digits_jobs(),
}


# ----------------------------------------------------------------------------------------------------
# Running the jobs


def run_jobs(jobs: list[Job], workers: int, threads: int, logs: str, poll: float = 1.0) -> tuple[int, dict]:
    """Run `jobs` as subprocesses, `workers` at a time, each once the job it waits for has finished. Of the
    jobs ready to start, those that other jobs wait for go first (otherwise list order): in the digits stage
    the last model's pretraining then starts while the first model's lambda runs fill the other core, rather
    than alone at the end (README's digits section gives the time both ways).

    Returns (0, {name: (start, end) seconds}), or at the first failure (its exit code, ...) with the
    other running jobs stopped."""
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    waiting, running, done, t0 = list(jobs), {}, {}, time.time()
    awaited = {j.after for j in jobs}
    while waiting or running:
        ready = [j for j in waiting if j.after is None or j.after in done]
        ready = sorted(ready, key=lambda j: j.name not in awaited)[:workers - len(running)]  # stable: list order
        for job in ready:
            waiting.remove(job)
            log = open(os.path.join(logs, f"{job.name}.log"), "w")
            proc = subprocess.Popen([sys.executable, *shlex.split(job.cmd)[1:]], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[job.name] = (proc, log, time.time() - t0)
            print(f"[{(time.time() - t0) / 60:5.1f} min] start {job.name}", flush=True)
        if not running:  # a job waits for one that is not in the list
            raise ValueError(f"jobs {', '.join(j.name for j in waiting)} wait for jobs that never run")
        time.sleep(poll)
        for name, (proc, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode:
                for other, _, _ in running.values():
                    other.terminate()
                print(f"reproduce.py: {name} failed (exit {proc.returncode}); see {log.name}", file=sys.stderr)
                return proc.returncode, done
            done[name] = (start, time.time() - t0)
            print(f"[{done[name][1] / 60:5.1f} min] done  {name} ({(done[name][1] - start) / 60:.1f} min)", flush=True)
    return 0, done


def history(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, name: str, dpi: int = 110) -> str:
    """Write fig as results/NAME and close it; returns the path."""
    path = os.path.join(RESULTS, name)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def theory_figures() -> list[str]:
    """Mean error against iteration with the predicted slope; log det Sigma_t against iteration."""
    import gaussian
    import torch

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for lam in THEORY_LAMS:
        h = history(os.path.join(RUNS, "gauss-contraction", f"lam_{lam:g}"))
        it = [r["iter"] for r in h]
        line, = ax.semilogy(it, [r["mean_err"] for r in h], "o-", ms=3, label=f"λ = {lam:g}")
        rho = lam / (1 + lam)
        ax.semilogy(it, [h[0]["mean_err"] * rho ** t for t in it], "--", color=line.get_color(), lw=1)
    ax.set(xlabel="iteration t", ylabel="‖μ_t − μ*‖", title="Gaussian, n = 100,000: dashed = (λ/(1+λ))^t")
    ax.legend(fontsize=8)
    contraction = save(fig, "gaussian_contraction.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for n in COLLAPSE_N:
        h = history(os.path.join(RUNS, f"gauss-collapse-n{n}", "lam_inf"))
        ax.plot([r["iter"] for r in h], [r["logdet"] for r in h], lw=1, label=f"fully synthetic, n = {n}")
    h = history(os.path.join(RUNS, "gauss-collapse-n20", "lam_1"))
    ax.plot([r["iter"] for r in h], [r["logdet"] for r in h], "k", lw=1.5, label="λ = 1, n = 20")
    ax.axhline(torch.linalg.slogdet(gaussian.truth(2)[1])[1].item(), color="gray", ls=":", label="log det Σ*")
    ax.set(xlabel="iteration t", ylabel="log det Σ_t", title="2-d Gaussian refitted on its own samples")
    ax.legend(fontsize=7)
    collapse = save(fig, "gaussian_collapse.png")
    return [contraction, collapse]


def digits_runs(m: str) -> tuple[dict, dict]:
    """Model m's digits histories {lam: [one history per seed]} and seed 0's config.json."""
    runs = {lam: [history(os.path.join(RUNS, f"digits-{m}", f"lam_{lam}", f"seed_{seed}")) for seed in DIGITS_SEEDS]
            for lam in DIGITS_LAMS}
    with open(os.path.join(RUNS, f"digits-{m}", f"lam_{DIGITS_LAMS[0]}", f"seed_{DIGITS_SEEDS[0]}", "config.json")) as f:
        return runs, json.load(f)


def digits_figures() -> list[str]:
    """Per model: every metric against iteration (mean and one standard deviation over the seeds, one colour per
    lambda, the noise floor as a grey band), a sheet of samples, and one table for all models."""
    from PIL import Image

    made = []
    for m in DIGITS_MODELS:
        runs, config = digits_runs(m)
        made.append(os.path.join(RESULTS, f"digits-{m}_metrics.png"))
        retrain.plot_metrics(runs, made[-1], floor=config["noise_floor"],
                             title=f"{m} ({config['preset']} preset) on the 8x8 digits: mean ± 1 sd over "
                                   f"{len(DIGITS_SEEDS)} seeds; {config['features']} features (pixel_*: raw pixels)")
        # seed 0's grids at iterations 0, 10, 20 (top to bottom): lam = 0 on the left, fully synthetic on the right
        rows = [[Image.open(os.path.join(RUNS, f"digits-{m}", f"lam_{lam}", f"seed_{DIGITS_SEEDS[0]}", "samples",
                                         f"iter{it:03d}.png")) for lam in ("0", "inf")]
                for it in (0, DIGITS_ITERS // 2, DIGITS_ITERS)]
        w, h = rows[0][0].size
        sheet = Image.new(rows[0][0].mode, (2 * w + 8, 3 * h + 16), 255)
        for i, row in enumerate(rows):
            for j, img in enumerate(row):
                sheet.paste(img, (j * (w + 8), i * (h + 8)))
        made.append(os.path.join(RESULTS, f"digits-{m}_samples.png"))
        sheet.save(made[-1])
    made.append(digits_table())
    return made


def digits_table() -> str:
    """results/digits_table.md: iteration 0 and the last per model and lambda, mean ± standard deviation over the
    seeds; the noise floor (two halves of the real set); and which neighbouring lambdas differ in the last
    iteration's FD by more than twice the standard error of the difference."""
    import numpy as np

    def at(hs, it, key):
        return np.array([next(r[key] for r in h if r["iter"] == it) for h in hs], dtype=float)

    def ms(x, digits=3):
        return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}"

    last = DIGITS_ITERS
    lines = [f"Mean ± standard deviation over seeds {', '.join(map(str, DIGITS_SEEDS))}; FD, precision, recall and "
             "coverage in the classifier's feature space (k = 3), classes = digits the classifier finds among the "
             "samples, pixel FD on raw pixels. Written by `python reproduce.py digits`.", "",
             f"| model | λ | FD it 0 | FD it {last} | precision 0 → {last} | recall 0 → {last} | "
             f"coverage 0 → {last} | class TV it {last} | pixel FD it 0 → {last} |",
             "|---|---|---|---|---|---|---|---|---|"]
    floors, tests = [], []
    for m in DIGITS_MODELS:
        runs, config = digits_runs(m)
        for lam, hs in runs.items():
            lines.append(f"| {m} | {lam} | {ms(at(hs, 0, 'fd'), 2)} | {ms(at(hs, last, 'fd'), 2)} | "
                         + " | ".join(f"{at(hs, 0, k).mean():.2f} → {ms(at(hs, last, k), 2)}"
                                      for k in ("precision", "recall", "coverage"))
                         + f" | {ms(at(hs, last, 'class_tv'), 3)} | {at(hs, 0, 'pixel_fd').mean():.3f} → "
                           f"{ms(at(hs, last, 'pixel_fd'), 3)} |")
        f = config["noise_floor"]
        floors.append(f"FD {f['fd']:.2f}, precision {f['precision']:.2f}, recall {f['recall']:.2f}, "
                      f"coverage {f['coverage']:.2f}, class TV {f['class_tv']:.3f}, pixel FD {f['pixel_fd']:.3f}")
        for a, b in zip(DIGITS_LAMS, DIGITS_LAMS[1:]):
            x, y = at(runs[a], last, "fd"), at(runs[b], last, "fd")
            se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
            tests.append(f"{m} λ {a} vs {b}: {y.mean() - x.mean():+.2f} ± {se:.2f} "
                         + ("(above the noise)" if abs(y.mean() - x.mean()) > 2 * se else "(within the noise)"))
    floors = [floors[0]] if len(set(floors)) == 1 else [f"{m}: {f}" for m, f in zip(DIGITS_MODELS, floors)]
    lines += ["", "Noise floor, two disjoint halves of the real digits against each other (seed 0's runs): "
              + "; ".join(floors) + ".", "",
              f"Difference in FD at iteration {last} between neighbouring λ, ± its standard error over the seeds "
              "(above the noise when more than twice it): " + "; ".join(tests) + "."]
    path = os.path.join(RESULTS, "digits_table.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# The regimes on the 1-D Gaussian: solid, the mean over seeds; thin, each seed; dashed, gaussian.py's
# closed form where it has one. The numbers behind README's paragraph go to results/regimes-gaussian.md.

BURN_IN = 10  # iterations left out of stationary averages (with the real set, the loops contract by 1/2 per iteration)


def seed_runs(name: str) -> list[list[dict]]:
    """The histories of the regimes-gaussian job `name`, one per seed."""
    folder = os.path.join(REGIMES, name)
    with open(os.path.join(folder, "seeds.json")) as f:
        seeds = json.load(f)["seeds"]
    return [history(os.path.join(folder, f"seed_{seed}")) for seed in seeds]


def per_seed(runs: list[list[dict]], value):
    """value(record) for every seed and iteration, as an array (seeds, iterations)."""
    import numpy as np

    return np.array([[value(r) for r in h] for h in runs])


def spread(ax, it, values, label: str, color=None, log: bool = False) -> str:
    """The mean over seeds (solid) and each seed (thin) against iteration; returns the colour."""
    plot = ax.semilogy if log else ax.plot
    line, = plot(it, values.mean(0), color=color, lw=1.6, label=label)
    plot(it, values.T, color=line.get_color(), lw=0.4, alpha=0.25)
    return line.get_color()


def mean_band(ax, it, values, label: str, color=None) -> str:
    """The mean over seeds (solid, log scale) with a band of one standard error either side (cut at a tenth of the
    mean, where the log scale ends); returns the colour."""
    mean, se = values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values))
    line, = ax.semilogy(it, mean, color=color, lw=1.6, label=label)
    ax.fill_between(it, (mean - se).clip(min=mean / 10), mean + se, color=line.get_color(), alpha=0.2, lw=0)
    return line.get_color()


def mean_se(x) -> str:
    """The mean over seeds and its standard error."""
    return f"{x.mean():.4g} ± {x.std(ddof=1) / math.sqrt(len(x)):.2g}"


def log_s2_step(n: int, tau: float = 1.0) -> float:
    """gaussian.py (R3) in 1-D: E[log s2_{t+1} - log s2_t] when s2_{t+1} is the ML variance of n samples of
    N(mu_t, tau^2 s2_t). At tau = 1 it is also E[log s2_0] - log sigma*^2 (model 0 is the ML fit of n real points)."""
    import torch

    return math.log(tau ** 2) + torch.special.digamma(torch.tensor((n - 1) / 2)).item() + math.log(2 / n)


def pools_figure(sigma2: float, notes: list[str]) -> str:
    """Replace, accumulate, accumulate-subsample, fully synthetic: log det Sigma_t and E[(mu_t - mu*)^2]."""
    import gaussian
    import numpy as np

    plt, n = _plt(), POOL_N
    fig, (ax_det, ax_mu) = plt.subplots(1, 2, figsize=(11, 4.6))
    notes += [f"## Pools: fully synthetic (--lam inf), n = {n} per generation, {SEEDS} seeds, iteration {POOL_ITERS}", ""]
    for pool in POOLS:
        runs = seed_runs(f"pool-{pool}")
        it = np.arange(len(runs[0]))
        logdet, mu2 = per_seed(runs, lambda r: r["logdet"]), per_seed(runs, lambda r: r["mean_err"] ** 2)
        label = f"--pool {pool}" + (" (no closed form)" if pool == "accumulate-subsample" else "")
        color = spread(ax_det, it, logdet, label)
        mean_band(ax_mu, it, mu2, label, color=color)
        expect_det = expect_mu2 = None
        if pool == "replace":  # (R3); and (R2) from E[s2_0] = sigma*^2 (n-1)/n, plus model 0's own error sigma*^2/n
            expect_det = math.log(sigma2) + log_s2_step(n) + it * log_s2_step(n)
            expect_mu2 = sigma2 / n + np.array([gaussian.replace_moments(t, n, sigma2 * (n - 1) / n)[1] for t in it])
            ax_det.plot(it, expect_det, "--", color=color, lw=1)
        elif pool == "accumulate":  # (A1) from the runs' mean s2_0 .. s2_{t-1}, plus sigma*^2/n
            s2 = per_seed(runs, lambda r: math.exp(r["logdet"])).mean(0)
            expect_mu2 = sigma2 / n + np.array([gaussian.accumulate_mean_var(s2[:t].tolist(), 0, n) for t in it])
        if expect_mu2 is not None:
            ax_mu.semilogy(it, expect_mu2, "--", color=color, lw=1)
        notes.append(f"- {pool}: log det Σ {mean_se(logdet[:, -1])}"
                     + (f" (R3: {expect_det[-1]:.4g})" if expect_det is not None else "")
                     + f"; (μ − μ*)² {mean_se(mu2[:, -1])}"
                     + (f" (predicted {expect_mu2[-1]:.4g})" if expect_mu2 is not None else ""))
    bound = sigma2 / n + math.pi ** 2 / 6 * sigma2 * (n - 1) / n / n  # (A1)'s bound from E[s2_0], plus sigma*^2/n
    notes += [f"- accumulate's bound σ*²/n + (π²/6) E[s²_0]/n = {bound:.4g}; σ*² = {sigma2:.4g}", ""]
    ax_det.axhline(math.log(sigma2), color="gray", ls=":", lw=1, label="log σ*²")
    ax_mu.axhline(sigma2, color="gray", ls=":", lw=1, label="σ*²")
    ax_det.set(xlabel="iteration t", ylabel="log det Σ_t (= log s²_t in 1-D)",
               title="log det Σ_t\ndashed: E[log det Σ_t] for replace (R3)")
    ax_mu.set(xlabel="iteration t", ylabel="mean over seeds of (μ_t − μ*)², ± 1 s.e.", ylim=(0.01, 1.5),
              title="E[(μ_t − μ*)²]; dashed: σ*²/n + (R2) for replace,\n"
                    "σ*²/n + (A1) from the runs' mean s²_k for accumulate")
    ax_det.legend(fontsize=8)
    ax_mu.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"1-D Gaussian (ML fit), fully synthetic loop (--lam inf), n = {n} samples per generation: the synthetic "
                 f"pool.\n{SEEDS} seeds: solid = mean over seeds, thin = each seed; dashed = gaussian.py's closed form",
                 fontsize=10)
    return save(fig, "regimes-gaussian_pools.png")


def real_data_figure(sigma2: float, notes: list[str]) -> str:
    """No, fixed or fresh real data (Alemohammad et al.'s three loops) at temperature 1 and 0.9."""
    import gaussian
    import numpy as np

    plt, n, lam = _plt(), MAD_N, MAD_LAM
    names = {"none": "none: fully synthetic loop", "fixed": "fixed: synthetic augmentation loop",
             "fresh": "fresh: fresh data loop"}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    notes += [f"## Real data: λ = {lam}, n = {n} real (+ {round(lam * n)} synthetic; none: {round(lam * n)} synthetic "
              f"alone), {SEEDS} seeds, {MAD_ITERS} iterations; stationary = iterations {BURN_IN}..{MAD_ITERS}", ""]
    for (ax_mu, ax_det, ax_zoom), tau in zip(axes, TAUS):
        for real in REALS:
            runs = seed_runs(f"real-{real}-tau{tau:g}")
            it = np.arange(len(runs[0]))
            logdet, mu2 = per_seed(runs, lambda r: r["logdet"]), per_seed(runs, lambda r: r["mean_err"] ** 2)
            color = spread(ax_det, it, logdet, f"--real {names[real]}")
            mean_band(ax_mu, it, mu2, f"--real {names[real]}", color=color)
            late = it >= BURN_IN
            if real == "none":  # replace, fully synthetic at temperature tau: (R2) plus sigma*^2/n, and (R3)
                e_mu2 = sigma2 / n + np.array([gaussian.replace_moments(t, n, sigma2 * (n - 1) / n, tau=tau)[1] for t in it])
                e_det = math.log(sigma2) + log_s2_step(n) + it * log_s2_step(n, tau)
                ax_mu.semilogy(it, e_mu2, "--", color=color, lw=1)
                ax_det.plot(it, e_det, "--", color=color, lw=1)
                notes.append(f"- τ = {tau:g}, none: at iteration {it[-1]} (μ − μ*)² {mean_se(mu2[:, -1])} "
                             f"(R2: {e_mu2[-1]:.4g}), "
                             f"log s² {mean_se(logdet[:, -1])} (R3: {e_det[-1]:.4g})")
                continue
            spread(ax_zoom, it, logdet, f"--real {real}", color=color)
            if real == "fixed":  # (P1) with the samples' stationary variance tau^2 E[s2] (measured), plus sigma*^2/n
                s2 = per_seed(runs, lambda r: math.exp(r["logdet"]))[:, late].mean()
                expect, how = gaussian.paper_stationary_var(n, lam, tau ** 2 * s2) + sigma2 / n, "P1 + σ*²/n"
            elif tau == 1:  # (P2), large n
                expect, how = gaussian.fresh_stationary_var(n, lam, sigma2), "P2"
            else:  # (P2) assumes unbiased samples
                expect, how = None, "no closed form"
            if expect is not None:
                ax_mu.axhline(expect, ls="--", color=color, lw=1)
            notes.append(f"- τ = {tau:g}, {real}: stationary (μ − μ*)² {mean_se(mu2[:, late].mean(1))} ({how}"
                         + (f": {expect:.4g}" if expect is not None else "")
                         + f"), log s² {mean_se(logdet[:, late].mean(1))}")
        for ax in (ax_det, ax_zoom):
            ax.axhline(math.log(sigma2), color="gray", ls=":", lw=1, label="log σ*²")
        ax_mu.set(xlabel="iteration t", ylabel="mean over seeds of (μ_t − μ*)², ± 1 s.e.",
                  title=f"τ = {tau:g}: E[(μ_t − μ*)²]\ndashed: (R2) none, (P1) fixed, "
                        + ("(P2) fresh" if tau == 1 else "fresh has no closed form"))
        ax_det.set(xlabel="iteration t", ylabel="log s²_t",
                   title=f"τ = {tau:g}: log s²_t\ndashed: E[log s²_t] (R3) for none")
        ax_zoom.set(xlabel="iteration t", ylabel="log s²_t", title=f"τ = {tau:g}: log s²_t with real data (zoom)\n"
                                                                   "no closed form in gaussian.py")
        if tau == TAUS[0]:  # the same colours in the second row
            ax_mu.legend(fontsize=7, loc="center right")
            ax_zoom.legend(fontsize=7)
    notes.append("")
    fig.suptitle(f"1-D Gaussian (ML fit), λ = {lam}: n = {n} real points (none, the same, or new ones each iteration) plus "
                 f"{round(lam * n)} samples of N(μ_t, τ² s²_t) (temperature τ).\n{SEEDS} seeds: solid = mean over seeds, "
                 "thin = each seed; dashed = gaussian.py's closed form", fontsize=10)
    return save(fig, "regimes-gaussian_real-data.png")


def curation_figure(notes: list[str]) -> str:
    """Curation by r(x) = beta x, one of K candidates kept by softmax(r): without real data and with the real set."""
    import gaussian
    import numpy as np
    import torch

    plt, n, k = _plt(), CURATE_N, CURATE_K
    fig, ((ax_free, ax_real), (ax_s2, ax_log)) = plt.subplots(2, 2, figsize=(11, 8))
    colors = {("inf", 0.2): "tab:blue", ("inf", 0.5): "tab:orange", ("1", 0.2): "tab:green", ("1", 0.5): "tab:red"}
    notes += [f"## Curation: K = {k}, r(x) = βx, n = {n} kept samples (+ n real with λ = 1), {CURATE_SEEDS} seeds, "
              f"{CURATE_ITERS} iterations; stationary = iterations {BURN_IN}..{CURATE_ITERS}", ""]
    for lam in CURATE_LAMS:
        for beta in BETAS:
            runs = seed_runs(f"curate-lam{lam}-beta{beta:g}")
            it = np.arange(len(runs[0]))
            mean = per_seed(runs, lambda r: r["reward"] / beta)  # the mean of the iteration's K n samples: mu_t
            shift = mean - mean[:, :1]  # mu_t - mu_0; mu_0 is the real set's mean
            s2 = per_seed(runs, lambda r: math.exp(r["logdet"]))
            reward, color, label = gaussian.Reward("linear", beta=(beta,)), colors[lam, beta], f"λ = {lam}, β = {beta:g}"
            spread(ax_log, it, s2, label, color=color, log=True)
            if lam == "inf":
                # K -> inf: the tilt moves the mean by beta s2 and keeps s2 (C3); the ML refit shrinks s2 by (n-1)/n (R1)
                e_s2 = np.array([gaussian.replace_moments(t, n, s2[:, 0].mean())[0] for t in it])
                e_shift = np.concatenate([[0.0], np.cumsum([reward.tilt(0.0, v)[0] for v in e_s2[:-1]])])
                spread(ax_free, it, shift, label, color=color)
                ax_free.plot(it, e_shift, "--", color=color, lw=1)
                spread(ax_s2, it, s2, label, color=color)
                ax_s2.plot(it, e_s2, "--", color=color, lw=1)
                # the finite-K shift by quadrature (C2), in units of beta s2, at model 0's variance
                v0 = s2[:, 0].mean()
                grid = torch.linspace(-12, 12, 2401, dtype=torch.float64) * math.sqrt(v0)
                p = gaussian.curated_density(grid, 0.0, v0, reward, k)
                ratio_k = torch.trapezoid(p * grid, grid).item() / (beta * v0)
                steps = shift[:, -1] / (beta * s2[:, :-1]).sum(1)  # per seed: the whole shift / sum of beta s2_t
                notes.append(f"- λ = ∞, β = {beta:g}: mean shift per generation {mean_se(steps)} β s² (C3, K → ∞: 1; "
                             f"(C2) at K = {k}: {ratio_k:.4f}); μ_{it[-1]} − μ_0 {mean_se(shift[:, -1])} "
                             f"(C3 + R1: {e_shift[-1]:.4g}); "
                             f"s²_{it[-1]} {mean_se(s2[:, -1])} (R1: {e_s2[-1]:.4g})")
                continue
            spread(ax_real, it[1:], shift[:, 1:], label, color=color, log=True)
            fixed = [gaussian.curated_real_fixed_point(float(lam), beta, v) for v in s2[:, 0]]  # v_R: model 0's s2
            c_v = 4 * float(lam) * (1 + float(lam)) * beta ** 2 * s2[:, 0].mean()
            late = it >= BURN_IN
            if all(f is not None for f in fixed):
                d_inf, s2_inf = np.mean([f[0] for f in fixed]), np.mean([f[1] for f in fixed])
                ax_real.axhline(d_inf, ls="--", color=color, lw=1)
                spread(ax_s2, it, s2, label, color=color)
                ax_s2.axhline(s2_inf, ls="--", color=color, lw=1)
                notes.append(f"- λ = {lam}, β = {beta:g} (4λ(1+λ)β²v_R = {c_v:.3f} ≤ 1): stationary μ − μ_0 "
                             f"{mean_se(shift[:, late].mean(1))} (C5: {d_inf:.4g}), s² {mean_se(s2[:, late].mean(1))} "
                             f"(C5: {s2_inf:.4g}; v_R {s2[:, 0].mean():.4g})")
            else:
                ax_real.text(0.03, 0.97, f"β = {beta:g}: 4λ(1+λ)β²v_R = {c_v:.2f} > 1,\nno fixed point (C5)",
                             transform=ax_real.transAxes, va="top", fontsize=8, color=color)
                notes.append(f"- λ = {lam}, β = {beta:g} (4λ(1+λ)β²v_R = {c_v:.3f} > 1, no fixed point): "
                             f"s² at iterations 10, 20, {it[-1]}: " + ", ".join(mean_se(s2[:, t]) for t in (10, 20, -1))
                             + f"; μ − μ_0 at {it[-1]}: {mean_se(shift[:, -1])}")
    notes.append("")
    ax_free.set(xlabel="iteration t", ylabel="μ_t − μ_0",
                title="without real data (λ = ∞): μ_t − μ_0\ndashed: β Σ_{k<t} E[s²_k], (C3) with (R1)")
    ax_real.set(xlabel="iteration t", ylabel="μ_t − μ_0 (μ_0: the real set's mean)",
                title="with the real set (λ = 1): μ_t − μ_0\ndashed: the fixed point λβs²_∞ (C5)")
    ax_s2.set(xlabel="iteration t", ylabel="s²_t", title="s²_t of the three loops that stay bounded\n"
              "dashed: E[s²_t] (R1) without real data, s²_∞ (C5) with")
    ax_log.set(xlabel="iteration t", ylabel="s²_t", title="s²_t of all four loops, log scale")
    for ax in (ax_free, ax_real, ax_s2, ax_log):
        ax.legend(fontsize=7, loc="upper left" if ax is ax_log else "lower right")
    fig.suptitle(f"1-D Gaussian (ML fit), curation (--curate {k} --reward linear --beta β): each of the n = {n} kept "
                 f"samples is one of {k} candidates,\nkept with probability softmax(βx); μ_t is the mean of iteration t's "
                 f"{k}·n samples (its mean reward / β).\n{CURATE_SEEDS} seeds: solid = mean over seeds, thin = each seed; "
                 "dashed = gaussian.py's closed form (K → ∞)", fontsize=10)
    return save(fig, "regimes-gaussian_curation.png")


def regimes_gaussian_figures() -> list[str]:
    """The three figures, and results/regimes-gaussian.md: each measured number beside its closed form."""
    import gaussian

    sigma2 = gaussian.truth(1)[1].item()  # sigma*^2 of --data gaussian --dim 1
    notes = ["Measured (mean ± standard error over seeds) against gaussian.py's closed forms; "
             "written by `python reproduce.py regimes-gaussian`.", ""]
    made = [pools_figure(sigma2, notes), real_data_figure(sigma2, notes), curation_figure(notes)]
    path = os.path.join(RESULTS, "regimes-gaussian.md")
    with open(path, "w") as f:
        f.write("\n".join(notes))
    return [*made, path]


def regimes_digits_figures() -> list[str]:
    """One figure of four panels (pools, real-data loops, curation, warm vs scratch) and results/regimes-digits.md
    with the numbers behind them; FD in the digits classifier's feature space, as in the digits stage."""
    plt = _plt()
    runs = {name: history(os.path.join(DIGITS_REGIMES, name)) for name in
            [*(f"pool-{p}" for p in POOLS), *(f"real-{r}-tau{t:g}" for t in TAUS for r in REALS),
             *(f"curate-lam{lam}" for lam in CURATE_LAMS), "start-warm-lam1", "start-scratch-lam1",
             "start-scratch-laminf"]}
    with open(os.path.join(DIGITS_REGIMES, "pool-replace", "config.json")) as f:
        floor = json.load(f)["noise_floor"]
    with open(os.path.join(DIGITS_REGIMES, "real-fixed-tau1", "config.json")) as f:
        floor_mad = json.load(f)["noise_floor"]

    def its(name, key="fd", upto=None):
        h = [r for r in runs[name] if upto is None or r["iter"] <= upto]
        return [r["iter"] for r in h], [key(r) if callable(key) else r[key] for r in h]

    def share(r):  # the rewarded class's share of the samples
        return r["class_hist"][RD_CURATE_CLASS] / sum(r["class_hist"])

    fig, ((ax_pool, ax_mad), (ax_cur, ax_start)) = plt.subplots(2, 2, figsize=(11, 8.4))
    notes = [f"{RD_MODEL} (small preset) on the digits, seed 0; FD in the digits classifier's feature space. "
             "Written by `python reproduce.py regimes-digits`.", ""]
    for pool in POOLS:
        ax_pool.plot(*its(f"pool-{pool}"), "o-", ms=3, label=f"--pool {pool}")
        h = runs[f"pool-{pool}"]
        notes.append(f"- fully synthetic, {pool}: FD {h[0]['fd']:.2f} → {h[-1]['fd']:.2f} (iteration {h[-1]['iter']}), "
                     f"coverage {h[0]['coverage']:.2f} → {h[-1]['coverage']:.2f}, classes {h[-1]['classes']}, "
                     f"training set {h[-1]['n_synth']} samples")
    ax_pool.axhline(floor["fd"], color="0.6", ls=":", lw=1, label="two real halves")
    ax_pool.set(xlabel="iteration", ylabel="FD", yscale="log", title="fully synthetic (λ = ∞): the synthetic pool")
    for tau, style in zip(TAUS, ("o-", "s--")):
        for real, color in zip(REALS, ("tab:red", "tab:blue", "tab:green")):
            name = f"real-{real}-tau{tau:g}"
            ax_mad.plot(*its(name), style, ms=3, color=color, label=f"--real {real}, τ = {tau:g}")
            h = runs[name]
            notes.append(f"- n = {RD_MAD_N}, λ = {MAD_LAM}, --real {real}, τ = {tau:g}: FD {h[0]['fd']:.2f} → "
                         f"{h[-1]['fd']:.2f} (iteration {h[-1]['iter']}), precision {h[-1]['precision']:.2f}, "
                         f"recall {h[-1]['recall']:.2f}")
    ax_mad.axhline(floor_mad["fd"], color="0.6", ls=":", lw=1, label=f"two sets of {floor_mad['n_half']} real digits")
    ax_mad.set(xlabel="iteration", ylabel="FD", yscale="log",
               title=f"Alemohammad et al.'s loops: n = {RD_MAD_N} real, λ = {MAD_LAM}")
    for lam in CURATE_LAMS:
        name = f"curate-lam{lam}"
        ax_cur.plot(*its(name, share), "o-", ms=3, label=f"λ = {lam}: share of class {RD_CURATE_CLASS}")
        h = runs[name]
        notes.append(f"- curation, K = {RD_CURATE_K}, r = log p(class {RD_CURATE_CLASS} | x), λ = {lam}: share of class "
                     f"{RD_CURATE_CLASS} {share(h[0]):.3f} → {share(h[-1]):.3f}, mean reward {h[0]['reward']:.2f} → "
                     f"{h[-1]['reward']:.2f}, classes {h[0]['classes']} → {h[-1]['classes']}, "
                     f"FD {h[0]['fd']:.2f} → {h[-1]['fd']:.2f} (iteration {h[-1]['iter']})")
    ax_cur.axhline(0.1, color="0.6", ls=":", lw=1, label="a tenth (the real digits' share)")
    ax_cur.set(xlabel="iteration", ylabel=f"share of class {RD_CURATE_CLASS} among the samples", ylim=(0, 1),
               title=f"curation: 1 of K = {RD_CURATE_K} kept by softmax(log p(class {RD_CURATE_CLASS} | x))")
    for name, label, upto in (("pool-replace", "warm start, λ = ∞", RD_START_ITERS),
                              ("start-scratch-laminf", "from scratch, λ = ∞", None),
                              ("start-warm-lam1", "warm start, λ = 1", None),
                              ("start-scratch-lam1", "from scratch, λ = 1", None)):
        ax_start.plot(*its(name, upto=upto), "o-" if "warm" in label else "s--", ms=3, label=label)
        h = [r for r in runs[name] if r["iter"] <= RD_START_ITERS]
        notes.append(f"- {label}: FD {h[0]['fd']:.2f} → {h[-1]['fd']:.2f} (iteration {h[-1]['iter']}), "
                     f"{sum(r.get('steps', 0) for r in h)} training steps after iteration 0")
    ax_start.axhline(floor["fd"], color="0.6", ls=":", lw=1, label="two real halves")
    ax_start.set(xlabel="iteration", ylabel="FD", yscale="log",
                 title="fine-tuning (warm) or the whole pretraining again (scratch)")
    for ax in (ax_pool, ax_mad, ax_cur, ax_start):
        ax.legend(fontsize=7)
    fig.suptitle(f"The self-consuming regimes on the 8x8 digits: {RD_MODEL}, small preset, seed 0; "
                 "FD in the digits classifier's feature space", fontsize=10)
    notes.append(f"- noise floor, two disjoint sets of {floor['n_half']} real digits: FD {floor['fd']:.2f} "
                 f"(the MAD loops' evaluation: two of {floor_mad['n_half']}, FD {floor_mad['fd']:.2f})")
    made = save(fig, "regimes-digits.png")
    path = os.path.join(RESULTS, "regimes-digits.md")
    with open(path, "w") as f:
        f.write("\n".join(notes) + "\n")
    return [made, path]


FIGURES = {"theory": theory_figures, "digits": digits_figures, "regimes-gaussian": regimes_gaussian_figures,
           "regimes-digits": regimes_digits_figures}


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--jobs", type=int, default=1, help="commands run at once (each gets cores / jobs threads)")
    p.add_argument("--restart", action="store_true", help="delete the stage's runs first instead of resuming them")
    p.add_argument("--dry-run", action="store_true", help="print the commands and check that they parse")
    p.add_argument("--figures-only", action="store_true", help="redraw the figures from finished runs")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 or more")
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    jobs = [job for stage in stages for job in STAGES[stage]]
    for job in jobs:
        retrain.build_parser().parse_args(shlex.split(job.cmd)[2:])  # raises on a command that does not parse
        print(job.cmd)
    if args.dry_run:
        return 0
    if not args.figures_only:
        outs = [words[words.index("--out") + 1] for words in (shlex.split(job.cmd) for job in jobs)]
        resumed = any(os.path.exists(out) for out in outs) and not args.restart
        for out in outs if args.restart else []:
            shutil.rmtree(out, ignore_errors=True)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        print(f"reproduce.py: {len(jobs)} jobs, {args.jobs} at a time with {threads} thread(s) each; "
              f"logs in {RUNS}/logs/" + ("; finished iterations are kept (--restart to start over)" if resumed else ""))
        t0 = time.time()
        code, spans = run_jobs(jobs, args.jobs, threads, os.path.join(RUNS, "logs"))
        if code:
            return code
        total = time.time() - t0
    os.makedirs(RESULTS, exist_ok=True)
    times_path = os.path.join(RESULTS, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for stage in stages:
        figures = FIGURES[stage]()
        print(f"{stage}: {', '.join(figures)}")
        if not args.figures_only:
            span = [spans[job.name] for job in STAGES[stage]]
            times[stage] = {"seconds": round(max(e for _, e in span) - min(s for s, _ in span), 1), "figures": figures,
                            "jobs": args.jobs, "threads": threads, "resumed": resumed,
                            "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count()}
    if not args.figures_only:
        if args.stage == "all":  # the stages overlap in the pool; this is the whole wall time
            times["all"] = {"seconds": round(total, 1), "jobs": args.jobs, "date": time.strftime("%Y-%m-%d")}
        print(f"reproduce.py: {total / 60:.1f} min")
        with open(times_path, "w") as f:
            json.dump(times, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
