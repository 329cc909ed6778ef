"""Run a function in N PyTorch processes joined by a gloo process group, for multi-process tests.

``run_ranks(fn, n, *args)`` starts ``n`` fresh Python processes (``sys.executable``), each with
one thread (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``), joins them in a gloo group on
127.0.0.1 at a free port, calls ``fn(rank, world_size, *args)`` in each and returns the ranks'
return values, rank 0 first. ``fn`` must be a module-level function of an importable module (the
worker imports it by name; the module's folder is put on the workers' ``PYTHONPATH``); arguments
and results travel pickled. A worker that raises, exits, or outlives ``timeout`` seconds (a
deadlocked collective included) fails the call with every rank's output, and the other workers are
killed, so a bug fails the test instead of hanging it. Collectives time out after
``collective_timeout`` seconds inside the workers too.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_WORKER = "import process_group, sys; process_group._worker(sys.argv[1])"


class RanksFailed(AssertionError):
    """A worker process failed, or the group did not finish in time; the message holds every
    rank's exit status and output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240,
              collective_timeout: float = 120, env: dict[str, str] | None = None) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each rank in its
    own single-threaded process of one gloo group. ``env`` adds variables to the workers'."""
    module = sys.modules[fn.__module__]
    if fn.__module__ == "__main__" or getattr(module, fn.__qualname__, None) is not fn:
        raise ValueError(f"run_ranks: {fn!r} is not a module-level function a worker can import")
    paths = [str(Path(__file__).resolve().parent), str(Path(module.__file__).resolve().parent),  # type: ignore[arg-type]
             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    worker_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
                  "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp, contextlib.ExitStack() as logs:
        procs = []
        for rank in range(world_size):
            job = Path(tmp) / f"rank{rank}.pkl"
            job.write_bytes(pickle.dumps({
                "module": fn.__module__, "name": fn.__qualname__, "args": args, "rank": rank,
                "world_size": world_size, "port": port, "collective_timeout": collective_timeout,
                "result": str(Path(tmp) / f"result{rank}.pkl")}))
            log = logs.enter_context(open(Path(tmp) / f"rank{rank}.log", "w+"))
            procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(job)], env=worker_env,
                                          stdout=log, stderr=subprocess.STDOUT))
        try:
            failed = _wait(procs, timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
        if failed:
            report = []
            for rank, p in enumerate(procs):
                output = (Path(tmp) / f"rank{rank}.log").read_text()
                report.append(f"--- rank {rank}: exit status {p.returncode}\n{output[-6000:]}")
            raise RanksFailed(f"{failed}\n" + "\n".join(report))
        return [pickle.loads((Path(tmp) / f"result{rank}.pkl").read_bytes()) for rank in range(world_size)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> str:
    """Wait for every process; a message if one failed or time ran out, else ``""``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            return "a worker failed"
        if all(c == 0 for c in codes):
            return ""
        time.sleep(0.05)
    return f"the workers did not finish within {timeout} s (a deadlock?)"


def _worker(job_path: str) -> None:
    """A worker's life: one thread, join the group, run the function, save its result."""
    import datetime
    import gc
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    job = pickle.loads(Path(job_path).read_bytes())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job['port']}", rank=job["rank"],
                            world_size=job["world_size"],
                            timeout=datetime.timedelta(seconds=job["collective_timeout"]))
    try:
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        result = fn(job["rank"], job["world_size"], *job["args"])
    finally:
        gc.collect()  # DDP's reducer sits in reference cycles; freed after its group, it aborts the process
        dist.destroy_process_group()
    Path(job["result"]).write_bytes(pickle.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is saved; torch's C++ teardown at interpreter exit is not under test
