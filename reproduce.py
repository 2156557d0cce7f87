"""reproduce.py -- regenerate every CPU figure and table of README's results section with one command.

A stage is a list of jobs, each one retrain.py command (all of them are listed in STAGES below); a job
may wait for another: the digits' lambda runs start from their model's pretrained iteration 0. The jobs
run as subprocesses, --jobs at a time with the CPU cores shared out between them, each logging into
runs/reproduce/logs/NAME.log. Then the figures are drawn into results/ and the wall time is recorded
in results/times.json. The commands carry --resume: rerun after an interruption and each run goes on
after its last finished iteration; --restart deletes the stage's runs first.

    python reproduce.py all --jobs 2           # everything below, on 2 CPU cores (see README for the time)
    python reproduce.py theory                 # the Gaussian warm-up: contraction rate and collapse (minutes)
    python reproduce.py digits --jobs 2        # ddpm, edm, otcfm on the 8x8 digits, lam in {0, 0.5, 1, inf}, 20 iterations
    python reproduce.py all --dry-run          # print the commands and check that they parse, run nothing
    python reproduce.py digits --figures-only  # redraw a stage's figures and table from its finished runs
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
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


class Job(NamedTuple):
    name: str  # also the name of its log file
    cmd: str  # a retrain.py command line
    after: str | None = None  # the job that must finish first


def digits_jobs(m: str) -> list[Job]:
    """Iteration 0 of model m once, then one job per lambda starting from it (the same numbers as one
    `--lam 0 0.5 1 inf` sweep, which would run the lambdas one after another)."""
    # pixel-space metrics, as README's digits figures were made (the learned feature space is now the default)
    run, small = f"{RUNS}/digits-{m}", f"--model {m} --preset small --data digits --metrics pixel"
    return [Job(f"{m}-pretrain", f"{PY} {small} --lam 0 --iters 0 --out {run}/pretrain"),
            *(Job(f"{m}-lam{lam}", f"{PY} {small} --init {run}/pretrain/iter0.pt --lam {lam} --iters {DIGITS_ITERS} "
                                   f"--out {run}/lam_{lam}", after=f"{m}-pretrain") for lam in DIGITS_LAMS)]


STAGES = {
    "theory": [
        Job("gauss-contraction",
            f"{PY} --model gaussian --data gaussian --n-real 100000 --lam {' '.join(map(str, THEORY_LAMS))} --iters 8 "
            f"--n-eval 1000 --set init_mean_shift=3 --out {RUNS}/gauss-contraction"),
        *(Job(f"gauss-collapse-n{n}", f"{PY} --model gaussian --data gaussian --n-real {n} --lam inf 1 --iters 300 "
                                      f"--out {RUNS}/gauss-collapse-n{n}") for n in COLLAPSE_N),
    ],
    "digits": [job for m in DIGITS_MODELS for job in digits_jobs(m)],
}


# ----------------------------------------------------------------------------------------------------
# Running the jobs


def run_jobs(jobs: list[Job], workers: int, threads: int, logs: str, poll: float = 1.0) -> tuple[int, dict]:
    """Run `jobs` as subprocesses, `workers` at a time, each once the job it waits for has finished.

    Returns (0, {name: (start, end) seconds}), or at the first failure (its exit code, ...) with the
    other running jobs stopped."""
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    waiting, running, done, t0 = list(jobs), {}, {}, time.time()
    while waiting or running:
        ready = [j for j in waiting if j.after is None or j.after in done][:workers - len(running)]
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


def digits_figures() -> list[str]:
    """Per model: FD, precision, recall against iteration (one line per lambda), sample grids, and one table."""
    from PIL import Image

    plt = _plt()
    made = []
    for m in DIGITS_MODELS:
        run = os.path.join(RUNS, f"digits-{m}")
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for lam in DIGITS_LAMS:
            h = history(os.path.join(run, f"lam_{lam}"))
            for ax, key in zip(axes, ("fd", "precision", "recall")):
                ax.plot([r["iter"] for r in h], [r[key] for r in h], "o-", ms=3, label=f"λ = {lam}")
        for ax, key in zip(axes, ("Fréchet distance (pixels)", "precision", "recall")):
            ax.set(xlabel="iteration", title=f"{m}: {key}")
        axes[0].legend(fontsize=8)
        made.append(save(fig, f"digits-{m}_metrics.png", dpi=100))
        # grids of iterations 0, 10, 20: lam = 0 on the left, fully synthetic on the right
        its = (0, DIGITS_ITERS // 2, DIGITS_ITERS)
        rows = [[Image.open(os.path.join(run, f"lam_{lam}", "samples", f"iter{it:03d}.png")) for lam in ("0", "inf")]
                for it in its]
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
    """results/digits_table.md: iteration 0 and the last iteration per model and lambda, and a noise gauge:
    the spread of the lambda = 0 control over the second half of its iterations."""
    lines = ["| model | λ | FD it 0 | FD last | precision it 0 → last | recall it 0 → last |",
             "|---|---|---|---|---|---|"]
    noise = []
    for m in DIGITS_MODELS:
        for lam in DIGITS_LAMS:
            h = history(os.path.join(RUNS, f"digits-{m}", f"lam_{lam}"))
            first, last = h[0], h[-1]
            lines.append(f"| {m} | {lam} | {first['fd']:.3f} | {last['fd']:.3f} (it {last['iter']}) | "
                         f"{first['precision']:.3f} → {last['precision']:.3f} | {first['recall']:.3f} → {last['recall']:.3f} |")
            if lam == "0":
                fds = [r["fd"] for r in h[len(h) // 2:]]
                noise.append(f"{m} {statistics.mean(fds):.3f} ± {statistics.stdev(fds):.3f}")
    lines += ["", "FD of the λ = 0 control over its second half of iterations (mean ± standard deviation), "
              "a gauge of the noise in one run: " + ", ".join(noise) + "."]
    path = os.path.join(RESULTS, "digits_table.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


FIGURES = {"theory": theory_figures, "digits": digits_figures}


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
