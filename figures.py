"""figures.py -- every figure and table: a run's sample grids and metric panels, and README's results.

Bertrand, Bose, Duplessis, Jiralerspong & Gidel, "On the Stability of Iterative Retraining of
Generative Models on their Own Data" (ICLR 2024, arXiv 2310.00429).

    save_grid, plot_metrics     one run's sample sheets and metrics against iteration (retrain.py)
    theory_figures, digits_figures (with digits_table), real_images_figures (mnist, fashion-mnist),
    regimes_gaussian_figures, regimes_digits_figures
                                one stage of reproduce.py each, drawn from its finished run folders; the stage's
                                settings (lambdas, seeds, n, ...) are passed in, the figures go to `results`
"""

import json
import math
import os

import numpy as np
import torch

import gaussian


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
          "pixel_recall": "pixel recall", "train_fd": "Frechet distance to the training images",
          "nn_train_share": "nearest real image: a training one",
          "inception_precision": "Inception precision", "inception_recall": "Inception recall", "mean_err": "|mu - mu*|", "cov_err": "|Sigma - Sigma*|", "logdet": "log det Sigma"}


def draw_floor(ax, floor: dict, key: str) -> None:
    """A noise floor's level of metric `key` (Evaluator.noise_floor) as a dashed line in a grey band of one sd."""
    if "n_fake" not in floor:  # older runs: one pair of real halves
        ax.axhline(floor[key], color="0.5", ls="--", lw=1, label="two real halves")
        return
    level, sd = floor[key]
    ax.axhline(level, color="0.5", ls="--", lw=1, label=f"real vs real, {floor['n_fake']} vs {floor['n_ref']} (mean, 1 sd)")
    ax.axhspan(level - sd, level + sd, color="0.88", zorder=0)


def plot_metrics(histories: dict[str, list], path: str, title: str = "", floor: dict | None = None) -> None:
    """One panel per metric against iteration, one line per lambda. A history may also be a list of histories
    (several seeds): then its mean, with a band of one standard deviation. The noise floor (Evaluator.noise_floor:
    what two independent real sets of the evaluated sizes score, mean and sd) is a grey line with a grey band of
    one sd: where a perfect generator's metric would lie. With one lambda and class histograms, a last panel shows the
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
        if floor and key in floor:
            draw_floor(ax, floor, key)
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


# ----------------------------------------------------------------------------------------------------
# reproduce.py's figures and tables, from its stages' run folders


def history(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, dpi: int = 110) -> str:
    """Write fig to path and close it; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def theory_figures(runs: str, results: str, lams: tuple, ns: tuple) -> list[str]:
    """Mean error against iteration with the predicted slope (the runs/gauss-contraction sweep over lams); log det
    Sigma_t against iteration (runs/gauss-collapse-nN, fully synthetic for every N in ns, and lambda = 1 at n = 20)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for lam in lams:
        h = history(os.path.join(runs, "gauss-contraction", f"lam_{lam:g}"))
        it = [r["iter"] for r in h]
        line, = ax.semilogy(it, [r["mean_err"] for r in h], "o-", ms=3, label=f"λ = {lam:g}")
        rho = lam / (1 + lam)
        ax.semilogy(it, [h[0]["mean_err"] * rho ** t for t in it], "--", color=line.get_color(), lw=1)
    ax.set(xlabel="iteration t", ylabel="‖μ_t − μ*‖", title="Gaussian, n = 100,000: dashed = (λ/(1+λ))^t")
    ax.legend(fontsize=8)
    contraction = save(fig, os.path.join(results, "gaussian_contraction.png"))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for n in ns:
        h = history(os.path.join(runs, f"gauss-collapse-n{n}", "lam_inf"))
        ax.plot([r["iter"] for r in h], [r["logdet"] for r in h], lw=1, label=f"fully synthetic, n = {n}")
    h = history(os.path.join(runs, "gauss-collapse-n20", "lam_1"))
    ax.plot([r["iter"] for r in h], [r["logdet"] for r in h], "k", lw=1.5, label="λ = 1, n = 20")
    ax.axhline(torch.linalg.slogdet(gaussian.truth(2)[1])[1].item(), color="gray", ls=":", label="log det Σ*")
    ax.set(xlabel="iteration t", ylabel="log det Σ_t", title="2-d Gaussian refitted on its own samples")
    ax.legend(fontsize=7)
    collapse = save(fig, os.path.join(results, "gaussian_collapse.png"))
    return [contraction, collapse]


def digits_runs(runs: str, m: str, lams: tuple, seeds: tuple) -> tuple[dict, dict]:
    """Model m's digits histories {lam: [one history per seed]} and the first seed's config.json."""
    folder = os.path.join(runs, f"digits-{m}")
    hs = {lam: [history(os.path.join(folder, f"lam_{lam}", f"seed_{seed}")) for seed in seeds] for lam in lams}
    with open(os.path.join(folder, f"lam_{lams[0]}", f"seed_{seeds[0]}", "config.json")) as f:
        return hs, json.load(f)


def digits_figures(runs: str, results: str, models: tuple, lams: tuple, seeds: tuple, iters: int) -> list[str]:
    """Per model (runs/digits-MODEL/lam_LAM/seed_SEED): every metric against iteration (mean and one standard
    deviation over the seeds, one colour per lambda, the noise floor as a grey band), a sheet of samples, and
    one table for all models."""
    from PIL import Image

    made = []
    for m in models:
        hs, config = digits_runs(runs, m, lams, seeds)
        made.append(os.path.join(results, f"digits-{m}_metrics.png"))
        plot_metrics(hs, made[-1], floor=config["noise_floor"],
                     title=f"{m} ({config['preset']} preset) on the 8x8 digits: mean ± 1 sd over "
                           f"{len(seeds)} seeds; {config['features']} features (pixel_*: raw pixels)")
        # the first seed's grids at iterations 0, iters/2, iters (top to bottom): lam = 0 left, fully synthetic right
        rows = [[Image.open(os.path.join(runs, f"digits-{m}", f"lam_{lam}", f"seed_{seeds[0]}", "samples",
                                         f"iter{it:03d}.png")) for lam in ("0", "inf")]
                for it in (0, iters // 2, iters)]
        w, h = rows[0][0].size
        sheet = Image.new(rows[0][0].mode, (2 * w + 8, 3 * h + 16), 255)
        for i, row in enumerate(rows):
            for j, img in enumerate(row):
                sheet.paste(img, (j * (w + 8), i * (h + 8)))
        made.append(os.path.join(results, f"digits-{m}_samples.png"))
        sheet.save(made[-1])
    made += digits_table(runs, results, models, lams, seeds, iters)
    return made


def paired_test(x: np.ndarray, y: np.ndarray) -> str:
    """y - x paired over seeds: the mean difference, its 95% interval and the two-sided paired t-test's p-value."""
    import scipy.stats

    d = y - x
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}], p = {scipy.stats.ttest_rel(y, x).pvalue:.2g}"


def digits_table(runs: str, results: str, models: tuple, lams: tuple, seeds: tuple, iters: int) -> list[str]:
    """results/digits_table.md: iteration 0 and the last (iters) per model and lambda, mean ± standard deviation
    over the seeds; the noise floor at the curves' sizes; and neighbouring lambdas compared by a paired t-test over
    the seeds (each seed's lambdas share its iteration 0) on FD averaged over the second half of the iterations.
    results/digits_seeds.csv: every seed's metrics at every iteration, for other tests."""
    def at(hs, it, key):
        return np.array([next(r[key] for r in h if r["iter"] == it) for h in hs], dtype=float)

    def late(hs, key):  # (seeds,) mean over iterations iters/2 .. iters
        return np.mean([at(hs, it, key) for it in range(iters // 2, iters + 1)], axis=0)

    def ms(x, digits=3):
        return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}"

    last, half = iters, iters // 2
    lines = [f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}. FD, precision, recall and coverage in "
             "the classifier's feature space (k = 3) against the digits' test split (599 images no model and not the "
             "classifier saw); train FD against the training digits (the paper's view); copies: the share of samples "
             "whose nearest real image (pixels) is a training one among as many training as test digits (0.5: no "
             "copying); class TV of the samples' digit histogram; pixel FD on raw pixels. Written by "
             "`python reproduce.py digits`.", "",
             f"| model | λ | FD it 0 | FD it {last} | train FD it {last} | precision 0 → {last} | recall 0 → {last} | "
             f"coverage 0 → {last} | copies it {last} | class TV it {last} | pixel FD it 0 → {last} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    floors, tests, rows = [], [], []
    for m in models:
        hs_of, config = digits_runs(runs, m, lams, seeds)
        for lam, hs in hs_of.items():
            lines.append(f"| {m} | {lam} | {ms(at(hs, 0, 'fd'), 2)} | {ms(at(hs, last, 'fd'), 2)} | "
                         f"{ms(at(hs, last, 'train_fd'), 2)} | "
                         + " | ".join(f"{at(hs, 0, k).mean():.2f} → {ms(at(hs, last, k), 2)}"
                                      for k in ("precision", "recall", "coverage"))
                         + f" | {ms(at(hs, last, 'nn_train_share'), 2)} | {ms(at(hs, last, 'class_tv'), 3)} | "
                           f"{at(hs, 0, 'pixel_fd').mean():.3f} → {ms(at(hs, last, 'pixel_fd'), 3)} |")
            rows += [{"model": m, "lam": lam, "seed": seed, **{k: v for k, v in r.items() if isinstance(v, (int, float))}}
                     for seed, h in zip(seeds, hs) for r in h]
        f = config["noise_floor"]
        floors.append(", ".join(f"{name} {f[k][0]:.{d}f} ± {f[k][1]:.{d}f}" for name, k, d in
                                (("FD", "fd", 2), ("train FD", "train_fd", 2), ("precision", "precision", 2),
                                 ("recall", "recall", 2), ("coverage", "coverage", 2), ("class TV", "class_tv", 3),
                                 ("pixel FD", "pixel_fd", 3)))
                      + f" ({f['n_fake']} samples vs {f['n_ref']} test digits)")
        for a, b in zip(lams, lams[1:]):
            tests.append(f"{m} λ {a} → {b}: {paired_test(late(hs_of[a], 'fd'), late(hs_of[b], 'fd'))}")
    floors = [floors[0]] if len(set(floors)) == 1 else [f"{m}: {f}" for m, f in zip(models, floors)]
    lines += ["", f"Noise floor, what two independent real sets of these sizes score (mean ± sd over {f['splits']} "
              "random splits of the real digits; FD scaled from the splits' size as 1/N): " + "; ".join(floors) + ".", "",
              f"FD averaged over iterations {half}-{last}, λ against the next λ, paired over the {len(seeds)} seeds: the "
              "mean difference, its 95% interval and the paired t-test's p-value: " + "; ".join(tests) + "."]
    path = os.path.join(results, "digits_table.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    csv = os.path.join(results, "digits_seeds.csv")
    with open(csv, "w") as f:
        f.write(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    return [path, csv]


def real_images_figures(runs: str, results: str, name: str, lams: tuple, iters: int) -> list[str]:
    """One sweep on real images (runs/NAME/lam_LAM, one seed): every metric against iteration with its noise floor,
    a sheet of samples (a row per lambda: iteration 0 left, the last right) and results/NAME_table.md."""
    from PIL import Image

    folder = os.path.join(runs, name)
    hs = {lam: history(os.path.join(folder, f"lam_{lam}")) for lam in lams}
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    made = [os.path.join(results, f"{name}_metrics.png"), os.path.join(results, f"{name}_samples.png")]
    plot_metrics(hs, made[0], floor=config["noise_floor"],
                 title=f"{config['model']} ({config['preset']} preset) on {name}, n = {config['n_real']} real images; "
                       f"{config['n_eval']} samples against {config['n_reference']} test images")
    grids = [[Image.open(os.path.join(folder, f"lam_{lam}", "samples", f"iter{it:03d}.png")) for it in (0, iters)]
             for lam in lams]
    w, h = grids[0][0].size
    sheet = Image.new(grids[0][0].mode, (2 * w + 8, len(lams) * (h + 8)), 255)
    for i, row in enumerate(grids):
        for j, img in enumerate(row):
            sheet.paste(img, (j * (w + 8), i * (h + 8)))
    sheet.save(made[1])
    return made + [real_images_table(hs, config, os.path.join(results, f"{name}_table.md"), name, iters)]


def real_images_table(hs: dict, config: dict, path: str, name: str, iters: int) -> str:
    """Iteration 0 (shared), the middle and the last per lambda against the floors; neighbouring lambdas' last FDs
    compared with the noise of one FD, taken as the standard deviation of lambda = 0's FD over iterations 1..iters
    (sampling and training noise together; its model stays where it is): z = difference / (sqrt(2) sd)."""
    f, keys = config["noise_floor"], ("fid", "inception_precision", "inception_recall", "fd", "precision", "recall",
                                      "coverage", "class_tv", "nn_train_share")
    at = {lam: {r["iter"]: r for r in h} for lam, h in hs.items()}
    heads = ("FID (Inception)", "Inception precision", "Inception recall", "FD (classifier)", "precision", "recall",
             "coverage", "class TV", "copies")
    lines = [f"{name}: {config['model']} ({config['preset']} preset), n = {config['n_real']} real training images, "
             f"{config['n_eval']} samples per iteration against the first {config['n_reference']} images of the test "
             "split; Inception at iterations 0, middle and last, the classifier's space every iteration. Copies: the "
             "share of samples whose nearest real image (pixels) is a training one (0.5: no copying). Written by "
             f"`python reproduce.py {name}`.", "",
             "| λ | iteration | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads),
             "| real vs real | (mean ± sd) | "
             + " | ".join(f"{f[k][0]:.3g} ± {f[k][1]:.2g}" if k in f else "" for k in keys) + " |"]
    control = next(iter(hs))  # the first lambda, 0
    rows = [("all", 0, at[control][0])] + [(lam, it, at[lam][it]) for lam in hs for it in (iters // 2, iters)]
    for lam, it, r in rows:
        lines.append(f"| {lam} | {it} | " + " | ".join(f"{r[k]:.3g}" if k in r else "" for k in keys) + " |")
    sd = np.std([at[control][it]["fd"] for it in range(1, iters + 1)], ddof=1)
    z = [f"λ {a} → {b}: {at[b][iters]['fd'] - at[a][iters]['fd']:+.3g} (z = "
         f"{(at[b][iters]['fd'] - at[a][iters]['fd']) / (math.sqrt(2) * sd):+.1f})" for a, b in zip(hs, list(hs)[1:])]
    lines += ["", f"Classifier FD at iteration {iters}, each λ against the next, with z = difference / (√2 sd), sd = "
              f"{sd:.3g}, the standard deviation of λ = {control}'s FD over iterations 1-{iters} (one seed): "
              + "; ".join(z) + "."]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# The regimes on the 1-D Gaussian: solid, the mean over seeds; thin, each seed; dashed, gaussian.py's
# closed form where it has one. The numbers behind README's paragraph go to results/regimes-gaussian.md.

BURN_IN = 10  # iterations left out of stationary averages (with the real set, the loops contract by 1/2 per iteration)


def seed_runs(folder: str) -> list[list[dict]]:
    """The histories of a --seeds run folder, one per seed."""
    with open(os.path.join(folder, "seeds.json")) as f:
        seeds = json.load(f)["seeds"]
    return [history(os.path.join(folder, f"seed_{seed}")) for seed in seeds]


def per_seed(runs: list[list[dict]], value):
    """value(record) for every seed and iteration, as an array (seeds, iterations)."""
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
    return math.log(tau ** 2) + torch.special.digamma(torch.tensor((n - 1) / 2)).item() + math.log(2 / n)


def pools_figure(folder: str, results: str, sigma2: float, notes: list[str], pools: tuple, n: int) -> str:
    """Replace, accumulate, accumulate-subsample (folder/pool-POOL), fully synthetic with n samples per generation:
    log det Sigma_t and E[(mu_t - mu*)^2]."""
    plt, runs_of = _plt(), {pool: seed_runs(os.path.join(folder, f"pool-{pool}")) for pool in pools}
    seeds, last = len(runs_of[pools[0]]), len(runs_of[pools[0]][0]) - 1
    fig, (ax_det, ax_mu) = plt.subplots(1, 2, figsize=(11, 4.6))
    notes += [f"## Pools: fully synthetic (--lam inf), n = {n} per generation, {seeds} seeds, iteration {last}", ""]
    for pool, runs in runs_of.items():
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
                 f"pool.\n{seeds} seeds: solid = mean over seeds, thin = each seed; dashed = gaussian.py's closed form",
                 fontsize=10)
    return save(fig, os.path.join(results, "regimes-gaussian_pools.png"))


def real_data_figure(folder: str, results: str, sigma2: float, notes: list[str], reals: tuple, taus: tuple, n: int,
                     lam: float) -> str:
    """No, fixed or fresh real data (Alemohammad et al.'s three loops, folder/real-REAL-tauTAU) at each temperature
    in taus: n real points and lam * n samples."""
    plt = _plt()
    runs_of = {(real, tau): seed_runs(os.path.join(folder, f"real-{real}-tau{tau:g}"))
               for tau in taus for real in reals}
    seeds, last = len(runs_of[reals[0], taus[0]]), len(runs_of[reals[0], taus[0]][0]) - 1
    names = {"none": "none: fully synthetic loop", "fixed": "fixed: synthetic augmentation loop",
             "fresh": "fresh: fresh data loop"}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    notes += [f"## Real data: λ = {lam}, n = {n} real (+ {round(lam * n)} synthetic; none: {round(lam * n)} synthetic "
              f"alone), {seeds} seeds, {last} iterations; stationary = iterations {BURN_IN}..{last}", ""]
    for (ax_mu, ax_det, ax_zoom), tau in zip(axes, taus):
        for real in reals:
            runs = runs_of[real, tau]
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
        if tau == taus[0]:  # the same colours in the second row
            ax_mu.legend(fontsize=7, loc="center right")
            ax_zoom.legend(fontsize=7)
    notes.append("")
    fig.suptitle(f"1-D Gaussian (ML fit), λ = {lam}: n = {n} real points (none, the same, or new ones each iteration) plus "
                 f"{round(lam * n)} samples of N(μ_t, τ² s²_t) (temperature τ).\n{seeds} seeds: solid = mean over seeds, "
                 "thin = each seed; dashed = gaussian.py's closed form", fontsize=10)
    return save(fig, os.path.join(results, "regimes-gaussian_real-data.png"))


def curation_figure(folder: str, results: str, notes: list[str], lams: tuple, betas: tuple, n: int, k: int) -> str:
    """Curation by r(x) = beta x, one of k candidates kept by softmax(r), n kept (folder/curate-lamLAM-betaBETA):
    without real data (lam inf) and with the real set (lam 1), at each beta."""
    plt = _plt()
    runs_of = {(lam, beta): seed_runs(os.path.join(folder, f"curate-lam{lam}-beta{beta:g}")) for lam in lams
               for beta in betas}
    seeds, last = len(runs_of[lams[0], betas[0]]), len(runs_of[lams[0], betas[0]][0]) - 1
    fig, ((ax_free, ax_real), (ax_s2, ax_log)) = plt.subplots(2, 2, figsize=(11, 8))
    colors = {("inf", 0.2): "tab:blue", ("inf", 0.5): "tab:orange", ("1", 0.2): "tab:green", ("1", 0.5): "tab:red"}
    notes += [f"## Curation: K = {k}, r(x) = βx, n = {n} kept samples (+ n real with λ = 1), {seeds} seeds, "
              f"{last} iterations; stationary = iterations {BURN_IN}..{last}", ""]
    for lam in lams:
        for beta in betas:
            runs = runs_of[lam, beta]
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
                 f"{k}·n samples (its mean reward / β).\n{seeds} seeds: solid = mean over seeds, thin = each seed; "
                 "dashed = gaussian.py's closed form (K → ∞)", fontsize=10)
    return save(fig, os.path.join(results, "regimes-gaussian_curation.png"))


def regimes_gaussian_figures(folder: str, results: str, *, pools: tuple, pool_n: int, reals: tuple, taus: tuple,
                             mad_n: int, mad_lam: float, curate_lams: tuple, betas: tuple, curate_n: int,
                             curate_k: int) -> list[str]:
    """The three figures (the pools, the real-data loops, curation), and results/regimes-gaussian.md: each measured
    number beside its closed form."""
    sigma2 = gaussian.truth(1)[1].item()  # sigma*^2 of --data gaussian --dim 1
    notes = ["Measured (mean ± standard error over seeds) against gaussian.py's closed forms; "
             "written by `python reproduce.py regimes-gaussian`.", ""]
    made = [pools_figure(folder, results, sigma2, notes, pools, pool_n),
            real_data_figure(folder, results, sigma2, notes, reals, taus, mad_n, mad_lam),
            curation_figure(folder, results, notes, curate_lams, betas, curate_n, curate_k)]
    path = os.path.join(results, "regimes-gaussian.md")
    with open(path, "w") as f:
        f.write("\n".join(notes))
    return [*made, path]


def regimes_digits_figures(folder: str, results: str, *, model: str, pools: tuple, reals: tuple, taus: tuple,
                           curate_lams: tuple, mad_n: int, mad_lam: float, curate_k: int, curate_class: int,
                           start_iters: int) -> list[str]:
    """One figure of four panels (pools, real-data loops with mad_n real digits, curation toward curate_class,
    warm vs scratch over start_iters iterations) and results/regimes-digits.md with the numbers behind them;
    FD in the digits classifier's feature space, as in the digits stage."""
    plt = _plt()
    runs = {name: history(os.path.join(folder, name)) for name in
            [*(f"pool-{p}" for p in pools), "pool-accumulate-epochs", *(f"real-{r}-tau{t:g}" for t in taus for r in reals),
             *(f"curate-lam{lam}" for lam in curate_lams), "start-warm-lam1", "start-scratch-lam1",
             "start-scratch-laminf"]}
    with open(os.path.join(folder, "pool-replace", "config.json")) as f:
        floor = json.load(f)["noise_floor"]
    with open(os.path.join(folder, "real-fixed-tau1", "config.json")) as f:
        floor_mad = json.load(f)["noise_floor"]

    def its(name, key="fd", upto=None):
        h = [r for r in runs[name] if upto is None or r["iter"] <= upto]
        return [r["iter"] for r in h], [key(r) if callable(key) else r[key] for r in h]

    def share(r):  # the rewarded class's share of the samples
        return r["class_hist"][curate_class] / sum(r["class_hist"])

    fig, ((ax_pool, ax_mad), (ax_cur, ax_start)) = plt.subplots(2, 2, figsize=(11, 8.4))
    notes = [f"{model} (small preset) on the digits, seed 0; FD in the digits classifier's feature space. "
             "Written by `python reproduce.py regimes-digits`.", ""]
    for pool in [*pools, "accumulate-epochs"]:
        label = "accumulate --budget epochs" if pool == "accumulate-epochs" else pool
        ax_pool.plot(*its(f"pool-{pool}"), "s--" if pool == "accumulate-epochs" else "o-", ms=3, label=f"--pool {label}")
        h = runs[f"pool-{pool}"]
        notes.append(f"- fully synthetic, {label}: FD {h[0]['fd']:.2f} → {h[-1]['fd']:.2f} (iteration {h[-1]['iter']}), "
                     f"coverage {h[0]['coverage']:.2f} → {h[-1]['coverage']:.2f}, classes {h[-1]['classes']}, "
                     f"training set {h[-1]['n_synth']} samples, {sum(r.get('steps', 0) for r in h)} training steps")
    draw_floor(ax_pool, floor, "fd")
    ax_pool.set(xlabel="iteration", ylabel="FD", yscale="log", title="fully synthetic (λ = ∞): the synthetic pool")
    for tau, style in zip(taus, ("o-", "s--")):
        for real, color in zip(reals, ("tab:red", "tab:blue", "tab:green")):
            name = f"real-{real}-tau{tau:g}"
            ax_mad.plot(*its(name), style, ms=3, color=color, label=f"--real {real}, τ = {tau:g}")
            h = runs[name]
            notes.append(f"- n = {mad_n}, λ = {mad_lam}, --real {real}, τ = {tau:g}: FD {h[0]['fd']:.2f} → "
                         f"{h[-1]['fd']:.2f} (iteration {h[-1]['iter']}), precision {h[-1]['precision']:.2f}, "
                         f"recall {h[-1]['recall']:.2f}")
    draw_floor(ax_mad, floor_mad, "fd")
    ax_mad.set(xlabel="iteration", ylabel="FD", yscale="log",
               title=f"Alemohammad et al.'s loops: n = {mad_n} real, λ = {mad_lam}")
    for lam in curate_lams:
        name = f"curate-lam{lam}"
        ax_cur.plot(*its(name, share), "o-", ms=3, label=f"λ = {lam}: share of class {curate_class}")
        h = runs[name]
        notes.append(f"- curation, K = {curate_k}, r = log p(class {curate_class} | x), λ = {lam}: share of class "
                     f"{curate_class} {share(h[0]):.3f} → {share(h[-1]):.3f}, mean reward {h[0]['reward']:.2f} → "
                     f"{h[-1]['reward']:.2f}, classes {h[0]['classes']} → {h[-1]['classes']}, "
                     f"FD {h[0]['fd']:.2f} → {h[-1]['fd']:.2f} (iteration {h[-1]['iter']})")
    ax_cur.axhline(0.1, color="0.6", ls=":", lw=1, label="a tenth (the real digits' share)")
    ax_cur.set(xlabel="iteration", ylabel=f"share of class {curate_class} among the samples", ylim=(0, 1),
               title=f"curation: 1 of K = {curate_k} kept by softmax(log p(class {curate_class} | x))")
    for name, label, upto in (("pool-replace", "warm start, λ = ∞", start_iters),
                              ("start-scratch-laminf", "from scratch, λ = ∞", None),
                              ("start-warm-lam1", "warm start, λ = 1", None),
                              ("start-scratch-lam1", "from scratch, λ = 1", None)):
        ax_start.plot(*its(name, upto=upto), "o-" if "warm" in label else "s--", ms=3, label=label)
        h = [r for r in runs[name] if r["iter"] <= start_iters]
        notes.append(f"- {label}: FD {h[0]['fd']:.2f} → {h[-1]['fd']:.2f} (iteration {h[-1]['iter']}), "
                     f"{sum(r.get('steps', 0) for r in h)} training steps after iteration 0")
    draw_floor(ax_start, floor, "fd")
    ax_start.set(xlabel="iteration", ylabel="FD", yscale="log",
                 title="fine-tuning (warm) or the whole pretraining again (scratch)")
    for ax in (ax_pool, ax_mad, ax_cur, ax_start):
        ax.legend(fontsize=7)
    fig.suptitle(f"The self-consuming regimes on the 8x8 digits: {model}, small preset, seed 0; "
                 "FD in the digits classifier's feature space", fontsize=10)
    notes.append(f"- noise floor, two independent real sets of {floor['n_fake']} and {floor['n_ref']} digits: FD "
                 f"{floor['fd'][0]:.2f} ± {floor['fd'][1]:.2f} (the MAD loops' evaluation: {floor_mad['n_fake']} and "
                 f"{floor_mad['n_ref']}, FD {floor_mad['fd'][0]:.2f} ± {floor_mad['fd'][1]:.2f})")
    made = save(fig, os.path.join(results, "regimes-digits.png"))
    path = os.path.join(results, "regimes-digits.md")
    with open(path, "w") as f:
        f.write("\n".join(notes) + "\n")
    return [made, path]


