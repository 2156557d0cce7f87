"""reproduce.py -- regenerate every CPU figure and table of README's results section with one command.

A stage is a list of jobs, each one retrain.py command (all of them are listed in STAGES below); a job
may wait for another: the digits' lambda runs start from their model's pretrained iteration 0. The jobs
run as subprocesses (jobs.run_jobs), --jobs at a time with the CPU cores shared out between them, each
logging into runs/reproduce/logs/NAME.log (the threads: OMP_NUM_THREADS when set). Then the figures are
drawn into results/ (figures.py); --record also writes the wall times into results/times.json. The commands
carry --resume where their run is there already: rerun after an interruption and each run goes on after its
last finished iteration; --restart deletes the stage's runs first.

    python reproduce.py all --jobs 2           # everything below, on 2 CPU cores (see README for the time)
    python reproduce.py theory                 # the Gaussian warm-up: contraction rate and collapse (minutes)
    python reproduce.py digits --jobs 2        # ddpm, edm, otcfm on the 8x8 digits: 4 lambdas, 20 iterations, 3 seeds
    python reproduce.py mnist                  # otcfm on MNIST 32x32, Inception FID beside the classifier's space
    python reproduce.py fashion-mnist          # the same on Fashion-MNIST
    python reproduce.py regimes-gaussian --jobs 2  # pools, real data, temperature, curation on the 1-D Gaussian (minutes)
    python reproduce.py regimes-digits --jobs 2    # the same regimes, and warm start vs from scratch, on the digits
    python reproduce.py all --dry-run          # print the commands and check that they parse, run nothing
    python reproduce.py digits --figures-only  # redraw a stage's figures and table from its finished runs
"""

import argparse
import dataclasses
import functools
import json
import os
import shlex
import shutil
import sys
import time

import figures
import jobs
import retrain

RUNS, RESULTS = os.path.join("runs", "reproduce"), "results"
PY = "python retrain.py --no-progress --resume"
THEORY_LAMS = (0.25, 0.5, 1, 2)
COLLAPSE_N = (10, 20, 50, 100)
DIGITS_MODELS = ("ddpm", "edm", "otcfm")  # slowest first: the pool starts jobs in list order
DIGITS_LAMS = ("0", "0.5", "1", "inf")
DIGITS_ITERS = 20
DIGITS_SEEDS = (0, 1, 2)  # independent replicates, iteration 0 included: the table gives mean +- sd over them
# Real images (MNIST, Fashion-MNIST at 32x32, the mnist preset that --preset auto picks for them): one sweep over
# the lambdas from one iteration 0, on a subset of the training split (lambda n samples per iteration cost CPU
# time), measured against the start of the test split; Inception at iterations 0, REAL_ITERS / 2 and REAL_ITERS
REAL_DATA = ("mnist", "fashion-mnist")
REAL_MODEL = "otcfm"  # the best classifier-space FD per CPU-minute in a trial on MNIST (otcfm.py's mnist preset)
REAL_N, REAL_EVAL, REAL_ITERS = 1000, 1000, 10  # real images trained on; samples evaluated = test images measured against
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
RD_POOL_ITERS = 20  # fully synthetic, all 1,198 training digits' worth of samples per generation
RD_EPOCHS_ITERS = 10  # accumulate with --budget epochs: iteration t trains t times as long (55 x 100 steps in all)
RD_MAD_N, RD_MAD_ITERS = 100, 10  # fresh real data needs 11 disjoint sets of 100 of the 1,198 training digits
RD_MAD_EVAL = 1198  # samples per iteration in those loops, as many as the digits stage's (100 are trained on)
RD_CURATE_K, RD_CURATE_CLASS, RD_CURATE_ITERS = 4, 0, 10  # keep 1 of 4 by softmax(log p(class 0 | x))
RD_START_ITERS = 3  # from scratch, every iteration costs a whole pretraining (6,000 steps)


def retrain_job(name: str, cmd: str, after: str | None = None) -> jobs.Job:
    """The job of one `python retrain.py ...` command line, logging into RUNS/logs/NAME.log."""
    return jobs.Job(name, shlex.split(cmd)[1:], os.path.join(RUNS, "logs", f"{name}.log"), after)


def command(job: jobs.Job) -> str:
    """The job's command line as it is typed."""
    return shlex.join(["python", *job.argv])


def digits_jobs(m: str) -> list[jobs.Job]:
    """Model m's iterations 0 for every seed, trained once and kept in the stage's cache (runs/reproduce/
    digits-m/cache), then one job per lambda over the same seeds, each starting from its seed's iteration 0
    (the same numbers as one `--lam 0 0.5 1 inf` sweep, which would run the lambdas one after another)."""
    run, seeds = f"{RUNS}/digits-{m}", " ".join(map(str, DIGITS_SEEDS))
    small = f"--model {m} --preset small --data digits --seeds {seeds} --cache {run}/cache"
    return [retrain_job(f"{m}-pretrain", f"{PY} {small} --lam 0 --iters 0 --out {run}/pretrain"),
            *(retrain_job(f"{m}-lam{lam}", f"{PY} {small} --lam {lam} --iters {DIGITS_ITERS} --out {run}/lam_{lam}",
                          after=f"{m}-pretrain") for lam in DIGITS_LAMS)]


def real_images_job(name: str) -> jobs.Job:
    """The lambda sweep on a real image dataset (REAL_DATA), one job: its lambdas run two at a time on two threads."""
    return retrain_job(name, f"{PY} --model {REAL_MODEL} --data {name} --n-real {REAL_N} --n-eval {REAL_EVAL} "
                             f"--n-ref {REAL_EVAL} --lam {' '.join(DIGITS_LAMS)} --iters {REAL_ITERS} --inception-every {REAL_ITERS // 2} "
                             f"--cache {RUNS}/{name}-cache --out {RUNS}/{name}")


def regimes_gaussian_jobs() -> list[jobs.Job]:
    """One retrain.py job per regime, each over several seeds: the synthetic pool (fully synthetic, n = 20),
    Alemohammad et al.'s three loops (no, fixed or fresh real data) at temperature 1 and 0.9, and curation by
    a linear reward without and with the real data, at a beta below and one above the fixed-point threshold
    of gaussian.py's (C5). (--start scratch is left out: the Gaussian's fit is from scratch in every regime.)
    The pools come first, as the slowest: accumulate's records and pool grow with every iteration."""
    def job(name, flags, seeds=SEEDS):
        return retrain_job(f"gauss-{name}", f"{PY} {GAUSS_1D} {flags} --seeds {' '.join(map(str, range(seeds)))} "
                                            f"--out {REGIMES}/{name}")

    return [*(job(f"pool-{pool}", f"--n-real {POOL_N} --lam inf --pool {pool} --iters {POOL_ITERS}") for pool in POOLS),
            *(job(f"curate-lam{lam}-beta{beta:g}", f"--n-real {CURATE_N} --lam {lam} --curate {CURATE_K} --reward linear "
                                                    f"--beta {beta:g} --iters {CURATE_ITERS}", CURATE_SEEDS)
              for lam in CURATE_LAMS for beta in BETAS),
            *(job(f"real-{real}-tau{tau:g}", f"--n-real {MAD_N} --lam {MAD_LAM} --real {real} --temperature {tau:g} "
                                              f"--iters {MAD_ITERS}") for tau in TAUS for real in REALS)]


def regimes_digits_jobs() -> list[jobs.Job]:
    """The regimes of regimes-gaussian on the digits with RD_MODEL's small preset: the pools (fully synthetic; accumulate
    also with --budget epochs, training on its whole pool), the
    three loops of Alemohammad et al. at temperature 1 and 0.9 (n = RD_MAD_N, so that fresh data lasts), curation
    toward one class without and with the real data, and retraining from scratch against fine-tuning. Each group
    starts from one iteration 0, pretrained by its first job and found by the others in the stage's cache."""
    base = f"{PY} --model {RD_MODEL} --preset small --data digits --cache {DIGITS_REGIMES}/cache"

    def job(name, flags, after="rd-pretrain"):
        return retrain_job(f"rd-{name}", f"{base} {flags} --out {DIGITS_REGIMES}/{name}", after)

    mad = f"--n-real {RD_MAD_N} --lam {MAD_LAM} --n-eval {RD_MAD_EVAL}"
    curate = f"--curate {RD_CURATE_K} --reward class --reward-class {RD_CURATE_CLASS} --iters {RD_CURATE_ITERS}"
    return [job("pretrain", "--lam 0 --iters 0", None),
            job("pretrain-mad", f"{mad} --iters 0", None),
            *(job(f"start-scratch-lam{lam}", f"--lam {lam} --start scratch --iters {RD_START_ITERS}") for lam in ("inf", "1")),
            *(job(f"pool-{pool}", f"--lam inf --pool {pool} --iters {RD_POOL_ITERS}") for pool in POOLS),
            job("pool-accumulate-epochs", f"--lam inf --pool accumulate --budget epochs --iters {RD_EPOCHS_ITERS}"),
            *(job(f"curate-lam{lam}", f"--lam {lam} {curate}") for lam in CURATE_LAMS),
            job("start-warm-lam1", f"--lam 1 --iters {RD_START_ITERS}"),
            *(job(f"real-{real}-tau{tau:g}", f"{mad} --real {real} --temperature {tau:g} --iters {RD_MAD_ITERS}",
                  "rd-pretrain-mad") for tau in TAUS for real in REALS)]


STAGES = {
    "theory": [
        retrain_job("gauss-contraction",
                    f"{PY} --model gaussian --data gaussian --n-real 100000 --lam {' '.join(map(str, THEORY_LAMS))} "
                    f"--iters 8 --n-eval 1000 --set init_mean_shift=3 --out {RUNS}/gauss-contraction"),
        *(retrain_job(f"gauss-collapse-n{n}", f"{PY} --model gaussian --data gaussian --n-real {n} --lam inf 1 "
                                              f"--iters 300 --out {RUNS}/gauss-collapse-n{n}") for n in COLLAPSE_N),
    ],
    "digits": [job for m in DIGITS_MODELS for job in digits_jobs(m)],
    **{name: [real_images_job(name)] for name in REAL_DATA},
    "regimes-gaussian": regimes_gaussian_jobs(),
    "regimes-digits": regimes_digits_jobs(),
}


# Each stage's figures and tables (figures.py), drawn from its finished runs into RESULTS
FIGURES = {
    "theory": lambda: figures.theory_figures(RUNS, RESULTS, THEORY_LAMS, COLLAPSE_N),
    "digits": lambda: figures.digits_figures(RUNS, RESULTS, DIGITS_MODELS, DIGITS_LAMS, DIGITS_SEEDS, DIGITS_ITERS),
    **{name: (lambda name=name: figures.real_images_figures(RUNS, RESULTS, name, DIGITS_LAMS, REAL_ITERS))
       for name in REAL_DATA},
    "regimes-gaussian": lambda: figures.regimes_gaussian_figures(
        REGIMES, RESULTS, pools=POOLS, pool_n=POOL_N, reals=REALS, taus=TAUS, mad_n=MAD_N, mad_lam=MAD_LAM,
        curate_lams=CURATE_LAMS, betas=BETAS, curate_n=CURATE_N, curate_k=CURATE_K),
    "regimes-digits": lambda: figures.regimes_digits_figures(
        DIGITS_REGIMES, RESULTS, model=RD_MODEL, pools=POOLS, reals=REALS, taus=TAUS, curate_lams=CURATE_LAMS,
        mad_n=RD_MAD_N, mad_lam=MAD_LAM, curate_k=RD_CURATE_K, curate_class=RD_CURATE_CLASS,
        start_iters=RD_START_ITERS),
}


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--jobs", type=int, default=1, help="commands run at once (each gets cores / jobs threads)")
    p.add_argument("--restart", action="store_true", help="delete the stage's runs first instead of resuming them")
    p.add_argument("--dry-run", action="store_true", help="print the commands and check that they parse")
    p.add_argument("--figures-only", action="store_true", help="redraw the figures from finished runs")
    p.add_argument("--record", action="store_true", help="write the stages' wall times into results/times.json")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 or more")
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    todo = [job for stage in stages for job in STAGES[stage]]
    for job in todo:
        retrain.build_parser().parse_args(job.argv[1:])  # raises on a command that does not parse
        print(command(job))
    if args.dry_run:
        return 0
    if not args.figures_only:
        outs = [job.argv[job.argv.index("--out") + 1] for job in todo]
        resumed = any(os.path.exists(out) for out in outs) and not args.restart
        for out in outs if args.restart else []:
            shutil.rmtree(out, ignore_errors=True)
        todo = [job if os.path.exists(out) else dataclasses.replace(job, argv=[a for a in job.argv if a != "--resume"])
                for job, out in zip(todo, outs)]  # --resume continues a run, and refuses one that is not there
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // args.jobs)
        print(f"reproduce.py: {len(todo)} jobs, {args.jobs} at a time with {threads} thread(s) each; "
              f"logs in {RUNS}/logs/" + ("; finished iterations are kept (--restart to start over)" if resumed else ""))
        t0 = time.time()
        try:
            spans = jobs.run_jobs([dataclasses.replace(job, env={"OMP_NUM_THREADS": str(threads)}) for job in todo],
                                  args.jobs, say=functools.partial(print, flush=True))
        except jobs.JobFailed as e:
            print(f"reproduce.py: {e}", file=sys.stderr)
            return e.code
        total = time.time() - t0
    os.makedirs(RESULTS, exist_ok=True)
    times_path = os.path.join(RESULTS, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for stage in stages:
        made = FIGURES[stage]()
        print(f"{stage}: {', '.join(made)}")
        if not args.figures_only:
            span = [spans[job.name] for job in STAGES[stage]]
            times[stage] = {"seconds": round(max(e for _, e in span) - min(s for s, _ in span), 1), "figures": made,
                            "jobs": args.jobs, "threads": threads, "resumed": resumed,
                            "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count()}
    if not args.figures_only:
        if args.stage == "all":  # the stages overlap in the pool; this is the whole wall time
            times["all"] = {"seconds": round(total, 1), "jobs": args.jobs, "date": time.strftime("%Y-%m-%d")}
        print(f"reproduce.py: {total / 60:.1f} min" + ("" if args.record else " (--record keeps it in results/times.json)"))
        if args.record:
            with open(times_path, "w") as f:
                json.dump(times, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
