"""Tests of bench.py: its quick mode at tiny sizes produces every column, the JSON, and numbers that follow from
each other (projection, metric scaling, NFE, FLOPs).  Run: python -m pytest tests/test_bench.py"""

import contextlib
import io
import json
import math
import statistics

import pytest
import torch

import bench
import ddpm
import edm
import otcfm
import reproduce

TINY = ["--quick", "--threads", "1", "--sample-mode", "scaled",
        "--set", "ddpm.sample_steps=10", "--set", "edm.num_steps=4"]
# --quick made smaller still, so that a run takes seconds: one timed call, batches of 1 to 4, short metric matrices
TINY_SIZES = dict(iters=1, warmup=1, batch=4, sample_n=2, feat_batch=1, raw_train_batch=2, raw_eval_batch=2,
                  metric_n=256, metric_dim=256, fd_dim=256)


def in_process(fn, argv: list[str]):
    """fn(argv) (bench.main) in this process: (what it returned, what it printed); torch's threads
    (which bench sets for the process) and RNG left as they were."""
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            value = fn(argv)
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
    return value, out.getvalue()


def run_bench(argv: list[str]) -> tuple[dict, str]:
    """bench.main(argv) with TINY_SIZES in its settings."""
    resolve = bench.resolve
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "resolve", lambda args: {**resolve(args), **TINY_SIZES})
        return in_process(bench.main, argv)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One run of the tiny quick mode (all models + FID), its printed report and its JSON file."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    return (*run_bench([*TINY, "--json", str(path)]), path)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MODEL_COLUMNS = ["model", "preset", "params_M", "fwd_gflop", "train_gflop", "train_batch", "train_img_s",
                 "train_peak_mib", "train_mfu", "sampler", "nfe", "sample_batch", "sample_img_s", "nfe_img_s",
                 "sample_basis", "sample_peak_mib", "sample_mfu"]
FID_COLUMNS = ["feat_batch", "gflop", "feat_img_s", "feat_peak_mib", "feat_mfu", "metrics_s", "metrics_basis"]
PROJECTION_COLUMNS = ["model", "nfe", "train_s", "sample_s", "features_s", "metrics_s", "iteration_s", "run_s"]
RAW_COLUMNS = ["network", "pass", "batch", "s_per_iter", "spread", "img_s", "tflop_s", "mfu", "peak_mib",
               "ref_img_s", "vs_ref"]
TEXT = {"model", "preset", "sampler", "sample_basis", "metrics_basis", "network", "pass"}
NA_ON_CPU = {"train_mfu", "sample_mfu", "feat_mfu", "mfu"}  # no bf16 peak off CUDA
NA_OFF_REFERENCE = {"ref_img_s", "vs_ref"}  # small presets / tiny batches have no reference figure


def check_row(row: dict, columns: list[str]):
    for key in columns:
        assert key in row, f"column {key} missing from {row}"
        v = row[key]
        if key in TEXT:
            assert isinstance(v, str) and v
        elif key in NA_ON_CPU | NA_OFF_REFERENCE:
            assert v == "n/a", (key, v)
        else:
            assert is_number(v) and v > 0, (key, v)


def test_every_column(result):
    res, _, _ = result
    assert [r["model"] for r in res["models"]] == ["ddpm/small", "edm/small", "otcfm/small"]
    for row in res["models"]:
        check_row(row, MODEL_COLUMNS)
        assert row["preset"] == "small" and row["train_batch"] == 4 and row["sample_batch"] == 2
        assert row["sample_basis"].startswith("projected from 3-NFE")
    check_row(res["fid"], FID_COLUMNS)
    for row in res["projection"]:
        check_row(row, PROJECTION_COLUMNS)
    assert [(r["network"], r["pass"]) for r in res["raw"]] == [
        (f"{m}/small", p) for m in ("ddpm", "edm", "otcfm") for p in ("fwd+bwd", "fwd")] + [("fid", "fwd")]
    for row in res["raw"]:
        check_row(row, RAW_COLUMNS)
    h = res["header"]
    assert h["device_type"] == "cpu" and h["dtype"] == "fp32" and h["torch"] == torch.__version__
    assert h["threads"] == 1 and h["date"][:2] == "20" and h["bf16_peak_tflops"] == "n/a"


def test_report_and_json(result):
    res, text, path = result
    first = text.splitlines()[0]
    for piece in ("device:", f"torch {torch.__version__}", f"threads {res['header']['threads']}", "dtype fp32",
                  res["header"]["date"]):
        assert piece in first
    for title in ("Models:", "FID:", "Projected retraining iteration", "Bare networks"):
        assert title in text
    assert "train img/s" in text and "sample img/s" in text and "features img/s" in text and "peak MiB" in text
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(res))


def test_projection_is_the_formula_of_the_measured_rates(result):
    res, _, _ = result
    feat, metrics = res["fid"]["feat_img_s"], res["fid"]["metrics_s"]
    models = {r["model"]: r for r in res["models"]}
    for p in res["projection"]:
        m = models[p["model"]]
        want = 50 * 1000 / m["train_img_s"] + 50_000 / m["sample_img_s"] + 50_000 / feat + metrics
        assert p["iteration_s"] == pytest.approx(want, rel=1e-12)
        assert p["run_s"] == pytest.approx(20 * want, rel=1e-12)
        assert p["nfe"] == m["nfe"]


def test_metric_scaling(result):
    m = result[0]["fid"]
    t = m["metrics_measured"]
    n, d, fd = t["n"], t["dim"], t["fd_dim"]
    want = (t["cov_s"] * (50_000 / n) * (2048 / d) ** 2      # covariance ~ n d^2
            + t["fd_s"] * (2048 / fd) ** 3                   # Frechet distance ~ d^3
            + t["pr_s"] * (50_000 / n) ** 2 * (2048 / d))    # precision / recall ~ n^2 d
    assert m["metrics_s"] == pytest.approx(want, rel=1e-12)


def test_nfe_is_the_models(result):
    nfe = {r["model"].split("/")[0]: r["nfe"] for r in result[0]["models"]}
    assert nfe["ddpm"] == 10  # DPM-Solver++(2M): one evaluation per step (--set ddpm.sample_steps=10)
    assert nfe["edm"] == 2 * 4 - 1  # Heun: 2 N - 1 (--set edm.num_steps=4)
    model = otcfm.Model(otcfm.make_config("small"), "cpu")
    model.generate(torch.arange(1))
    assert nfe["otcfm"] == model.nfe


def test_short_sampler_keeps_each_samplers_count_of_evaluations():
    """The shortened sampler whose time is scaled: about k evaluations for every sampler, and the row names the
    sampler the Config selects."""
    for sampler in ("heun", "dpm2m"):
        cfg = edm.make_config("small", sampler=sampler)
        model = edm.Model(edm.make_config("small", model_channels=16, num_blocks=1, sampler=sampler,
                                          **bench.short_sampler("edm", cfg, 3)), "cpu")
        model.generate(torch.arange(1))
        assert model.nfe == 3 and bench.sampler_name("edm", model.cfg) == f"{sampler}-{model.cfg.num_steps}"


def test_full_sampling_mode():
    """Whole generate() calls timed: the NFE is the sampler's, the rate is images over the median call."""
    res, text = run_bench(["--quick", "--threads", "1", "--model", "ddpm", "--only", "models", "--sample-mode", "full",
                           "--set", "ddpm.sample_steps=4"])
    (row,) = res["models"]
    assert row["nfe"] == 4 and row["sampler"] == "dpm2m-4" and row["sample_basis"] == "measured, 2 images per call"
    assert row["sample_img_s"] == pytest.approx(2 / statistics.median(row["sample_times_s"]), rel=1e-12)
    assert res["raw"] == [] and res["fid"] is not None and [p["model"] for p in res["projection"]] == ["ddpm/small"]
    assert "Bare networks" not in text


def test_flops(result):
    for row in result[0]["models"]:  # backward costs two forwards
        assert 2.9 < row["train_gflop"] / row["fwd_gflop"] < 3.1
    # the paper DDPM U-Net, counted on the meta device (no compute): about 12.4 GFLOP per 32x32 image forward
    cfg = ddpm.make_config("paper")
    with torch.device("meta"):
        net = ddpm.build_net(cfg).eval()
        x = torch.zeros(2, 3, 32, 32)
    flops = bench.count_flops(lambda: bench.call_net("ddpm", net, x, cfg)) / 2
    assert flops / 1e9 == pytest.approx(12.44, abs=0.01)


def test_rates_follow_from_times(result):
    res = result[0]
    for row in res["raw"]:
        assert row["s_per_iter"] == statistics.median(row["times_s"])
        assert row["img_s"] == pytest.approx(row["batch"] / row["s_per_iter"], rel=1e-12)
    for row in res["models"]:
        assert len(row["train_times_s"]) == 1  # TINY_SIZES: one timed call
        assert row["train_img_s"] == pytest.approx(row["train_batch"] / row["train_times_s"][0], rel=1e-12)


def test_reference_and_mfu_helpers():
    s = {"device": torch.device("cpu"), "peak_tflops": None, "threads": 2}
    row = bench.raw_row("edm", "paper", "fwd+bwd", 16, [9.0, 8.0, 7.0], 127e9, 1000.0, s)
    assert row["img_s"] == 2.0 and row["spread"] == 9 / 7
    assert row["ref_img_s"] == 2.3 and row["vs_ref"] == pytest.approx(2.0 / 2.3)
    assert bench.raw_row("edm", "paper", "fwd+bwd", 8, [4.0], 127e9, 1.0, s)["ref_img_s"] == "n/a"  # other batch
    assert bench.raw_row("ddpm", "paper", "fwd", 64, [2.0], 12e9, 1.0, s)["ref_img_s"] == 23.5
    assert bench.raw_row("ddpm", "paper", "fwd", 64, [2.0], 12e9, 1.0, {**s, "threads": 8})["ref_img_s"] == "n/a"
    assert bench.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.bf16_peak_tflops("Tesla T4") is None
    assert bench.mfu(42e9, 1000.0, 989.0) == pytest.approx(42e12 / 989e12)
    assert bench.mfu(42e9, 1000.0, None) == "n/a"
    gpu = {"device": torch.device("cuda"), "peak_tflops": 989.0, "threads": 2}
    assert bench.raw_row("edm", "paper", "fwd+bwd", 16, [0.01], 127e9, 1.0, gpu)["mfu"] == pytest.approx(
        127e9 * 1600 / 989e12)


def test_set_parsing():
    got = bench.parse_sets(["otcfm.sampler=euler", "edm.num_steps=9", "ddpm.xflip=false", "edm.channel_mult=(1,2)"])
    assert got == {"otcfm": {"sampler": "euler"}, "edm": {"num_steps": 9, "channel_mult": (1, 2)},
                   "ddpm": {"xflip": False}}
    with pytest.raises(SystemExit):
        bench.parse_sets(["gan.lr=1"])
    edm.make_config("small", **got["edm"])  # the values have the types make_config takes


def test_demo_projects_the_readme_command(monkeypatch):
    """--demo: each small preset timed at its own batch and sample_batch, and the README command's minutes as
    pretraining (steps x s/step + 1,797 samples) plus 20 iterations (steps x s/step + 1,797 samples)."""
    monkeypatch.setitem(otcfm.PRESETS, "small", {**otcfm.PRESETS["small"], "batch": 16, "sample_batch": 8,
                                                 "pretrain_kimg": 1.6, "kimg": 0.32})
    monkeypatch.setattr(reproduce, "REAL_MODEL", "edm")  # the mnist rows come with reproduce.py mnist's model only
    res, out = run_bench(["--demo", "--model", "otcfm", "--threads", "1", "--iters", "1"])
    (row,) = res["demo"]
    assert row["model"] == "otcfm" and row["batch"] == 16 and row["pretrain_steps"] == 100 and row["iter_steps"] == 20
    pre = 100 * row["step_s"] + 1797 * row["sample_ms"] / 1000
    it = 20 * row["step_s"] + 1797 * row["sample_ms"] / 1000
    assert row["iter_s"] == pytest.approx(it) and row["readme_min"] == pytest.approx((pre + 20 * it) / 60)
    assert row["sweep_min"] == pytest.approx((pre + 4 * 20 * it) / 60)
    assert "lam 1 x 20 min" in out and res["header"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert "reproduce_mnist_min" not in res


def test_demo_projects_the_mnist_stage(monkeypatch):
    """With reproduce.py mnist's model: its mnist preset's row (1,000 samples per iteration, 10 iterations) and
    Inception's rate, and the stage's minutes as the pretraining plus half the four lambdas' iterations (two
    processes of one thread) plus the Inception features of 11 x 1,000 images (test and training images, iteration
    0, and iterations 5 and 10 of each lambda)."""
    module = {"ddpm": ddpm, "edm": edm, "otcfm": otcfm}[reproduce.REAL_MODEL]
    steps = {k: 2 for k in ("sample_steps", "num_steps", "steps") if hasattr(module.Config, k)}
    for preset in ("small", "mnist"):
        monkeypatch.setitem(module.PRESETS, preset, {**module.PRESETS[preset], "batch": 8, "sample_batch": 2,
                                                     "pretrain_kimg": 0.08, "kimg": 0.016, **steps})
    monkeypatch.setattr(bench, "inception_rate", lambda threads: 7.0)
    res, out = run_bench(["--demo", "--model", reproduce.REAL_MODEL, "--threads", "1", "--iters", "1"])
    small, mnist = res["demo"]
    assert (small["preset"], mnist["preset"]) == ("small", "mnist") and mnist["pretrain_steps"] == 10
    it = 2 * mnist["step_s"] + 1000 * mnist["sample_ms"] / 1000
    assert mnist["iter_s"] == pytest.approx(it)
    assert res["reproduce_mnist_min"] == pytest.approx(mnist["pretrain_min"] + 4 * 10 * it / 60 / 2 + 11_000 / 7.0 / 60)
    assert "7.0 img/s on 1 thread(s)" in out and "reproduce.py mnist" in out
