"""Tests of bench.py: its quick mode at tiny sizes produces every column, the JSON, and numbers that follow from
each other (projection, metric scaling, NFE, FLOPs).  Run: python -m pytest tests/test_bench.py"""

import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import subprocess

import pytest
import torch

import bench
import ddpm
import edm
import otcfm
import retrain

TINY = ["--tiny", "--threads", "1", "--sample-mode", "scaled",
        "--set", "ddpm.sample_steps=10", "--set", "edm.num_steps=4"]


def in_process(fn, argv: list[str]):
    """fn(argv) (bench.main or bench.cli) in this process: (what it returned, what it printed); torch's threads
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
    res, text = run_bench(["--tiny", "--threads", "1", "--model", "ddpm", "--only", "models", "--sample-mode", "full",
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
        assert len(row["train_times_s"]) == 1  # --tiny: one timed call
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


# ----------------------------------------------------------------------------------------------------
# --gpu-check: its code at tiny sizes on the CPU

GPU_CHECK = ["--gpu-check", "--tiny", "--device", "cpu", "--threads", "1"]
CUDA_PROFILE = {"amp": "bf16", "channels_last": True, "fused_adam": True, "compile": False}


def run_cli(argv: list[str]) -> tuple[int, str]:
    return in_process(bench.cli, argv)


def check_lines(text: str) -> dict[str, tuple[str, str]]:
    """{check name: (status, detail)} of the PASS / FAIL / SKIP lines."""
    out = {}
    for line in text.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            name, _, detail = rest.partition(": ")
            assert name not in out, f"two lines for {name}"
            out[name] = (status, detail)
    return out


def test_gpu_check_tiny_passes(tmp_path, monkeypatch):
    """The whole --gpu-check at tiny sizes with the CUDA profile forced: a PASS line for every check (SKIP for
    compile and torchrun), exit 0, and gpu_check.json in the current folder with those results, the rows and the
    retrain.py metrics. Catches a check that breaks on working models (wrong shape / profile / metrics checks,
    retrain.py arguments that it or the models reject, Inception weights that fid.load_inception refuses) and
    rows or JSON that lose their figures."""
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(GPU_CHECK)
    lines = check_lines(text)
    passed = {"ddpm eager", "edm eager", "otcfm eager", "memory edm/ffhq64", "memory ddpm", "memory otcfm", "files",
              "retrain edm"}
    skipped = {"ddpm compile", "edm compile", "otcfm compile", "torchrun"}
    assert {n for n, (st, _) in lines.items() if st == "PASS"} == passed, text
    assert {n for n, (st, _) in lines.items() if st == "SKIP"} == skipped
    assert "FAIL" not in {st for st, _ in lines.values()} and code == 0
    assert "SKIP torchrun: 0 GPUs" in text and "gpu-check: 8 PASS, 0 FAIL, 4 SKIP" in text
    assert "Memory at the paper batches" in text and "sample img/s" in text

    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["passed"] is True and res["counts"] == {"PASS": 8, "FAIL": 0, "SKIP": 4}
    assert {c["name"]: (c["status"], c["detail"]) for c in res["checks"]} == lines
    assert res["header"]["tiny"] and res["header"]["dtype"] == "bf16" and res["header"]["gpus"] == 0
    assert [r["model"] for r in res["models"]] == ["ddpm eager", "edm eager", "otcfm eager"]
    for row in res["models"]:
        assert row["preset"] == "paper" and row["profile"] == CUDA_PROFILE
        assert len(row["train_losses"]) == 5 and all(math.isfinite(v) for v in row["train_losses"])
        assert row["samples"]["shape"] == [2, 3, 32, 32] and row["samples"]["finite"]
        for key in ("train_img_s", "sample_img_s", "train_peak_mib", "sample_peak_mib", "nfe"):
            assert is_number(row[key]) and row[key] > 0, key
        assert row["train_mfu"] == row["sample_mfu"] == "n/a"  # no bf16 peak off CUDA
    assert [row["sampler"] for row in res["models"]] == ["ddim-2", "heun-2", "dopri5"]
    assert [(r["model"], r["resolution"], r["train_batch"]) for r in res["memory"]] == [
        ("edm/ffhq64", 64, 4), ("ddpm", 32, 4), ("otcfm", 32, 4)]
    assert all(is_number(r["train_peak_mib"]) and r["train_peak_mib"] > 0 for r in res["memory"])
    (retrain_check,) = [c for c in res["checks"] if c["name"] == "retrain edm"]
    argv = retrain_check["argv"]
    assert argv[argv.index("--preset") + 1] == "paper" and argv[argv.index("--metrics") + 1] == "inception"
    for piece in ("channels_last=true", "fused_adam=true", "amp=bf16"):
        assert piece in argv
    assert [r["iter"] for r in retrain_check["records"]] == [0, 1]
    for r in retrain_check["records"]:
        assert r["features"] == "inception" and all(math.isfinite(r[k]) for k in ("fid", "precision", "recall"))


def test_gpu_check_reports_failures(tmp_path, monkeypatch):
    """Broken models are FAIL lines with the reason, the other checks still run, and the exit status is 1:
    a NaN loss from train_step (ddpm eager, and retrain.py stopping on it), samples outside [-1, 1] (edm eager),
    a model ignoring the CUDA profile (otcfm eager: fused Adam off). Catches a check that passes regardless."""
    monkeypatch.setattr(ddpm.Model, "train_step", lambda self, x: torch.tensor(float("nan")))
    generate = edm.Model.generate
    monkeypatch.setattr(edm.Model, "generate", lambda self, seeds: generate(self, seeds) * 2)
    init = otcfm.Model.__init__
    monkeypatch.setattr(otcfm.Model, "__init__",
                        lambda self, cfg, device: init(self, dataclasses.replace(cfg, fused_adam="false"), device))
    path = tmp_path / "gpu.json"
    code, text = run_cli([*GPU_CHECK, "--checks", "models", "retrain", "--retrain-model", "ddpm", "--json", str(path)])
    lines = check_lines(text)
    assert code == 1
    assert set(lines) == {"ddpm eager", "edm eager", "otcfm eager", "files", "retrain ddpm"}
    assert lines["ddpm eager"] == ("FAIL", "losses [nan, nan, nan, nan, nan]")
    assert lines["edm eager"][0] == "FAIL" and "outside [-1, 1]" in lines["edm eager"][1]
    assert lines["otcfm eager"][0] == "FAIL" and "'fused_adam': False" in lines["otcfm eager"][1]
    assert lines["files"][0] == "PASS"
    status, reason = lines["retrain ddpm"]
    assert status == "FAIL" and reason.startswith("retrain.main returned 2: ") and "non-finite loss" in reason
    assert "failed: ddpm eager, edm eager, otcfm eager, retrain ddpm" in text
    res = json.loads(path.read_text())
    assert res["passed"] is False and res["counts"]["FAIL"] == 4


def test_gpu_check_exception_is_a_fail(capsys):
    """An exception inside a check (CUDA out of memory, a bug) is that check's FAIL line with the exception's first
    line, not the end of the run."""
    s = {"checks": [], "device": torch.device("cpu")}

    def broken():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    check = bench.run_check(s, "memory edm/ffhq64", broken)
    assert check["status"] == "FAIL" and check["detail"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "FAIL memory edm/ffhq64: RuntimeError: CUDA out of memory" in capsys.readouterr().out
    assert bench.run_check(s, "files", lambda: ([], "ok", {}))["status"] == "PASS" and len(s["checks"]) == 2


def gpu_check_settings(argv: list[str]) -> dict:
    threads = torch.get_num_threads()
    try:
        return bench.resolve_gpu_check(bench.build_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def test_gpu_check_compile_fallback_is_a_fail(monkeypatch):
    """A compile check whose model fell back to eager (torch.compile failing, here replaced by one that fails) is a
    FAIL saying so, though losses and samples are fine. Catches a compile check that passes by running eagerly."""
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, *args, **kwargs: broken)
    s = gpu_check_settings([*GPU_CHECK, "--model", "ddpm"])
    s.update(checks=[], gc_models=[], gc_memory=[])
    problems, detail, _ = bench.check_model("ddpm", s, True)
    assert any(p.startswith("fell back to eager: torch.compile failed") for p in problems), problems
    assert "ddim-2 NFE 2" in detail and [r["model"] for r in s["gc_models"]] == ["ddpm compile"]


def test_gpu_check_retrain_arguments():
    """The --set values handed to retrain.py read back, through its own parser, as the Config the model checks
    used (tuples, booleans, the forced CUDA profile, the step budgets). Catches values retrain.py would misread."""
    s = gpu_check_settings(GPU_CHECK)
    for name, module in (("ddpm", ddpm), ("edm", edm), ("otcfm", otcfm)):
        s.update(data_path="d.npy", inception_path="i.pth")
        argv = bench.retrain_argv(name, s, "out")
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        got = module.make_config("paper", **retrain.parse_overrides(sets, module.Config))
        want = module.make_config("paper", **s["overrides"][name], amp="bf16", batch=4, sample_batch=8,
                                  pretrain_kimg=0.016, kimg=0.008)
        assert got == want, name
    with pytest.raises(SystemExit, match="not CUDA"):  # without --tiny it needs a GPU
        gpu_check_settings(["--gpu-check", "--device", "cpu"])


def test_gpu_check_torchrun(tmp_path, monkeypatch):
    """The torchrun check launches python -m torch.distributed.run --standalone --nproc_per_node=N retrain.py with
    the retrain check's arguments, passes on exit 0 with the metrics, fails on a non-zero exit (with the last line
    of stderr) or missing iterations; N divides the batch. (subprocess.run is replaced: no processes start.)"""
    s = gpu_check_settings([*GPU_CHECK, "--torchrun-procs", "2"])
    s.update(workdir=str(tmp_path), data_path="d.npy", inception_path="i.pth")
    calls = []

    def fake_run(cmd, returncode, iters):
        def run(cmd_, **kwargs):
            calls.append(cmd_)
            out = cmd_[cmd_.index("--out") + 1]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                for it in iters:
                    f.write(json.dumps({"iter": it, "fid": 1.0, "precision": 0.5, "recall": 0.5,
                                        "features": "inception", "nfe": 3}) + "\n")
            return subprocess.CompletedProcess(cmd_, returncode, "", "Traceback\nRuntimeError: boom\n")
        return run

    monkeypatch.setattr(bench.subprocess, "run", fake_run(None, 0, (0, 1)))
    problems, detail, extra = bench.check_torchrun("edm", s, 2)
    cmd = calls[-1]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5].endswith("retrain.py") and os.path.isfile(cmd[5])
    out = str(tmp_path / "torchrun-edm")
    assert cmd[6:] == [*bench.retrain_argv("edm", s, out), "--device", "cpu"]
    assert problems == [] and detail.startswith("2 processes: iteration 0: fid 1")
    monkeypatch.setattr(bench.subprocess, "run", fake_run(None, 1, (0,)))
    problems, _, extra = bench.check_torchrun("edm", s, 2)
    assert problems == ["exit status 1: RuntimeError: boom", "no iteration 1 in metrics.jsonl"] and extra["exit"] == 1
    assert bench.torchrun_procs({**s, "torchrun_procs": 3}, 4) == 2
    assert bench.torchrun_procs({**s, "torchrun_procs": 6}, 512) == 4
    assert bench.torchrun_procs({**s, "torchrun_procs": 8}, 512) == 8


def test_demo_projects_the_readme_command(monkeypatch):
    """--demo: each small preset timed at its own batch and sample_batch, and the README command's minutes as
    pretraining (steps x s/step + 1,797 samples) plus 20 iterations (steps x s/step + 1,797 samples)."""
    import otcfm

    monkeypatch.setitem(otcfm.PRESETS, "small", {**otcfm.PRESETS["small"], "batch": 16, "sample_batch": 8,
                                                 "pretrain_kimg": 1.6, "kimg": 0.32})
    res, out = run_bench(["--demo", "--model", "otcfm", "--threads", "1", "--iters", "1"])
    (row,) = res["demo"]
    assert row["model"] == "otcfm" and row["batch"] == 16 and row["pretrain_steps"] == 100 and row["iter_steps"] == 20
    pre = 100 * row["step_s"] + 1797 * row["sample_ms"] / 1000
    it = 20 * row["step_s"] + 1797 * row["sample_ms"] / 1000
    assert row["iter_s"] == pytest.approx(it) and row["readme_min"] == pytest.approx((pre + 20 * it) / 60)
    assert "README cmd min" in out and res["header"]["capability"] == torch.backends.cpu.get_cpu_capability()
