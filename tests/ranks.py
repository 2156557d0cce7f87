"""Start retrain.py (or another script) as several gloo processes by hand, as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, ...),
without torchrun's agent: a second faster to start, and each process's exit status and output are its own
(torchrun stops the other workers when the first one exits)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv_of_rank, procs: int = 2, timeout: float = 300,
              script: Path = REPO / "retrain.py") -> list[subprocess.CompletedProcess]:
    """`script` (retrain.py) on `procs` processes, rank r with the command line argv_of_rank(r); every process
    must end within `timeout` seconds (else the test fails with TimeoutExpired and all are killed)."""
    port, running = free_port(), []
    for rank in range(procs):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(procs), "LOCAL_WORLD_SIZE": str(procs)}
        running.append(subprocess.Popen([sys.executable, str(script), *map(str, argv_of_rank(rank))],
                                        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0, results = time.time(), []
    try:
        for p in running:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in running:
            p.kill()
    return results
