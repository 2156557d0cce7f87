"""Training under DistributedDataParallel against one process, for the three models (test_cuda_path.py).

A few optimizer steps on a fixed global batch of GLOBAL_BATCH images, at configs that carry the paper
presets' features (EDM with its 9 augment inputs and both preconditionings, OT-CFM with exact OT pairing
and resampling). For the two runs to be comparable, every random draw of a training step is made a
function of the global image index: a draw whose first dimension is the local batch B, made at rank r,
returns rows r*B .. (r+1)*B-1 of a global draw, row i of which comes from its own generator (seeded by
the call's number and i). One process at the global batch then draws exactly what the ranks drew.

    torchrun --standalone --nproc_per_node=2 tests/ddp_models.py OUT.pt
"""

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL_BATCH, STEPS = 8, 3
TINY = {"ddpm": dict(drop_rate=0.0, warmup=1),
        "edm": dict(dropout=0.0, lr_rampup_kimg=0.0),
        "otcfm": dict(dropout=0.0, warmup_steps=0)}
CASES = {  # name: (model, overrides of the small preset)
    "ddpm": ("ddpm", dict(hid_channels=64)),  # 2+ channels per GroupNorm group: no bias with a zero gradient
    "edm-edm-augment9": ("edm", dict(precond="edm", augment_dim=9)),
    "edm-vp-augment9": ("edm", dict(precond="vp", augment_dim=9)),
    "otcfm-ot-resample": ("otcfm", dict(ot=True, ot_resample=True)),
    "otcfm-ot": ("otcfm", dict(ot=True, ot_resample=False)),
}


@contextlib.contextmanager
def per_image_draws(rank: int):
    """Within the block, torch.randn / randn_like / rand / randint draw per global image index (see above)."""
    calls = [0]
    originals = {name: getattr(torch, name) for name in ("randn", "randn_like", "rand", "randint")}

    def rows(shape, draw_row):
        calls[0] += 1
        first = rank * shape[0]
        out = [draw_row(shape[1:], torch.Generator().manual_seed(calls[0] * 100_000 + i))
               for i in range(first, first + shape[0])]
        return torch.stack(out)

    def shape_of(size):
        return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)

    def randn(*size, generator=None, dtype=None, device=None, **kw):
        assert generator is None, "draws with an explicit generator are not per-image here"
        x = rows(shape_of(size), lambda s, g: originals["randn"](s, generator=g))
        return x.to(device=device, dtype=dtype or torch.float32)

    def randn_like(t, **kw):
        return rows(t.shape, lambda s, g: originals["randn"](s, generator=g)).to(t.device, t.dtype)

    def rand(*size, generator=None, dtype=None, device=None, **kw):
        assert generator is None
        x = rows(shape_of(size), lambda s, g: originals["rand"](s, generator=g))
        return x.to(device=device, dtype=dtype or torch.float32)

    def randint(*args, generator=None, device=None, dtype=None, **kw):
        assert generator is None
        low, high, size = (0, *args) if len(args) == 2 else args
        x = rows(tuple(size), lambda s, g: originals["randint"](low, high, s, generator=g))
        return x.to(device=device, dtype=dtype or torch.int64)

    for name, fn in (("randn", randn), ("randn_like", randn_like), ("rand", rand), ("randint", randint)):
        setattr(torch, name, fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def build(case: str):
    """(model, global batch of images) of a case: the same weights and data in every process."""
    import importlib

    name, overrides = CASES[case]
    module = importlib.import_module(name)
    torch.manual_seed(0)
    cfg = module.make_config("small", batch=GLOBAL_BATCH, **TINY[name], **overrides)
    model = module.Model(cfg, "cpu")
    x = torch.rand(GLOBAL_BATCH, cfg.img_channels, cfg.img_resolution, cfg.img_resolution,
                   generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, x


def train(case: str, rank: int, world: int) -> dict:
    """STEPS steps on this rank's slice of the global batch; the network's parameters afterwards."""
    model, x = build(case)
    b = GLOBAL_BATCH // world
    with per_image_draws(rank):
        for _ in range(STEPS):
            model.train_step(x[rank * b:(rank + 1) * b])
    return {k: v.detach().clone() for k, v in model.net.named_parameters()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {case: train(case, rank, world) for case in CASES}
    if rank == 0:
        torch.save(results, sys.argv[1])
    dist.barrier()  # both ranks leave together
    dist.destroy_process_group()
