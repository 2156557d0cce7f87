"""What makes a first run quick and says how long it takes: iteration 0 cached across runs, the CPU threads
chosen from the free cores, and the run's time estimated from its first measured steps."""

import dataclasses
import sys
import time

import pytest
import torch

import jobs
import retrain
import settings
import training
from test_retrain import mean_module, metrics, run

TOY = ["--model", "meanmodel", "--data", "digits", "--n-real", 50, "--lam", 1, "--iters", 1, "--metrics", "pixel"]


@pytest.fixture
def meanmodel(monkeypatch):
    monkeypatch.setitem(sys.modules, "meanmodel", mean_module())
    monkeypatch.setattr(retrain, "MODELS", retrain.MODELS + ("meanmodel",))


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_iteration_0_is_cached_across_runs(tmp_path, meanmodel, capsys):
    """A second run with the same model, settings, data and seed starts from the first run's iteration 0
    (and says so), with the same metrics; another seed, or --no-cache, trains it again."""
    assert run(tmp_path / "a", *TOY) == 0
    first = capsys.readouterr().out
    assert "training from scratch" in first and "from the cache" not in first
    cached = list((tmp_path / "cache").glob("meanmodel-iter0-*.pt"))
    assert len(cached) == 1
    assert run(tmp_path / "b", *TOY, "--iters", 2) == 0  # more iterations: the same iteration 0
    second = capsys.readouterr().out
    assert "from the cache" in second and "training from scratch" not in second
    a, b = metrics(tmp_path / "a" / "metrics.jsonl"), metrics(tmp_path / "b" / "metrics.jsonl")
    assert without_time(b[:2]) == without_time(a)  # iteration 0 (and so iteration 1) unchanged
    assert torch.equal(retrain.load_checkpoint(str(tmp_path / "a" / "iter0.pt"))["samples"],
                       retrain.load_checkpoint(str(tmp_path / "b" / "iter0.pt"))["samples"])
    assert run(tmp_path / "c", *TOY, "--seed", 1) == 0
    assert "training from scratch" in capsys.readouterr().out  # another seed: another iteration 0
    assert run(tmp_path / "d", *TOY, "--no-cache") == 0
    assert "training from scratch" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # seeds 0 and 1


def test_cache_key_follows_everything_iteration_0_depends_on(tmp_path, meanmodel):
    """The cache file's name changes with the Config, the data, the seed and the number of samples."""
    args = retrain.build_parser().parse_args([*map(str, TOY), "--out", str(tmp_path / "run")])
    s = settings.resolve(args, 1, torch.device("cpu"))

    def key(cfg=s.cfg, real=s.real, samples=50, seed=0):
        return retrain.iter0_cache(dataclasses.replace(s, cfg=cfg, real=real, n_gen={1.0: samples}, seed=seed))

    base = key()
    assert base == key() and base.startswith(str(tmp_path / "cache"))
    others = [key(cfg=dataclasses.replace(s.cfg, batch=8)), key(real=s.real.flip(0)), key(samples=100), key(seed=1)]
    assert len({base, *others}) == 5
    args.init = "x.pt"
    assert key() is None  # --init: nothing to cache


@pytest.mark.parametrize("cores,busy,world,expected", [(2, 0.05, 1, 2), (2, 1.1, 1, 1), (2, 4.0, 1, 1),
                                                       (8, 2.2, 1, 6), (8, 0.0, 2, 4)])
def test_default_threads_never_take_a_busy_core(monkeypatch, cores, busy, world, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(jobs.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(jobs, "busy_cores", lambda: (busy, "busy now"))
    threads = torch.get_num_threads()
    try:
        said = jobs.cpu_threads(None, world)
        noun = "thread" if expected == 1 else "threads"
        assert torch.get_num_threads() == expected and said.startswith(f"{expected} CPU {noun} ({cores} cores")
        assert jobs.cpu_threads(3, world) == "3 CPU threads (--threads)" and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_busy_cores_reads_the_cpu_time_spent_now_on_this_process_cores(monkeypatch, tmp_path):
    """Between two reads of /proc/stat, each core spent 1,000 ticks. The process may run on cores 0, 1 and 3:
    core 0 was 75% busy (user, system, steal), core 1 30% (idle 600, waiting on disk 100), core 3 idle, so
    1.05 of its cores are busy. Core 2, outside its affinity, was fully busy and does not count; nor does
    the machine-wide first line, nor the lagging load average."""
    def stat_text(ticks):  # ticks: {core: (user, system, idle, iowait, steal)}, cumulative
        cores = [f"cpu{c} {u} 0 {s} {i} {w} 0 0 {st}" for c, (u, s, i, w, st) in ticks.items()]
        return "\n".join(["cpu  1 2 3 4 5 6 7 8", *cores, "intr 12345 0 1", "ctxt 99"]) + "\n"

    stat = tmp_path / "stat"
    start = {0: (100, 100, 800, 0, 0), 1: (100, 0, 900, 0, 0), 2: (0, 0, 1000, 0, 0), 3: (50, 50, 900, 0, 0)}
    end = {0: (600, 300, 1050, 0, 50), 1: (400, 0, 1500, 100, 0), 2: (1000, 0, 1000, 0, 0), 3: (50, 50, 1900, 0, 0)}
    stat.write_text(stat_text(start))
    monkeypatch.setattr(jobs.os, "sched_getaffinity", lambda pid: {0, 1, 3})
    monkeypatch.setattr(jobs.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(jobs.time, "sleep", lambda s: stat.write_text(stat_text(end)))
    busy, how = jobs.busy_cores(0.5, str(stat))
    assert how == "busy now" and busy == pytest.approx(0.75 + 0.3 + 0.0)
    monkeypatch.setattr(jobs.os, "getloadavg", lambda: (1.5, 1.0, 0.5))  # no /proc/stat (macOS): the load average
    assert jobs.busy_cores(0.5, str(tmp_path / "none")) == (1.5, "load")


def test_the_run_says_its_time_once(capsys):
    """estimate = steps x measured s/step + samples x measured s/sample, summed over the work to come."""
    clock = training.RunClock(per_sample=0.01, probe=64, work=[("pretraining", 600, 1000), ("lam 1: 20 iterations",
                                                                                          20 * 100, 20 * 1000)])
    clock.first_steps(0.05, 25, 0)
    clock.first_steps(0.5, 25, 1)  # said once only
    out = capsys.readouterr()
    text = out.out + out.err
    # pretraining 600 x 0.05 + 1000 x 0.01 = 40 s; iterations 2000 x 0.05 + 20000 x 0.01 = 300 s
    assert text.count("estimate:") == 1 and "estimate: 5.7 min in all, pretraining 0.7 min + lam 1: 20 iterations 5.0 min" in text


@pytest.mark.parametrize("budget, probe", [(training.PROBE_SECONDS, 100), (0.0, 64)])
def test_the_sampler_is_timed_at_its_own_batch_size_when_cheap(tmp_path, meanmodel, capsys, monkeypatch, budget,
                                                                probe):
    """150 samples per iteration in batches of 100 (the toy's sample_batch): the clock times a batch of 100, the
    size the iterations use, unless a batch of 64 already says it would take more than PROBE_SECONDS."""
    monkeypatch.setattr(training, "PROBE_SECONDS", budget)
    assert run(tmp_path, *TOY[:4], "--n-real", 150, *TOY[6:]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("estimate:"))
    assert f"ms/sample over {probe} samples" in line


def test_the_estimate_comes_within_the_first_steps(tmp_path, meanmodel, capsys, monkeypatch):
    """In a real run the estimate line comes after the first 2 x LOSS_EVERY steps of pretraining (timed on the
    second LOSS_EVERY: the first pay one-time costs), before iteration 0
    ends, and counts the pretraining and every lambda's iterations."""
    monkeypatch.setattr(training, "LOSS_EVERY", 5)
    model, calls = sys.modules["meanmodel"].Model, []
    step = model.train_step

    def slow_start(self, x):  # the first 5 of the 10 pretraining steps take 50 ms longer
        calls.append(1)
        time.sleep(0.05 if len(calls) <= 5 else 0)
        return step(self, x)

    monkeypatch.setattr(model, "train_step", slow_start)
    assert run(tmp_path / "a", *TOY[:6], "--lam", 0, 1, "--iters", 2, "--metrics", "pixel") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("estimate:"))
    assert at < next(i for i, line in enumerate(lines) if line.startswith("iter   0"))
    assert "pretraining" in lines[at] and "lam 0: 2 iterations" in lines[at] and "lam 1: 2 iterations" in lines[at]
    assert float(lines[at].split("measured here: ")[1].split(" s/step")[0]) < 0.025  # steps 5-9, not 0-4
