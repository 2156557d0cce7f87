"""One DDPM training step under torchrun (used by test_distributed.py): rank r trains on its half of a
fixed global batch with torch.manual_seed(100 + r); rank 0 saves the resulting parameters."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddpm  # noqa: E402

GLOBAL_BATCH = 8


def setup() -> tuple[ddpm.Model, torch.Tensor]:
    torch.manual_seed(0)
    model = ddpm.Model(ddpm.make_config("small", drop_rate=0.0, batch=GLOBAL_BATCH, warmup=1), "cpu")
    x = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, x


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x = setup()
    b = GLOBAL_BATCH // world
    torch.manual_seed(100 + rank)
    model.train_step(x[rank * b:(rank + 1) * b])
    if rank == 0:
        torch.save(model.state_dict()["net"], sys.argv[1])
    dist.destroy_process_group()
