"""A failure on one rank of a 2-process gloo run, in each phase of a run: every rank ends soon after, with the
same one-line error, instead of one rank waiting in a collective that the failed one never joins.

The failure is injected by tests/faulty_rank.py (on rank 0, then on rank 1): in the model's constructor (which
builds DistributedDataParallel, a collective), a training step, a sampling batch, and the write of iteration 0's
checkpoint (rank 0 alone writes files)."""

import time
from pathlib import Path

import pytest

from ranks import run_ranks

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", "16", "--metrics", "pixel",
            "--device", "cpu", "--no-progress", "--iters", "0", "--set", "batch=8", "--set", "sample_batch=8",
            "--set", "sample_steps=2", "--set", "pretrain_kimg=0.016"]
ERRORS = {"construction": "RuntimeError: CUDA out of memory (injected)",
          "training": "RuntimeError: CUDA out of memory (injected)",
          "sampling": "RuntimeError: CUDA out of memory (injected)",
          "writing": "OSError: [Errno 28] No space left on device (injected)"}


def faulty_run(tmp_path, monkeypatch, phase: str, failing: int):
    monkeypatch.setenv("FAULT_PHASE", phase)
    monkeypatch.setenv("FAULT_RANK", str(failing))
    t0 = time.time()
    results = run_ranks(lambda r: [*TINY_RUN, "--out", tmp_path / "run"], timeout=60,
                        script=REPO / "tests" / "faulty_rank.py")
    return results, time.time() - t0


@pytest.mark.parametrize("phase, failing", [(phase, rank) for phase in ERRORS for rank in (0, 1)
                                            if (phase, rank) != ("writing", 1)])  # test_rank_1_writes_nothing
def test_a_failure_on_one_rank_ends_every_rank_with_its_line(tmp_path, monkeypatch, phase, failing):
    results, seconds = faulty_run(tmp_path, monkeypatch, phase, failing)  # run_ranks: both end within 60 s
    line = f"retrain.py: error: rank {failing}: {ERRORS[phase]}"
    for rank, r in enumerate(results):
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 2 and last == line, (rank, r.returncode, seconds, r.stderr[-3000:])
        if rank == failing:  # the injected error's traceback, there alone
            assert "Traceback" in r.stderr and "(injected)" in r.stderr.split("Traceback")[-1], r.stderr[-3000:]
        else:  # no traceback of a collective that the failed rank broke
            assert "Traceback" not in r.stderr, (rank, r.stderr[-3000:])


def test_rank_1_writes_nothing(tmp_path, monkeypatch):
    """Checkpoint writes fail on rank 1 here: the run ends well, since rank 0 alone writes the run folder."""
    results, _ = faulty_run(tmp_path, monkeypatch, "writing", 1)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]
    assert (tmp_path / "run" / "iter0.pt").exists()
    assert results[1].stderr == ""  # nor does it print: not even the store's warnings, had rank 0 ended before it
