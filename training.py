"""training.py -- one training run and one sampling pass of a model, as every retraining iteration does them.

retrain.py's loop (Bertrand et al., ICLR 2024) calls train() to fine-tune the model of iteration t-1 for kimg
thousand images and sample() to draw the samples that measure model t and train model t+1. Here is how:

  - training batches are drawn epoch by epoch without replacement from a seed of the iteration (train_seed),
    the same on every process; under torchrun each process trains on its slice of the global batch;
  - the loss stays on the device and is read every LOSS_EVERY steps (averaged over processes, checked finite):
    the one host synchronisation of the training loop;
  - each sample has its own seed (seed, iteration, index: image_seeds), so the samples do not depend on the
    batch size or the number of processes; images are rounded to uint8 as a PNG stores them (to_uint8);
  - the run's clock times the first steps and a sampling batch, and says once how long the whole run will take.
"""

import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from jobs import UserError, rank_world
from settings import Settings, lam_folder, lam_label, save_atomic

LOSS_EVERY = 25  # training steps between reads of the loss: the one host synchronisation of the training loop
PROBE_SECONDS = 10.0  # the run's clock times one whole sampling batch when a batch of 64 says it takes less than this


# ----------------------------------------------------------------------------------------------------
# Seeds: one per image, one per iteration


def image_seeds(seed: int, it: int, n: int) -> torch.Tensor:
    """The seed of image i of iteration it: (seed * 1000 + it) * 10^7 + i."""
    return (seed * 1000 + it) * 10**7 + torch.arange(n, dtype=torch.int64)


def train_seed(seed: int, it: int) -> int:
    """Seeds training batches and the model's own noise in iteration it (kept apart from image seeds)."""
    return (seed * 1000 + it) * 10**7 + 10**7 - 1


# ----------------------------------------------------------------------------------------------------
# Training and sampling


def batch_plan(n: int, batch: int, steps: int, gen: torch.Generator, device, start: tuple | None = None):
    """The training batches as blocks of LOSS_EVERY steps, each one copy to the device: (indices (k, batch),
    flips (k, batch), the plan's state after them: (steps done, order, pos)). Epoch by epoch without replacement;
    the same on every rank (gen is shared). start: such a state to go on from (with gen's state of that time)."""
    done, order, pos = start or (0, torch.randperm(n, generator=gen), 0)
    for first in range(done, steps, LOSS_EVERY):
        idx, flips = [], []
        for _ in range(min(LOSS_EVERY, steps - first)):
            take = []  # this step's indices, continuing into the next epoch when this one runs out
            while sum(map(len, take)) < batch:
                if pos == n:
                    order, pos = torch.randperm(n, generator=gen), 0
                k = min(batch - sum(map(len, take)), n - pos)
                take.append(order[pos:pos + k])
                pos += k
            idx.append(torch.cat(take))
            flips.append(torch.rand(batch, generator=gen) < 0.5)
        yield torch.stack(idx).to(device), torch.stack(flips).to(device), (first + len(idx), order, pos)


def train(model, train_set: torch.Tensor, kimg: float, cfg, seed: int, it: int, progress: bool, desc: str,
          clock=None, snapshots=None) -> dict:
    """Train `model` on `train_set` (uint8 images, or float vectors) for `kimg` thousand images seen.

    Under torchrun each rank trains on its slice of the same global batch. The step itself never waits for the
    device: the loss stays there and is read (averaged over ranks, checked finite) every LOSS_EVERY steps; the
    second such window times the run for `clock` (RunClock: the first pays one-time costs, up to 1.6x). With
    `snapshots` (Snapshots), the training goes on from its last snapshot, and takes new ones as it goes."""
    if hasattr(model, "fit"):  # closed form (gaussian.py): one fit on the whole set
        model.fit(train_set.float() / 127.5 - 1 if train_set.dtype == torch.uint8 else train_set)
        return {"steps": 0}
    rank, world = rank_world()
    torch.manual_seed(train_seed(seed, it) + rank)  # the model's noise, t, sigma, dropout
    gen = torch.Generator().manual_seed(train_seed(seed, it))  # batch indices and flips: the same on every rank
    steps = max(1, round(kimg * 1000 / cfg.batch))
    mine = slice(rank * (cfg.batch // world), (rank + 1) * (cfg.batch // world))
    start, total = snapshots.restore(model, gen, steps) if snapshots else (None, 0.0)
    bar = tqdm(total=steps, initial=start[0] if start else 0, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True)
    for idx, flips, plan in batch_plan(len(train_set), cfg.batch, steps, gen, train_set.device, start):
        first, t_window, losses = plan[0] - len(idx), time.time(), []
        for j in range(len(idx)):
            x = train_set[idx[j, mine]].float() / 127.5 - 1  # (B, C, H, W) in [-1, 1]
            if cfg.xflip:
                x = torch.where(flips[j, mine, None, None, None], x.flip(3), x)
            losses.append(model.train_step(x))  # 0-dim tensors on the device
        window = torch.stack(losses).double().sum()
        if world > 1:
            dist.all_reduce(window)
        window = window.item() / world  # the host waits here, once per LOSS_EVERY steps
        if not math.isfinite(window):
            raise UserError(f"non-finite loss in steps {first}-{first + len(idx) - 1} of iteration {it}; stopped, "
                            "the last good checkpoint is kept (lower the learning rate or use --set amp=fp32)")
        total += window
        bar.update(len(idx))
        bar.set_postfix(loss=f"{window / len(idx):.4f}", refresh=False)
        if clock is not None and (first == LOSS_EVERY or first + len(idx) >= steps):
            clock.first_steps((time.time() - t_window) / len(idx), len(idx), it)
        if snapshots and plan[0] < steps:
            snapshots.take(model, gen, steps, plan, total)
    bar.close()
    return {"steps": steps, "loss": total / steps}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as a PNG writer would store it: round(127.5 x + 127.5), halves rounded up."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def sample(model, n: int, seed: int, it: int, chunk: int, is_image: bool, progress: bool,
           temperature: float = 1.0) -> torch.Tensor:
    """n samples of iteration `it` on the CPU: uint8 images, or float64 vectors; a temperature other than 1
    scales the sampler's initial noise (--temperature).

    The seeds are cut into chunks of `chunk` by global index; rank r generates chunks r, r + world, ...
    so every chunk is computed the same way whatever the number of processes."""
    rank, world = rank_world()
    chunks = list(torch.split(image_seeds(seed, it, n), chunk))
    mine = {}
    for k in tqdm(range(rank, len(chunks), world), desc=f"sample it {it}", disable=not progress, leave=False, dynamic_ncols=True):
        x = model.generate(chunks[k]) if temperature == 1 else model.generate(chunks[k], temperature=temperature)
        mine[k] = (to_uint8(x) if is_image else x.to(torch.float64)).cpu()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return torch.cat([mine[k] for k in range(len(chunks))]) if chunks else torch.zeros(0)


# ----------------------------------------------------------------------------------------------------
# The run's clock


class RunClock:
    """Says once, after the first 2 x LOSS_EVERY training steps of the run, how long the whole run will take:
    measured seconds per step and per sample times the steps and samples still to come (metrics, plots and
    checkpoints not counted)."""

    def __init__(self, per_sample: float, probe: int, work: list[tuple[str, int, int]]):
        self.per_sample, self.probe, self.work, self.said = per_sample, probe, work, False

    def first_steps(self, per_step: float, steps: int, it: int) -> None:
        if self.said or rank_world()[0] != 0:
            return
        self.said = True
        parts = [(what, n_steps * per_step + n_samples * self.per_sample) for what, n_steps, n_samples in self.work]
        tqdm.write(f"estimate: {sum(sec for _, sec in parts) / 60:.1f} min in all, "
                   + " + ".join(f"{what} {sec / 60:.1f} min" for what, sec in parts)
                   + f" (measured here: {per_step:.3f} s/step over {steps} steps of iteration {it}, "
                   f"{self.per_sample * 1000:.1f} ms/sample over {self.probe} samples)")


def run_clock(s: Settings, model, lams: list, pretraining: bool) -> RunClock | None:
    """The run's clock for the work still to do, with the sampler timed on seeds no iteration uses (a batch of 64,
    then a whole batch of the iterations' size where that costs under PROBE_SECONDS). None for closed-form
    models and on ranks other than 0."""
    cfg, iters = s.cfg, s.iters
    if not s.main or not hasattr(cfg, "batch"):
        return None
    work = [("pretraining", round(cfg.pretrain_kimg * 1000 / cfg.batch), max(s.n_gen.values()))] if pretraining else []
    for lam in lams:
        log = os.path.join(lam_folder(s.out, s.lams, lam), "metrics.jsonl")
        done = sum(1 for _ in open(log)) - 1 if os.path.exists(log) else 0
        if iters > done:
            work.append((f"lam {lam_label(lam)}: {iters - done} iterations",
                         (iters - done) * max(1, round(s.config["kimg"] * 1000 / cfg.batch)), (iters - done) * s.n_gen[lam]))

    def seconds_per_sample(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(image_seeds(s.seed, 999, n))  # iteration 999 of this seed: never a real iteration's seeds
        return (time.perf_counter() - t0) / n

    probe = min(cfg.sample_batch, 64)
    per_sample = seconds_per_sample(probe)
    batch = min(cfg.sample_batch, max(s.n_gen.values()))  # on a CPU a batch of 512 ran 1.25x faster per sample
    if batch > probe and per_sample * batch < PROBE_SECONDS:
        probe, per_sample = batch, seconds_per_sample(batch)
    return RunClock(per_sample, probe, work)


# ----------------------------------------------------------------------------------------------------
# Snapshots of a long training run: what --resume goes on from during iteration 0


class Snapshots:
    """Every `minutes` of training, the whole state of the run in `path` (atomically): the model's state (weights,
    EMA, optimizer, step), the batch plan's, every process's random generators and the loss so far, so that a
    run killed midway goes on from there and ends as if never stopped."""

    def __init__(self, path: str, minutes: float):
        self.path, self.every, self.last = path, minutes * 60, time.time()

    def take(self, model, gen: torch.Generator, steps: int, plan: tuple, total: float) -> None:
        due = [time.time() - self.last >= self.every]
        if dist.is_initialized():
            dist.broadcast_object_list(due, src=0)  # rank 0's clock decides for every rank
        if not due[0]:
            return
        rngs = [(torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None)]
        if dist.is_initialized():  # every process's: each draws its own noise
            mine, rngs = rngs[0], [None] * dist.get_world_size()
            dist.all_gather_object(rngs, mine)
        if rank_world()[0] == 0:
            save_atomic({"steps": steps, "plan": plan, "gen": gen.get_state(), "rngs": rngs, "total": total,
                         "model": model.state_dict()}, self.path)
        self.last = time.time()

    def restore(self, model, gen: torch.Generator, steps: int) -> tuple[tuple | None, float]:
        """(the batch plan's state, the loss so far) of the last snapshot, its state set in model, gen and the random
        generators; (None, 0.0) when there is none of this training run and process count."""
        if not os.path.exists(self.path):
            return None, 0.0
        s = torch.load(self.path, map_location="cpu", weights_only=True)
        rank, world = rank_world()
        if s["steps"] != steps or len(s["rngs"]) != world:
            return None, 0.0
        model.load_state_dict(s["model"])
        gen.set_state(s["gen"])
        torch.set_rng_state(s["rngs"][rank][0])
        if s["rngs"][rank][1] is not None:
            torch.cuda.set_rng_state(s["rngs"][rank][1])
        if rank == 0:
            print(f"training: going on from the snapshot after step {s['plan'][0]} of {steps} ({self.path})")
        return s["plan"], s["total"]
