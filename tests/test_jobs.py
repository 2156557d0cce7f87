"""jobs.run_jobs: jobs start in order (after, awaited first) and within the workers limit, their log lines are
relayed as they come, a failure stops the others, and each job gets its environment."""

import os
import time

import pytest

import jobs

SCRIPT = """import os, sys, time
name, events, seconds, code = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
def note(what):
    with open(events, "a") as f:
        f.write(f"{name} {what} {time.time()} {os.getpid()}\\n")
note("start")
print(f"{name} hello FOO={os.environ.get('FOO')} PYTHONUNBUFFERED={os.environ.get('PYTHONUNBUFFERED')}")
time.sleep(seconds)
print(f"{name} bye")
note("end")
sys.exit(code)
"""


@pytest.fixture
def job(tmp_path):
    """job(name, ...): a Job that notes its start and end in tmp_path/events.txt, prints a line, sleeps, prints
    another and exits with `code`; it logs into tmp_path/logs/NAME.log."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)

    def make(name, after=None, seconds=0.3, code=0, env=None):
        return jobs.Job(name, [str(script), name, str(tmp_path / "events.txt"), str(seconds), str(code)],
                        str(tmp_path / "logs" / f"{name}.log"), after, env)
    return make


def events(tmp_path):
    """{(name, "start" or "end"): (time, pid)}"""
    out = {}
    for line in open(tmp_path / "events.txt"):
        name, what, t, pid = line.split()
        out[name, what] = (float(t), int(pid))
    return out


def test_order_and_workers_limit(tmp_path, job):
    said = []
    spans = jobs.run_jobs([job("a"), job("b", after="a"), job("c"), job("d")], workers=2, say=said.append, poll=0.05)
    assert set(spans) == {"a", "b", "c", "d"} and all(0 <= s < e for s, e in spans.values())
    ev = events(tmp_path)
    assert ev["b", "start"][0] >= ev["a", "end"][0]  # b waits for a
    times = sorted((t, +1 if what == "start" else -1) for (_, what), (t, _) in ev.items())
    running = [sum(d for _, d in times[:i + 1]) for i in range(len(times))]
    assert max(running) == 2  # two at a time, never three
    assert sorted(os.listdir(tmp_path / "logs")) == ["a.log", "b.log", "c.log", "d.log"]  # the folder is made
    assert len(said) == 8 and said[0].endswith("min] start a") and " done  " in said[-1]
    assert jobs.run_jobs([job("e")], workers=1, say=None, poll=0.05).keys() == {"e"}  # silent


def test_awaited_jobs_start_first(tmp_path, job):
    """One worker, list order a, b, c, where c waits for b: b (awaited) starts first, then a and c in list order."""
    jobs.run_jobs([job("a"), job("b"), job("c", after="b")], workers=1, say=None, poll=0.05)
    ev = events(tmp_path)
    assert ev["b", "start"][0] < ev["a", "start"][0] < ev["c", "start"][0]


def test_relay_gets_each_line_as_it_comes(tmp_path, job):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log").write_text("an earlier run's line\n")
    got = []
    jobs.run_jobs([job("a", seconds=1.0)], workers=1, relay=lambda name, line: got.append((name, line, time.time())),
                  say=None, poll=0.05)
    assert [(name, line.split()[:2]) for name, line, _ in got] == [("a", ["a", "hello"]), ("a", ["a", "bye"])]
    assert got[0][2] < events(tmp_path)["a", "end"][0]  # relayed while the job still ran
    assert (tmp_path / "logs" / "a.log").read_text().startswith("an earlier run's line\na hello")  # appended to


def test_a_failure_stops_the_others_and_names_the_log(tmp_path, job):
    t0 = time.time()
    with pytest.raises(jobs.JobFailed) as failed:
        jobs.run_jobs([job("slow", seconds=60), job("bad", seconds=1.0, code=3), job("next", after="bad")], workers=2,
                      say=None, poll=0.05)
    log = str(tmp_path / "logs" / "bad.log")
    assert (failed.value.name, failed.value.code, failed.value.log) == ("bad", 3, log)
    assert str(failed.value) == f"bad stopped with exit code 3; see {log}"
    assert time.time() - t0 < 30  # slow was stopped, not waited for
    ev = events(tmp_path)
    with pytest.raises(ProcessLookupError):  # and is gone (terminated, then waited for)
        os.kill(ev["slow", "start"][1], 0)
    assert ("next", "start") not in ev and ("slow", "end") not in ev  # the job waiting for the failed one never ran
    with pytest.raises(ValueError):  # a job waiting for a job that is not in the list
        jobs.run_jobs([job("x", after="nowhere")], 1, say=None, poll=0.05)


def test_an_error_in_the_runner_stops_the_jobs(tmp_path, job):
    def relay(name, line):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        jobs.run_jobs([job("slow", seconds=60)], workers=1, relay=relay, say=None, poll=0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(events(tmp_path)["slow", "start"][1], 0)


def test_each_job_gets_its_environment(tmp_path, job, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    jobs.run_jobs([job("a", env={"FOO": "bar"}), job("b")], workers=2, say=None, poll=0.05)
    assert "a hello FOO=bar PYTHONUNBUFFERED=1" in (tmp_path / "logs" / "a.log").read_text()
    assert "b hello FOO=None PYTHONUNBUFFERED=1" in (tmp_path / "logs" / "b.log").read_text()


def test_torchrun_with_one_process_starts_a_process_group(monkeypatch):
    """torchrun --nproc_per_node=1 (WORLD_SIZE 1, TORCHELASTIC_RUN_ID set) starts a group of one, so that one GPU runs
    the NCCL path (DDP, the collectives) as N GPUs do; a plain python process starts none."""
    import torch.distributed as dist

    from ranks import free_port

    assert jobs.setup_device("cpu")[:2] == (0, 1) and not dist.is_initialized()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "TORCHELASTIC_RUN_ID": "test"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        assert jobs.setup_device("cpu")[:2] == (0, 1) and dist.is_initialized() and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
