"""Gradient accumulation (Config.batch_gpu, EDM's --batch-gpu): one optimizer step on 8 images in micro-batches
gives the update of the whole batch at once, for ddpm, edm and otcfm, also under DistributedDataParallel.

    pytest tests/test_accumulate.py
    python tests/test_accumulate.py OUT.pt      # one rank of the DDP test (started by it, see ranks.py)
"""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the models, also when run as a rank

import ddp_models  # noqa: E402
import ddpm  # noqa: E402
import edm  # noqa: E402
import otcfm  # noqa: E402
from ranks import REPO, run_ranks  # noqa: E402

# Adam's eps for the tests. At the default 1e-8 Adam's first step is lr * sign(g): an element whose gradient is 0 up
# to float32 rounding (the attention's key bias, whose gradient is exactly 0 in exact arithmetic) moves by +-lr
# with whichever sign the rounding gave, in any two runs that sum the gradient in another order. With eps = 1e-2
# the step is a smooth function of the gradient, so equal gradients give equal weights within float tolerance.
ADAM_EPS = 1e-2
# tiny networks, no dropout (masks are drawn per micro-batch), full lr at the first step, no gradient clipping (it
# would rescale a wrongly scaled gradient back to the right norm and hide it)
CASES = {
    "ddpm": (ddpm, dict(warmup=1, grad_clip=1e9)),  # "small": min-SNR weights per image, no dropout
    "edm": (edm, dict(dropout=0.0, lr_rampup_kimg=0.0, augment_dim=9)),
    "edm-vp": (edm, dict(precond="vp", dropout=0.0, lr_rampup_kimg=0.0)),
    "otcfm": (otcfm, dict(warmup_steps=0, grad_clip=1e9, sigma=0.1)),  # exact OT with resampling, eps drawn
}
N = 8  # images per step


def build(case: str, **overrides):
    """The small preset's model of a case, prepared for the tests: the same for every call."""
    module, base = CASES[case]
    torch.manual_seed(0)
    return prepared(module.Model(module.make_config("small", batch=N, **{**base, **overrides}), "cpu"))


def prepared(model):
    """model with every weight moved off its initialisation (zero-initialised output layers would leave most
    gradients 0), the same way for every call, and Adam's eps set to ADAM_EPS."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for group in model.opt.param_groups:
        group["eps"] = ADAM_EPS
    return model


def images(model) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    return torch.rand(N, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, generator=g) * 2 - 1


def step(model):
    """One train_step under a fixed seed: (its loss, every tensor it changes: weights, gradients, EMA, Adam)."""
    torch.manual_seed(3)
    return model.train_step(images(model)), changed(model)


def changed(model) -> dict:
    """Every tensor a train_step changes: weights, gradients, EMA, Adam's state."""
    out = {}
    for name, p in model.net.named_parameters():
        out[f"net.{name}"], out[f"grad.{name}"] = p.detach().clone(), p.grad.clone()
    for name, p in model.ema.named_parameters():
        out[f"ema.{name}"] = p.detach().clone()
    for i, state in model.opt.state_dict()["state"].items():
        for key, v in state.items():
            out[f"adam.{i}.{key}"] = torch.as_tensor(v).clone()
    return out


def assert_same(got: dict, want: dict) -> None:
    """Every tensor within 1e-5 of its own scale (the largest magnitude in it)."""
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key].double(), want[key].double()
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-5 * scale, key


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_give_the_whole_batch_update(case):
    before = {name: p.detach().clone() for name, p in build(case).net.named_parameters()}
    loss, whole = step(build(case))
    # not trivially equal: every weight tensor has a gradient and moved
    for name in before:
        if "map_augment" in name:  # edm: zero augment labels, zero gradient
            continue
        assert whole[f"grad.{name}"].abs().max() > 0, name
        assert not torch.equal(whole[f"net.{name}"], before[name]), name
    for batch_gpu in (2, 3):  # 4 micro-batches of 2; 3 + 3 + 2, weighted by their sizes
        got_loss, got = step(build(case, batch_gpu=batch_gpu))
        assert_same(got, whole)
        assert got_loss.dim() == 0 and abs(got_loss.item() - loss.item()) <= 1e-6 * abs(loss.item())


def unweighted(model):
    """A wrong accumulation: the micro-batch losses summed without their weights (4 times the gradient)."""
    def backward(drawn):
        for i in range(0, N, 2):
            model._loss(*[None if d is None else d[i:i + 2] for d in drawn]).backward()
        return torch.zeros(())
    return backward


def drawn_per_micro_batch(model):
    """A wrong accumulation: each micro-batch draws its own noise (for OT-CFM: its own OT pairing)."""
    def backward(drawn):
        x = images(model)
        for i in range(0, N, 2):
            (model._loss(*model._draw(x[i:i + 2])) * (2 / N)).backward()
        return torch.zeros(())
    return backward


@pytest.mark.parametrize("wrong", [unweighted, drawn_per_micro_batch])
@pytest.mark.parametrize("case", list(CASES))
def test_the_comparison_catches_a_wrong_accumulation(case, wrong):
    _, whole = step(build(case))
    model = build(case, batch_gpu=2)
    model._backward = wrong(model)
    _, got = step(model)
    with pytest.raises(AssertionError):
        assert_same(got, whole)


class SyncRecorder:
    """Stands in for the DistributedDataParallel network: records, per forward, whether it ran outside no_sync
    (the backward after it then all-reduces)."""

    def __init__(self, fwd):
        self.fwd, self.synced, self.skipping = fwd, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self.skipping = True
        try:
            yield
        finally:
            self.skipping = False

    def __call__(self, *args):
        self.synced.append(not self.skipping)
        return self.fwd(*args)


@pytest.mark.parametrize("case", ["ddpm", "edm", "otcfm"])
def test_gradients_are_all_reduced_once_per_step(case):
    for batch_gpu, want in ((0, [True]), (8, [True]), (3, [False, False, True])):
        model = build(case, batch_gpu=batch_gpu)
        model._train_fwd = recorder = SyncRecorder(model._train_fwd)
        step(model)
        assert recorder.synced == want, batch_gpu


@pytest.mark.parametrize("module", [ddpm, edm, otcfm])
def test_batch_gpu_setting(module):
    for preset in module.PRESETS:
        assert module.make_config(preset).batch_gpu == 0  # the whole share at once
    assert module.make_config("small", batch_gpu=64).batch_gpu == 64
    with pytest.raises(ValueError, match="batch_gpu"):
        module.make_config("small", batch_gpu=-1)


# ----------------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 gloo processes x 4 images in micro-batches of 2 against 1 process x 8 images at once

DDP_CASES = ["edm-edm-augment9", "otcfm-ot-resample"]  # ddp_models' cases: augment inputs, global OT plan


def ddp_step(case: str, rank: int, world: int, batch_gpu: int) -> dict:
    """One train_step of a ddp_models case on this rank's share of its batch, every image with its own draws."""
    model, x = ddp_models.build(case)
    model.cfg.batch_gpu = batch_gpu
    prepared(model)
    b = len(x) // world
    with ddp_models.per_image_draws(rank):
        model.train_step(x[rank * b:(rank + 1) * b])
    return changed(model)


def test_micro_batches_under_ddp_give_the_one_process_update(tmp_path):
    out = tmp_path / "ddp.pt"
    for r in run_ranks(lambda rank: [out], script=REPO / "tests" / "test_accumulate.py"):
        assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    for case in DDP_CASES:
        assert_same(ddp[case], ddp_step(case, rank=0, world=1, batch_gpu=0))


if __name__ == "__main__":  # one rank of the test above
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {case: ddp_step(case, dist.get_rank(), dist.get_world_size(), batch_gpu=2) for case in DDP_CASES}
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["ddpm", "edm", "otcfm"])
def test_grad_clip_0_is_off(case):
    """Config.grad_clip = 0 trains unclipped in every model (a max norm of 0 would zero every gradient): the same
    step as with a bound no gradient reaches."""
    off, huge = build(case, grad_clip=0.0), build(case, grad_clip=1e9)
    before = [p.detach().clone() for p in off.net.parameters()]
    for model in (off, huge):
        torch.manual_seed(2)
        model.train_step(images(model))
    assert any(not torch.equal(a, p) for a, p in zip(before, off.net.parameters()))
    for a, b in zip(off.net.parameters(), huge.net.parameters()):
        assert torch.equal(a, b)
