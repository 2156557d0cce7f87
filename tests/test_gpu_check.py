"""The GPU acceptance check: does the CUDA path run, end to end, at the paper's sizes?

On a machine with one or more CUDA GPUs (under 10 minutes, most of it torch.compile):

    python -m pytest -m gpu -v

runs the checks below at full size and writes what they measured to runs/gpu_check.json (another path:
GPU_CHECK_JSON=PATH). The ordinary test suite runs the same checks in their tiny CPU mode (pytest.ini leaves the
full-size ones, marked gpu, out of a plain `pytest`): each paper preset a few channels wide (TINY_NETS), the CUDA
profile forced (bf16, channels_last, fused Adam), batch 4, 2 seeds, 2-step samplers (otcfm keeps dopri5),
8 images. The checks that need a GPU skip there: compile (minutes on a CPU) and torchrun (2+ GPUs).

    test_model      bench.bench_model at each paper preset and batch with the profile the models' "auto" resolves
                    to on CUDA: 5 Model.train_step calls (finite losses), 2 Model.generate calls of the preset's
                    sample_batch seeds with its sampler (finite images of the right shape in [-1, 1], an NFE),
                    Model.profile; [compiled] the same with Config.compile = True, and no fallback to eager
    test_memory     2 training steps at the preset's batch (EDM FFHQ-64 at 256, DDPM and OT-CFM at 128), their
                    peak memory (bench.PeakMemory)
    test_inputs     2,048 random 32x32 RGB images as an .npy file and FID Inception weights (at full size the
                    released ones when the torch hub cache holds them, else random ones, He-initialized so that
                    their features are not ~0), read back by data.load_images and fid.load_inception
    test_retrain    retrain.main(["--model", "edm", "--preset", "paper", "--iters", "1", "--metrics", "inception",
                    ...]) on those inputs, 4 + 2 optimizer steps: the Config it trained is the one asked for, and
                    metrics.jsonl holds iterations 0 and 1 with a finite FID above 1 (random images against a
                    barely trained model's samples) and precision and recall in [0, 1]
    test_torchrun   with 2+ GPUs, the same run under python -m torch.distributed.run --standalone --nproc_per_node=N
                    (N: the GPUs, lowered until it divides the batch)

The JSON record: {"header": bench.py's header (GPU, torch, dtype, bf16 peak, ...) with the GPU count and CUDA
version, "checks": [one per test: its name, size, outcome, seconds, and what it measured: bench.py's row of a
model or memory check (img/s, MFU, peak MiB, ...), a retrain run's command line and metrics]}. It is rewritten
after each check, so a run that stops keeps what finished; run it in one process (no -n). docs/performance.md
takes its GPU figures from there.

The tests after the checks show that each check fails on a broken input."""

import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import bench
import data
import ddpm
import edm
import fid
import otcfm
import retrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "runs", "gpu_check.json")  # where `pytest -m gpu` writes its record
RELEASED = os.path.join(torch.hub.get_dir(), "checkpoints", fid.WEIGHTS_FILE)  # FID Inception weights, if downloaded

TRAIN_CALLS = 5               # Model.train_step calls of a model check (1 warm-up, 4 timed)
SAMPLE_CALLS = 2              # Model.generate calls of a model check (1 warm-up, 1 timed)
CUDA_PROFILE = {"amp": "bf16", "channels_last": True, "fused_adam": True}  # Model.profile of "auto" on CUDA
MEMORY_RUNS = (("edm", "ffhq64"), ("ddpm", "paper"), ("otcfm", "paper"))  # their batches: 256, 128, 128
IMAGES = 2048                 # random images of the retrain.py checks (= samples per iteration)
PRETRAIN_STEPS = 4            # optimizer steps of iteration 0 (--set pretrain_kimg = steps * batch / 1000)
FINETUNE_STEPS = 2            # optimizer steps of iteration 1 (--set kimg)

# tiny mode: each paper preset's structure (attention level, augment labels, sampler) a few channels wide, with
# 2-step DDIM / Heun samplers (otcfm keeps its adaptive dopri5), and the CUDA profile set by hand
TINY_NETS = {
    "ddpm": dict(hid_channels=8, norm_groups=4, ch_multipliers=(1, 1), apply_attn=(False, True), num_res_blocks=1,
                 sample_steps=2),
    "edm": dict(model_channels=8, channel_mult=(1, 1), num_blocks=1, num_steps=2),
    "otcfm": dict(channels=8, norm_groups=4, channel_mult=(1, 1), num_res_blocks=1, head_channels=8),
}
TINY = dict(batch=4, sample_n=2, sample_batch=8, images=8)  # sample_batch: retrain.py's; images: ~0.15 CPU-s each


def settings(full: bool, workdir) -> dict:
    """bench.py's settings (bench.resolve) of the checks, bf16 and generate() in full: on CUDA at the paper presets'
    batches (full), or in tiny mode on the CPU. workdir: where the retrain checks write."""
    argv = ["--dtype", "bf16", "--only", "models", "--sample-mode", "full", "--warmup", "1",
            "--iters", str(TRAIN_CALLS - 1)]
    argv += ["--device", "cuda"] if full else ["--device", "cpu", "--threads", "1", "--batch", str(TINY["batch"]),
                                               "--sample-n", str(TINY["sample_n"])]
    s = bench.resolve(bench.build_parser().parse_args(argv))
    tiny = {m: {**TINY_NETS[m], "amp": "bf16", "channels_last": "true", "fused_adam": "true"} for m in bench.MODELS}
    s.update(full=full, sample_iters=SAMPLE_CALLS - 1, overrides={} if full else tiny,
             images=IMAGES if full else TINY["images"], workdir=str(workdir))
    return s


@pytest.fixture(scope="module", params=["tiny", pytest.param("full", marks=pytest.mark.gpu)])
def s(request, tmp_path_factory) -> dict:
    """The settings of a check, once in tiny mode and once (marked gpu) at full size."""
    if request.param == "full" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return settings(request.param == "full", tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny-mode settings, for the tests that break a check."""
    return settings(False, tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def tiny_inputs(tiny) -> dict:
    return write_inputs(tiny)


# ----------------------------------------------------------------------------------------------------
# The JSON record


@pytest.fixture(scope="module")
def checks() -> list:
    return []


@pytest.fixture
def record(request, s, checks) -> dict:
    """This check's entry of the JSON record: the test adds what it measured, this fixture its outcome (the report
    that conftest.py keeps as request.node.rep_call) and seconds, then writes the record."""
    entry = {"check": request.node.name, "size": "full" if s["full"] else "tiny"}
    t0 = time.perf_counter()
    yield entry
    rep = getattr(request.node, "rep_call", None)
    entry.update(outcome=rep.outcome if rep else "error", seconds=round(time.perf_counter() - t0, 2))
    if rep and rep.failed:
        entry["error"] = rep.longrepr.reprcrash.message
    elif rep and rep.skipped:
        entry["reason"] = rep.longrepr[2]
    checks.append(entry)
    if s["full"]:  # what the check left goes back to the GPU before the next one
        gc.collect()
        torch.cuda.empty_cache()
    path = os.environ.get("GPU_CHECK_JSON") or (RECORD if s["full"] else None)  # tiny mode: only when asked
    if path:
        header = {**bench.header_of(s), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"header": header, "checks": checks}, f, indent=1)


# ----------------------------------------------------------------------------------------------------
# The checks


def run_model(name: str, s: dict, compile_: bool = False) -> dict:
    """bench.bench_model at the paper preset: its row, with the warnings the model gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row, _ = bench.bench_model(name, "paper", {**s, "compile": compile_})
        finally:
            if compile_:
                torch._dynamo.reset()  # the next model compiles from scratch, without this one's graphs in memory
    row["warnings"] = sorted({str(w.message).splitlines()[0] for w in caught if str(w.message)})
    return row


def assert_model(row: dict, compile_: bool = False) -> None:
    losses, smp, res = row["train_losses"], row["samples"], row["resolution"]
    assert len(losses) == TRAIN_CALLS and all(map(math.isfinite, losses)), f"losses {losses}"
    assert smp["shape"] == [row["sample_batch"], row["channels"], res, res], f"samples of shape {smp['shape']}"
    assert smp["finite"] and -1 <= smp["min"] <= smp["max"] <= 1, f"samples {smp}, not finite in [-1, 1]"
    assert type(row["nfe"]) is int and row["nfe"] >= 1, f"nfe {row['nfe']!r}"
    fallback = [m for m in row["warnings"] if "torch.compile failed" in m]
    assert not (compile_ and fallback), f"fell back to eager: {fallback[0]}"
    assert row["profile"] == {**CUDA_PROFILE, "compile": compile_}


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", bench.MODELS)
def test_model(name, compile_, s, record):
    if compile_ and not s["full"]:
        pytest.skip("torch.compile of the paper networks takes minutes on a CPU")
    record["row"] = row = run_model(name, s, compile_)
    assert_model(row, compile_)


def run_memory(name: str, preset: str, s: dict) -> dict:
    """2 training steps (1 warm-up, 1 timed) at the preset's batch: bench.py's row with their peak memory."""
    return bench.bench_model(name, preset, {**s, "sample": False, "warmup": 1, "iters": 1})[0]


def assert_memory(row: dict, batch: int) -> None:
    assert len(row["train_losses"]) == 2 and all(map(math.isfinite, row["train_losses"])), row["train_losses"]
    assert row["train_batch"] == batch


@pytest.mark.parametrize("name, preset", MEMORY_RUNS)
def test_memory(name, preset, s, record):
    record["row"] = row = run_memory(name, preset, s)
    assert_memory(row, bench.model_config(name, preset, {}, "bf16", False)[1].batch if s["full"] else TINY["batch"])


def write_inputs(s: dict) -> dict:
    """retrain.py's inputs: random uint8 images as an .npy file (NHWC, as data.py reads them) and FID Inception
    weights, which fid.load_inception must accept: at full size the released ones when the torch hub cache holds
    them, else random ones."""
    images = np.random.default_rng(0).integers(0, 256, size=(s["images"], 32, 32, 3), dtype=np.uint8)
    out = {"data": os.path.join(s["workdir"], "random-32x32.npy"),
           "inception": os.path.join(s["workdir"], "random-inception.pth"), "weights": "random"}
    np.save(out["data"], images)
    if s["full"] and os.path.isfile(RELEASED):
        out.update(inception=RELEASED, weights="released",
                   fingerprint=fid.weights_fingerprint(fid.load_inception(RELEASED)))
        return out
    torch.manual_seed(0)
    net = fid.FIDInception()
    for m in net.modules():  # He initialization: pool features of size ~0.3 (torch's default shrinks them to ~1e-8)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), out["inception"])
    out["fingerprint"] = fid.weights_fingerprint(net)
    return out


@pytest.fixture(scope="module")
def inputs(s) -> dict:
    return write_inputs(s)


def assert_inputs(inputs: dict, n: int) -> None:
    assert fid.weights_fingerprint(fid.load_inception(inputs["inception"])) == inputs["fingerprint"], \
        "fid.load_inception read back other weights than were written"
    assert tuple(data.load_images(inputs["data"]).shape) == (n, 3, 32, 32)


def test_inputs(s, inputs, record):
    record["inception"] = inputs["weights"]
    assert_inputs(inputs, s["images"])


def retrain_sets(s: dict) -> dict:
    """The Config fields retrain.py is given with --set: the tiny network and profile, the step budgets."""
    sets = dict(s["overrides"].get("edm", {}))
    if not s["full"]:
        sets.update(batch=TINY["batch"], sample_batch=TINY["sample_batch"])
    batch = edm.make_config("paper", **sets).batch
    return {**sets, "pretrain_kimg": PRETRAIN_STEPS * batch / 1000, "kimg": FINETUNE_STEPS * batch / 1000}


def set_value(v) -> str:
    """A Config value as retrain.py's --set FIELD=VALUE reads it (tuples as JSON lists)."""
    if isinstance(v, (tuple, list)):
        return json.dumps(list(v), separators=(",", ":"))
    return str(v)


def retrain_argv(s: dict, inputs: dict, out: str) -> list[str]:
    """retrain.py's command line of the checks: EDM at the paper preset, one iteration, short budgets, Inception
    metrics on the random inputs."""
    n = str(s["images"])
    return ["--model", "edm", "--preset", "paper", "--data", inputs["data"], "--n-real", n, "--n-eval", n,
            "--iters", "1", "--metrics", "inception", "--inception", inputs["inception"], "--out", out, "--force",
            "--no-progress", "--seed", "0",
            *[a for k, v in retrain_sets(s).items() for a in ("--set", f"{k}={set_value(v)}")]]


def assert_run(out: str, s: dict) -> list[dict]:
    """A retrain.py run folder: the Config of iteration 0's checkpoint is the one asked for (the --set values read
    back as such), and metrics.jsonl holds iterations 0 and 1 with finite FID, precision and recall."""
    config = retrain.load_checkpoint(os.path.join(out, "iter0.pt"))["config"]
    want = dataclasses.asdict(edm.make_config("paper", **retrain_sets(s)))
    assert {k: config[k] for k in want} == want
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["iter"] for r in records] == [0, 1]
    for r in records:
        assert r["features"] == "inception", r
        assert math.isfinite(r["fid"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1, r
        # random images against a barely trained model's samples: FID ~230 (random weights), more (released ones)
        assert r["fid"] > 1, f"FID {r['fid']:.3g} in iteration {r['iter']}: the features do not tell the sets apart"
    return records


def run_retrain(s: dict, inputs: dict, record: dict) -> None:
    """retrain.main in this process (its messages, on a failure, are in the captured stderr)."""
    out = os.path.join(s["workdir"], "retrain-edm")
    record["argv"] = argv = [*retrain_argv(s, inputs, out), "--device", str(s["device"])]
    assert retrain.main(argv) == 0, "retrain.main failed (see its stderr)"
    record["metrics"] = assert_run(out, s)


def test_retrain(s, inputs, record):
    run_retrain(s, inputs, record)


def torchrun_procs(gpus: int, batch: int) -> int:
    """Processes of the torchrun check: every GPU, as many as divide the batch (each rank trains batch / N)."""
    while gpus > 1 and batch % gpus:
        gpus -= 1
    return gpus


def run_torchrun(s: dict, inputs: dict, procs: int, record: dict) -> None:
    """The retrain check's run under `python -m torch.distributed.run --standalone --nproc_per_node=procs`."""
    out = os.path.join(s["workdir"], "torchrun-edm")
    record["cmd"] = cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={procs}", os.path.join(ROOT, "retrain.py"),
                           *retrain_argv(s, inputs, out), *(["--device", "cpu"] if not s["full"] else [])]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    record["output_tail"] = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
    record["metrics"] = assert_run(out, s)


def test_torchrun(s, inputs, record):
    procs = torchrun_procs(torch.cuda.device_count() if s["full"] else 0, edm.make_config("paper").batch)
    if procs < 2:
        pytest.skip(f"needs 2+ CUDA GPUs ({torch.cuda.device_count()} here)")
    run_torchrun(s, inputs, procs, record)


# ----------------------------------------------------------------------------------------------------
# Each check fails on a broken input (tiny mode)


def nan_loss(self, x):
    return torch.tensor(float("nan"))


@pytest.mark.parametrize("fault", ["nan loss", "samples outside [-1, 1]", "profile ignored"])
def test_model_check_fails(fault, tiny, monkeypatch):
    """A NaN loss from train_step (ddpm), samples twice too large (edm), a model that ignores fused_adam (otcfm)."""
    if fault == "nan loss":
        name, match = "ddpm", "losses \\[nan"
        monkeypatch.setattr(ddpm.Model, "train_step", nan_loss)
    elif fault == "samples outside [-1, 1]":
        name, match, generate = "edm", "not finite in \\[-1, 1\\]", edm.Model.generate
        monkeypatch.setattr(edm.Model, "generate", lambda self, seeds: generate(self, seeds) * 2)
    else:
        name, match, init = "otcfm", "fused_adam", otcfm.Model.__init__
        monkeypatch.setattr(otcfm.Model, "__init__",
                            lambda self, cfg, device: init(self, dataclasses.replace(cfg, fused_adam="false"), device))
    with pytest.raises(AssertionError, match=match):
        assert_model(run_model(name, tiny))


def test_compiled_check_fails_on_eager_fallback(tiny, monkeypatch):
    """torch.compile failing (here replaced by one whose calls raise TorchDynamo's error): the model runs eagerly,
    losses and samples are fine, and the compiled check fails saying so."""
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, *args, **kwargs: broken)
    with pytest.raises(AssertionError, match="fell back to eager: torch.compile failed"):
        assert_model(run_model("ddpm", tiny, compile_=True), compile_=True)


def test_memory_check_fails_on_nan_loss(tiny, monkeypatch):
    monkeypatch.setattr(ddpm.Model, "train_step", nan_loss)
    with pytest.raises(AssertionError, match="nan"):
        assert_memory(run_memory("ddpm", "paper", tiny), TINY["batch"])


def test_inputs_check_fails(tiny, tiny_inputs, monkeypatch):
    """Weights that fid.load_inception reads back as others, images that data.load_images reads in another layout."""
    inputs = tiny_inputs
    assert_inputs(inputs, tiny["images"])
    with pytest.raises(AssertionError, match="other weights"):
        assert_inputs({**inputs, "fingerprint": "0" * 16}, tiny["images"])
    load_images = data.load_images
    monkeypatch.setattr(data, "load_images", lambda path: load_images(path).permute(0, 2, 3, 1))
    with pytest.raises(AssertionError):
        assert_inputs(inputs, tiny["images"])


def test_retrain_check_fails_when_retrain_fails(tiny, tiny_inputs, capsys):
    """retrain.py stops with its one-line message and exit status 2 (here: a data file that is not there)."""
    with pytest.raises(AssertionError, match="retrain.main failed"):
        run_retrain(tiny, {**tiny_inputs, "data": os.path.join(tiny["workdir"], "missing.npy")}, {})
    assert "missing.npy" in capsys.readouterr().err


def test_retrain_check_fails_on_zero_features(tiny, tiny_inputs, monkeypatch):
    """Inception features that are all zero (a broken feature extractor): FID 0, and the check fails."""
    monkeypatch.setattr(fid, "inception_features", lambda images, *args, **kwargs: np.zeros((len(images), 2048)))
    with pytest.raises(AssertionError, match="FID 0 in iteration 0"):
        run_retrain(tiny, tiny_inputs, {})


def test_torchrun_check(tiny, monkeypatch):
    """The torchrun check's command (python -m torch.distributed.run ... retrain.py with the retrain check's
    arguments); it passes on exit 0 with a run folder that holds the Config asked for and good metrics, and fails
    on another exit status, a Config that retrain.py read otherwise, a missing iteration, a non-finite or zero FID.
    (subprocess.run is replaced by one that writes the run folder: no processes start.)"""
    inputs = {"data": "d.npy", "inception": "i.pth"}
    good = {"iter": 1, "fid": 230.0, "precision": 0.0, "recall": 0.0, "features": "inception"}

    def fake(returncode=0, config=None, records=({**good, "iter": 0}, good)):
        def run(cmd, **kwargs):
            out = cmd[cmd.index("--out") + 1]
            os.makedirs(out, exist_ok=True)
            want = dataclasses.asdict(edm.make_config("paper", **retrain_sets(tiny)))
            torch.save({"format": retrain.CKPT_FORMAT, "config": {**want, **(config or {})}},
                       os.path.join(out, "iter0.pt"))
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            return subprocess.CompletedProcess(cmd, returncode, "", "Traceback\nRuntimeError: boom\n")
        return run

    record = {}
    monkeypatch.setattr(subprocess, "run", fake())
    run_torchrun(tiny, inputs, 2, record)
    cmd = record["cmd"]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5] == os.path.join(ROOT, "retrain.py") and os.path.isfile(cmd[5])
    out = os.path.join(tiny["workdir"], "torchrun-edm")
    assert cmd[6:] == [*retrain_argv(tiny, inputs, out), "--device", "cpu"]
    for broken, match in ((fake(returncode=1), "exit status 1: \\['RuntimeError: boom'\\]"),
                          (fake(config={"channel_mult": (1, 2)}), "channel_mult"),
                          (fake(records=[good]), "\\[1\\] == \\[0, 1\\]"),
                          (fake(records=[{**good, "iter": 0, "fid": float("nan")}, good]), "'fid': nan"),
                          (fake(records=[{**good, "iter": 0}, {**good, "fid": 0.0}]), "FID 0 in iteration 1")):
        monkeypatch.setattr(subprocess, "run", broken)
        with pytest.raises(AssertionError, match=match):
            run_torchrun(tiny, inputs, 2, {})
    assert torchrun_procs(3, 4) == 2 and torchrun_procs(6, 512) == 4 and torchrun_procs(8, 512) == 8
