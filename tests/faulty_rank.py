"""retrain.py with a failure injected on one rank, started by tests/test_faults.py through run_ranks.

FAULT_RANK: the rank that fails. FAULT_PHASE: where it fails:
    construction   the model's constructor (before its DistributedDataParallel, a collective)
    training       a training step
    sampling       a sampling batch of training.sample (not the run's clock, which samples on rank 0 alone)
    writing        the writes of checkpoints (.pt), as on a full disk: iteration 0's is the first
"""

import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ddpm  # noqa: E402
import settings  # noqa: E402

PHASE, FAILING = os.environ["FAULT_PHASE"], os.environ["FAULT_RANK"] == os.environ["RANK"]
OOM = RuntimeError("CUDA out of memory (injected)")


def construct(self, *args, **kwargs):
    if FAILING:
        raise OOM
    original_init(self, *args, **kwargs)


def train_step(self, x):
    if FAILING:
        raise OOM
    return original_train_step(self, x)


def generate(self, seeds, *args, **kwargs):
    if FAILING and int(seeds[0]) // 10**7 % 1000 != 999:  # iteration 999's seeds: the clock's probe (training.py)
        raise OOM
    return original_generate(self, seeds, *args, **kwargs)


def save_atomic(obj, path):
    if FAILING and path.endswith(".pt"):
        raise OSError(28, "No space left on device (injected)")
    original_save_atomic(obj, path)


original_init, original_train_step, original_generate = ddpm.Model.__init__, ddpm.Model.train_step, ddpm.Model.generate
original_save_atomic = settings.save_atomic
if PHASE == "construction":
    ddpm.Model.__init__ = construct
elif PHASE == "training":
    ddpm.Model.train_step = train_step
elif PHASE == "sampling":
    ddpm.Model.generate = generate
elif PHASE == "writing":
    settings.save_atomic = save_atomic  # before retrain.py and training.py import it by name
else:
    raise ValueError(f"FAULT_PHASE {PHASE!r}")

sys.argv[0] = str(REPO / "retrain.py")
runpy.run_path(sys.argv[0], run_name="__main__")
