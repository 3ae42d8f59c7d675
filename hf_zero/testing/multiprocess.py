"""Run a function on N ranks in fresh processes, for tests and examples.

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initializes a gloo
process group in each, calls ``fn(rank, world_size, *args)`` and returns the list of per-rank
return values (rank order). If any rank raises, or the run outlasts ``timeout`` seconds, every
rank is stopped and a ``RankFailure`` is raised carrying each failing rank's full traceback. A rank
whose process dies without reporting (killed) is seen within a second, not at ``timeout``; when a
fatal signal killed it (a segfault in native code), the message holds the Python stacks that
``faulthandler`` wrote for it.

``backend="nccl"`` gives each rank its own GPU instead: rank r makes ``cuda:r`` its current
device before the NCCL process group is created (bound to that device), so ``fn`` can allocate
with ``device="cuda"``. It needs at least ``world_size`` visible GPUs. The gloo path is unchanged.

``fn`` and ``args`` must be picklable (a module-level function), as with ``torch.multiprocessing``.
Return plain Python values (``tensor.tolist()``): a tensor sent back through the queue lives in the
rank's shared memory, which is gone once the rank exits.

[Note: ranks forked from a preloaded server]
A rank started with ``spawn`` is a fresh interpreter that imports torch and transformers before it
does anything: several CPU-seconds per rank, most of a small test's time on a 2-core machine. The
ranks come from multiprocessing's forkserver instead: one server process imports ``PRELOAD`` once
(importing torch initialises no CUDA and starts no thread pool) and forks each rank from that
state, which then imports ``fn``'s module as a spawned rank would. What a forked rank would see
differently, and how it is made the same:
- the environment is the server's (that of its start): each rank is given the caller's
  ``os.environ`` as it is at the call;
- cwd and ``sys.path`` are the caller's: multiprocessing sends them with every rank;
- a forked rank ends with ``os._exit``, which runs no ``atexit`` handler (a spawned one ends as an
  interpreter does): each rank runs them once ``fn`` has returned and its process group is gone;
- a variable read when torch or transformers is imported (``IMPORT_TIME_PREFIXES``) that differs
  from the server's start: this call spawns fresh interpreters, as before.
Where forkserver does not exist (Windows), ranks are spawned.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing as mp
import os
import queue
import shutil
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """One or more ranks raised or hung; the message holds every rank's traceback."""


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKENDS = ("gloo", "nccl")
_POLL_S = 0.5  # how often run_on_ranks looks for a rank that died without reporting

# What the forkserver imports once for every rank (see the note at the top).
PRELOAD = ("torch", "torch.distributed", "transformers", "transformers.trainer")
# Variables these imports may read: one changed since the server started means spawned ranks.
# hf_zero's own (HF_ZERO_*) are read at run time, and hf_zero is not preloaded.
IMPORT_TIME_PREFIXES = ("HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "KMP_",
                        "ACCELERATE_", "TOKENIZERS_", "NCCL_", "PYTHON")
_server_env: dict[str, str] | None = None  # the import-time variables the forkserver started with


def _import_time_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(IMPORT_TIME_PREFIXES) and not k.startswith("HF_ZERO_")}


def _context():
    """The forkserver context with ``PRELOAD``, or spawn where the environment differs from the
    server's start (or forkserver does not exist)."""
    global _server_env
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    if _server_env is None:
        _server_env = _import_time_env()  # the server starts with the first rank started below
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return mp.get_context("forkserver" if _import_time_env() == _server_env else "spawn")


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any, backend: str,
            environ: dict[str, str] | None = None, fault_path: str | None = None) -> None:
    if fault_path is not None:  # a crash in native code (SIGSEGV) leaves each thread's Python stack there
        faulthandler.enable(open(fault_path, "w"), all_threads=True)  # noqa: SIM115 - open until the process ends
    if environ is not None:  # a forked rank holds the server's environment: the caller's instead
        os.environ.clear()
        os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        atexit._run_exitfuncs()  # what an interpreter's exit runs (the note at the top)


def run_on_ranks(
    fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo"
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return per-rank results.

    ``backend``: ``"gloo"`` (CPU ranks) or ``"nccl"`` (rank r on ``cuda:r``)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend 'nccl' with world_size {world_size} needs {world_size} GPUs; "
            f"{torch.cuda.device_count()} visible"
        )
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    faults = tempfile.mkdtemp(prefix="hf_zero-ranks-")  # each rank's faulthandler output
    fault_paths = [os.path.join(faults, f"rank{r}.txt") for r in range(world_size)]
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, backend, environ, fault_paths[r]),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, status, payload = results.get(timeout=min(_POLL_S, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if _died(procs, results, outcomes, world_size, fault_paths):
                    _drain(results, outcomes, world_size, grace=5.0, procs=procs)
                    _died(procs, results, outcomes, world_size, fault_paths)
                    raise RankFailure(_describe(outcomes, "a rank died"))
                if time.monotonic() >= deadline:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise RankFailure(_describe(outcomes, f"timed out after {timeout}s; ranks {missing} did not finish"))
                continue
            outcomes[rank] = (status, payload)
            if status == "error":
                # One rank failed: the others may be blocked in a collective. Give them a moment to report.
                _drain(results, outcomes, world_size, grace=5.0, procs=procs)
                _died(procs, results, outcomes, world_size, fault_paths)  # a rank killed, which the others saw
                raise RankFailure(_describe(outcomes, "a rank raised"))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(faults, ignore_errors=True)
    return [outcomes[r][1] for r in range(world_size)]


def run_each(rank: int, world_size: int, fn: Callable, runs: dict) -> dict:
    """``fn(rank, world_size, *args)`` for every ``key: args`` of ``runs``, one after another in this
    one rank start (``run_on_ranks(run_each, world, fn, runs)``: one start for many cases); the
    results by key. A failing run names itself (its key and args) in the error."""
    out = {}
    for key, args in runs.items():
        try:
            out[key] = fn(rank, world_size, *args)
        except BaseException as error:  # noqa: BLE001 - re-raised with the run named
            raise AssertionError(f"{fn.__name__} run {key!r} {args} at W {world_size}") from error
    return out


def run_report(output_dir: str) -> dict:
    """The run report (``hf_zero_report.json``) of a Trainer run in ``output_dir``, read on any rank
    once every rank got here: rank 0 writes the finished report at its ``on_train_end``, so a rank
    that reads it without waiting may see an earlier rewrite (report.py, [Note: report rewrites])."""
    import json

    from hf_zero.trainer.report_file import REPORT_NAME

    if dist.is_initialized():
        dist.barrier()
    with open(os.path.join(output_dir, REPORT_NAME)) as f:
        return json.load(f)


def _died(procs: list, results: Any, outcomes: dict, world_size: int, fault_paths: list[str] = ()) -> bool:
    """Whether a rank's process has exited without a result (killed: SIGKILL, the OOM killer,
    ``os._exit``, a crash in native code); such ranks are recorded as errors, with the Python stacks
    faulthandler wrote when it was a fatal signal (SIGSEGV, SIGABRT, ...). A result put just before
    exiting is read first."""
    if not any(r not in outcomes and p.exitcode is not None for r, p in enumerate(procs)):
        return False
    _drain(results, outcomes, world_size, grace=1.0, procs=procs)
    dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None]
    for r in dead:
        stacks = _read(fault_paths[r]) if r < len(fault_paths) else ""
        outcomes[r] = ("error", f"rank {r}'s process exited with code {procs[r].exitcode} without a result "
                                "(a negative code: killed by that signal)\n"
                                + (f"its Python stacks at the fatal signal (faulthandler):\n{stacks}" if stacks else ""))
    return bool(dead)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _drain(results: Any, outcomes: dict, world_size: int, grace: float, procs: list = ()) -> None:
    """Read the results that come within ``grace`` seconds of silence; with ``procs``, stop as soon
    as every rank still missing has exited (a killed one never reports)."""
    quiet_until = time.monotonic() + grace
    while len(outcomes) < world_size and time.monotonic() < quiet_until:
        try:
            rank, status, payload = results.get(timeout=min(_POLL_S, grace))
        except queue.Empty:
            if procs and all(p.exitcode is not None for r, p in enumerate(procs) if r not in outcomes):
                try:  # what an exiting rank put just before it went
                    rank, status, payload = results.get(timeout=_POLL_S)
                except queue.Empty:
                    return
            else:
                continue
        outcomes[rank] = (status, payload)
        quiet_until = time.monotonic() + grace


def _describe(outcomes: dict[int, tuple[str, Any]], headline: str) -> str:
    parts = [f"run_on_ranks: {headline}"]
    for rank in sorted(outcomes):
        status, payload = outcomes[rank]
        if status == "error":
            parts.append(f"--- rank {rank} traceback ---\n{payload}")
    return "\n".join(parts)


def run_rank_processes(command: list[str], world_size: int, log_dir, *, limit: float, cwd=None,
                       env: dict[str, str] | None = None) -> list[dict]:
    """Start ``command`` once per rank as its own process of a ``world_size``-rank job on this host
    (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT set; ``env`` added; output to
    ``log_dir/rank{r}.log``), wait up to ``limit`` seconds and kill the ranks still running.

    For processes that may end through ``os._exit`` (the hang watchdog), which ``run_on_ranks``
    would only see as a timeout. Per rank: ``code`` (None: still running at ``limit``, killed),
    ``text`` (its output) and ``ended`` (``time.time()`` when it was seen to exit, or None)."""
    import subprocess
    import time
    from pathlib import Path

    log_dir, port = Path(log_dir), free_port()
    procs, logs = [], []
    try:
        for rank in range(world_size):
            rank_env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            **(env or {}))
            logs.append(open(log_dir / f"rank{rank}.log", "w"))
            procs.append(subprocess.Popen(command, env=rank_env, cwd=cwd, stdout=logs[-1], stderr=subprocess.STDOUT))
        ended: dict[int, float] = {}
        deadline = time.monotonic() + limit
        while len(ended) < world_size and time.monotonic() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in ended and proc.poll() is not None:
                    ended[rank] = time.time()
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return [{"code": proc.returncode if rank in ended else None, "ended": ended.get(rank),
             "text": (log_dir / f"rank{rank}.log").read_text()} for rank, proc in enumerate(procs)]
