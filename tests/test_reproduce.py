"""reproduce.py: its commands parse (a dry run), a stage runs its jobs with their threads and logs and
records its time, a lambda job started from a pretrained iteration 0 gives the numbers of the same lambda
in one sweep, and each stage's figures are drawn from its run folders."""

import json
import math
import os
import shlex

import pytest

import regimes
import reproduce
import retrain
import settings


def test_dry_run_parses_every_command(capsys):
    assert reproduce.main(["all", "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    every = [job for stage in reproduce.STAGES.values() for job in stage]
    assert printed == [reproduce.command(job) for job in every]
    assert [shlex.split(line) for line in printed] == [["python", "retrain.py", *job.argv[1:]] for job in every]
    assert all(job.log == os.path.join(reproduce.RUNS, "logs", f"{job.name}.log") for job in every)
    assert sum("--model gaussian" in c for c in printed) == (1 + len(reproduce.COLLAPSE_N)
                                                            + len(reproduce.STAGES["regimes-gaussian"]))
    for m in reproduce.DIGITS_MODELS:
        assert (sum(f"--model {m} " in reproduce.command(job) for job in reproduce.STAGES["digits"])
                == 1 + len(reproduce.DIGITS_LAMS))
    names = [job.name for stage in reproduce.STAGES.values() for job in stage]
    assert len(set(names)) == len(names)  # one log file each
    jobs = {job.name: job for job in reproduce.STAGES["digits"]}
    for job in jobs.values():  # every lambda job finds its model's iterations 0 in the cache its pretrain job filled
        assert (job.after is None) == job.name.endswith("-pretrain")
        args = retrain.build_parser().parse_args(job.argv[1:])
        assert args.seeds == list(reproduce.DIGITS_SEEDS) and len(args.seeds) >= 3 and args.metrics == "auto"
        if job.after:
            first = retrain.build_parser().parse_args(jobs[job.after].argv[1:])
            assert args.cache == first.cache and args.model == first.model and args.seeds == first.seeds
            assert first.iters == 0 and args.iters == reproduce.DIGITS_ITERS and not args.init


def regime(args, real, whole):
    """retrain.py's regime for a parsed command, checked against its data as the run checks it."""
    lams = [settings.parse_lam(lam) for lam in args.lam]
    flags = {f: getattr(args, f) for f in regimes.FLAGS}
    return regimes.Regime(**flags).check(args.data, real, lams, args.iters, whole)


def test_regimes_gaussian_commands(capsys):
    """The stage's dry run parses its commands, and each passes retrain.py's regime checks on its data: every
    pool fully synthetic, every real-data loop at every temperature, curation without and with the real set at
    a beta on either side of gaussian.py's fixed-point threshold (C5) for the data's variance."""
    import gaussian

    assert reproduce.main(["regimes-gaussian", "--dry-run"]) == 0
    jobs = reproduce.STAGES["regimes-gaussian"]
    assert capsys.readouterr().out.strip().splitlines() == [reproduce.command(job) for job in jobs]
    parsed = [retrain.build_parser().parse_args(job.argv[1:]) for job in jobs]
    for args in parsed:
        real = gaussian.make_data(args.dim, args.n_real)
        regime(args, real, None)  # raises on a bad mix
        assert args.model == "gaussian" and args.dim == 1 and args.resume and len(args.seeds) >= 3
    assert len({args.out for args in parsed}) == len(parsed)
    pools = [a for a in parsed if a.pool != "replace" or (a.lam == ["inf"] and a.curate == 1)]
    loops = [a for a in parsed if a.lam == [str(reproduce.MAD_LAM)] and a.curate == 1]
    curated = [a for a in parsed if a.curate > 1]
    assert len(pools) + len(loops) + len(curated) == len(parsed)
    assert sorted(a.pool for a in pools) == sorted(reproduce.POOLS) and all(a.n_real == reproduce.POOL_N for a in pools)
    assert sorted((a.real, a.temperature) for a in loops) == sorted((r, t) for r in reproduce.REALS for t in reproduce.TAUS)
    assert {(a.lam[0], a.beta[0]) for a in curated} == {(lam, b) for lam in reproduce.CURATE_LAMS for b in reproduce.BETAS}
    assert all(a.reward == "linear" and a.curate == reproduce.CURATE_K for a in curated)
    v_real = gaussian.truth(1)[1].item()
    below, above = (gaussian.curated_real_fixed_point(1.0, b, v_real) for b in reproduce.BETAS)
    assert below is not None and above is None


def test_regimes_digits_commands(capsys):
    """The digits regimes parse and pass retrain.py's regime checks on the digits themselves (fresh data for every
    iteration, the class reward's classes); each group's runs share the iteration 0 its pretrain job caches."""
    import data

    assert reproduce.main(["regimes-digits", "--dry-run"]) == 0
    jobs = reproduce.STAGES["regimes-digits"]
    assert capsys.readouterr().out.strip().splitlines() == [reproduce.command(job) for job in jobs]
    digits = data.load_labelled("digits")
    real = digits[0]
    parsed = {job.name: retrain.build_parser().parse_args(job.argv[1:]) for job in jobs}
    for job in jobs:
        args = parsed[job.name]
        n = args.n_real or len(real)
        regime(args, real[:n], digits)
        assert args.model == reproduce.RD_MODEL and args.cache == parsed["rd-pretrain"].cache and args.resume
        if job.after:  # the same data and seed as the job that pretrained its iteration 0
            first = parsed[job.after]
            assert (args.n_real, args.seed, args.preset, args.overrides) == (first.n_real, first.seed, first.preset,
                                                                             first.overrides)
            assert first.iters == 0 and args.iters > 0
    assert {a.pool for a in parsed.values() if a.lam == ["inf"]} == set(reproduce.POOLS)
    loops = {(a.real, a.temperature) for a in parsed.values() if a.n_real == reproduce.RD_MAD_N and a.iters > 0}
    assert loops == {(r, t) for r in reproduce.REALS for t in reproduce.TAUS}
    assert {a.start for a in parsed.values()} == {"warm", "scratch"}
    assert {tuple(a.lam) for a in parsed.values() if a.curate > 1} == {("inf",), ("1",)}
    # every run uses one model: the small preset as it is, so that its iteration 0 is the digits stage's seed 0
    assert {(a.preset, tuple(a.overrides)) for a in parsed.values()} == {("small", ())}


def test_dry_run_rejects_a_broken_command(monkeypatch):
    bad = reproduce.retrain_job("bad", f"{reproduce.PY} --model gaussian --lamda 1")
    monkeypatch.setitem(reproduce.STAGES, "theory", [bad])
    with pytest.raises(retrain.UserError):
        reproduce.main(["theory", "--dry-run"])


FAKE = """import os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "threads.txt"), "w") as f:
    f.write(os.environ["OMP_NUM_THREADS"] + (" resumed" if "--resume" in sys.argv else ""))
print("ran", out)
sys.exit(3 if "--lam" in sys.argv else 0)
"""


def test_a_stage_runs_its_jobs_and_records_its_time(tmp_path, monkeypatch, capsys):
    """A made-up stage of two commands that parse as retrain.py's (the second waits for the first): each runs with
    the CPU cores shared out as OMP_NUM_THREADS (the user's, when set) and logs into RUNS/logs/NAME.log, with
    --resume only where its run is there already; the stage's figures are drawn and, with --record, its time
    written to times.json, marked resumed when its runs were there already. A failing job stops the stage with
    its exit code."""
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    monkeypatch.setattr(reproduce, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(reproduce, "RESULTS", str(tmp_path / "results"))
    stage = [reproduce.retrain_job("one", f"python {script} --resume --model gaussian --out {tmp_path}/one"),
             reproduce.retrain_job("two", f"python {script} --resume --model gaussian --out {tmp_path}/two", after="one")]
    monkeypatch.setattr(reproduce, "STAGES", {"theory": stage})
    monkeypatch.setattr(reproduce, "FIGURES", {"theory": lambda: ["results/made.png"]})
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for resumed in (False, True):
        assert reproduce.main(["theory", "--jobs", "2", "--record"]) == 0
        said = threads + (" resumed" if resumed else "")
        assert [(tmp_path / run / "threads.txt").read_text() for run in ("one", "two")] == [said, said]
        assert f"ran {tmp_path}/two" in (tmp_path / "runs" / "logs" / "two.log").read_text()
        times = json.load(open(tmp_path / "results" / "times.json"))["theory"]
        assert times["figures"] == ["results/made.png"] and times["jobs"] == 2 and times["threads"] == int(threads)
        assert times["resumed"] == resumed and times["seconds"] > 0
    out = capsys.readouterr().out
    assert "start one" in out and "done  two" in out and "theory: results/made.png" in out
    recorded = (tmp_path / "results" / "times.json").read_text()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert reproduce.main(["theory", "--jobs", "2"]) == 0  # without --record: times.json as it was
    assert (tmp_path / "results" / "times.json").read_text() == recorded
    assert (tmp_path / "one" / "threads.txt").read_text() == "3 resumed"
    stage.append(reproduce.retrain_job("three", f"python {script} --lam 1 --out {tmp_path}/three"))
    assert reproduce.main(["theory"]) == 3
    assert f"three stopped with exit code 3; see {tmp_path}/runs/logs/three.log" in capsys.readouterr().err


def test_lambda_job_from_iteration_0_equals_the_sweep(tmp_path, digits_cache):
    tiny = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", "48", "--no-progress",
            "--set", "batch=16", "--set", "sample_steps=3", "--set", "kimg=0.032", "--set", "pretrain_kimg=0.048",
            "--set", "sample_batch=16"]
    assert retrain.main([*tiny, "--lam", "0", "1", "--iters", "2", "--out", str(tmp_path / "sweep")]) == 0
    assert retrain.main([*tiny, "--lam", "0", "--iters", "0", "--out", str(tmp_path / "pre")]) == 0
    assert retrain.main([*tiny, "--lam", "1", "--iters", "2", "--init", str(tmp_path / "pre" / "iter0.pt"),
                         "--out", str(tmp_path / "one")]) == 0
    keys = ("iter", "n_real", "n_synth", "loss", "fd", "precision", "recall")
    sweep = [json.loads(l) for l in open(tmp_path / "sweep" / "lam_1" / "metrics.jsonl")]
    one = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
    assert len(one) == 3 and [{k: r.get(k) for k in keys} for r in one] == [{k: r.get(k) for k in keys} for r in sweep]
    # reproduce.py's way: the pretrain job fills a shared cache, the lambda job (another folder) starts from it
    cache = ["--cache", str(digits_cache)]
    assert retrain.main([*tiny, *cache, "--lam", "0", "--iters", "0", "--out", str(tmp_path / "pre2")]) == 0
    assert len(os.listdir(digits_cache)) == 2  # iteration 0 and the metrics' classifier
    assert retrain.main([*tiny, *cache, "--lam", "1", "--iters", "2", "--out", str(tmp_path / "two")]) == 0
    assert "cached in" in retrain.load_checkpoint(str(tmp_path / "two" / "iter0.pt"))["how"]  # not trained again
    two = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    assert [{k: r.get(k) for k in keys} for r in two] == [{k: r.get(k) for k in keys} for r in sweep]


# ----------------------------------------------------------------------------------------------------
# The figures and tables (figures.py, called as reproduce.FIGURES does), drawn from made-up runs


def _fake_run(folder, records, floor=None):
    """A finished run folder: metrics.jsonl, config.json and sample grids for every iteration."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"preset": "small", "features": "classifier", "noise_floor": floor or {}}, f)
    for r in records:
        Image.fromarray(np.full((8, 8), 10 * r["iter"], np.uint8)).save(os.path.join(folder, "samples", f"iter{r['iter']:03d}.png"))


def _record(it, fd, **kw):
    return {"iter": it, "fd": fd, "precision": 0.8, "recall": 0.9, "density": 1.0, "coverage": 0.85, "class_tv": 0.05,
            "classes": 10, "class_hist": [10] * 10, "pixel_fd": fd / 10, "pixel_precision": 0.8, "pixel_recall": 0.9,
            "train_fd": fd / 2, "nn_train_share": 0.5, "n_synth": 100, "steps": 100, **kw}


FLOOR = {"fd": [2.5, 0.5], "precision": [0.9, 0.01], "recall": [0.9, 0.01], "density": [1.0, 0.05],
         "coverage": [0.9, 0.02], "class_tv": [0.03, 0.007], "pixel_fd": [0.27, 0.05], "train_fd": [1.5, 0.3],
         "n_fake": 1198, "n_ref": 599, "n_half": 898, "splits": 20}


def test_digits_table_gives_mean_sd_over_seeds_and_tests_lambdas_paired_over_seeds(tmp_path, monkeypatch):
    """The table's mean ± sd over seeds; neighbouring lambdas compared on FD averaged over iterations 1-2 by a paired
    t-test: λ 0 vs 0.5 differ by 0.1 in every seed (t = 4, 2 degrees of freedom) though their spreads over seeds
    overlap; every seed's every metric in digits_seeds.csv."""
    import scipy.stats

    monkeypatch.setattr(reproduce, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(reproduce, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(reproduce, "DIGITS_ITERS", 2)
    os.makedirs(tmp_path / "results")
    last = {"0": [1.0, 2.0, 3.0], "0.5": [1.1, 2.1, 3.2], "1": [2.0, 2.1, 1.9], "inf": [5.0, 7.0, 6.0]}
    for m in reproduce.DIGITS_MODELS:
        for lam, fds in last.items():
            for seed, fd in zip(reproduce.DIGITS_SEEDS, fds):
                _fake_run(tmp_path / "runs" / f"digits-{m}" / f"lam_{lam}" / f"seed_{seed}",
                          [_record(0, 1.0), _record(1, (1 + fd) / 2), _record(2, fd)], FLOOR)
    made = reproduce.FIGURES["digits"]()
    assert all(os.path.exists(p) for p in made) and len(made) == 2 * len(reproduce.DIGITS_MODELS) + 2
    table = open(made[-2]).read()
    assert "| ddpm | inf | 1.00 ± 0.00 | 6.00 ± 1.00 | 3.00 ± 0.50 |" in table  # mean and sample sd; train FD
    # late FD = (1 + fd) / 4 + fd / 2: per-seed differences 0.075, 0.075, 0.15; mean 0.1, sd 0.0433
    half = scipy.stats.t.ppf(0.975, 2) * 0.0433013 / 3 ** 0.5
    p = 2 * scipy.stats.t.sf(0.1 / (0.0433013 / 3 ** 0.5), 2)
    assert f"ddpm λ 0 → 0.5: +0.10 [{0.1 - half:+.2f}, {0.1 + half:+.2f}], p = {p:.2g}" in table and f"{p:.2g}" == "0.057"
    assert "FD 2.50 ± 0.50" in table and "(1198 samples vs 599 test digits)" in table  # the noise floor
    rows = open(made[-1]).read().splitlines()
    assert rows[0].startswith("model,lam,seed,iter,fd,") and len(rows) == 1 + 3 * 4 * 3 * 3
    assert "ddpm,0.5,2,2,3.2," in open(made[-1]).read()


def test_real_images_table_compares_lambdas_with_the_control_s_spread(tmp_path, monkeypatch):
    """reproduce.py mnist's figures: the metrics, a sheet of 4 lambdas x (iteration 0, last), and the table: the floor
    row, the shared iteration 0, the middle and the last per lambda (Inception's numbers where measured), and each
    lambda's last FD against the next with z = difference / (sqrt 2 sd), sd that of lambda 0's FD over iterations
    1..last."""
    from PIL import Image

    monkeypatch.setattr(reproduce, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(reproduce, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(reproduce, "REAL_ITERS", 2)
    os.makedirs(tmp_path / "results")
    floor = {**FLOOR, "fid": [10.9, 0.4], "inception_precision": [0.7, 0.02], "inception_recall": [0.7, 0.02],
             "nn_train_share": [0.5, 0.016]}
    last = {"0": 1.2, "0.5": 1.4, "1": 1.4, "inf": 3.0}
    for lam, fd in last.items():
        _fake_run(tmp_path / "runs" / "mnist" / f"lam_{lam}",
                  [_record(0, 1.1, fid=20.0, inception_precision=0.6, inception_recall=0.5), _record(1, 1.0),
                   _record(2, fd, fid=10 * fd, inception_precision=0.6, inception_recall=0.5)])
    with open(tmp_path / "runs" / "mnist" / "config.json", "w") as f:
        json.dump({"model": "ddpm", "preset": "mnist", "n_real": 1000, "n_eval": 1000, "n_reference": 1000,
                   "noise_floor": floor}, f)
    made = reproduce.FIGURES["mnist"]()
    assert all(os.path.exists(p) for p in made) and len(made) == 3
    assert Image.open(made[1]).size == (2 * 8 + 8, 4 * (8 + 8))  # 4 rows of two 8x8 grids, 8 pixels apart
    table = open(made[2]).read()
    assert "| real vs real | (mean ± sd) | 10.9 ± 0.4 | 0.7 ± 0.02 | 0.7 ± 0.02 | 2.5 ± 0.5 |" in table and "| 0.5 ± 0.016 |" in table
    assert "| inf | 2 | 30 | 0.6 | 0.5 | 3 | 0.8 | 0.9 | 0.85 | 0.05 | 0.5 |" in table
    assert "| all | 0 | 20 | 0.6 | 0.5 | 1.1 |" in table and "| 0.5 | 0 |" not in table  # iteration 0 once
    assert "| 0.5 | 1 |  |  |  | 1 |" in table  # the middle iteration, without Inception's numbers there
    sd = math.sqrt(0.02)  # FDs 1.0 and 1.2 of lambda 0 at iterations 1 and 2
    assert f"sd = {sd:.3g}" in table and "λ 0 → 0.5: +0.2 (z = +1.0)" in table and "λ 0.5 → 1: +0 (z = +0.0)" in table
    assert f"λ 1 → inf: +1.6 (z = {1.6 / (math.sqrt(2) * sd):+.1f})" in table


def test_regimes_digits_figure_and_notes(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "DIGITS_REGIMES", str(tmp_path / "rd"))
    monkeypatch.setattr(reproduce, "RESULTS", str(tmp_path / "results"))
    os.makedirs(tmp_path / "results")
    for job in reproduce.STAGES["regimes-digits"]:
        name = job.name.removeprefix("rd-")
        hist = [10] * 10
        records = []
        for it in range(4):
            if name.startswith("curate"):  # the rewarded class takes over: 10% -> 37% of 100 samples
                hist = [10 + 9 * it] + [10 - it] * 9
            records.append(_record(it, 1.0 + it, class_hist=hist, reward=-2.0 + it / 2))
        _fake_run(tmp_path / "rd" / name, records, FLOOR)
    figure, notes = reproduce.FIGURES["regimes-digits"]()
    assert os.path.exists(figure)
    text = open(notes).read()
    assert "λ = inf: share of class 0 0.100 → 0.370, mean reward -2.00 → -0.50" in text
    assert "fully synthetic, accumulate: FD 1.00 → 4.00 (iteration 3)" in text
    assert "fully synthetic, accumulate --budget epochs: FD 1.00 → 4.00 (iteration 3)" in text
    assert "noise floor, two independent real sets of 1198 and 599 digits: FD 2.50 ± 0.50" in text


def test_regimes_gaussian_figures_and_notes(tmp_path, monkeypatch):
    """Every regimes-gaussian job as 3 seeds of 25 iterations, s2 = 1 throughout: the notes give the runs' seeds and
    iterations, and the closed forms that do not depend on the data (the bound of accumulate; curation with the
    real set: a fixed point at the lower beta, none at the higher)."""
    import gaussian

    monkeypatch.setattr(reproduce, "REGIMES", str(tmp_path / "rg"))
    monkeypatch.setattr(reproduce, "RESULTS", str(tmp_path / "results"))
    os.makedirs(tmp_path / "results")
    for job in reproduce.STAGES["regimes-gaussian"]:
        folder = tmp_path / "rg" / job.name.removeprefix("gauss-")
        for seed in range(3):
            os.makedirs(folder / f"seed_{seed}")
            (folder / f"seed_{seed}" / "metrics.jsonl").write_text("".join(
                json.dumps({"iter": it, "logdet": 0.0, "mean_err": 0.1 * (seed + 1), "reward": 0.1 * it}) + "\n"
                for it in range(26)))
        (folder / "seeds.json").write_text(json.dumps({"seeds": [0, 1, 2]}))
    *figs, notes = reproduce.FIGURES["regimes-gaussian"]()
    assert len(figs) == 3 and all(os.path.exists(f) for f in figs)
    text = open(notes).read()
    n, sigma2 = reproduce.POOL_N, gaussian.truth(1)[1].item()
    assert f"n = {n} per generation, 3 seeds, iteration 25" in text
    assert f"E[s²_0]/n = {sigma2 / n + math.pi ** 2 / 6 * sigma2 * (n - 1) / n / n:.4g}" in text
    assert "3 seeds, 25 iterations; stationary = iterations 10..25" in text
    low, high = reproduce.BETAS
    assert f"λ = 1, β = {low:g} (4λ(1+λ)β²v_R = {8 * low ** 2:.3f} ≤ 1): stationary μ − μ_0" in text
    assert f"λ = 1, β = {high:g} (4λ(1+λ)β²v_R = {8 * high ** 2:.3f} > 1, no fixed point)" in text
