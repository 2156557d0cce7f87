"""The GPU acceptance check: does the CUDA path run, end to end, at the paper's sizes?

On a machine with one or more CUDA GPUs (minutes; most of it torch.compile and the retrain.py runs):

    python -m pytest -m gpu -v

runs the checks below at full size and writes what they measured to runs/gpu_check.json (another path:
GPU_CHECK_JSON=PATH). The ordinary test suite runs the same checks in their tiny CPU mode (pytest.ini leaves the
full-size ones, marked gpu, out of a plain `pytest`): each paper preset a few channels wide (TINY_NETS), the CUDA
profile forced (bf16, channels_last, fused Adam), batch 4, 2 seeds, 2-step samplers (otcfm keeps dopri5),
8 images, 2 gloo processes. The checks that need a GPU skip there: compile (minutes on a CPU) and torchrun.

    test_model      bench.bench_model at each paper preset and batch with the profile the models' "auto" resolves
                    to on CUDA: 5 Model.train_step calls (finite losses), 2 Model.generate calls of the preset's
                    sample_batch seeds with its sampler (finite images of the right shape in [-1, 1], an NFE),
                    Model.profile; [compiled] the same with Config.compile = True, and no fallback to eager
    test_memory     2 training steps at the preset's batch (EDM FFHQ-64 at 256, DDPM and OT-CFM at 128), their
                    peak memory (bench.PeakMemory)
    test_inputs     2,048 random 32x32 RGB images as an .npy file and FID Inception weights (at full size the
                    released ones when the torch hub cache holds them, else random ones, He-initialized so that
                    their features are not ~0), read back by data.load_images and fid.load_inception
    test_features_ranks
                    metrics.Evaluator.features of 1,001 of those images from N processes (torchrun, one GPU each,
                    NCCL; tiny: 2 gloo processes on 3 images), gathered on rank 0, equal those of one process
                    (fid.inception_features) to FEATURES_TOL; with one GPU, a 1-process NCCL group against plain
    test_precision  each paper network (every weight random, none zero), one forward at a middle noise level
                    as its sampler calls it, in a model with amp bf16 and one with amp fp32 and the same weights:
                    they differ (bf16 ran), by at most PRECISION_TOL of the output's largest value
    test_dopri5_nfe OT-CFM at the paper preset trained 300 steps on the images (tiny: 5), then sampled with
                    dopri5 at the paper's tolerances: the samples are not the untrained net's (a zero velocity
                    field leaves the noise as it is), and the NFE is below the preset's fixed-step budget
    test_retrain    retrain.main(["--model", "edm", "--preset", "paper", "--iters", "1", "--metrics", "inception",
                    ...]) on those inputs, 4 + 2 optimizer steps: the Config it trained is the one asked for, and
                    metrics.jsonl holds iterations 0 and 1 with a finite FID above 1 (random images against a
                    barely trained model's samples) and precision and recall in [0, 1]
    test_retrain_compiled
                    the same with --compile: the log says compile True, and no fallback to eager
    test_resume_cpu_to_gpu
                    retrain.py --device cpu, iterations 0 and 1 of EDM's tiny network on 64 of the images (the
                    profile "auto": fp32, NCHW, plain Adam), then --resume --iters 2 on CUDA (bf16, NHWC, fused
                    Adam): iteration 2 appended with finite metrics, iterations 0 and 1 kept (tiny: CPU to CPU)
    test_torchrun   each model's retrain check under python -m torch.distributed.run --standalone
                    --nproc_per_node=N (N: the GPUs, lowered until it divides the batch; with one GPU a single
                    process in a process group of one: NCCL and DDP as on N GPUs)

The JSON record: {"header": bench.py's header (GPU, torch, dtype, bf16 peak, ...) with the GPU count and CUDA
version, "checks": [one per test: its name, size, outcome, seconds, and what it measured: bench.py's row of a
model or memory check (img/s, MFU, peak MiB, ...), a retrain run's command line and metrics]}. It is rewritten
after each check, so a run that stops keeps what finished; run it in one process (no -n). docs/performance.md
takes its GPU figures from there.

The tests after the checks show that each check fails on a broken input."""

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

import bench
import data
import ddpm
import edm
import fid
import jobs
import metrics
import otcfm
import retrain
from ranks import run_ranks

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
FEATURE_IMAGES = 1001         # images of the features check: odd, so that N >= 2 processes get shares of two sizes
PRECISION_BATCH = 16          # images of the precision check's forward
DOPRI5_STEPS = 300            # optimizer steps of OT-CFM before the dopri5 check samples
RESUME_IMAGES = 64            # real images of the resume check: its first two iterations run on the CPU
MODULES = {"ddpm": ddpm, "edm": edm, "otcfm": otcfm}

# features of the same image from 1 process and from N: the same fp32 network (TF32 off), but another batch
# composition, for which cuDNN may pick another convolution algorithm (sums in another order: ~1e-6 of the
# largest feature); the features of two different images differ by ~3e-2 of it (random weights; measured)
FEATURES_TOL = 1e-4
# bf16 keeps 8 significant bits: each rounding errs by up to 2^-9 = 0.2%, and through the 20-60 layers of these
# U-Nets such errors add up as a random walk, ~sqrt(50) x 0.2% = 1.4% (measured on the CPU, tiny and paper
# networks: 0.9-2.4% of the output's largest value); a weight error of 10% gives 27-45%
PRECISION_TOL = 0.04

# tiny mode: each paper preset's structure (attention level, augment labels, sampler) a few channels wide, with
# 2-step DDIM / Heun samplers (otcfm keeps its adaptive dopri5), and the CUDA profile set by hand
TINY_NETS = {
    "ddpm": dict(hid_channels=8, norm_groups=4, ch_multipliers=(1, 1), apply_attn=(False, True), num_res_blocks=1,
                 sample_steps=2),
    "edm": dict(model_channels=8, channel_mult=(1, 1), num_blocks=1, num_steps=2),
    "otcfm": dict(channels=8, norm_groups=4, channel_mult=(1, 1), num_res_blocks=1, head_channels=8),
}
TINY = dict(batch=4, sample_n=2, sample_batch=8, images=8,  # sample_batch: retrain.py's; images: ~0.15 CPU-s each
            feature_images=3, precision_batch=4, dopri5_steps=5, resume_images=8)


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
    sizes = dict(feature_images=FEATURE_IMAGES, precision_batch=PRECISION_BATCH, dopri5_steps=DOPRI5_STEPS,
                 resume_images=RESUME_IMAGES)
    s.update({k: v if full else TINY[k] for k, v in sizes.items()})
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


def features_worker(argv: list[str]) -> int:
    """One process of the features check (this file run as a script, under torchrun or ranks.run_ranks):
    metrics.Evaluator.features of the first N images, each process extracting its share and rank 0 gathering
    them; rank 0 saves them with the size of the process group, counted by a collective of it."""
    p = argparse.ArgumentParser()
    for name in ("images", "n", "inception", "out"):
        p.add_argument(name)
    p.add_argument("--device", default="cpu")
    p.add_argument("--swap", action="store_true", help="the fault test's: rank 0 receives the shares reversed")
    a = p.parse_args(argv)
    rank, world, device = jobs.setup_device(a.device)
    if not dist.is_initialized():  # one process, where jobs.setup_device starts no group: one all the same
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if a.swap:
        gather = dist.gather

        def swapped(tensor, gather_list=None, *args, **kwargs):
            work = gather(tensor, gather_list, *args, **kwargs)
            if gather_list:
                gather_list.reverse()
            return work

        dist.gather = swapped
    evaluator = metrics.Evaluator.__new__(metrics.Evaluator)  # features() alone: no real set, no reference
    evaluator.kind, evaluator.device, evaluator.progress = "inception", device, False
    evaluator.net = fid.load_inception(a.inception, device=device)
    features = evaluator.features(data.load_images(a.images)[:int(a.n)])
    ranks = torch.ones(1, device=device)
    dist.all_reduce(ranks)  # with one process the group's only collective: NCCL on one GPU
    if rank == 0:
        np.savez(a.out, features=features, ranks=int(ranks.item()), backend=dist.get_backend())
    dist.barrier()
    return 0


def run_features_ranks(s: dict, inputs: dict, swap: bool = False) -> dict:
    """The Inception features of the first s["feature_images"] images in this process (fid.inception_features) and
    from features_worker on N processes: on CUDA under torchrun, one per GPU (NCCL); tiny: 2 gloo processes on the
    CPU (ranks.run_ranks). Their difference relative to the largest feature, and how much the images' differ."""
    procs, n = (torch.cuda.device_count() if s["full"] else 2), s["feature_images"]
    out = os.path.join(s["workdir"], f"features{'-swapped' if swap else ''}.npz")
    argv = [inputs["data"], n, inputs["inception"], out, "--device", s["device"].type, *(["--swap"] if swap else [])]
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])
    with mock.patch.dict(os.environ, {"PYTHONPATH": path}):  # the processes import this file's modules
        if s["full"]:
            results = [subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc_per_node={procs}", os.path.abspath(__file__), *map(str, argv)],
                                      cwd=ROOT, capture_output=True, text=True, timeout=600)]
        else:
            results = run_ranks(lambda rank: argv, procs, script=Path(__file__).resolve())
    r = {"procs": procs, "images": n, "output_tail": "".join(p.stdout + p.stderr for p in results)[-4000:]}
    for p in results:
        assert p.returncode == 0, f"exit status {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"
    saved = np.load(out)
    one = fid.inception_features(data.load_images(inputs["data"])[:n],
                                 fid.load_inception(inputs["inception"], device=s["device"]), progress=False)
    many, scale = saved["features"], np.abs(one).max()
    r.update(ranks=int(saved["ranks"]), backend=str(saved["backend"]), shapes=[list(one.shape), list(many.shape)],
             spread=float(np.ptp(one, axis=0).max() / scale))
    if many.shape == one.shape:
        r["max_diff"] = float(np.abs(many - one).max() / scale)
    return r


def assert_features_ranks(r: dict) -> None:
    assert r["ranks"] == r["procs"], f"a process group of {r['ranks']}, not {r['procs']}"
    assert r["shapes"][1] == r["shapes"][0], f"features of shape {r['shapes'][1]} from {r['procs']} processes"
    assert r["spread"] > 100 * FEATURES_TOL, f"the images' features are alike (spread {r['spread']:.3g})"
    assert r["max_diff"] <= FEATURES_TOL, (f"features from {r['procs']} processes differ from one process's by "
                                           f"{r['max_diff']:.3g} of the largest feature")


def test_features_ranks(s, inputs, record):
    record["features"] = r = run_features_ranks(s, inputs)
    assert_features_ranks(r)


@contextlib.contextmanager
def fp32_exact():
    """float32 matmuls and convolutions without TF32 (retrain.py turns it on on CUDA): the reference of bf16."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def network_output(name: str, model, x: torch.Tensor) -> torch.Tensor:
    """The sampled network (the EMA) on x at a middle noise level, as the model's sampler calls it (its amp, its
    layout): DDPM's noise prediction at step T/2, EDM's raw output F at sigma 1 (D = c_skip x + c_out F, where
    c_skip x would hide F's rounding), OT-CFM's velocity at t = 1/2."""
    b, net = len(x), model.ema
    with torch.inference_mode():
        if name == "ddpm":
            with model._autocast():
                return net(model._input(x), torch.full((b,), model.cfg.timesteps // 2, device=x.device)).float()
        if name == "otcfm":
            with model._autocast():
                return net(torch.full((b,), 0.5, device=x.device), model._input(x)).float()
        sigma = torch.ones(b, 1, 1, 1, device=x.device)
        c_skip, c_out, _, _ = net.coefficients(sigma)
        return ((net(x, sigma) - c_skip * x) / c_out).float()


def run_precision(name: str, s: dict, weight_error: float = 0.0) -> dict:
    """One forward (network_output) of the paper network (tiny: its tiny one) in a model with amp bf16 and in one
    with amp fp32, the same weights, random in every layer; weight_error (the fault test's): the bf16 model's
    weights off by that much (relative, Gaussian). Their largest difference relative to the largest output."""
    module, device = MODULES[name], s["device"]
    sets = {k: v for k, v in s["overrides"].get(name, {}).items() if k != "amp"}
    models = {}
    for amp in ("bf16", "fp32"):
        torch.manual_seed(0)
        models[amp] = module.Model(module.make_config("paper", **sets, amp=amp), device)
    torch.manual_seed(1)
    with torch.no_grad():  # torch's default init, zero-initialized output layers included: every layer computes
        for p in models["fp32"].ema.parameters():
            if p.dim() > 1:
                torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        models["bf16"].ema.load_state_dict(models["fp32"].ema.state_dict())
        for p in models["bf16"].ema.parameters():
            if p.dim() > 1 and weight_error:
                p.mul_(1 + weight_error * torch.randn_like(p))
    cfg = models["fp32"].cfg
    x = torch.randn(s["precision_batch"], cfg.img_channels, cfg.img_resolution, cfg.img_resolution,
                    generator=torch.Generator().manual_seed(2)).to(device)
    with fp32_exact():
        out = {amp: network_output(name, m, x) for amp, m in models.items()}
    scale = out["fp32"].abs().max()
    return {"model": name, "profiles": [m.profile["amp"] for m in models.values()], "batch": len(x),
            "output_max": float(scale), "max_diff": float((out["bf16"] - out["fp32"]).abs().max() / scale),
            "rms_diff": float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm()), "tolerance": PRECISION_TOL}


def assert_precision(r: dict) -> None:
    assert r["max_diff"] > 0, "bf16 and fp32 outputs are equal: the bf16 model did not compute in bf16"
    assert r["max_diff"] <= PRECISION_TOL, (f"bf16 differs from fp32 by {r['max_diff']:.3g} of the largest output "
                                            f"(tolerance {PRECISION_TOL})")


@pytest.mark.parametrize("name", bench.MODELS)
def test_precision(name, s, record):
    record["precision"] = r = run_precision(name, s)
    assert_precision(r)


def run_dopri5(s: dict, inputs: dict) -> dict:
    """OT-CFM at the paper preset (tiny: its tiny network) sampled with dopri5 at the paper's tolerances, untrained
    and after s["dopri5_steps"] optimizer steps on the check's images: the NFE of each, how far the samples moved."""
    device, full = s["device"], s["full"]
    # from scratch for a short run: no lr warm-up (5,000 steps), the EMA following the net (0.9999 from step 0 would
    # keep it ~97% the initial weights)
    cfg = otcfm.make_config("paper", **s["overrides"].get("otcfm", {}), warmup_steps=0, ema_warmup=True)
    torch.manual_seed(0)
    model = otcfm.Model(cfg, device)
    images = data.load_images(inputs["data"]).to(device)
    seeds = torch.arange(cfg.sample_batch if full else TINY["sample_n"])
    before = model.generate(seeds)  # a zero-initialized output layer: a zero field, which leaves the noise as it is
    r = {"untrained_nfe": model.nfe, "steps": s["dopri5_steps"], "bound": cfg.steps, "samples": len(seeds)}
    batch, gen = cfg.batch if full else TINY["batch"], torch.Generator().manual_seed(0)
    for _ in range(s["dopri5_steps"]):
        x = images[torch.randint(0, len(images), (batch,), generator=gen).to(device)].float() / 127.5 - 1
        loss = model.train_step(x)
    after = model.generate(seeds)
    r.update(nfe=model.nfe, loss=float(loss), moved=float((after - before).abs().max()))
    return r


def assert_dopri5(r: dict) -> None:
    """dopri5 at the paper's rtol = atol = 1e-5 takes at least 8 evaluations (2 choose the first step, 6 per step)
    and fewer than the preset's fixed-step budget (Config.steps: compute_fid.py's 100 Euler steps), which an
    adaptive solver is there to beat: a short run learns a nearly straight field (14-26 evaluations measured on
    the tiny net), where a network computing in bf16 takes ~110 (see otcfm.Config.amp) and a field 1000x too
    steep 164. (The untrained net's zero field takes 44: the first step of 1e-6 grows at most 10x a step.)"""
    assert r["moved"] > 0, ("the trained net's dopri5 samples are the untrained net's (the noise): the sampled "
                            "weights never trained")
    assert 8 <= r["nfe"] < r["bound"], (f"dopri5 took {r['nfe']} network evaluations after {r['steps']} steps, "
                                        f"not below {r['bound']}")


def test_dopri5_nfe(s, inputs, record):
    record["dopri5"] = r = run_dopri5(s, inputs)
    assert_dopri5(r)


def retrain_sets(s: dict, name: str = "edm") -> dict:
    """The Config fields retrain.py is given with --set: the tiny network and profile, the step budgets."""
    sets = dict(s["overrides"].get(name, {}))
    if not s["full"]:
        sets.update(batch=TINY["batch"], sample_batch=TINY["sample_batch"])
    batch = MODULES[name].make_config("paper", **sets).batch
    return {**sets, "pretrain_kimg": PRETRAIN_STEPS * batch / 1000, "kimg": FINETUNE_STEPS * batch / 1000}


def set_value(v) -> str:
    """A Config value as retrain.py's --set FIELD=VALUE reads it (tuples as JSON lists)."""
    if isinstance(v, (tuple, list)):
        return json.dumps(list(v), separators=(",", ":"))
    return str(v)


def set_args(sets: dict) -> list[str]:
    return [a for k, v in sets.items() for a in ("--set", f"{k}={set_value(v)}")]


def retrain_argv(s: dict, inputs: dict, out: str, name: str = "edm") -> list[str]:
    """retrain.py's command line of the checks: a model (EDM) at the paper preset, one iteration, short budgets,
    Inception metrics on the random inputs."""
    n = str(s["images"])
    return ["--model", name, "--preset", "paper", "--data", inputs["data"], "--n-real", n, "--n-eval", n,
            "--iters", "1", "--metrics", "inception", "--inception", inputs["inception"], "--out", out, "--force",
            "--no-progress", "--seed", "0", *set_args(retrain_sets(s, name))]


def read_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_record(r: dict) -> None:
    """A metrics.jsonl record of the checks' runs: finite FID above 1, precision and recall in [0, 1]."""
    assert r["features"] == "inception", r
    assert math.isfinite(r["fid"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1, r
    # random images against a barely trained model's samples: FID ~230 (random weights), more (released ones)
    assert r["fid"] > 1, f"FID {r['fid']:.3g} in iteration {r['iter']}: the features do not tell the sets apart"


def assert_run(out: str, s: dict, name: str = "edm", compile_: bool = False) -> list[dict]:
    """A retrain.py run folder: the Config of iteration 0's checkpoint is the one asked for (the --set values read
    back as such, compile with --compile), and metrics.jsonl holds iterations 0 and 1 with good metrics."""
    config = retrain.load_checkpoint(os.path.join(out, "iter0.pt"))["config"]
    want = dataclasses.asdict(MODULES[name].make_config("paper", **retrain_sets(s, name), compile=compile_))
    assert {k: config[k] for k in want} == want
    records = read_metrics(out)
    assert [r["iter"] for r in records] == [0, 1]
    for r in records:
        assert_record(r)
    return records


@contextlib.contextmanager
def printed():
    """What the block prints, kept (the StringIO yielded) and passed on to sys.stdout after it."""
    kept = io.StringIO()
    try:
        with contextlib.redirect_stdout(kept):
            yield kept
    finally:
        sys.stdout.write(kept.getvalue())


def run_retrain(s: dict, inputs: dict, record: dict, compile_: bool = False) -> None:
    """retrain.main in this process (its messages, on a failure, are in the captured stderr); compile_: with
    --compile, which must not fall back to eager."""
    out = os.path.join(s["workdir"], "retrain-edm" + ("-compiled" if compile_ else ""))
    record["argv"] = argv = [*retrain_argv(s, inputs, out), "--device", str(s["device"]),
                             *(["--compile"] if compile_ else [])]
    with warnings.catch_warnings(record=True) as caught, printed() as log:
        warnings.simplefilter("always")
        try:
            code = retrain.main(argv)
        finally:
            if compile_:
                torch._dynamo.reset()
    record["warnings"] = sorted({str(w.message).splitlines()[0] for w in caught if str(w.message)})
    assert code == 0, "retrain.main failed (see its stderr)"
    if compile_:
        fallback = [m for m in record["warnings"] if "torch.compile failed" in m]
        assert not fallback, f"fell back to eager: {fallback[0]}"
        assert "compile True" in log.getvalue(), "retrain.py's settings line does not say compile True"
    record["metrics"] = assert_run(out, s, compile_=compile_)


def test_retrain(s, inputs, record):
    run_retrain(s, inputs, record)


def test_retrain_compiled(s, inputs, record):
    if not s["full"]:
        pytest.skip("torch.compile of the paper networks takes minutes on a CPU")
    run_retrain(s, inputs, record, compile_=True)


def resume_sets() -> dict:
    """The resume check's Config fields at both sizes: EDM's tiny network (its first iterations run on the CPU),
    the profile left "auto", the retrain check's step budgets."""
    batch = TINY["batch"]
    return {**TINY_NETS["edm"], "batch": batch, "sample_batch": TINY["sample_batch"],
            "pretrain_kimg": PRETRAIN_STEPS * batch / 1000, "kimg": FINETUNE_STEPS * batch / 1000}


def run_resume(s: dict, inputs: dict, record: dict) -> None:
    """retrain.py --device cpu for iterations 0 and 1 (every core at full size: its Inception features run on the
    CPU), then `--resume --out RUN --iters 2 --device` the check's device, the rest read from the run's command."""
    out, n = os.path.join(s["workdir"], "resume-edm"), str(s["resume_images"])
    first = ["--model", "edm", "--preset", "paper", "--data", inputs["data"], "--n-real", n, "--n-eval", n,
             "--iters", "1", "--metrics", "inception", "--inception", inputs["inception"], "--out", out, "--force",
             "--no-progress", "--seed", "0", "--device", "cpu", "--threads", str(jobs.cpu_cores() if s["full"] else 1),
             *set_args(resume_sets())]
    then = ["--resume", "--out", out, "--iters", "2", "--device", str(s["device"])]
    record["argv"] = [first, then]
    threads = torch.get_num_threads()
    try:
        assert retrain.main(first) == 0, "retrain.py --device cpu failed (see its stderr)"
        before = read_metrics(out)
        with printed() as log:
            code = retrain.main(then)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, f"retrain.py --resume --device {s['device']} failed (see its stderr)"
    record["metrics"] = assert_resume(out, before, log.getvalue(), s["device"])


def assert_resume(out: str, before: list[dict], log: str, device: torch.device) -> list[dict]:
    """The resumed run: iteration 2 appended with good metrics, iterations 0 and 1 as they were, the device in
    config.json and, where it changed, said; ckpt.pt at iteration 2."""
    after = read_metrics(out)
    assert [r["iter"] for r in after] == [0, 1, 2], f"iterations {[r['iter'] for r in after]} after --resume"
    assert after[:2] == before, "--resume changed the records of iterations 0 and 1"
    assert_record(after[2])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["device"] == device.type, "config.json does not hold the resumed run's device"
    if device.type != "cpu":
        assert f"--resume with device {device.type} (the run began with cpu)" in log, "the device change went unsaid"
    assert retrain.load_checkpoint(os.path.join(out, "ckpt.pt"))["iter"] == 2
    return after


def test_resume_cpu_to_gpu(s, inputs, record):
    if not s["full"]:  # (run by hand in tiny mode, it passes: 38 s on 2 busy cores)
        pytest.skip("CPU to CPU, two more retrain.py runs of ~5 s each (Inception metrics and their noise floor); "
                    "test_resume_check checks the check with retrain.main faked")
    run_resume(s, inputs, record)


def torchrun_procs(gpus: int, batch: int) -> int:
    """Processes of the torchrun check: every GPU, as many as divide the batch (each rank trains batch / N)."""
    while gpus > 1 and batch % gpus:
        gpus -= 1
    return gpus


def run_torchrun(s: dict, inputs: dict, procs: int, record: dict, name: str = "edm") -> None:
    """A model's retrain check under `python -m torch.distributed.run --standalone --nproc_per_node=procs`."""
    out = os.path.join(s["workdir"], f"torchrun-{name}")
    record["cmd"] = cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={procs}", os.path.join(ROOT, "retrain.py"),
                           *retrain_argv(s, inputs, out, name), *(["--device", "cpu"] if not s["full"] else [])]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    record["output_tail"] = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
    record["metrics"] = assert_run(out, s, name)


@pytest.mark.parametrize("name", bench.MODELS)
def test_torchrun(name, s, inputs, record):
    if not s["full"]:
        pytest.skip("torchrun runs on CUDA GPUs (tiny mode: test_torchrun_check, its subprocess faked)")
    record["procs"] = procs = torchrun_procs(torch.cuda.device_count(), MODULES[name].make_config("paper").batch)
    run_torchrun(s, inputs, procs, record, name)


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


def broken_compile(module, *args, **kwargs):
    """torch.compile whose compiled function raises TorchDynamo's error when called."""
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")

    return broken


def test_compiled_check_fails_on_eager_fallback(tiny, monkeypatch):
    """torch.compile failing (here replaced by one whose calls raise TorchDynamo's error): the model runs eagerly,
    losses and samples are fine, and the compiled check fails saying so."""
    monkeypatch.setattr(torch, "compile", broken_compile)
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


def test_retrain_check_fails_on_zero_features(tiny, tiny_inputs, monkeypatch, tmp_path):
    """Inception features that are all zero (a broken feature extractor): FID 0, and the check fails. (In a folder of
    its own, whose cache holds no real features of the true extractor.)"""
    monkeypatch.setattr(fid, "inception_features", lambda images, *args, **kwargs: np.zeros((len(images), 2048)))
    with pytest.raises(AssertionError, match="FID 0 in iteration 0"):
        run_retrain({**tiny, "workdir": str(tmp_path)}, tiny_inputs, {})


def test_features_check_fails_on_swapped_gather(tiny, tiny_inputs):
    """Rank 0 receiving the shares in reverse order (dist.gather patched in the processes): rows of other images
    and of the padding where the first images' should be, and the check fails."""
    with pytest.raises(AssertionError, match="differ from one process's by"):
        assert_features_ranks(run_features_ranks(tiny, tiny_inputs, swap=True))


@pytest.mark.parametrize("fault", ["weights 10% off", "amp ignored"])
def test_precision_check_fails(fault, tiny, monkeypatch):
    """The bf16 model's weights 10% off the fp32 model's (edm: outputs ~40% apart); a model that ignores amp
    (ddpm: its "bf16" output is the fp32 one, bit for bit)."""
    if fault == "weights 10% off":
        with pytest.raises(AssertionError, match="bf16 differs from fp32 by"):
            assert_precision(run_precision("edm", tiny, weight_error=0.1))
        return
    init = ddpm.Model.__init__
    monkeypatch.setattr(ddpm.Model, "__init__",
                        lambda self, cfg, device: init(self, dataclasses.replace(cfg, amp="fp32"), device))
    with pytest.raises(AssertionError, match="did not compute in bf16"):
        assert_precision(run_precision("ddpm", tiny))


@pytest.mark.parametrize("fault", ["never trained", "steep field"])
def test_dopri5_check_fails(fault, tiny, tiny_inputs, monkeypatch):
    """Training steps that change nothing (the sampled net stays the untrained one, a zero field); a velocity field
    1000x too steep (a diverged net): dopri5 takes 164 evaluations."""
    if fault == "never trained":
        monkeypatch.setattr(otcfm.Model, "train_step", lambda self, x: torch.zeros(()))
        match = "are the untrained net's"
    else:
        dopri5 = otcfm.dopri5
        monkeypatch.setitem(otcfm.SAMPLERS, "dopri5", lambda f, x, cfg: dopri5(lambda t, y: 1000 * f(t, y), x, cfg))
        match = "dopri5 took \\d+ network evaluations after 5 steps, not below 100"
    with pytest.raises(AssertionError, match=match):
        assert_dopri5(run_dopri5(tiny, tiny_inputs))


def test_retrain_compiled_check_fails_on_eager_fallback(tiny, tiny_inputs, monkeypatch, tmp_path):
    """retrain.py --compile where torch.compile fails: the run completes eagerly, and the check fails saying so.
    (Inception features replaced by the images' first 64 values, whose metrics cost nothing: they play no part; in a
    folder of its own, whose cache holds no real features of the true extractor.)"""
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fid, "inception_features",
                        lambda images, *args, **kwargs: torch.as_tensor(images).flatten(1)[:, :64].double().numpy())
    with pytest.raises(AssertionError, match="fell back to eager: torch.compile failed"):
        run_retrain({**tiny, "workdir": str(tmp_path)}, tiny_inputs, {}, compile_=True)


def test_resume_check(tiny, monkeypatch):
    """The resume check's two retrain.py calls (the first on the CPU, then --resume --iters 2 on the check's device);
    it passes on a run folder with iteration 2 appended, and fails on a resumed run that stops with an error,
    appends nothing, rewrites iteration 1, measures a NaN FID or keeps the old device, and on a change of device
    that retrain.py does not say. (retrain.main is replaced by one that writes the run folder.)"""
    good = {"lam": 1.0, "fid": 230.0, "precision": 0.0, "recall": 0.0, "features": "inception"}
    calls = []

    def fake(resumed=({**good, "iter": 2},), kept=None, device="cpu", code=0):
        def main(argv):
            calls.append(argv)
            out = argv[argv.index("--out") + 1]
            lines = [{**good, "iter": 0}, kept or {**good, "iter": 1}, *resumed] if "--resume" in argv else \
                [{**good, "iter": 0}, {**good, "iter": 1}]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in lines)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump({"device": device if "--resume" in argv else "cpu"}, f)
            torch.save({"format": retrain.CKPT_FORMAT, "iter": lines[-1]["iter"]}, os.path.join(out, "ckpt.pt"))
            return code if "--resume" in argv else 0
        return main

    inputs = {"data": "d.npy", "inception": "i.pth"}
    monkeypatch.setattr(retrain, "main", fake())
    run_resume(tiny, inputs, {})
    first, then = calls
    assert first[first.index("--device") + 1] == "cpu" and "--resume" not in first
    assert then == ["--resume", "--out", first[first.index("--out") + 1], "--iters", "2", "--device", "cpu"]
    for broken, match in ((fake(code=2), "--resume --device cpu failed"),
                          (fake(resumed=()), "iterations \\[0, 1\\] after --resume"),
                          (fake(kept={**good, "iter": 1, "fid": 200.0}), "changed the records"),
                          (fake(resumed=({**good, "iter": 2, "fid": float("nan")},)), "'fid': nan"),
                          (fake(device="cuda"), "does not hold the resumed run's device")):
        monkeypatch.setattr(retrain, "main", broken)
        with pytest.raises(AssertionError, match=match):
            run_resume(tiny, inputs, {})
    out = os.path.join(tiny["workdir"], "resume-edm")
    fake(device="cuda")(["--resume", "--out", out])  # a run resumed on CUDA
    with pytest.raises(AssertionError, match="the device change went unsaid"):
        assert_resume(out, read_metrics(out)[:2], "retrain.py: settings", torch.device("cuda"))
    assert_resume(out, read_metrics(out)[:2], "retrain.py: --resume with device cuda (the run began with cpu)",
                  torch.device("cuda"))


@pytest.mark.parametrize("name", bench.MODELS)
def test_torchrun_check(name, tiny, monkeypatch):
    """The torchrun check's command (python -m torch.distributed.run ... retrain.py with the retrain check's
    arguments for each model); it passes on exit 0 with a run folder that holds the Config asked for and good metrics, and fails
    on another exit status, a Config that retrain.py read otherwise, a missing iteration, a non-finite or zero FID.
    (subprocess.run is replaced by one that writes the run folder: no processes start.)"""
    inputs = {"data": "d.npy", "inception": "i.pth"}
    good = {"iter": 1, "fid": 230.0, "precision": 0.0, "recall": 0.0, "features": "inception"}

    def fake(returncode=0, config=None, records=({**good, "iter": 0}, good)):
        def run(cmd, **kwargs):
            out = cmd[cmd.index("--out") + 1]
            os.makedirs(out, exist_ok=True)
            want = dataclasses.asdict(MODULES[name].make_config("paper", **retrain_sets(tiny, name)))
            torch.save({"format": retrain.CKPT_FORMAT, "config": {**want, **(config or {})}},
                       os.path.join(out, "iter0.pt"))
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            return subprocess.CompletedProcess(cmd, returncode, "", "Traceback\nRuntimeError: boom\n")
        return run

    record = {}
    monkeypatch.setattr(subprocess, "run", fake())
    run_torchrun(tiny, inputs, 2, record, name)
    cmd = record["cmd"]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5] == os.path.join(ROOT, "retrain.py") and os.path.isfile(cmd[5])
    out = os.path.join(tiny["workdir"], f"torchrun-{name}")
    assert cmd[6:] == [*retrain_argv(tiny, inputs, out, name), "--device", "cpu"]
    assert cmd[cmd.index("--model") + 1] == name
    for broken, match in ((fake(returncode=1), "exit status 1: \\['RuntimeError: boom'\\]"),
                          (fake(config={"lr": 1.0}), "'lr': 1.0"),
                          (fake(records=[good]), "\\[1\\] == \\[0, 1\\]"),
                          (fake(records=[{**good, "iter": 0, "fid": float("nan")}, good]), "'fid': nan"),
                          (fake(records=[{**good, "iter": 0}, {**good, "fid": 0.0}]), "FID 0 in iteration 1")):
        monkeypatch.setattr(subprocess, "run", broken)
        with pytest.raises(AssertionError, match=match):
            run_torchrun(tiny, inputs, 2, {}, name)
    assert torchrun_procs(3, 4) == 2 and torchrun_procs(6, 512) == 4 and torchrun_procs(8, 512) == 8


if __name__ == "__main__":  # a process of the features check (run_features_ranks)
    code = features_worker(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as retrain.py: no process-group teardown, which can abort once another rank has left
