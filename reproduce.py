"""reproduce.py -- regenerate every CPU figure of README's results section with one command.

Each stage runs retrain.py commands (listed in STAGES, all visible here) into runs/reproduce/, then
draws its figures into results/ and records the wall time it took in results/times.json.

    python reproduce.py theory        # the Gaussian warm-up: contraction rate and collapse (a few minutes)
    python reproduce.py ddpm-short    # ddpm on the 8x8 digits, lam in {0, inf}, 20 iterations (about half an hour)
    python reproduce.py digits        # ddpm, edm, otcfm on the 8x8 digits, lam in {0, 0.5, 1, inf}, 20 iterations
    python reproduce.py all --dry-run # print the commands and check that they parse, run nothing
    python reproduce.py ddpm-short --figures-only   # redraw a stage's figures from its finished runs
"""

import argparse
import json
import os
import shlex
import sys
import time

import retrain

RUNS, RESULTS = os.path.join("runs", "reproduce"), "results"
PY = "python retrain.py --no-progress --force"
THEORY_LAMS = (0.25, 0.5, 1, 2)
COLLAPSE_N = (10, 20, 50, 100)
DIGITS_MODELS = ("ddpm", "edm", "otcfm")

STAGES = {
    "theory": [
        f"{PY} --model gaussian --data gaussian --n-real 100000 --lam {' '.join(map(str, THEORY_LAMS))} --iters 8 "
        f"--n-eval 1000 --set init_mean_shift=3 --out {RUNS}/gauss-contraction",
        *(f"{PY} --model gaussian --data gaussian --n-real {n} --lam inf 1 --iters 300 --out {RUNS}/gauss-collapse-n{n}"
          for n in COLLAPSE_N),
    ],
    "ddpm-short": [f"{PY} --model ddpm --preset small --data digits --lam 0 inf --iters 20 --out {RUNS}/ddpm-short"],
    "digits": [f"{PY} --model {m} --preset small --data digits --lam 0 0.5 1 inf --iters 20 --out {RUNS}/digits-{m}"
               for m in DIGITS_MODELS],
}


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


def digits_figures(runs: dict[str, str]) -> list[str]:
    """Per run: FD, precision, recall against iteration (one line per lambda), and sample grids."""
    from PIL import Image

    plt = _plt()
    made = []
    for name, run in runs.items():
        m = name.split("-")[0]
        lams = sorted((d[4:] for d in os.listdir(run) if d.startswith("lam_")), key=float)
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for lam in lams:
            h = history(os.path.join(run, f"lam_{lam}"))
            for ax, key in zip(axes, ("fd", "precision", "recall")):
                ax.plot([r["iter"] for r in h], [r[key] for r in h], "o-", ms=3, label=f"λ = {lam}")
        for ax, key in zip(axes, ("Fréchet distance (pixels)", "precision", "recall")):
            ax.set(xlabel="iteration", title=f"{m}: {key}")
        axes[0].legend(fontsize=8)
        made.append(save(fig, f"{name}_metrics.png", dpi=100))
        # grids of iterations 0, 10, 20: lam = 0 on the left, fully synthetic on the right
        rows = [[Image.open(os.path.join(run, f"lam_{lam}", "samples", f"iter{it:03d}.png")) for lam in ("0", "inf")]
                for it in (0, 10, 20)]
        w, h = rows[0][0].size
        sheet = Image.new(rows[0][0].mode, (2 * w + 8, 3 * h + 16), 255)
        for i, row in enumerate(rows):
            for j, img in enumerate(row):
                sheet.paste(img, (j * (w + 8), i * (h + 8)))
        made.append(os.path.join(RESULTS, f"{name}_samples.png"))
        sheet.save(made[-1])
    return made


FIGURES = {"theory": theory_figures,
           "ddpm-short": lambda: digits_figures({"ddpm-short": os.path.join(RUNS, "ddpm-short")}),
           "digits": lambda: digits_figures({f"{m}-digits": os.path.join(RUNS, f"digits-{m}") for m in DIGITS_MODELS})}


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--dry-run", action="store_true", help="print the commands and check that they parse")
    p.add_argument("--figures-only", action="store_true", help="redraw the figures from finished runs")
    args = p.parse_args(argv)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    for stage in stages:
        for cmd in STAGES[stage]:
            words = shlex.split(cmd)
            retrain.build_parser().parse_args(words[2:])  # raises on a command that does not parse
            print(cmd)
    if args.dry_run:
        return 0
    os.makedirs(RESULTS, exist_ok=True)
    times_path = os.path.join(RESULTS, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for stage in stages:
        t0 = time.time()
        for cmd in [] if args.figures_only else STAGES[stage]:
            code = retrain.main(shlex.split(cmd)[2:])
            if code:
                return code
        figures = FIGURES[stage]()
        if args.figures_only:
            print(f"{stage}: redrew {', '.join(figures)}")
            continue
        times[stage] = {"seconds": round(time.time() - t0, 1), "figures": figures,
                        "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count()}
        print(f"{stage}: {times[stage]['seconds'] / 60:.1f} min -> {', '.join(figures)}")
        with open(times_path, "w") as f:
            json.dump(times, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
