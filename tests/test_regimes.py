"""The self-consuming regimes of retrain.py (--pool, --real, --start, --temperature, --curate, --reward) end to
end: the paper's default is untouched, each regime trains on exactly the set it names, every flag survives
--resume, bad combinations fail in one line, the models' samplers take a temperature, and one closed form
of gaussian.py holds through the whole loop."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import classifier
import data
import ddpm
import edm
import fid
import gaussian
import otcfm
import regimes
import retrain
import training
from test_retrain import folder_digest, mean_module

TINY_DDPM = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", 64, "--metrics", "pixel",
             "--device", "cpu", "--set", "batch=16", "--set", "sample_batch=64", "--set", "sample_steps=3",
             "--set", "kimg=0.032", "--set", "pretrain_kimg=0.032", "--set", "drop_rate=0"]


def run(out, *argv):
    return retrain.main([*map(str, argv), "--out", str(out), "--no-progress"])


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The metrics plots take most of the time of these small runs, and nothing here looks at them."""
    monkeypatch.setattr(retrain, "plot_metrics", lambda *a, **k: None)


def metrics(path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(path)]


# ----------------------------------------------------------------------------------------------------
# The samplers' temperature


def tiny_model(name: str):
    cfg = {"ddpm": lambda: ddpm.make_config("small", hid_channels=32, ch_multipliers=(1, 1), num_res_blocks=1,
                                            apply_attn=(False, False), sample_steps=3),
           "edm": lambda: edm.make_config("small", model_channels=16, num_blocks=1, num_steps=3),
           "otcfm": lambda: otcfm.make_config("small", steps=2)}[name]()
    torch.manual_seed(0)
    return {"ddpm": ddpm, "edm": edm, "otcfm": otcfm}[name].Model(cfg, "cpu")


@pytest.mark.parametrize("name", ["ddpm", "edm", "otcfm"])
def test_temperature_scales_the_initial_noise(name):
    """temperature=1 is the sampler without a temperature, bit for bit; the deterministic samplers (DDIM, Heun
    without churn, midpoint) map the initial noise alone to the image, so at temperature 0 every seed gives the
    same image."""
    model, seeds = tiny_model(name), torch.arange(3)
    plain = model.generate(seeds)
    assert torch.equal(plain, model.generate(seeds, temperature=1.0))
    cold = model.generate(seeds, temperature=0.0)
    assert torch.equal(cold[0], cold[1]) and torch.equal(cold[0], cold[2]) and not torch.equal(plain[0], plain[1])
    assert not torch.equal(model.generate(seeds, temperature=0.5), plain)


def test_gaussian_temperature_is_exact():
    """The Gaussian's samples at temperature tau are mu + tau (x - mu) of its samples at 1: N(mu, tau^2 Sigma)."""
    m = gaussian.Model(gaussian.make_config("small"))
    m.fit(gaussian.make_data(2, 100))
    seeds = torch.arange(50)
    plain, hot = m.generate(seeds), m.generate(seeds, temperature=1.5)
    assert torch.equal(plain, m.generate(seeds, temperature=1.0))
    assert torch.allclose(hot - m.mu, 1.5 * (plain - m.mu), atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# The paper's default is the loop without regime flags


DEFAULTS_SPELLED = ["--pool", "replace", "--real", "fixed", "--start", "warm", "--temperature", 1, "--curate", 1]


def equal(a, b) -> bool:
    """Nested dicts and lists of tensors and plain values: equal, the tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(equal, a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def same_run(a, b) -> None:
    """Two run folders hold the same run: the same metrics (but the wall time), and a last checkpoint with the
    same samples, model state and pool."""
    assert metrics(a / "metrics.jsonl") == metrics(b / "metrics.jsonl")
    ca, cb = (retrain.load_checkpoint(str(p / "ckpt.pt")) for p in (a, b))
    assert set(ca) == set(cb) and equal(*({k: c[k] for k in ("samples", "state", "pool") if k in c} for c in (ca, cb)))


@pytest.mark.parametrize("model", ["gaussian", "ddpm"])
def test_default_flags_are_the_paper_loop(tmp_path, model):
    """The defaults and the same flags spelled out give the same run, bit for bit (metrics, samples, weights);
    the records show the pool: n real plus the previous generation's samples."""
    argv = (["--model", "gaussian", "--data", "gaussian", "--n-real", 40, "--lam", 0.5, "--iters", 3] if model == "gaussian"
            else [*TINY_DDPM, "--lam", 1, "--iters", 2])
    assert run(tmp_path / "default", *argv) == 0
    assert run(tmp_path / "spelled", *argv, *DEFAULTS_SPELLED) == 0
    same_run(tmp_path / "default", tmp_path / "spelled")
    config = json.load(open(tmp_path / "spelled" / "config.json"))
    assert {k: config[k] for k in regimes.DEFAULTS} == regimes.DEFAULTS
    for r in metrics(tmp_path / "default" / "metrics.jsonl")[1:]:
        assert r["n_synth_by_gen"] == {str(r["iter"] - 1): r["n_synth"]} and r["n_real"] == (40 if model == "gaussian" else 64)


# ----------------------------------------------------------------------------------------------------
# What each regime trains on


def spy(monkeypatch) -> tuple[list, list]:
    """Records every training set fitted and every generate() call of the Gaussian: (fits, [(fits so far,
    temperature, samples)])."""
    fits, gens = [], []
    fit, generate = gaussian.Model.fit, gaussian.Model.generate

    def spy_generate(self, seeds, temperature=1.0):
        gens.append((len(fits), temperature, generate(self, seeds, temperature)))
        return gens[-1][2]

    monkeypatch.setattr(gaussian.Model, "fit", lambda self, x: (fits.append(x.clone()), fit(self, x))[1])
    monkeypatch.setattr(gaussian.Model, "generate", spy_generate)
    return fits, gens


def rows_in(x: torch.Tensor, pool: torch.Tensor) -> bool:
    return all(any(torch.equal(row, p) for p in pool) for row in x)


@pytest.mark.parametrize("real", ["fixed", "fresh", "none"])
@pytest.mark.parametrize("pool", ["replace", "accumulate", "accumulate-subsample"])
def test_each_regime_trains_on_what_it_names(tmp_path, monkeypatch, pool, real):
    """Iteration t fits exactly: the real set (fixed), n new draws never seen before (fresh) or nothing (none),
    then the first n_synth samples of model t-1 (replace), of every model so far (accumulate), or n_synth
    distinct ones among those (accumulate-subsample); the records say so."""
    fits, gens = spy(monkeypatch)
    n, n_synth, iters = 20, 10, 3
    assert run(tmp_path / "r", "--model", "gaussian", "--data", "gaussian", "--n-real", n, "--lam", 0.5, "--iters", iters,
               "--pool", pool, "--real", real, "--set", "sample_batch=7") == 0
    real0 = gaussian.make_data(2, n, seed=0)
    samples = [torch.cat([x for k, _, x in gens if k == t + 1]) for t in range(iters)]  # of models 0, 1, 2
    kept = [s[:n_synth] for s in samples]
    records = metrics(tmp_path / "r" / "metrics.jsonl")
    real_sets = [real0]
    for t in range(1, iters + 1):
        x, r = fits[t], records[t]
        if real == "none":
            synth = x
        else:
            synth = x[n:]
            if real == "fixed":
                assert torch.equal(x[:n], real0)
            else:  # new draws, none of them seen before
                assert torch.equal(x[:n], gaussian.make_data(2, n, seed=regimes.regime_seed(training.train_seed(0, t), regimes.FRESH_REAL)))
                assert not any(rows_in(x[:1], earlier) for earlier in real_sets)
                real_sets.append(x[:n])
        available = torch.cat(kept[t - 1:t] if pool == "replace" else kept[:t])
        if pool == "accumulate-subsample":
            assert len(synth) == n_synth and rows_in(synth, available) and len(synth.unique(dim=0)) == n_synth
            assert sum(r["n_synth_by_gen"].values()) == n_synth and r["n_pool"] == t * n_synth
            assert set(map(int, r["n_synth_by_gen"])) <= set(range(t))
        else:
            assert torch.equal(synth, available)
            assert r["n_synth_by_gen"] == {str(k): n_synth for k in (range(t) if pool == "accumulate" else [t - 1])}
        assert (r["n_real"], r["n_synth"]) == (0 if real == "none" else n, len(synth))


@pytest.mark.parametrize("real", ["fixed", "fresh"])
def test_a_subset_is_measured_against_the_test_split(tmp_path, real):
    """--n-real 100 of the digits: the samples' FD is against the digits' test split (599 digits no model trains on;
    the fresh sets are drawn from the training split), and train_fd against the 100 the first iteration trained on."""
    assert run(tmp_path, "--model", "gaussian", "--data", "digits", "--n-real", 100, "--lam", 1, "--iters", 1,
               "--metrics", "pixel", "--real", real) == 0
    config = json.load(open(tmp_path / "config.json"))
    assert (config["n_real"], config["reference"], config["n_reference"]) == (100, "test", 599)
    samples = retrain.load_checkpoint(str(tmp_path / "ckpt.pt"))["samples"]  # iteration 1's
    test, train = data.load_labelled("digits", split="test")[0], data.load_labelled("digits")[0]
    fake = fid.feature_stats(fid.pixel_features(samples))

    def fd(reference):
        return fid.frechet_distance(*fake, *fid.feature_stats(fid.pixel_features(reference)), method="eigh")

    r = metrics(tmp_path / "metrics.jsonl")[-1]
    assert r["iter"] == 1 and len(samples) == 100
    assert r["fd"] == pytest.approx(fd(test), rel=1e-6) and r["train_fd"] == pytest.approx(fd(train[:100]), rel=1e-6)
    assert abs(fd(train[:100]) - fd(test)) > 0.01 * fd(test)  # so the two checks above tell them apart


def test_temperature_and_curation(tmp_path, monkeypatch):
    """--temperature 0.5 --curate 3 --reward linear: every sample comes from the tempered sampler, iteration 0
    included (re-evaluated); model t-1 draws 3 candidates per kept sample, and each kept sample is one of its
    own 3 candidates; the kept samples score higher than the model's samples."""
    fits, gens = spy(monkeypatch)
    n, n_synth, iters = 30, 30, 3
    assert run(tmp_path / "c", "--model", "gaussian", "--data", "gaussian", "--n-real", n, "--lam", 1, "--iters", iters,
               "--temperature", 0.5, "--curate", 3, "--reward", "linear", "--beta", 2, 0) == 0
    assert {tau for k, tau, _ in gens if k > 1} == {0.5}  # model 0 sampled twice: shared (1) and this run's (0.5)
    assert [tau for k, tau, _ in gens if k == 1] == [1.0, 0.5]
    for t in range(1, iters + 1):
        candidates = torch.cat([x for k, tau, x in gens if k == t and tau == 0.5])
        assert len(candidates) == 3 * n_synth
        synth = fits[t][n:]
        assert all(rows_in(synth[i:i + 1], candidates[3 * i:3 * i + 3]) for i in range(n_synth))
    records = metrics(tmp_path / "c" / "metrics.jsonl")
    shared = retrain.load_checkpoint(str(tmp_path / "c" / "iter0.pt"))["record"]
    assert records[0]["fd"] != shared["fd"]  # the tempered iteration 0, not the shared one
    assert all(r["reward_kept"] > r["reward"] for r in records[1:])


@pytest.mark.parametrize("start", ["warm", "scratch"])
def test_scratch_restarts_from_the_initial_weights(tmp_path, monkeypatch, start):
    """--start scratch: each iteration begins from iteration 0's initial weights (step 0, mean 0) and trains for
    the pretraining budget (10 steps here, against 5 for warm fine-tuning)."""
    mod = mean_module()  # test_retrain's toy SGD model: learns the mean image, counts its steps
    monkeypatch.setitem(sys.modules, "meanmodel", mod)
    monkeypatch.setattr(retrain, "MODELS", retrain.MODELS + ("meanmodel",))
    first_steps = []  # (step counter, largest |mean|) when each train() call begins
    train = retrain.train

    def spy_train(model, *args, **kwargs):
        first_steps.append((model.step, model.mean.abs().max().item()))
        return train(model, *args, **kwargs)

    monkeypatch.setattr(retrain, "train", spy_train)
    assert run(tmp_path / start, "--model", "meanmodel", "--data", "digits", "--n-real", 60, "--lam", 1, "--iters", 3,
               "--metrics", "pixel", "--start", start) == 0
    steps = [r["steps"] for r in metrics(tmp_path / start / "metrics.jsonl")[1:]]
    if start == "scratch":
        assert first_steps[1:] == [(0, 0.0)] * 3 and steps == [10] * 3
    else:
        assert [s for s, _ in first_steps] == [0, 10, 15, 20] and steps == [5] * 3
    assert json.load(open(tmp_path / start / "config.json"))["kimg"] == (0.16 if start == "scratch" else 0.08)


# ----------------------------------------------------------------------------------------------------
# --resume with every flag


GAUSSIAN_ALL = ["--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 1, "inf", "--pool",
                "accumulate-subsample", "--real", "fresh", "--start", "scratch", "--temperature", 0.8, "--curate", 2,
                "--reward", "quadratic", "--gamma", 0.5]


def test_resume_with_every_flag_gaussian(tmp_path):
    """Every regime flag at once, two lambdas: 2 + 3 iterations equal 5 at once."""
    assert run(tmp_path / "full", *GAUSSIAN_ALL, "--iters", 5) == 0
    assert run(tmp_path / "parts", *GAUSSIAN_ALL, "--iters", 2) == 0
    assert run(tmp_path / "parts", *GAUSSIAN_ALL, "--iters", 5, "--resume") == 0
    for lam in ("lam_1", "lam_inf"):
        same_run(tmp_path / "full" / lam, tmp_path / "parts" / lam)


def test_resume_with_every_flag_ddpm_and_classifier_reward(tmp_path, monkeypatch):
    """A tiny DDPM on the digits with every regime flag, the reward from the digits classifier (trained for 30
    steps here instead of its 1,500): 1 + 1 iterations equal 2 at once; 64 fresh digits per iteration. The
    reward's classifier is trained once, then loaded from the cache, and gives the same rewards both ways."""
    get = classifier.get
    monkeypatch.setattr(classifier, "get", lambda x, y, cache, *a, **k: get(x, y, cache, classifier.Config(steps=30)))
    digits, zero = data.load_labelled("digits"), torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    rewards = [regimes.image_reward({"kind": "confidence"}, digits, "cpu", str(tmp_path / "c"))(zero).item()]
    assert len(list((tmp_path / "c").glob("classifier-*.pt"))) == 1
    rewards.append(regimes.image_reward({"kind": "confidence"}, digits, "cpu", str(tmp_path / "c"))(zero).item())
    rewards.append(regimes.image_reward({"kind": "confidence"}, digits, "cpu", None)(zero).item())
    assert len(set(rewards)) == 1  # trained, loaded, trained again without a cache: the same classifier every time
    argv = [*TINY_DDPM, "--lam", 1, "--pool", "accumulate", "--real", "fresh", "--start", "scratch", "--temperature", 0.9,
            "--curate", 2, "--reward", "class", "--reward-class", 3]
    assert run(tmp_path / "full", *argv, "--iters", 2) == 0
    assert run(tmp_path / "parts", *argv, "--iters", 1) == 0
    assert run(tmp_path / "parts", *argv, "--iters", 2, "--resume") == 0
    same_run(tmp_path / "full", tmp_path / "parts")
    ckpt = retrain.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))
    assert [len(g) for g in ckpt["pool"]] == [64, 64] and ckpt["samples"].shape[0] == 128  # 2 candidates per kept one
    r = metrics(tmp_path / "full" / "metrics.jsonl")[-1]
    assert r["n_synth_by_gen"] == {"0": 64, "1": 64} and r["n_real"] == 64 and "reward" in r and "reward_kept" in r
    assert len(list((tmp_path / "cache").glob("classifier-*.pt"))) == 1  # the reward's, trained once for both runs


# ----------------------------------------------------------------------------------------------------
# Bad combinations: one line on stderr, nothing written


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes") / "run"
    assert run(out, "--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 1, "--iters", 2) == 0
    return out


@pytest.fixture
def existing_run(a_run, tmp_path):
    return Path(shutil.copytree(a_run, tmp_path / "existing"))


GAUSS = ["--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 1, "--iters", 2]
DIGITS = ["--model", "gaussian", "--data", "digits", "--n-real", 500, "--lam", 1, "--iters", 2, "--metrics", "pixel"]
BAD = {
    "curation without a reward": ([*GAUSS, "--force", "--curate", 4], "--reward linear or quadratic"),
    "no candidates": ([*GAUSS, "--force", "--curate", 0], "--curate 0"),
    "zero temperature": ([*GAUSS, "--force", "--temperature", 0], "--temperature"),
    "vector reward on images": ([*DIGITS, "--force", "--reward", "linear"], "vector data"),
    "classifier reward on vectors": ([*GAUSS, "--force", "--reward", "class"], "classifier"),
    "beta of the wrong size": ([*GAUSS, "--force", "--reward", "linear", "--beta", 1, 2, 3], "--beta"),
    "no such class": ([*DIGITS, "--force", "--reward", "class", "--reward-class", 10], "classes 0..9"),
    "fresh data too small": ([*DIGITS, "--force", "--real", "fresh", "--iters", 3], "4 disjoint sets of 500"),
    "no real data and lam 0": (["--model", "gaussian", "--data", "gaussian", "--n-real", 30, "--lam", 0, 1, "--iters", 2,
                                "--force", "--real", "none"], "nothing to train"),
    "unknown pool": ([*GAUSS, "--force", "--pool", "keep"], "--pool"),
    "resume with another regime": ([*GAUSS, "--resume", "--pool", "accumulate"], "pool 'replace' there, 'accumulate' now"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_regime_one_line_and_folder_untouched(existing_run, capsys, case):
    argv, needle = BAD[case]
    before = folder_digest(existing_run)
    capsys.readouterr()
    assert run(existing_run, *argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retrain.py: error:") and needle in err[0], err
    assert folder_digest(existing_run) == before


def test_resume_a_run_from_before_the_regime_flags(existing_run):
    """A config.json without the regime fields (and n_reference) was the paper's loop, measured against its real
    set: --resume continues it with the defaults."""
    path = existing_run / "config.json"
    config = json.load(open(path))
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in [*regimes.DEFAULTS, "n_reference"]}))
    assert run(existing_run, *GAUSS[:-1], 3, "--resume") == 0
    assert run(existing_run, *GAUSS[:-1], 4, "--resume", "--temperature", 2) != 0


# ----------------------------------------------------------------------------------------------------
# A closed form through the whole loop


def test_temperature_drift_of_log_det_end_to_end(tmp_path):
    """(R3) through retrain.py: fully synthetic, d = 2, n = 20, tau = 0.9, 100 iterations. log det Sigma_t drifts by
    d log tau^2 + psi((n-1)/2) + psi((n-2)/2) + d log 2 - d log n = -0.421 - 0.270 per iteration; the average
    over 100 iterations has a standard error of 0.05 (per-step variance psi'(9.5) + psi'(9) = 0.23);
    tolerance 0.15, well inside the 0.42 that the temperature adds. Accumulate, same n, tau = 1: the first
    generations move log det by ~0.5 each (as replace's do: 0.27 down on average), later ones by ever less
    as the pool grows (A): within 3 of its start after 50 iterations, and within 0.3 over the last 25
    (measured over 8 seeds: at most 1.6, and 0.11), where replace loses 0.27 x 25 = 6.8."""
    common = ["--model", "gaussian", "--data", "gaussian", "--n-real", 20, "--lam", "inf", "--iters", 100, "--seed", 4]
    assert run(tmp_path / "hot", *common, "--temperature", 0.9) == 0
    logdet = [r["logdet"] for r in metrics(tmp_path / "hot" / "metrics.jsonl")]
    psi = lambda x: torch.special.digamma(torch.tensor(x, dtype=torch.float64)).item()
    drift = 2 * math.log(0.9 ** 2) + psi(19 / 2) + psi(18 / 2) + 2 * math.log(2) - 2 * math.log(20)
    assert abs((logdet[-1] - logdet[0]) / 100 - drift) < 0.15, ((logdet[-1] - logdet[0]) / 100, drift)
    assert run(tmp_path / "kept", *common[:-4], "--iters", 50, "--pool", "accumulate") == 0
    logdet = [r["logdet"] for r in metrics(tmp_path / "kept" / "metrics.jsonl")]
    assert max(abs(v - logdet[0]) for v in logdet) < 3 and abs(logdet[50] - logdet[25]) < 0.3


@pytest.mark.parametrize("pool, grows", [("accumulate", True), ("accumulate-subsample", False), ("replace", False)])
def test_budget_epochs_trains_on_the_whole_pool(tmp_path, pool, grows):
    """--budget epochs: each iteration sees every image of its training set as often as the paper's loop does, so
    the accumulating pool trains 1, 2, 3 times as long at iterations 1, 2, 3 (lam = inf: its pool is n_synth per
    generation); subsampling and replacing keep the paper's size and budget, as with --budget fixed."""
    assert run(tmp_path / "e", *TINY_DDPM, "--lam", "inf", "--pool", pool, "--budget", "epochs", "--iters", 3) == 0
    steps = [r["steps"] for r in metrics(tmp_path / "e" / "metrics.jsonl")[1:]]
    base = round(0.032 * 1000 / 16)  # the preset's kimg in steps of 16 (TINY_DDPM), as --budget fixed trains
    assert steps == ([base, 2 * base, 3 * base] if grows else [base] * 3)
    assert json.load(open(tmp_path / "e" / "config.json"))["budget"] == "epochs"
