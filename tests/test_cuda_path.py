"""The CUDA path of the three models, checked on the CPU.

Every device-dependent choice is a Config field (amp, channels_last, fused_adam, compile) that "auto"
resolves from the device; set by hand, the CPU runs the CUDA profile. Each test names the defect it
catches:
  - bf16 autocast + channels_last + fused Adam train and sample like float32;
  - nothing in a training step waits for the device (a host sync per step costs directly on a GPU);
  - the optimizer's update runs a fixed number of kernels, however many parameter tensors there are;
  - the paper presets run forward, loss and a sampler step on (fake) CUDA tensors without mixing devices;
  - DistributedDataParallel on 2 processes trains exactly as one process at the same global batch
    (EDM's unused augment inputs broke DDP; OT-CFM paired noise and data per rank);
  - TF32 is switched on through the API that keeps every reader working;
  - a failure on one rank ends every rank with the same one-line error instead of a hang.
"""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddp_models
import jobs
import retrain
import training
from ranks import run_ranks

REPO = Path(__file__).resolve().parents[1]
MODELS = ("ddpm", "edm", "otcfm")
CUDA_PROFILE = dict(amp="bf16", channels_last="true", fused_adam="true")
FP32_PROFILE = dict(amp="fp32", channels_last="false", fused_adam="false")
SHORT_SAMPLER = {"ddpm": dict(sample_steps=4), "edm": dict(num_steps=3), "otcfm": dict(sampler="midpoint", steps=2)}


def tiny(name: str, **overrides):
    module = __import__(name)
    return module, module.make_config("small", batch=8, **ddp_models.TINY[name], **SHORT_SAMPLER[name], **overrides)


def digits_batch(n: int = 8) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 8 - 1  # (n, 1, 8, 8) in [-1, 1]
    return x


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that run (views excluded: they launch no kernel) and the host syncs."""

    SYNCS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal")

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNCS:
            self.syncs.append(name)
        elif not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------------
# The CUDA profile on the CPU


@pytest.mark.parametrize("name", MODELS)
def test_cuda_profile_resolves_and_agrees_with_float32(name):
    """bf16 autocast, channels_last weights and fused Adam, run on the CPU: the profile is what was asked,
    the weights are NHWC, and losses and samples agree with the float32 profile."""
    models = {}
    for label, profile in (("fp32", FP32_PROFILE), ("cuda", CUDA_PROFILE)):
        module, cfg = tiny(name, **profile)
        torch.manual_seed(0)
        models[label] = module.Model(cfg, "cpu")
    fast = models["cuda"]
    assert fast.profile == {"amp": "bf16", "channels_last": True, "fused_adam": True, "compile": False}
    assert models["fp32"].profile == {"amp": "fp32", "channels_last": False, "fused_adam": False, "compile": False}
    convs = [p for p in fast.net.parameters() if p.dim() == 4 and p.shape[-1] > 1 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    assert fast.opt.param_groups[0]["fused"] is True
    x = digits_batch()
    losses = {}
    for label, model in models.items():
        torch.manual_seed(1)
        losses[label] = torch.stack([model.train_step(x) for _ in range(3)])
    assert losses["cuda"].dtype == torch.float32 and torch.isfinite(losses["cuda"]).all()
    torch.testing.assert_close(losses["cuda"], losses["fp32"], rtol=0.03, atol=0.0)  # bf16: ~3 significant digits
    seeds = torch.arange(6)
    a, b = models["fp32"].generate(seeds), models["cuda"].generate(seeds)
    assert b.shape == a.shape == (6, 1, 8, 8) and b.is_contiguous()
    assert (a - b).abs().mean() < 0.05, (a - b).abs().mean()


# ----------------------------------------------------------------------------------------------------
# No host sync, a fixed number of kernels


@pytest.mark.parametrize("name", MODELS)
def test_training_steps_never_wait_for_the_device(name, monkeypatch):
    """20 steps of training.train in the CUDA profile: the only host syncs are the loop's loss reads, one per
    LOSS_EVERY steps (the old loop read the loss at every step, and EDM all-reduced it there).
    OT-CFM's exact pairing reads its cost matrix on the host by design (scipy's assignment solver, as
    torchcfm's POT): a device-to-host copy that the CPU cannot see, not counted here."""
    monkeypatch.setattr(training, "LOSS_EVERY", 10)
    module, cfg = tiny(name, **CUDA_PROFILE)
    model = module.Model(cfg, "cpu")
    train_set = (torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with OpCounter() as counter:
        stats = training.train(model, train_set, kimg=20 * cfg.batch / 1000, cfg=cfg, seed=0, it=1, progress=False,
                              desc="")
    assert stats["steps"] == 20 and np.isfinite(stats["loss"])
    assert counter.syncs == ["aten._local_scalar_dense"] * 2, counter.syncs


@pytest.mark.parametrize("name", MODELS)
def test_update_runs_a_fixed_number_of_kernels(name, monkeypatch):
    """Everything after backward (gradient cleaning, clipping, Adam, EMA) runs the same number of operators
    for a network with twice as many parameter tensors: foreach and fused kernels, no per-tensor loops
    (EDM had 417 nan_to_num and 417 lerp_ kernels per step at the paper preset)."""
    counts = []
    for blocks in (1, 2):
        field = {"ddpm": "num_res_blocks", "edm": "num_blocks", "otcfm": "num_res_blocks"}[name]
        module, cfg = tiny(name, **CUDA_PROFILE, **{field: blocks})
        model = module.Model(cfg, "cpu")
        update, counter = model._update, OpCounter()

        def counted(*args, **kwargs):
            with counter:
                return update(*args, **kwargs)

        model.train_step(digits_batch())  # the first step also creates Adam's state, per tensor
        monkeypatch.setattr(model, "_update", counted)
        model.train_step(digits_batch())
        counts.append((len(list(model.net.parameters())), counter.ops))
    (n1, ops1), (n2, ops2) = counts
    assert n2 > n1 + 10, counts  # the second network has many more parameter tensors
    assert ops1 == ops2 and ops1 < 40, counts


# ----------------------------------------------------------------------------------------------------
# The paper presets on fake CUDA tensors


@pytest.mark.parametrize("name", MODELS)
def test_paper_preset_runs_on_fake_cuda_tensors(name, monkeypatch):
    """Paper preset, CUDA profile, every tensor a FakeTensor on device cuda (no GPU needed, nothing computed):
    the model builds, the training loss and a sampler step run, and nothing mixes CPU and CUDA tensors
    (an op on fake tensors of two devices raises). Fake tensors hold no values, so the samplers' host-side
    schedules (time grids the samplers read as Python floats) are computed for real, outside the mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    module = __import__(name)
    cfg = module.make_config("paper", amp="bf16", channels_last="true", fused_adam="true")
    res = cfg.img_resolution
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model = module.Model(cfg, "cuda")
        assert all(p.device.type == "cuda" for p in model.net.parameters())
        x = torch.rand(2, 3, res, res, device="cuda") * 2 - 1
        if name == "otcfm":  # the exact OT pairing runs on the host (scipy): fake tensors have no values for it
            model.cfg.ot = False
        loss = model.loss(x)
        assert loss.device.type == "cuda" and loss.dim() == 0
        x_T = torch.randn(2, 3, res, res, device="cuda")
        if name == "ddpm":
            with unset_fake_temporarily():  # the schedule as the sampler reads it: host values
                abar = torch.cumprod(1 - module.linear_betas(cfg), 0).numpy()
                grid = module.time_grid(cfg.skip_schedule, 2, cfg.timesteps).numpy()

            def eps_fn(x, t):
                t = torch.full((x.shape[0],), int(t), device="cuda", dtype=torch.long)
                return model.ema(x.contiguous(memory_format=torch.channels_last), t).float()

            out = module.ddim_sampler(eps_fn, x_T, abar, grid, None)
        elif name == "edm":
            steps = module.time_steps

            def real_steps(*args):
                with unset_fake_temporarily():
                    return steps(*args)

            monkeypatch.setattr(module, "time_steps", real_steps)
            out, _ = module.heun_sampler(model.ema, x_T, module.make_config("paper", num_steps=2))
        else:
            out, _ = module.euler(lambda t, x: model.ema(t, x).float(), x_T, module.make_config("paper", steps=1))
        assert out.shape == x_T.shape and out.device.type == "cuda"


# ----------------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 processes against 1


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "params.pt"
    for r in run_ranks(lambda rank: [out], script=REPO / "tests" / "ddp_models.py"):
        assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", list(ddp_models.CASES))
def test_ddp_on_two_processes_equals_one_process(case, ddp_results):
    """A few steps on 2 gloo processes x 4 images equal the same steps on 1 process x 8 images, every image
    with the same random draws (the per-image draws of ddp_models). Fails for EDM with augment inputs
    (DDP stops: unused parameters) and for OT-CFM when each rank pairs noise and data on its own."""
    before = {k: v.detach().clone() for k, v in ddp_models.build(case)[0].net.named_parameters()}
    single = ddp_models.train(case, rank=0, world=1)
    ddp = ddp_results[case]
    assert ddp.keys() == single.keys()
    moved = max((single[k] - before[k]).abs().max().item() for k in single)
    assert moved > 1e-4  # the steps changed the weights
    # Summing the gradient over 2 x 4 images instead of 8 changes its float rounding; Adam divides each
    # gradient by its own scale, so on the few elements whose gradient is ~0 that rounding becomes a step of up
    # to ~lr (2e-3). Hence: every element within lr / 20, and the mean difference 100x below the steps' size.
    diff = torch.cat([(ddp[k] - single[k]).abs().flatten() for k in single])
    assert diff.max() < 1e-4 and diff.mean() < 1e-6, (diff.max().item(), diff.mean().item())


# ----------------------------------------------------------------------------------------------------
# TF32 and failures on one rank


def test_tf32_switches_keep_every_reader_working():
    """After retrain's TF32 switch and inside fid.py's exact-float32 block, the legacy readers (used by
    torch.compile's autotuner and other libraries) still answer: the fp32_precision API made them raise."""
    import fid

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        jobs.enable_tf32()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
        with fid._precision_mode(torch.device("cuda"), "fp32"):
            assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
        jobs.setup_device("cpu")
        torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


TINY_RUN = ["--model", "ddpm", "--preset", "small", "--device", "cpu", "--no-progress", "--iters", "0",
            "--set", "batch=8", "--set", "sample_batch=8", "--set", "sample_steps=2", "--set", "pretrain_kimg=0.016"]


def test_deterministic_switches_off_the_autotuner_and_on_deterministic_algorithms(monkeypatch):
    """The CUDA switches can be set without a GPU: by default cuDNN's autotuner (fast, repeatable only up to
    rounding); with --deterministic, deterministic algorithms and cuBLAS's workspace setting instead."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision())
    try:
        jobs.cuda_switches(deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        jobs.cuda_switches(deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2])
        torch.set_float32_matmul_precision(saved[3])


def test_missing_init_on_rank_0_alone_ends_both_ranks(tmp_path):
    """--init names a file that rank 1 has and rank 0 lacks (as on two machines): both end within 60 s with
    the same one-line error (rank 0 used to raise alone and leave rank 1 waiting at a barrier)."""
    import ddpm

    model = ddpm.Model(ddpm.make_config("small", img_channels=1, img_resolution=8), "cpu")
    ckpt = {"format": retrain.CKPT_FORMAT, "model": "ddpm", "state": model.state_dict()}
    torch.save(ckpt, tmp_path / "init1.pt")
    results = run_ranks(lambda r: [*TINY_RUN, "--data", "digits", "--n-real", "16", "--metrics", "pixel",
                                   "--init", tmp_path / f"init{r}.pt", "--out", tmp_path / "run"], timeout=60)
    for r in results:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0] == f"retrain.py: error: --init '{tmp_path / 'init0.pt'}' not found: give a checkpoint file or 'official'"


def test_reference_cache_mismatch_on_rank_0_ends_both_ranks(tmp_path):
    """Rank 0 alone reads the real set's reference features; a cache made from other images is refused
    there, and rank 1 ends too, with the same line, instead of waiting in the first training step."""
    import fid
    import metrics

    images = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    np.save(tmp_path / "images.npy", images.numpy())
    torch.save(fid.FIDInception().state_dict(), tmp_path / "inception.pth")
    (tmp_path / "run").mkdir()
    net = fid.load_inception(str(tmp_path / "inception.pth"))
    path = metrics.inception_cache(str(tmp_path / "cache"), "reference", images, net)  # the run's cache file
    fid.reference(images.flip(0), name="other", path=path, progress=False)
    results = run_ranks(lambda r: [*TINY_RUN, "--data", tmp_path / "images.npy", "--metrics", "inception",
                                   "--inception", tmp_path / "inception.pth", "--out", tmp_path / "run",
                                   "--resume", "--force"], timeout=60)
    for r in results:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith("retrain.py: error: reference '") and "delete it" in lines[0]


BROKEN_FEATURES = """import os, runpy, sys
sys.path.insert(0, {repo!r})
import fid
extract = fid.inception_features
def broken(x, *args, **kwargs):  # the samples' features fail on one rank, as a CUDA out-of-memory would
    if os.environ["RANK"] == "{rank}":
        raise RuntimeError("CUDA out of memory (injected)")
    return extract(x, *args, **kwargs)
fid.inception_features = broken
sys.argv[0] = {retrain!r}
runpy.run_path({retrain!r}, run_name="__main__")
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_a_feature_error_on_one_rank_ends_both_ranks(tmp_path, failing):
    """Under torchrun every rank extracts the Inception features of its share of the samples, then rank 0 gathers
    them. An error during the extraction on one rank ends both within 60 s with the same one-line error, instead
    of leaving the other waiting in the gather until the NCCL watchdog."""
    import fid

    images = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    np.save(tmp_path / "images.npy", images.numpy())
    torch.save(fid.FIDInception().state_dict(), tmp_path / "inception.pth")
    script = tmp_path / "broken.py"
    script.write_text(BROKEN_FEATURES.format(repo=str(REPO), rank=failing, retrain=str(REPO / "retrain.py")))
    results = run_ranks(lambda r: [*TINY_RUN, "--data", tmp_path / "images.npy", "--metrics", "inception",
                                   "--inception", tmp_path / "inception.pth", "--out", tmp_path / "run"],
                        timeout=60, script=script)
    for r in results:
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2, r.stderr[-2000:]
        assert last == f"retrain.py: error: rank {failing}: RuntimeError: CUDA out of memory (injected)", r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# torch.compile: a fallback for compile errors only


def compiling_to(error):
    """A stand-in for torch.compile whose compiled network raises error when called."""
    def compiled(*args):
        raise error
    return lambda net: compiled


@pytest.mark.parametrize("name", MODELS)
def test_compile_falls_back_to_eager_on_compile_errors_only(name, monkeypatch):
    """torch.compile failing to compile (inductor finding no C++ compiler) falls back to the eager network with a
    one-line warning per network call, and trains and samples exactly as eager; an error of the compiled code as
    it runs (CUDA out of memory) propagates. Catches a fallback that catches every exception: an out-of-memory
    inside a compiled forward switched that process to eager for good. EDM runs VP with sigma_min below the
    smallest level its schedule supports: the samplers read that level through the compiled wrapper
    (net.sigma_min), which must give the eager net's."""
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    extra = dict(precond="vp", sigma_min=1e-4) if name == "edm" else {}
    x = digits_batch(8)
    monkeypatch.setattr(torch, "compile", compiling_to(InductorError(InvalidCxxCompiler("cc"), None)))
    runs = []
    for compile_ in (False, True):
        module, cfg = tiny(name, compile=compile_, **extra)
        torch.manual_seed(0)
        model = module.Model(cfg, "cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(1)
            runs.append((model.train_step(x), model.generate(torch.arange(2))))
        fallbacks = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
        assert len(fallbacks) == (2 if compile_ else 0), fallbacks  # training's network call and sampling's
    assert all(m.startswith("torch.compile failed (InductorError: InvalidCxxCompiler") for m in fallbacks)
    assert all(len(m.splitlines()) == 1 for m in fallbacks)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    monkeypatch.setattr(torch, "compile", compiling_to(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")))
    module, cfg = tiny(name, compile=True)
    model = module.Model(cfg, "cpu")
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        model.train_step(x)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        model.generate(torch.arange(2))
