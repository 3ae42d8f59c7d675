"""Launcher environment: ranks vs GPUs, master address and port, RANK/WORLD_SIZE/LOCAL_RANK."""

import socket

import pytest

from hf_zero.doctor import environment
from hf_zero.doctor.environment import (
    asks_for_cpu,
    check_gpus,
    check_launcher_env,
    check_master_addr,
    check_master_port,
)
from hf_zero.doctor.result import Status

REMOTE = "192.0.2.1"  # TEST-NET-1: never an address of this machine


def test_gpus():
    assert check_gpus(2, 4).status is Status.PASS
    assert check_gpus(4, 4).status is Status.PASS
    result = check_gpus(8, 2)
    assert result.status is Status.FAIL
    assert result.detail.startswith("8 ranks per node but only 2 CUDA device(s) visible")
    assert "--nproc 2" in result.fix
    cpu = check_gpus(2, 0)
    assert cpu.status is Status.WARN and "gloo" in cpu.detail
    assert check_gpus(8, 1, cpu_requested=True).status is Status.PASS


@pytest.mark.parametrize("args, expected", [
    (["--use_cpu"], True), (["--lr", "1", "--use_cpu", "--bf16"], True), (["--use_cpu", "false"], False),
    (["--use_cpu=True"], True), (["--use-cpu=0"], False), (["--no_cuda"], True), (["--bf16"], False),
])
def test_asks_for_cpu(args, expected):
    assert asks_for_cpu(args) is expected


def test_master_addr():
    assert check_master_addr(None, 1).detail == "127.0.0.1 resolves to 127.0.0.1"
    assert check_master_addr("localhost", 2).status is Status.PASS
    missing = check_master_addr(None, 2)
    assert missing.status is Status.FAIL and "needs --master_addr" in missing.detail


def test_unresolvable_master_addr(monkeypatch):
    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(environment.socket, "getaddrinfo", getaddrinfo)
    result = check_master_addr("worker-9", 2)
    assert result.status is Status.FAIL
    assert result.detail == "--master_addr 'worker-9' does not resolve: [Errno -2] Name or service not known"
    assert check_master_port("worker-9", 29500, 2).status is Status.SKIP


def test_port_free_and_in_use(free_port, busy_port):
    assert check_master_port(None, free_port, 1).status is Status.PASS
    busy = check_master_port("127.0.0.1", busy_port, 1)
    assert busy.status is Status.FAIL
    assert busy.detail == f"127.0.0.1:{busy_port} is already in use on this machine"
    # the master of a 2-node job is this machine: same bind test
    assert check_master_port("127.0.0.1", busy_port, 2).status is Status.FAIL


def test_one_node_job_with_a_remote_master_fails(free_port):
    result = check_master_port(REMOTE, free_port, 1)
    assert result.status is Status.FAIL
    assert "is not an address of this machine" in result.detail


@pytest.mark.parametrize("outcome, status", [
    (None, Status.PASS), (ConnectionRefusedError(111, "Connection refused"), Status.PASS),
    (TimeoutError("timed out"), Status.FAIL), (OSError(113, "No route to host"), Status.FAIL),
])
def test_remote_master_probe(monkeypatch, outcome, status):
    calls = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def create_connection(address, timeout):
        calls.append((address, timeout))
        if outcome is not None:
            raise outcome
        return Connection()

    monkeypatch.setattr(environment.socket, "create_connection", create_connection)
    result = check_master_port(REMOTE, 29500, 2)
    assert result.status is status, result
    assert calls == [((REMOTE, 29500), 2.0)]
    if status is Status.FAIL:
        assert result.detail.startswith(f"{REMOTE}:29500 is not reachable from here: ")
        assert "firewall" in result.fix


def test_remote_master_not_probed_for_the_launcher(monkeypatch):
    monkeypatch.setattr(environment.socket, "create_connection", None)  # would raise if called
    assert check_master_port(REMOTE, 29500, 2, probe_remote=False).status is Status.SKIP
    assert check_master_port(REMOTE, None, 2).status is Status.SKIP


def test_launcher_env():
    assert check_launcher_env({}).status is Status.SKIP
    ok = check_launcher_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (ok.status, ok.detail) == (Status.PASS, "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 LOCAL_WORLD_SIZE=2: consistent")


@pytest.mark.parametrize("environ, problem", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 must be < WORLD_SIZE=2"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a non-negative integer"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 must be < LOCAL_WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE=4 must be <= WORLD_SIZE=2"),
])
def test_inconsistent_launcher_env(environ, problem):
    result = check_launcher_env(environ)
    assert result.status is Status.FAIL
    assert problem in result.detail


def test_launcher_env_against_flags_and_under_hf_zero_launch():
    env = {"RANK": "0", "WORLD_SIZE": "4"}
    assert check_launcher_env(env, expected_world=2).status is Status.WARN
    assert check_launcher_env(env, launcher="torchrun").status is Status.WARN
    slurm = check_launcher_env(env, launcher="slurm")
    assert slurm.status is Status.FAIL and "unset RANK" in slurm.fix


def test_a_later_node_rank_never_binds_the_masters_port(monkeypatch, busy_port):
    """Node rank 1 on the master's machine (two nodes of a job on one host): node rank 0 owns the port,
    in use or not; a remote master is treated as before."""
    for port in (busy_port, 29500):
        result = check_master_port("127.0.0.1", port, 2, probe_remote=False, node_rank=1)
        assert result.status is Status.PASS, result
        assert result.detail == (f"127.0.0.1:{port}: the master is this machine, where node rank 0's rendezvous runs "
                                 "(this is node rank 1; the port is node rank 0's to bind)")
    monkeypatch.setattr(environment.socket, "create_connection", None)  # would raise if called
    assert check_master_port(REMOTE, 29500, 2, probe_remote=False, node_rank=1).status is Status.SKIP
