"""retrain.py under torchrun: 2 CPU processes (gloo) against one process.

Sampling is split across ranks by chunks of global image indices, so the synthetic set of an
iteration is bit-identical for any number of processes; training runs DistributedDataParallel on the
same global batch; rank 0 alone writes files; --resume works under torchrun."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import retrain
from ranks import run_ranks

TINY = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", "64", "--metrics", "pixel",
        "--device", "cpu", "--no-progress", "--set", "batch=16", "--set", "sample_batch=16",
        "--set", "sample_steps=3", "--set", "kimg=0.032", "--set", "pretrain_kimg=0.032", "--set", "drop_rate=0"]


def launch(*argv, procs=1):
    """retrain.py on `procs` gloo processes (ranks started by hand, as torchrun would), rank 0's output; one process:
    retrain.main in this one (one thread, as the ranks), nothing returned."""
    if procs == 1:
        assert retrain.main([*map(str, argv)]) == 0
        return None
    results = run_ranks(lambda rank: argv, procs)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results[0]


def history(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Iteration 0 trained once; then one retraining iteration from it on 1 process and on 2."""
    root = tmp_path_factory.mktemp("runs")
    launch(*TINY, "--iters", 0, "--out", root / "init")
    common = [*TINY, "--init", root / "init" / "iter0.pt", "--lam", "1", "--iters", 1]
    launch(*common, "--out", root / "one")
    launch(*common, "--out", root / "two", procs=2)
    return {"common": common, "one": root / "one", "two": root / "two"}


def test_samples_and_metrics_do_not_depend_on_process_count(runs):
    one = retrain.load_checkpoint(str(runs["one"] / "iter0.pt"))
    two = retrain.load_checkpoint(str(runs["two"] / "iter0.pt"))
    assert one["samples"].shape == (64, 1, 8, 8) and one["samples"].dtype == torch.uint8
    assert torch.equal(one["samples"], two["samples"])  # 4 chunks of 16: ranks 0 and 1 made 2 each
    # iteration 0 (loaded, sampled, evaluated) is the same; iteration 1 trained under DDP, equal to float rounding
    assert history(runs["one"] / "metrics.jsonl")[0] == history(runs["two"] / "metrics.jsonl")[0]
    assert json.load(open(runs["two"] / "config.json"))["world_size"] == 2


def test_resume_under_torchrun(tmp_path, runs):
    shutil.copytree(runs["two"], tmp_path / "parts")  # 1 iteration on 2 processes, then resumed on 2
    launch(*runs["common"][:-1], 2, "--out", tmp_path / "parts", "--resume", procs=2)
    launch(*runs["common"][:-1], 2, "--out", tmp_path / "full", procs=2)
    full, parts = history(tmp_path / "full" / "metrics.jsonl"), history(tmp_path / "parts" / "metrics.jsonl")
    assert [r["iter"] for r in full] == [0, 1, 2] and full == parts
    a = retrain.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))
    b = retrain.load_checkpoint(str(tmp_path / "parts" / "ckpt.pt"))
    assert torch.equal(a["samples"], b["samples"])
    assert all(torch.equal(a["state"]["net"][k], b["state"]["net"][k]) for k in a["state"]["net"])


def test_resume_with_another_process_count(tmp_path, runs):
    """Begun on one process, continued on two: allowed (samples depend on their seeds alone), and said."""
    shutil.copytree(runs["one"], tmp_path / "run")
    first = history(tmp_path / "run" / "metrics.jsonl")
    r = launch(*runs["common"][:-1], 2, "--out", tmp_path / "run", "--resume", procs=2)
    assert "--resume with world_size 2 (the run began with 1)" in r.stdout
    resumed = history(tmp_path / "run" / "metrics.jsonl")
    assert [h["iter"] for h in resumed] == [0, 1, 2] and resumed[:2] == first  # iteration 1 kept, 2 added
    assert json.load(open(tmp_path / "run" / "config.json"))["world_size"] == 2


def test_every_seed_of_a_seeds_run_keeps_its_ranks(tmp_path, runs):
    """--seeds under 2 processes: every seed's run (setup_device once per seed) keeps rank 1 as rank 1, which prints
    nothing, and the seeds' iterations 0 equal those of one process."""
    argv = [*runs["common"][:-2], "--iters", 0, "--seeds", 0, 1]
    two = launch(*argv, "--out", tmp_path / "two", procs=2)
    assert two.stdout.count("retrain.py: ddpm (small)") == 2
    rank1 = run_ranks(lambda rank: [*argv, "--out", tmp_path / "again", "--force"], 2)[1]
    assert rank1.returncode == 0 and rank1.stdout == "", rank1.stdout[-2000:]
    launch(*argv, "--out", tmp_path / "one")
    for seed in (0, 1):
        assert history(tmp_path / "one" / f"seed_{seed}" / "metrics.jsonl") == \
            history(tmp_path / "two" / f"seed_{seed}" / "metrics.jsonl")
