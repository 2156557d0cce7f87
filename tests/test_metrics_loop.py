"""The loop's metrics on small images: the learned feature space by default on the digits, the class
histogram, density and coverage, the pixel view, the noise floor, and replicates over seeds."""

import json
import sys

import numpy as np
import pytest

import retrain
from test_retrain import mean_module, metrics, run

TINY_DDPM = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", 200, "--lam", 1, "--iters", 1,
             "--set", "batch=16", "--set", "sample_batch=100", "--set", "sample_steps=2", "--set", "pretrain_kimg=0.032",
             "--set", "kimg=0.032", "--no-cache"]


@pytest.fixture
def meanmodel(monkeypatch):
    monkeypatch.setitem(sys.modules, "meanmodel", mean_module())
    monkeypatch.setattr(retrain, "MODELS", retrain.MODELS + ("meanmodel",))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    assert run(out, *TINY_DDPM) == 0
    return out


def test_digits_are_measured_in_the_classifier_space_by_default(digits_run):
    """--metrics auto on the labelled 8x8 digits: a classifier's features (its accuracy recorded), the class
    histogram of the samples, density and coverage, and the pixel-space metrics as a second view."""
    config = json.load(open(digits_run / "config.json"))
    assert config["features"] == "classifier" and config["classifier"]["accuracy"] > 0.8  # trained on 160 images
    for r in metrics(digits_run / "metrics.jsonl"):
        assert r["features"] == "classifier"
        for key in ("fd", "precision", "recall", "density", "coverage", "class_tv", "classes",
                    "pixel_fd", "pixel_precision", "pixel_recall", "pixel_density", "pixel_coverage"):
            assert np.isfinite(r[key]), key
        assert len(r["class_hist"]) == 10 and sum(r["class_hist"]) == 200  # every sample has a class
        assert 0 <= r["class_tv"] <= 1 and 0 <= r["coverage"] <= 1
    assert (digits_run / "metrics.png").stat().st_size > 1000


def test_the_noise_floor_is_recorded_once_per_run(digits_run):
    """What two independent real sets of 200 samples and the 599 test digits score (mean, sd over random splits of the
    real digits): near-ideal precision and recall, a small distance; far from what 2 training steps of a U-Net give."""
    config = json.load(open(digits_run / "config.json"))
    floor = config["noise_floor"]
    assert (config["n_eval"], config["reference"], config["n_reference"]) == (200, "test", 599)
    assert (floor["n_fake"], floor["n_ref"], floor["splits"]) == (200, 599, 20)
    first = metrics(digits_run / "metrics.jsonl")[0]
    assert floor["fd"][0] + 3 * floor["fd"][1] < first["fd"] / 5 and floor["coverage"][0] > first["coverage"]
    assert floor["pixel_fd"][0] < first["pixel_fd"] and 0 < floor["class_tv"][0] < 0.1
    # the training view's FD: 200 samples against the 200 trained-on digits, a smaller reference than 599: higher
    assert floor["train_fd"][0] == pytest.approx(floor["fd"][0] * (2 / 200) / (1 / 200 + 1 / 599))


def test_held_out_view_and_memorization(digits_classifier, tmp_path):
    """Against the test split, and the training view: samples that are the trained-on digits themselves are all
    nearest to a training image (share 1, distance ratio 0); unseen real digits from the same training split are
    nearer to either set about equally often (share 0.5 +- 0.035 over 200); the training view sees the copies as
    perfect (FD ~0), the test split does not."""
    import shutil

    import data
    from metrics import Evaluator

    shutil.copy(digits_classifier[1]["path"], tmp_path)
    train, test = data.load_labelled("digits"), data.load_labelled("digits", split="test")
    evaluate = Evaluator(test, train, 200, "auto", None, 200, __import__("torch").device("cpu"), False,
                         str(tmp_path), str(tmp_path), seed=0)
    copies, unseen = evaluate(train[0][:200]), evaluate(train[0][600:800])
    assert copies["nn_train_share"] == 1 and copies["nn_ratio"] == pytest.approx(0, abs=1e-3)
    assert 0.38 < unseen["nn_train_share"] < 0.62 and 0.85 < unseen["nn_ratio"] < 1.15
    assert copies["train_fd"] < 1e-6 < evaluate.floor["fd"][0] / 3 < copies["fd"]
    assert unseen["train_fd"] > 10 * copies["train_fd"]


def test_resuming_a_run_measured_in_another_space_is_refused(digits_run, tmp_path, capsys):
    """A run begun before the digits' default space changed (its iteration 0 measured in pixels) cannot go on
    in classifier space: one history would mix two feature spaces."""
    import shutil

    import torch

    shutil.copytree(digits_run, tmp_path / "run")
    shutil.copytree(digits_run.parent / "cache", tmp_path / "cache")  # its classifier: not trained again
    ckpt = torch.load(tmp_path / "run" / "iter0.pt", weights_only=True)
    ckpt["record"]["features"] = "pixel"
    torch.save(ckpt, tmp_path / "run" / "iter0.pt")
    assert run(tmp_path / "run", *TINY_DDPM[:-1], "--iters", 2, "--resume") == 2
    assert "measured its metrics in pixel space, this one would use classifier; add --metrics pixel" in \
        capsys.readouterr().err


def test_seeds_are_independent_replicates_summarized_by_mean_and_spread(tmp_path, meanmodel):
    """--seeds 0 1 2: one run per seed (iteration 0 included: different seeds, different models), then the
    mean and standard deviation per iteration; the same seed twice gives the same metrics."""
    common = ["--model", "meanmodel", "--data", "digits", "--n-real", 60, "--lam", 0, 1, "--iters", 2,
              "--metrics", "pixel", "--no-cache"]
    assert run(tmp_path / "s", *common, "--seeds", 0, 1, 2) == 0
    firsts = [metrics(tmp_path / "s" / f"seed_{s}" / "lam_0" / "metrics.jsonl")[0]["fd"] for s in (0, 1, 2)]
    assert len(set(firsts)) == 3  # three different iterations 0
    summary = json.load(open(tmp_path / "s" / "seeds.json"))
    assert summary["seeds"] == [0, 1, 2] and set(summary["lams"]) == {"0", "1"}
    row0 = summary["lams"]["0"][0]
    assert row0["iter"] == 0 and row0["seeds"] == 3
    assert row0["fd"][0] == pytest.approx(np.mean(firsts)) and row0["fd"][1] == pytest.approx(np.std(firsts, ddof=1))
    assert (tmp_path / "s" / "metrics.png").stat().st_size > 1000
    assert run(tmp_path / "again", *common, "--seed", 1) == 0
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(metrics(tmp_path / "again" / "lam_1" / "metrics.jsonl")) == \
        strip(metrics(tmp_path / "s" / "seed_1" / "lam_1" / "metrics.jsonl"))


def test_inception_every_k_iterations_beside_the_classifier(tmp_path, monkeypatch):
    """--inception-every 2 on the digits (classifier space every iteration): Inception's FID, precision and recall
    against the same test digits at iterations 0 and 2 only, with their noise floor, and nothing else measured in
    Inception's space; a K that is negative is refused. (Random Inception weights, He-scaled so that the features
    are not ~0; 16 samples against 16 test digits.)"""
    import torch

    import fid
    import metrics as metrics_module

    spaces = []  # the width of the features of every space_metrics call: 2048 in Inception's space
    measure = metrics_module.Evaluator.space_metrics
    monkeypatch.setattr(metrics_module.Evaluator, "space_metrics",
                        lambda self, fake, *a: spaces.append(fake.shape[1]) or measure(self, fake, *a))

    net = fid.FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    argv = [*TINY_DDPM[:TINY_DDPM.index("--iters")], "--iters", 3, *TINY_DDPM[TINY_DDPM.index("--iters") + 2:],
            "--n-eval", 16, "--n-ref", 16, "--inception", tmp_path / "inception.pth"]
    assert run(tmp_path / "run", *argv, "--inception-every", 2) == 0
    records = metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in records if "fid" in r] == [0, 2] and all(r["features"] == "classifier" for r in records)
    for r in records[::2]:
        assert r["fid"] > 0 and 0 <= r["inception_precision"] <= 1 and 0 <= r["inception_recall"] <= 1
    assert spaces.count(2048) == 2  # against the test digits only: the training view is the classifier's
    floor = json.load(open(tmp_path / "run" / "config.json"))["noise_floor"]
    assert floor["fid"][0] > 0 and len(floor["inception_recall"]) == 2 and floor["fd"][0] > 0
    # the floor's real sets are drawn from the test digits and the first n_eval training digits, as the classifier's
    (train,) = (tmp_path / "cache").glob("inception-train-*.npz")  # in the cache folder that later runs share
    assert len(np.load(train)["features"]) == 16
    assert run(tmp_path / "bad", *argv, "--inception-every", -1) == 2
