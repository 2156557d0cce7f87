"""jobs.py -- what runs side by side: the CPU threads of one process, torchrun's processes, and the runner of
several processes.

Bertrand, Bose, Duplessis, Jiralerspong & Gidel, "On the Stability of Iterative Retraining of
Generative Models on their Own Data" (ICLR 2024, arXiv 2310.00429).

    cpu_threads(requested, world)   torch's CPU threads for this process: never a core another job keeps busy
    setup_device, rank_world, barrier, on_every_rank, ends_every_rank
                                    the device and rank of each process under torchrun (one process without it),
                                    and a failure on one of them ending every one
    run_jobs(jobs, workers)         Python commands as subprocesses, `workers` at a time, each once the job it
                                    waits for has finished; used for a sweep's lambdas (retrain.py) and for
                                    the stages of reproduce.py
"""

import contextlib
import dataclasses
import datetime
import os
import subprocess
import sys
import threading
import time
import traceback
import typing

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------
# CPU threads


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores(seconds: float = 0.5, stat: str = "/proc/stat") -> tuple[float, str]:
    """How many of the cores this process may run on (its affinity) other jobs keep busy now, and how that was
    measured: the share of non-idle time of each of those cores in /proc/stat over `seconds` (Linux), else
    the 1-minute load average, which lags (a job that ended a minute ago, pip or a test run, still counts)
    and counts the whole machine."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def idle_and_total():  # {core: (idle, total)} from the lines cpuN user nice system idle iowait irq softirq ...
        ticks = {}
        with open(stat) as f:
            for line in f:
                name, *values = line.split()
                if not name.startswith("cpu"):
                    break  # the per-core lines come first
                if name[3:].isdigit() and (allowed is None or int(name[3:]) in allowed):
                    values = [int(v) for v in values]
                    ticks[int(name[3:])] = (values[3] + values[4], sum(values))
        return ticks

    try:
        before = idle_and_total()
        time.sleep(seconds)
        after = idle_and_total()
        if not before:
            raise ValueError("no per-core lines")
        return sum(1 - (after[c][0] - before[c][0]) / max(after[c][1] - before[c][1], 1) for c in before), "busy now"
    except (OSError, ValueError, IndexError, KeyError):
        return (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), "load"


def cpu_threads(requested: int | None, world: int) -> str:
    """Set torch's CPU threads and say why: --threads, else OMP_NUM_THREADS, else the cores free right now.
    Small networks on a CPU run ~1.2x faster on 2 idle cores than on 1, but many times slower when a thread
    has to share its core with another job (threads wait for each other at every operation), so the
    default never takes a busy core: the cores minus those busy now, at least 1, per process."""
    if requested:
        torch.set_num_threads(requested)
        return f"{plural(requested, 'CPU thread')} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{plural(torch.get_num_threads(), 'CPU thread')} (OMP_NUM_THREADS)"
    cores = cpu_cores()
    busy, how = busy_cores()
    threads = max(1, min(cores, round(cores - busy)) // world)
    torch.set_num_threads(threads)
    return f"{plural(threads, 'CPU thread')} ({cores} cores, {busy:.1f} {how}; --threads to choose)"


# ----------------------------------------------------------------------------------------------------
# torchrun's ranks: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; otherwise a single process


class UserError(Exception):
    """A problem with the user's input or run folder: printed as one line, no traceback (on every rank)."""


def enable_tf32() -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (training only: fid.py turns them off for
    its exact features). Through the long-standing switches, so that torch.get_float32_matmul_precision() and
    torch.backends.cuda.matmul.allow_tf32 stay readable for torch.compile and other libraries; the
    fp32_precision attributes would make those reads raise ("mix of the legacy and new APIs")."""
    torch.set_float32_matmul_precision("high")  # = torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def cuda_switches(deterministic: bool) -> None:
    """TF32 (enable_tf32), and cuDNN's autotuner: the batch shapes repeat, so the fastest convolution algorithm is
    searched once per shape, but it may differ between processes and runs, so results agree up to rounding.
    deterministic: no autotuner, deterministic algorithms only (slower): a rerun or resume on the same GPUs and
    software repeats bit for bit."""
    enable_tf32()
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for repeatable matmuls


def setup_device(name: str | None, deterministic: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device); on CUDA also cuda_switches."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun, also with one process (NCCL on one GPU);
        # the group is started once (a --seeds run comes back here for every seed)
        cuda = torch.cuda.is_available() and name != "cpu"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        rank = dist.get_rank()
    else:
        if name is None:
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"device '{name}' is not usable here ({str(e).splitlines()[0]})") from None
        rank = 0
    if device.type == "cuda":
        cuda_switches(deterministic)
    if world > 1:
        watch_failures()
    return rank, world, device


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def on_every_rank():
    """A block that may fail on some processes only (a file missing on one machine, rank 0's reference cache,
    rank 0's metrics): when it fails anywhere, every process raises the same one-line error, instead of
    the others waiting in their next collective until the NCCL timeout. Also a barrier."""
    error = None
    try:
        yield
    except Exception as e:
        error = one_line(e)
        if not isinstance(e, UserError):  # a bug, not the user's input: its traceback here, its line on every rank
            traceback.print_exc()
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)


def one_line(e: Exception) -> str:
    """The line every rank prints for e: a UserError's message, else the rank, the exception's type and first line."""
    if isinstance(e, UserError):
        return str(e)
    return f"rank {rank_world()[0]}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# A failure outside on_every_rank leaves the other ranks in a collective the failed one never joins (DDP's gradient
# all-reduce or its constructor's broadcast, sample's gather; under NCCL until its timeout): its line reaches them
# through the rendezvous store instead, where a thread of each rank watches for it.

END_WAIT = 10.0  # seconds an ending rank waits for the others to have ended too
_watcher = {"thread": None, "stop": None}


def _store_keys() -> tuple[str, str, str]:
    """(the first failure's line, the count of ranks ended on it, of those gone); a torchrun restart has its own."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"failure/{attempt}/line", f"failure/{attempt}/ended", f"failure/{attempt}/gone"


def _store() -> dist.TCPStore:
    """A client of the rendezvous store: torchrun's agent's, or rank 0's process's when started without torchrun."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=30))


def _end(store: dist.TCPStore | None, line: str) -> typing.NoReturn:
    """End this rank on a failure: `line` printed as its last, then exit status 2 once every rank has printed it
    (at most END_WAIT s), since torchrun stops all ranks at the first exit. Rank 0 exits once the others have
    gone, since without torchrun the store is its process's."""
    _, ended, gone = _store_keys()
    try:
        print(f"{os.path.basename(sys.argv[0])}: error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if store is None:
            return
        world, deadline = dist.get_world_size(), time.time() + END_WAIT
        store.add(ended, 1)
        if rank_world()[0] != 0:
            while store.add(ended, 0) < world and time.time() < deadline:
                time.sleep(0.1)
            store.add(gone, 1)
        else:
            while store.add(gone, 0) < world - 1 and time.time() < deadline:
                time.sleep(0.1)
    finally:
        os._exit(2)


def watch_failures() -> None:
    """Start this rank's watcher (once): when another rank has published a failure (ends_every_rank), it prints
    that line as this process's last and ends it with exit status 2, wherever its main thread waits."""
    if _watcher["thread"] is None:
        stop = threading.Event()
        _watcher.update(thread=threading.Thread(target=_watch, args=(_store(), stop), daemon=True), stop=stop)
        _watcher["thread"].start()


def _watch(store: dist.TCPStore, stop: threading.Event) -> None:
    line_key = _store_keys()[0]
    try:
        while not store.check([line_key]):
            if stop.wait(0.2):
                return
        if stop.wait(1.0):  # a second for this rank's own failure, if it has one, to end it as usual (put_back, say)
            return
        line = store.get(line_key).decode()
    except dist.DistError:  # the store has gone: its rank or agent ended before this one could
        return
    _end(store, line)


def _stop_watching() -> None:
    """Stop the watcher; its ending of this process, if begun, ends it here."""
    if _watcher["thread"] is not None:
        _watcher["stop"].set()
        _watcher["thread"].join()
        _watcher["thread"] = None


@contextlib.contextmanager
def ends_every_rank():
    """Around a whole run with a watcher (several processes): an exception that escapes it on any rank ends every
    rank (_end) with the same one-line error, the first failed rank's, published in the store (its traceback
    printed there alone, unless a UserError: the other ranks' errors are then mostly the collectives it broke).
    A run that ends well stops the watchers between two barriers: none still reads the store when rank 0 ends."""
    try:
        yield
    except Exception as e:
        if _watcher["thread"] is None:
            raise
        _stop_watching()
        mine = line = one_line(e)
        try:
            store = _store()
            line = store.compare_set(_store_keys()[0], "", mine).decode()  # the first failure's line, on every rank
        except dist.DistError:  # the store has gone with rank 0: this rank's own line
            store = None
        if line == mine and not isinstance(e, UserError):
            traceback.print_exc()
        _end(store, line)
    if _watcher["thread"] is not None:
        barrier()
        _stop_watching()
        barrier()


# ----------------------------------------------------------------------------------------------------
# The job runner


@dataclasses.dataclass
class Job:
    name: str                      # how it is named in messages
    argv: list[str]                # a Python command: script path and its arguments, run with sys.executable
    log: str                       # file that receives its stdout and stderr (appended to; folders made)
    after: str | None = None       # the name of a job that must finish first
    env: dict | None = None        # extra environment variables for it


class JobFailed(Exception):
    def __init__(self, name: str, code: int, log: str):
        super().__init__(f"{name} stopped with exit code {code}; see {log}")
        self.name, self.code, self.log = name, code, log


def run_jobs(jobs: list[Job], workers: int, relay=None, say=print, poll: float = 0.5) -> dict[str, tuple[float, float]]:
    """Run `jobs`, `workers` at a time, each once its `after` job has finished. Of the jobs ready to start, those
    that other jobs wait for go first, otherwise list order: a long chain then starts early rather than alone at
    the end. say(text) gets a line when a job starts and ends (say=None: silence); relay(name, line), if given,
    every complete line a job writes to its log, read back from the log as it grows. At the first failure the
    other running jobs are stopped and JobFailed raised; so they are at any other error or Ctrl-C.
    Returns {name: (start, end)} in seconds since the call."""
    say = say or (lambda text: None)
    t0, waiting, running, done = time.time(), list(jobs), {}, {}
    awaited = {job.after for job in jobs}
    try:
        while waiting or running:
            ready = [job for job in waiting if job.after is None or job.after in done]
            for job in sorted(ready, key=lambda job: job.name not in awaited)[:workers - len(running)]:  # stable sort
                waiting.remove(job)
                os.makedirs(os.path.dirname(job.log) or ".", exist_ok=True)
                log = open(job.log, "a")
                reader = open(job.log)
                reader.seek(0, os.SEEK_END)  # relay what this run writes, not an earlier run's lines
                env = {**os.environ, **(job.env or {}), "PYTHONUNBUFFERED": "1"}  # lines reach the log as printed
                proc = subprocess.Popen([sys.executable, *job.argv], stdout=log, stderr=subprocess.STDOUT, env=env)
                running[job.name] = {"proc": proc, "log": log, "reader": reader, "tail": "", "start": time.time() - t0}
                say(f"[{running[job.name]['start'] / 60:5.1f} min] start {job.name}")
            if not running:  # nothing can start: the jobs left wait for jobs that never run
                raise ValueError(f"jobs {', '.join(job.name for job in waiting)} wait for jobs that never run")
            time.sleep(poll)
            for name, run in list(running.items()):
                finished = run["proc"].poll() is not None  # before reading: its last lines are then in the file
                if relay:
                    *lines, run["tail"] = (run["tail"] + run["reader"].read()).split("\n")  # complete lines only
                    for line in lines:
                        relay(name, line)
                if not finished:
                    continue
                del running[name]
                run["log"].close()
                run["reader"].close()
                if run["proc"].returncode:
                    raise JobFailed(name, run["proc"].returncode, run["log"].name)
                done[name] = (run["start"], time.time() - t0)
                say(f"[{done[name][1] / 60:5.1f} min] done  {name} ({(done[name][1] - run['start']) / 60:.1f} min)")
    finally:
        for run in running.values():  # a failure, an error or Ctrl-C: stop the others too
            run["proc"].terminate()
            run["proc"].wait()
            run["log"].close()
            run["reader"].close()
    return done
