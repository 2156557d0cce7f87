"""retrain.py under torchrun: 2 CPU processes (gloo) against one process.

Sampling is split across ranks by chunks of global image indices, so the synthetic set of an
iteration is bit-identical for any number of processes; training runs DistributedDataParallel on the
same global batch; rank 0 alone writes files; --resume works under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrain

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", "64", "--metrics", "pixel",
        "--device", "cpu", "--no-progress", "--set", "batch=16", "--set", "sample_batch=16",
        "--set", "sample_steps=3", "--set", "kimg=0.032", "--set", "pretrain_kimg=0.032", "--set", "drop_rate=0"]


def launch(*argv, procs=1):
    cmd = [sys.executable, str(REPO / "retrain.py"), *map(str, argv)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def history(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(path)]


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("init") / "run"
    launch(*TINY, "--iters", 0, "--out", out)
    return str(out / "iter0.pt")


def test_samples_and_metrics_do_not_depend_on_process_count(tmp_path, init_ckpt):
    launch(*TINY, "--init", init_ckpt, "--iters", 0, "--out", tmp_path / "one")
    launch(*TINY, "--init", init_ckpt, "--iters", 0, "--out", tmp_path / "two", procs=2)
    one = retrain.load_checkpoint(str(tmp_path / "one" / "iter0.pt"))
    two = retrain.load_checkpoint(str(tmp_path / "two" / "iter0.pt"))
    assert one["samples"].shape == (64, 1, 8, 8) and one["samples"].dtype == torch.uint8
    assert torch.equal(one["samples"], two["samples"])  # 4 chunks of 16: ranks 0 and 1 made 2 each
    assert history(tmp_path / "one" / "metrics.jsonl") == history(tmp_path / "two" / "metrics.jsonl")
    assert json.load(open(tmp_path / "two" / "config.json"))["world_size"] == 2


def test_resume_under_torchrun(tmp_path, init_ckpt):
    common = [*TINY, "--init", init_ckpt, "--lam", "1"]
    launch(*common, "--iters", 2, "--out", tmp_path / "full", procs=2)
    launch(*common, "--iters", 1, "--out", tmp_path / "parts", procs=2)
    launch(*common, "--iters", 2, "--out", tmp_path / "parts", "--resume", procs=2)
    full, parts = history(tmp_path / "full" / "metrics.jsonl"), history(tmp_path / "parts" / "metrics.jsonl")
    assert [r["iter"] for r in full] == [0, 1, 2] and full == parts
    a = retrain.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))
    b = retrain.load_checkpoint(str(tmp_path / "parts" / "ckpt.pt"))
    assert torch.equal(a["samples"], b["samples"])
    assert all(torch.equal(a["state"]["net"][k], b["state"]["net"][k]) for k in a["state"]["net"])


def test_resume_with_another_process_count(tmp_path, init_ckpt):
    """Begun on one process, continued on two: allowed (samples depend on their seeds alone), and said."""
    common = [*TINY, "--init", init_ckpt, "--lam", "1", "--out", tmp_path / "run"]
    launch(*common, "--iters", 1)
    first = history(tmp_path / "run" / "metrics.jsonl")
    r = launch(*common, "--iters", 2, "--resume", procs=2)
    assert "--resume with world_size 2 (the run began with 1)" in r.stdout
    resumed = history(tmp_path / "run" / "metrics.jsonl")
    assert [h["iter"] for h in resumed] == [0, 1, 2] and resumed[:2] == first  # iteration 1 kept, 2 added
    assert json.load(open(tmp_path / "run" / "config.json"))["world_size"] == 2


def test_one_ddp_step_equals_one_step_on_the_global_batch(tmp_path, monkeypatch):
    """2 ranks x 4 images == 1 process x 8 images, when each image gets the same timestep and noise."""
    import ddp_step

    out = tmp_path / "ddp.pt"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "tests" / "ddp_step.py"), str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)

    model, x = ddp_step.setup()
    before = {k: v.clone() for k, v in model.state_dict()["net"].items()}
    draws = []  # what each rank drew: its timesteps, then its noise
    for rank in range(2):
        torch.manual_seed(100 + rank)
        t = torch.randint(0, model.cfg.timesteps, (4,))
        draws.append((t, torch.randn(4, 1, 8, 8)))
    t_all, noise_all = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: t_all)
    monkeypatch.setattr(torch, "randn_like", lambda *a, **k: noise_all)
    model.train_step(x)
    single = model.state_dict()["net"]
    assert max((single[k] - before[k]).abs().max().item() for k in single) > 1e-4  # the step moved the weights
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6)
