"""Launcher environment: ranks against visible GPUs, the rendezvous address and port, and the
RANK/WORLD_SIZE/LOCAL_RANK variables of a launcher already running us.

Each check takes what it needs as arguments (device counts, environment), so tests can craft them.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping, Sequence

from hf_zero.doctor.result import CheckResult, failed, passed, skipped, warned

GPUS = "gpus"
MASTER_ADDR = "master address"
MASTER_PORT = "master port"
LAUNCHER_ENV = "launcher env"
CONNECT_TIMEOUT_S = 2.0
DEFAULT_PORT = 29500
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_CPU_FLAGS = ("--use_cpu", "--use-cpu", "--no_cuda", "--no-cuda")
_FALSE = ("false", "False", "0", "no")


def asks_for_cpu(script_args: Sequence[str]) -> bool:
    """Whether the script's arguments hold TrainingArguments' ``--use_cpu`` (or ``--no_cuda``)."""
    for i, arg in enumerate(script_args):
        flag, sep, value = arg.partition("=")
        if flag not in _CPU_FLAGS:
            continue
        if sep:
            return value not in _FALSE
        following = script_args[i + 1] if i + 1 < len(script_args) else ""
        return following not in _FALSE
    return False


def check_gpus(ranks_per_node: int, device_count: int, *, cpu_requested: bool = False) -> CheckResult:
    """Ranks started on this machine against the CUDA devices it shows."""
    if cpu_requested:
        return passed(GPUS, f"{ranks_per_node} rank(s) on CPU (--use_cpu): gloo will be used")
    if device_count == 0:
        return warned(GPUS, f"no CUDA device visible: {ranks_per_node} rank(s) will train on CPU with gloo",
                      "if you expected GPUs: check nvidia-smi, CUDA_VISIBLE_DEVICES, and that torch is a CUDA "
                      "build (python -c 'import torch; print(torch.version.cuda)')")
    if ranks_per_node > device_count:
        return failed(GPUS, f"{ranks_per_node} ranks per node but only {device_count} CUDA device(s) visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
                      f"use --nproc {device_count} (hf-zero launch: --num_gpus {device_count}), make more devices "
                      "visible, or pass --use_cpu to the script to train on CPU")
    return passed(GPUS, f"{ranks_per_node} rank(s) per node, {device_count} CUDA device(s) visible: NCCL")


def resolve(addr: str) -> list[tuple[int, str]]:
    """(address family, IP) pairs of ``addr``; raises OSError (socket.gaierror) if it does not resolve."""
    infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    seen: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr[0]) not in seen:
            seen.append((family, sockaddr[0]))
    return seen


def check_master_addr(addr: str | None, nnodes: int) -> CheckResult:
    """The rendezvous address resolves here (default 127.0.0.1 on one node; required on several)."""
    if addr is None:
        if nnodes > 1:
            return failed(MASTER_ADDR, f"a {nnodes}-node job needs --master_addr (node rank 0's address)",
                          "pass --master_addr ADDR, the same on every node")
        addr = "127.0.0.1"
    try:
        ips = resolve(addr)
    except OSError as error:
        return failed(MASTER_ADDR, f"--master_addr {addr!r} does not resolve: {error}",
                      "use node rank 0's IP address or a hostname this machine resolves (check /etc/hosts, DNS)")
    return passed(MASTER_ADDR, f"{addr} resolves to {', '.join(ip for _, ip in ips)}")


def _bind(family: int, ip: str, port: int) -> int:
    """0 if (ip, port) can be bound here, else the errno (EADDRINUSE, EADDRNOTAVAIL, EACCES...)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError as error:
            return error.errno or -1
    return 0


def _connect(ip: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection was made or refused (the host answered), else why not."""
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as error:
        return error.strerror or str(error)


def check_master_port(addr: str | None, port: int | None, nnodes: int, *, probe_remote: bool = True,
                      timeout: float = CONNECT_TIMEOUT_S, node_rank: int = 0) -> CheckResult:
    """The rendezvous port: free to bind when the master is this machine, else (``probe_remote``)
    the master host answers a TCP connect within ``timeout``.

    Binding (addr, port) tells the cases apart: it works (or says "in use") only for an address of
    this machine. A refused connection counts as reachable: node 0 may not have started yet. A
    ``node_rank`` > 0 never binds the port, which node rank 0 owns (it may be binding it right now):
    it binds the address on any port to tell whether the master is this machine (several nodes of a
    job on one host), and otherwise probes it as a remote master."""
    if addr is None:
        if nnodes > 1:
            return skipped(MASTER_PORT, "no --master_addr")
        addr = "127.0.0.1"
    if port is None:
        if nnodes > 1:
            return skipped(MASTER_PORT, "pass --master_port to test that the master is reachable")
        port = DEFAULT_PORT
    try:
        family, ip = resolve(addr)[0]
    except OSError:
        return skipped(MASTER_PORT, f"{addr!r} does not resolve (see master address)")
    where = f"{addr}:{port}"
    code = _bind(family, ip, 0 if node_rank > 0 else port)
    if code == 0 and node_rank > 0:
        return passed(MASTER_PORT, f"{where}: the master is this machine, where node rank 0's rendezvous runs "
                                   f"(this is node rank {node_rank}; the port is node rank 0's to bind)")
    if code == 0:
        return passed(MASTER_PORT, f"{where} is free to bind on this machine (the master)")
    if code == errno.EADDRINUSE:
        return failed(MASTER_PORT, f"{where} is already in use on this machine",
                      "pick another --master_port (the same on every node), or stop the process holding it "
                      f"(ss -ltnp | grep {port})")
    if code == errno.EACCES:
        return failed(MASTER_PORT, f"{where}: permission denied to bind (ports below 1024 need root)",
                      "use a --master_port of 1024 or more (29500 is the default)")
    if code != errno.EADDRNOTAVAIL:
        return failed(MASTER_PORT, f"{where} cannot be bound: {os.strerror(code)}", "pick another --master_port")
    if nnodes == 1:
        return failed(MASTER_PORT, f"--master_addr {addr!r} is not an address of this machine, but the job has "
                                   "one node, whose rank 0 runs here",
                      "drop --master_addr (127.0.0.1 is used), or give one of this machine's addresses")
    if not probe_remote:
        return skipped(MASTER_PORT, f"{where} is on another machine (not probed)")
    problem = _connect(ip, port, timeout)
    if problem is not None:
        return failed(MASTER_PORT, f"{where} is not reachable from here: {problem}",
                      "check that --master_addr is node rank 0's address on a network every node shares, and that "
                      f"no firewall blocks TCP port {port} (and the ports NCCL/gloo use) between the nodes")
    return passed(MASTER_PORT, f"{where} reachable (TCP answered within {timeout:g} s)")


def _int_vars(environ: Mapping[str, str]) -> tuple[dict[str, int], list[str]]:
    values, bad = {}, []
    for name in TORCH_VARS:
        if name in environ:
            text = environ[name].strip()
            if text.isascii() and text.isdigit():
                values[name] = int(text)
            else:
                bad.append(f"{name}={environ[name]!r} is not a non-negative integer")
    return values, bad


def check_launcher_env(environ: Mapping[str, str], *, expected_world: int | None = None,
                       launcher: str | None = None) -> CheckResult:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE of a launcher already around us, if any.

    ``launcher``: the ``hf-zero launch`` launcher about to start ranks. With ``slurm`` a RANK in
    this environment would reach every srun task and stop ``hf_zero.run`` mapping SLURM_* (FAIL);
    with torchrun/ssh the started ranks get their own values (WARN: hf-zero launch itself seems to
    run under another launcher). ``expected_world``: nproc * nnodes the user gave, compared with
    WORLD_SIZE."""
    present = {name: environ[name] for name in TORCH_VARS if name in environ}
    if not present:
        return skipped(LAUNCHER_ENV, "not under a launcher (no RANK/WORLD_SIZE/LOCAL_RANK set)")
    shown = " ".join(f"{k}={v}" for k, v in present.items())
    if launcher == "slurm" and "RANK" in present:
        return failed(LAUNCHER_ENV, f"{shown} is set here and would reach every srun task, so hf_zero.run would "
                                    "not map SLURM_PROCID/SLURM_NTASKS onto RANK/WORLD_SIZE",
                      "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE before hf-zero launch --launcher slurm")
    if launcher is not None:
        return warned(LAUNCHER_ENV, f"{shown} is set: hf-zero launch seems to run under another launcher; the "
                                    "ranks it starts get their own values",
                      "start hf-zero launch once per node, not once per rank (or use python -m hf_zero.run "
                      "under that launcher)")
    values, bad = _int_vars(environ)
    problems = list(bad)
    for name in ("RANK", "WORLD_SIZE"):
        if name not in present:
            problems.append(f"{name} is not set")
    rank, world = values.get("RANK"), values.get("WORLD_SIZE")
    local, local_world = values.get("LOCAL_RANK"), values.get("LOCAL_WORLD_SIZE")
    if world is not None and world < 1:
        problems.append(f"WORLD_SIZE={world} must be >= 1")
    if rank is not None and world is not None and rank >= world:
        problems.append(f"RANK={rank} must be < WORLD_SIZE={world}")
    if local is not None and local_world is not None and local >= local_world:
        problems.append(f"LOCAL_RANK={local} must be < LOCAL_WORLD_SIZE={local_world}")
    if local_world is not None and world is not None and local_world > world:
        problems.append(f"LOCAL_WORLD_SIZE={local_world} must be <= WORLD_SIZE={world}")
    if local is not None and rank is not None and local > rank:
        problems.append(f"LOCAL_RANK={local} must be <= RANK={rank}")
    if problems:
        return failed(LAUNCHER_ENV, f"{shown}: " + "; ".join(problems),
                      "let the launcher (torchrun, srun via hf_zero.run) set these, or unset the stale ones")
    if expected_world is not None and world is not None and world != expected_world:
        return warned(LAUNCHER_ENV, f"{shown}: WORLD_SIZE={world} but --nproc * --nnodes = {expected_world}",
                      "the launcher's WORLD_SIZE wins; pass the matching --nproc/--nnodes to size the checks")
    return passed(LAUNCHER_ENV, f"{shown}: consistent")
