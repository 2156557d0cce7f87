"""The retraining loop (retrain.py) on the one model whose answer is known in closed form: a Gaussian
fitted by maximum likelihood (gaussian.py), plus the loop's bookkeeping: counts, resume, bad input."""

import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import gaussian
import retrain
import settings
import training

REPO = Path(__file__).resolve().parents[1]


def run(out, *argv):
    return retrain.main([*map(str, argv), "--out", str(out), "--no-progress"])


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def folder_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# Theory


@pytest.mark.parametrize("key,perturb", [("mean_err", "init_mean_shift=5"), ("cov_err", "init_cov_scale=10")])
def test_error_contracts_by_lam_over_one_plus_lam(tmp_path, key, perturb):
    """Well-specified model, large n: ||theta_t - theta*|| shrinks by lam / (1 + lam) per iteration.

    The mean and the covariance are perturbed in separate runs: the ML covariance of a real/synthetic
    mixture whose means differ holds a between-group term quadratic in the mean error, which the
    linear (local) argument of Theorem 1 leaves out."""
    out = tmp_path / "sweep"
    assert run(out, "--model", "gaussian", "--data", "gaussian", "--n-real", 50_000, "--lam", 0.5, 1, 2,
               "--iters", 3, "--n-eval", 200, "--set", perturb) == 0
    first = None
    for lam in (0.5, 1, 2):
        h = metrics(out / f"lam_{lam:g}" / "metrics.jsonl")
        assert [r["iter"] for r in h] == [0, 1, 2, 3]
        first = first or h[0]
        assert h[0] == {**first, "lam": lam}  # iteration 0 is shared by every lambda
        rho = lam / (1 + lam)
        for t in (1, 2, 3):
            ratio = h[t][key] / h[t - 1][key]
            assert abs(ratio - rho) < 0.1 * rho, (lam, t, ratio, rho)
    assert (out / "metrics.png").stat().st_size > 1000  # the comparison plot


def test_fully_synthetic_collapses_and_real_data_prevents_it(tmp_path):
    """n = 20 in 2-D: log det Sigma_t falls by several units without real data, stays near log det Sigma* with lam = 1."""
    out = tmp_path / "collapse"
    assert run(out, "--model", "gaussian", "--data", "gaussian", "--n-real", 20, "--lam", "inf", 1,
               "--iters", 300, "--seed", 3) == 0
    logdet_star = torch.linalg.slogdet(gaussian.truth(2)[1])[1].item()
    synth = [r["logdet"] for r in metrics(out / "lam_inf" / "metrics.jsonl")]
    mixed = [r["logdet"] for r in metrics(out / "lam_1" / "metrics.jsonl")]
    assert len(synth) == len(mixed) == 301
    assert synth[-1] < synth[0] - 5
    assert np.mean(synth[-50:]) < np.mean(synth[:50]) - 5
    assert max(abs(v - logdet_star) for v in mixed) < 1.5


# ----------------------------------------------------------------------------------------------------
# The counts: n real + round(lam n) synthetic, the synthetic ones from the previous model


@pytest.mark.parametrize("lam", ["0.5", "inf"])
def test_each_iteration_trains_on_real_plus_previous_samples(tmp_path, monkeypatch, lam):
    fits, gens = [], []
    fit, generate = gaussian.Model.fit, gaussian.Model.generate
    monkeypatch.setattr(gaussian.Model, "fit", lambda self, x: (fits.append(x.clone()), fit(self, x))[1])
    monkeypatch.setattr(gaussian.Model, "generate", lambda self, s: gens.append((len(fits), generate(self, s))) or gens[-1][1])
    n = 41
    assert run(tmp_path / "counts", "--model", "gaussian", "--data", "gaussian", "--n-real", n, "--lam", lam,
               "--iters", 3, "--set", "sample_batch=7") == 0
    real = gaussian.make_data(2, n, seed=0)
    n_synth = n if lam == "inf" else round(0.5 * n)
    assert len(fits) == 4 and torch.equal(fits[0], real)  # iteration 0 fits the real data
    for t in (1, 2, 3):
        # the samples generated right after fit t-1, in seed order, chunk by chunk
        previous = torch.cat([x for k, x in gens if k == t])
        expect = previous[:n_synth] if lam == "inf" else torch.cat([real, previous[:n_synth]])
        assert torch.equal(fits[t], expect)
    for r in metrics(tmp_path / "counts" / "metrics.jsonl")[1:]:
        assert (r["n_real"], r["n_synth"]) == ((0, n) if lam == "inf" else (n, n_synth))


def test_samples_depend_only_on_their_seed(tmp_path):
    m = gaussian.Model(gaussian.make_config("small"))
    m.fit(gaussian.make_data(2, 100))
    a = training.sample(m, 50, seed=1, it=4, chunk=7, is_image=False, progress=False)
    b = training.sample(m, 20, seed=1, it=4, chunk=20, is_image=False, progress=False)
    assert torch.equal(a[:20], b)
    assert not torch.equal(a[:20], training.sample(m, 20, seed=1, it=5, chunk=20, is_image=False, progress=False))


def test_initial_weights_follow_the_seed(tmp_path):
    """The network is built after seeding from --seed: the same seed gives the same iteration 0 even in one
    process whose global random state has moved on; another seed gives another one."""
    tiny = ["--model", "otcfm", "--preset", "small", "--data", "digits", "--n-real", "32", "--iters", "0",
            "--metrics", "pixel", "--set", "batch=8", "--set", "steps=2", "--set", "pretrain_kimg=0.008"]
    states = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        torch.rand(7)  # move the global random state between runs
        assert run(tmp_path / name, *tiny, "--seed", seed) == 0
        states[name] = retrain.load_checkpoint(str(tmp_path / name / "iter0.pt"))["state"]["net"]
    assert all(torch.equal(states["a"][k], states["b"][k]) for k in states["a"])
    assert not all(torch.equal(states["a"][k], states["c"][k]) for k in states["a"])


def test_uint8_quantization_matches_png_rounding():
    x = torch.tensor([-1.0, -0.99, 0.0, 0.5, 1.0, 1.3, -2.0])
    expect = torch.tensor([0, 1, 128, 191, 255, 255, 0], dtype=torch.uint8)  # round(127.5 x + 127.5), clipped
    assert torch.equal(training.to_uint8(x), expect)


# ----------------------------------------------------------------------------------------------------
# An SGD model through the generic training loop: batches, kimg, non-finite losses


class MeanModel:
    """A toy SGD model: learns the mean image; samples are that mean plus seeded noise."""

    def __init__(self, cfg, device="cpu"):
        self.cfg, self.mean, self.step, self.nfe, self.batches = cfg, torch.zeros(cfg.img_channels, cfg.img_resolution, cfg.img_resolution), 0, 1, []

    def train_step(self, x):
        self.batches.append(x.clone())
        self.step += 1
        self.mean += 0.5 * (x.mean(0) - self.mean)
        loss = (x - self.mean).pow(2).mean()  # a 0-dim tensor, as the models return it
        return torch.full_like(loss, float("nan")) if self.step == self.cfg.nan_at else loss

    def generate(self, seeds):
        z = torch.stack([torch.randn(self.mean.shape, generator=torch.Generator().manual_seed(s)) for s in seeds.tolist()])
        return (self.mean + 0.1 * z).clamp(-1, 1)

    def state_dict(self):
        return {"mean": self.mean.clone(), "step": self.step}

    def load_state_dict(self, d):
        self.mean, self.step = d["mean"].clone(), d["step"]


def mean_module():
    from dataclasses import dataclass

    @dataclass
    class Config:
        img_channels: int = 1
        img_resolution: int = 8
        batch: int = 16
        xflip: bool = True
        pretrain_kimg: float = 0.16
        kimg: float = 0.08
        sample_batch: int = 100
        nan_at: int = -1

    mod = types.ModuleType("meanmodel")
    mod.Config, mod.Model, mod.PRESETS, mod.OFFICIAL_URLS = Config, MeanModel, {"small": {}, "paper": {}}, {}
    mod.make_config = lambda preset, **kw: Config(**kw)
    return mod


@pytest.fixture
def meanmodel(monkeypatch):
    monkeypatch.setitem(sys.modules, "meanmodel", mean_module())
    monkeypatch.setattr(retrain, "MODELS", retrain.MODELS + ("meanmodel",))


def test_training_budget_batches_and_flips(tmp_path, meanmodel):
    real = data.load_images("digits", n=50)
    mod = sys.modules["meanmodel"]
    m = MeanModel(mod.Config())
    stats = training.train(m, real, 0.16, m.cfg, seed=0, it=1, progress=False, desc="")
    assert stats["steps"] == len(m.batches) == 10  # 160 images / batch 16
    seen = torch.cat(m.batches)
    assert seen.shape == (160, 1, 8, 8) and seen.min() >= -1 and seen.max() <= 1
    as_u8 = training.to_uint8(seen)
    flipped = sum(not any(torch.equal(img, r) for r in real) for img in as_u8)
    assert all(any(torch.equal(img, r) or torch.equal(img.flip(2), r) for r in real) for img in as_u8)
    assert 40 < flipped < 120  # about half the images are mirrored (some digits are symmetric)
    # 160 = 3 epochs of 50 + 10: the first 150 draws cover each image exactly 3 times
    counts = {}
    for img in as_u8[:150]:
        k = next(i for i, r in enumerate(real) if torch.equal(img, r) or torch.equal(img.flip(2), r))
        counts[k] = counts.get(k, 0) + 1
    assert len(counts) >= 45 and max(counts.values()) <= 4


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, meanmodel, capsys):
    out = tmp_path / "nan"
    # pretraining takes 10 steps, each iteration 5: step 23 is in iteration 3
    code = run(out, "--model", "meanmodel", "--data", "digits", "--n-real", 50, "--lam", 1, "--iters", 5,
               "--set", "nan_at=23", "--metrics", "pixel")
    assert code != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("retrain.py: error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0] and "Traceback" not in err
    assert [r["iter"] for r in metrics(out / "metrics.jsonl")] == [0, 1, 2]
    assert retrain.load_checkpoint(str(out / "ckpt.pt"))["iter"] == 2


def test_meanmodel_resume_in_process_equals_uninterrupted(tmp_path, meanmodel):
    common = ["--model", "meanmodel", "--data", "digits", "--n-real", 60, "--lam", 0.5, "--metrics", "pixel"]
    assert run(tmp_path / "a", *common, "--iters", 4) == 0
    assert run(tmp_path / "b", *common, "--iters", 2) == 0
    ckpt = retrain.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert ckpt["history"] == (tmp_path / "b" / "metrics.jsonl").read_text()  # one string, not 100s of objects
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # c: its checkpoint as older versions wrote it, a list of records
    torch.save({**ckpt, "history": metrics(tmp_path / "b" / "metrics.jsonl")}, tmp_path / "c" / "ckpt.pt")
    for run_dir in ("b", "c"):
        assert run(tmp_path / run_dir, *common, "--iters", 4, "--resume") == 0
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert len(metrics(tmp_path / "a" / "metrics.jsonl")) == 5
    for run_dir in ("b", "c"):
        assert strip(metrics(tmp_path / "a" / "metrics.jsonl")) == strip(metrics(tmp_path / run_dir / "metrics.jsonl"))
    assert (tmp_path / "b" / "samples" / "iter004.png").exists() and (tmp_path / "b" / "metrics.png").exists()


# ----------------------------------------------------------------------------------------------------
# Resume after kill -9


def test_a_batch_that_does_not_divide_among_processes_is_refused():
    """Under torchrun each process trains on batch / world images a step: 8 on 3 processes would train on 6."""
    args = retrain.build_parser().parse_args(["--model", "edm", "--preset", "small", "--set", "batch=8"])
    with pytest.raises(retrain.UserError, match="batch 8 does not divide among 3 processes"):
        settings.resolve(args, 3, torch.device("cpu"))
    assert settings.resolve(args, 4, torch.device("cpu")).cfg.batch == 8


def test_no_progress_bars_when_the_output_is_not_a_terminal(tmp_path, capsys):
    """Sent to a file or a pipe, the output holds the result lines only: no progress bar glued to them."""
    argv = ["--model", "gaussian", "--data", "gaussian", "--n-real", "30", "--lam", "1", "--iters", "2"]
    assert retrain.main([*argv, "--out", str(tmp_path / "r")]) == 0  # capsys: stdout and stderr are not terminals
    out = capsys.readouterr()
    assert "sample it" not in out.err + out.out and "iter   2 lam    1" in out.out


def test_a_run_folder_describes_itself_and_resume_needs_only_the_folder(tmp_path, capsys):
    """config.json holds the command line that makes the run; `--resume --out RUN` alone continues it, --iters extends
    it, a finished run says so, a conflicting flag is named in one line, and a missing RUN is an error."""
    out = str(tmp_path / "r")
    argv = ["--model", "gaussian", "--data", "gaussian", "--n-real", "30", "--lam", "0.5", "--iters", "1",
            "--pool", "accumulate", "--set", "init_mean_shift=1", "--out", out, "--no-progress"]
    assert retrain.main(argv) == 0
    command = json.load(open(tmp_path / "r" / "config.json"))["command"]
    again = retrain.build_parser().parse_args(shlex.split(command)[2:])
    assert vars(again) == vars(retrain.build_parser().parse_args(argv))
    capsys.readouterr()
    assert retrain.main(["--resume", "--out", out, "--no-progress"]) == 0
    assert "lam 0.5: complete, iterations 0 to 1; --resume with --iters above 1 extends it" in capsys.readouterr().out
    assert retrain.main(["--resume", "--out", out, "--iters", "3", "--no-progress"]) == 0
    h = metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["iter"] for r in h] == [0, 1, 2, 3] and h[3]["n_synth"] == 3 * 15  # accumulate kept from the command
    assert retrain.main(["--resume", "--out", out, "--n-real", "40", "--set", "init_mean_shift=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_real 30 there, 40 now" in err[0] and "model_config.init_mean_shift 1.0 there, 2.0 now" in err[0]
    assert retrain.main(["--resume", "--out", str(tmp_path / "typo"), "--model", "gaussian"]) == 2
    assert "no run in" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_resume_after_kill_gives_identical_metrics(tmp_path):
    """A run killed (SIGKILL) midway, then resumed, ends with the records of a run never interrupted. The killed
    run is a process of its own; the resumed and the uninterrupted ones run here, on one thread as it did."""
    argv = ["--model", "gaussian", "--data", "gaussian", "--n-real", "100", "--lam", "1", "--iters", "60", "--seed", "5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(REPO / "retrain.py"), *argv, "--no-progress", "--out", str(killed)],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        mj = killed / "metrics.jsonl"
        if mj.exists() and len(mj.read_text().splitlines()) >= 15:
            break
        time.sleep(0.02)
    p.kill()  # SIGKILL: no cleanup
    p.wait()
    done = len(metrics(killed / "metrics.jsonl"))
    assert 15 <= done < 61, "the run should have been killed midway"
    assert run(killed, *argv, "--resume") == 0  # in-process runs keep the test's one thread (conftest.py)
    assert run(tmp_path / "full", *argv) == 0
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    a, b = strip(metrics(killed / "metrics.jsonl")), strip(metrics(tmp_path / "full" / "metrics.jsonl"))
    assert len(a) == len(b) == 61 and a == b


def test_pretraining_killed_midway_goes_on_from_its_snapshot(tmp_path, capsys):
    """Iteration 0's pretraining, killed (SIGKILL) after a snapshot, goes on from it with --resume --out alone and
    ends with the records of a run never interrupted; the snapshot is removed once iteration 0 is whole."""
    argv = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", "48", "--set", "batch=16",
            "--set", "hid_channels=16", "--set", "sample_steps=2", "--set", "pretrain_kimg=6.4", "--set", "kimg=0.032",
            "--lam", "1", "--iters", "1", "--metrics", "pixel", "--no-cache", "--save-every", "0.0001"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(REPO / "retrain.py"), *argv, "--no-progress", "--out", str(killed)],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "pretrain.pt").exists():
        time.sleep(0.02)
    time.sleep(0.3)  # a few windows later: not the very first snapshot
    p.kill()
    p.wait()
    assert (killed / "pretrain.pt").exists() and not (killed / "iter0.pt").exists(), "killed in pretraining"
    capsys.readouterr()
    assert run(killed, "--resume") == 0
    said = capsys.readouterr().out
    assert "training: going on from the snapshot after step" in said and not (killed / "pretrain.pt").exists()
    assert run(tmp_path / "full", *argv) == 0
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    a, b = strip(metrics(killed / "metrics.jsonl")), strip(metrics(tmp_path / "full" / "metrics.jsonl"))
    assert len(a) == 2 and a == b
    assert retrain.load_checkpoint(str(killed / "iter0.pt"))["how"] == retrain.load_checkpoint(
        str(tmp_path / "full" / "iter0.pt"))["how"]  # the pretraining loss over all 400 steps


def test_lambdas_side_by_side_equal_one_after_another(tmp_path, capsys, digits_cache):
    """--lam-jobs 2: after iteration 0 each lambda runs in its own process (one thread each here, as the sequential
    sweep): the same records, bit for bit, and the comparison plot; the children's iteration lines are relayed.
    A regime flag and a --set travel to the children (rebuilt from the parsed arguments)."""
    tiny = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", "48", "--no-progress",
            "--set", "batch=16", "--set", "sample_steps=3", "--set", "kimg=0.032", "--set", "pretrain_kimg=0.048",
            "--set", "sample_batch=16", "--pool", "accumulate", "--lam", "0.5", "inf", "--iters", "2"]
    threads = torch.get_num_threads()
    try:  # --threads sets torch's threads for this process: the tests after this one keep theirs
        assert retrain.main([*tiny, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
        capsys.readouterr()
        assert retrain.main([*tiny, "--threads", "2", "--lam-jobs", "2", "--out", str(tmp_path / "two")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "side by side, 2 at a time with 1 thread each" in out
    assert "iter   2 lam  inf" in out and "iter   2 lam  0.5" in out  # relayed from the children's logs
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    for lam in ("0.5", "inf"):
        a, b = (metrics(tmp_path / run / f"lam_{lam}" / "metrics.jsonl") for run in ("one", "two"))
        assert len(a) == 3 and strip(a) == strip(b)
        assert b[2]["n_synth"] == 2 * b[1]["n_synth"]  # accumulate reached the children
        assert (tmp_path / "two" / f"lam_{lam}" / "log.txt").exists()
    assert (tmp_path / "two" / "metrics.png").exists()
    assert not (tmp_path / "two" / "cache").exists()  # the children share the sweep's cache folder


def test_lam_jobs_default_and_limits():
    parse = retrain.build_parser().parse_args
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert retrain.lam_jobs(parse([]), [0.0, 1.0, math.inf], cpu, 1, "classifier") == 2  # one per thread
        assert retrain.lam_jobs(parse(["--lam-jobs", "5"]), [0.0, 1.0], cpu, 1, "pixel") == 2  # one per lambda
        assert retrain.lam_jobs(parse([]), [1.0], cpu, 1, "pixel") == 1
        assert retrain.lam_jobs(parse([]), [0.0, 1.0], cpu, 2, "pixel") == 1  # under torchrun
        assert retrain.lam_jobs(parse([]), [0.0, 1.0], cpu, 1, "inception") == 1
        other = parse([])
        other.model = "meanmodel"  # a model registered in-process: a child process's command line would refuse it
        assert retrain.lam_jobs(other, [0.0, 1.0], cpu, 1, "pixel") == 1
    finally:
        torch.set_num_threads(threads)


def test_child_command_line_keeps_what_the_user_gave():
    args = retrain.build_parser().parse_args(["--model", "edm", "--lam", "0", "1", "--set", "lr=1e-3", "--set", "batch=8",
                                              "--beta", "0.5", "2", "--no-cache", "--seed", "3", "--threads", "4",
                                              "--out", "x", "--lam-jobs", "2"])
    argv = retrain.child_argv(args, 1.0, "x/lam_1", 2, "cache")
    again = retrain.build_parser().parse_args(argv)
    assert again.model == "edm" and again.overrides == ["lr=1e-3", "batch=8"] and again.beta == [0.5, 2.0]
    assert again.no_cache and again.seed == 3 and again.threads == 2 and again.lam == ["1"] and again.out == "x/lam_1"
    assert again.resume and again.cache == "cache" and again.lam_jobs is None and again.seeds is None


# ----------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback, the run folder as it was


@pytest.fixture
def existing_run(tmp_path):
    out = tmp_path / "existing"
    assert run(out, "--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 1, "--iters", 2) == 0
    return out


def mixed_folder(tmp_path) -> str:
    from PIL import Image

    d = tmp_path / "mixed"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    Image.new("RGB", (16, 16)).save(d / "b.png")
    return str(d)


def foreign_checkpoint(tmp_path) -> str:
    path = tmp_path / "edm.pt"
    torch.save({"format": retrain.CKPT_FORMAT, "model": "edm", "state": {}}, path)
    return str(path)


def other_size_checkpoint(tmp_path) -> str:
    m = gaussian.Model(gaussian.make_config("small", dim=3))
    path = tmp_path / "dim3.pt"
    torch.save({"format": retrain.CKPT_FORMAT, "model": "gaussian", "state": m.state_dict()}, path)
    return str(path)


BAD = {
    "negative lam": (["--lam", "-1"], "lam"),
    "non-numeric lam": (["--lam", "abc"], "not a number"),
    "negative iters": (["--iters", "-2"], "iters"),
    "unknown model": (["--model", "gan"], "gan"),
    "missing data": (["--data", "/no/such/folder"], "not found"),
    "mixed sizes": (["--data", mixed_folder], "mixed sizes"),
    "checkpoint of another model": (["--force", "--init", foreign_checkpoint], "edm"),
    "checkpoint of another size": (["--force", "--init", other_size_checkpoint], "3-d"),
    "existing folder without --resume": ([], "--resume"),
    "resume with other settings": (["--resume", "--n-real", "40"], "n_real"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_and_folder_untouched(tmp_path, existing_run, capsys, case):
    extra, needle = BAD[case]
    extra = [e(tmp_path) if callable(e) else e for e in extra]
    before = folder_digest(existing_run)
    capsys.readouterr()
    argv = ["--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 1, "--iters", 2]
    code = run(existing_run, *argv, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("retrain.py: error:") and needle in err[0], err
    assert folder_digest(existing_run) == before


BAD_IMAGES = {  # checked before the run starts, whatever the model: the folder given with --force is kept
    "non-positive kimg": (["--kimg", "-1"], "--kimg -1"),
    "more real images than the data holds": (["--n-real", "99999"], "holds 1198 images"),
    "no samples evaluated": (["--n-eval", "0"], "--n-eval 0"),
    "a reference larger than the test split": (["--n-ref", "700"], "--n-ref 700: the test split of 'digits' holds 599"),
    "batch 0": (["--set", "batch=0"], "batch 0"),
    "negative learning rate": (["--set", "lr=-1"], "lr -1.0: must be > 0"),
    "dropout of 1.5": (["--set", "drop_rate=1.5"], "drop_rate 1.5: must be in [0, 1)"),
}


@pytest.mark.parametrize("name", ["ddpm", "edm", "otcfm", "gaussian"])
def test_every_preset_is_in_range_and_a_number_out_of_range_is_named(name):
    """Each model's make_config checks the range of every number in its RANGES: every preset passes; a value
    just outside the range (0 for "> 0", -1 for ">= 0", 1 or 1.5 for a fraction, nan for any) is refused."""
    module = __import__(name)
    for preset in module.PRESETS:
        module.make_config(preset)
    outside = {"> 0": 0, ">= 0": -1, "in [0, 1)": 1, "in [0, 1]": 1.5}
    for field, rule in module.RANGES.items():
        for value in (outside[rule], float("nan")):
            with pytest.raises(ValueError, match=f"^{field} {value!r}: must be {re.escape(rule)}$"):
                module.make_config("small", **{field: value})


@pytest.mark.parametrize("model, data_flag, device, want", [
    ("ddpm", "mnist", "cpu", ("mnist", "mnist")), ("otcfm", "fashion-mnist", "cpu", ("mnist", "fashion-mnist")),
    ("edm", "mnist", "cuda", ("mnist", "mnist")), ("ddpm", "digits", "cuda", ("small", "digits")),
    ("edm", "cifar10", "cpu", ("small", "cifar10")), ("ddpm", None, "cpu", ("small", "digits")),
    ("ddpm", None, "cuda", ("paper", "cifar10")), ("ddpm", "some/folder", "cpu", ("small", "some/folder")),
    ("ddpm", "some/folder", "cuda", ("paper", "some/folder")), ("gaussian", None, "cpu", ("small", "gaussian"))])
def test_preset_auto_takes_the_one_built_for_the_data(model, data_flag, device, want, capsys):
    """--preset auto: the preset of a named dataset on every device (MNIST and Fashion-MNIST: mnist); other data, or
    none, by the device; an explicit --preset stays."""
    argv = ["--model", model] + (["--data", data_flag] if data_flag else [])
    args = retrain.build_parser().parse_args(argv)
    assert settings.choose_preset(args, torch.device(device)) == want
    assert f"--preset auto -> '{want[0]}' on {want[1]}" in capsys.readouterr().out
    args = retrain.build_parser().parse_args(argv + ["--preset", "paper"])
    assert settings.choose_preset(args, torch.device(device))[0] == "paper"


@pytest.mark.parametrize("name", ["ddpm", "edm", "otcfm"])
def test_the_mnist_preset_trains_and_samples_32x32_greyscale(name):
    """Each model's mnist preset: 32 x 32 x 1, no flips; two training steps (EDM's learning rate ramps up from 0)
    give finite losses and move the weights; generate gives (N, 1, 32, 32) in [-1, 1]."""
    module = __import__(name)
    cfg = module.make_config("mnist", sample_batch=2, **{k: 2 for k in ("sample_steps", "num_steps", "steps")
                                                         if hasattr(module.Config, k)})
    assert (cfg.img_channels, cfg.img_resolution, cfg.xflip, cfg.batch) == (1, 32, False, 64)
    torch.manual_seed(0)
    model = module.Model(cfg, "cpu")
    before = [p.detach().clone() for p in model.net.parameters()]
    losses = [model.train_step(torch.rand(4, 1, 32, 32) * 2 - 1) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses) and any(not torch.equal(a, b) for a, b in zip(before, model.net.parameters()))
    x = model.generate(torch.arange(3))
    assert x.shape == (3, 1, 32, 32) and x.abs().max() <= 1 and torch.isfinite(x).all()


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_settings_one_line_and_the_forced_folder_kept(tmp_path, existing_run, capsys, case):
    extra, needle = BAD_IMAGES[case]
    before = folder_digest(existing_run)
    capsys.readouterr()
    code = run(existing_run, "--model", "ddpm", "--data", "digits", "--force", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("retrain.py: error:") and needle in err[0], err
    assert folder_digest(existing_run) == before


def test_force_puts_the_old_run_back_when_the_new_one_fails(tmp_path, existing_run, capsys):
    """--force moves the old run aside; a new run that fails before its iteration 0 (here: metrics that need
    labels, on unlabelled vectors) puts it back; one that gets there replaces it."""
    argv = ["--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 1, "--force"]
    before = folder_digest(existing_run)
    assert run(existing_run, *argv, "--iters", 2, "--metrics", "classifier") == 2
    assert "labelled" in capsys.readouterr().err
    assert folder_digest(existing_run) == before and not (tmp_path / "existing.replaced").exists()
    assert run(existing_run, *argv, "--iters", 1) == 0
    assert len(metrics(existing_run / "metrics.jsonl")) == 2 and not (tmp_path / "existing.replaced").exists()


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(obj, path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(retrain, "save_atomic", refuse)
    assert run(tmp_path / "r", "--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--iters", 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "config.json" in err[0] and "Permission denied" in err[0]


def test_the_run_ends_with_a_summary_and_where_its_files_are(tmp_path, capsys):
    assert run(tmp_path / "r", "--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 0, "inf",
               "--iters", 2) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    h = {lam: metrics(tmp_path / "r" / f"lam_{lam}" / "metrics.jsonl") for lam in ("0", "inf")}
    assert lines[-4].startswith("retrain.py: done in") and "iteration 0 -> 2" in lines[-4]
    for line, lam in zip(lines[-3:-1], ("0", "inf")):
        assert line.split(":")[0].split() == ["lam", lam]
        assert f"fd {h[lam][0]['fd']:.4g} -> {h[lam][2]['fd']:.4g}" in line
    assert f"{tmp_path / 'r'}/: metrics.png" in lines[-1] and "lam_*/metrics.jsonl" in lines[-1]


def test_set_reads_tuples_as_json_and_says_so_when_it_cannot():
    import ddpm

    assert settings.parse_overrides(["ch_multipliers=[1, 4]", "hid_channels=8"], ddpm.Config) == {
        "ch_multipliers": [1, 4], "hid_channels": 8}
    with pytest.raises(retrain.UserError, match=r"written as JSON: \[1, 2, 2, 2\]"):
        settings.parse_overrides(["ch_multipliers=1,4"], ddpm.Config)
    with pytest.raises(retrain.UserError, match=r"hid_channels \(default 128\)$"):
        settings.parse_overrides(["hid_channels=eight"], ddpm.Config)
    with pytest.raises(retrain.UserError, match=r"lr \(the preset's 0.002\)$"):  # the preset's value, not the Config's default
        settings.parse_overrides(["lr=fast"], ddpm.make_config("small"))


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "retrain.py"), "--lam", "-0.5", "--out", str(tmp_path / "x")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("script", ["retrain", "fid", "bench", "reproduce", "ddpm", "edm", "otcfm",
                                    "gaussian", "data", "classifier"])
def test_every_script_has_a_working_help(script, monkeypatch, capsys):
    """`python FILE.py --help` of every file with a command line prints its usage and exits 0."""
    import runpy

    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    try:
        runpy.run_path(str(REPO / f"{script}.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("usage:") and "(default: None)" not in out, out[:300]
