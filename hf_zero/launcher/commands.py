"""One node's command line: torchrun on this machine, torchrun over ssh, or srun.

Pure functions: they return `NodeCommand`s (argv + extra environment) and never run
anything, so `--dry_run` prints exactly what would run and tests can compare strings.
"""

import shlex
from collections.abc import Mapping, Sequence
from typing import NamedTuple

RUN_MODULE = "hf_zero.run"


class NodeCommand(NamedTuple):
    """What one node (or, for srun, the whole job) runs: `env` is added to the caller's environment."""

    host: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    stdin_closed: bool = False
    """Run with stdin from /dev/null: set for ssh, whose `-tt` would otherwise put this
    terminal in raw mode (and several ssh clients would fight over it)."""


def run_argv(module: bool, script: str, script_args: Sequence[str]) -> list[str]:
    """The arguments of `python -m hf_zero.run`: `[--module] SCRIPT ARGS...`."""
    return (["--module"] if module else []) + [script, *script_args]


def torchrun_argv(
    python: str,
    *,
    nproc_per_node: int,
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    target: Sequence[str],
) -> list[str]:
    """`python -m torch.distributed.run ... -m hf_zero.run TARGET` for one node."""
    return [
        python, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc_per_node),
        "--nnodes", str(nnodes),
        "--node_rank", str(node_rank),
        "--master_addr", master_addr,
        "--master_port", str(master_port),
        "-m", RUN_MODULE, *target,
    ]  # fmt: skip


def ssh_command(host: str, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> NodeCommand:
    """`ssh -tt HOST "cd CWD && export K=V ... && ARGV"`.

    `-tt` gives the remote command a terminal, so closing the connection (first failure
    elsewhere, Ctrl-C here) hangs it up and torchrun stops its ranks on SIGHUP; without a
    terminal the remote ranks would keep running.
    """
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    remote = f"cd {shlex.quote(cwd)} && "
    if exports:
        remote += f"export {exports} && "
    remote += shlex.join(argv)
    return NodeCommand(host=host, argv=("ssh", "-tt", host, remote), env={}, stdin_closed=True)


def srun_argv(
    python: str,
    *,
    nodes: int,
    ntasks_per_node: int,
    nodelist: Sequence[str],
    target: Sequence[str],
) -> list[str]:
    """`srun ... python -m hf_zero.run TARGET`: one task per rank, no torchrun.

    Each task maps SLURM_* onto RANK/WORLD_SIZE/... itself (`hf_zero.launcher.slurm`).
    `--kill-on-bad-exit=1` makes the first failing rank end the whole step.
    """
    argv = ["srun", "--nodes", str(nodes), "--ntasks-per-node", str(ntasks_per_node)]
    if nodelist:
        argv += ["--nodelist", ",".join(nodelist)]
    return argv + ["--kill-on-bad-exit=1", python, "-m", RUN_MODULE, *target]


def format_command(command: NodeCommand) -> str:
    """One shell line: `K=V ... ARGV`, every word quoted so it can be pasted into a shell."""
    words = [f"{name}={shlex.quote(value)}" for name, value in command.env.items()]
    return " ".join(words + [shlex.join(command.argv)])
