"""Which launcher runs a job, and the command every node runs.

| launcher | who starts the ranks | commands |
|---|---|---|
| torchrun | torchrun on this machine (one node of the job) | 1 |
| ssh | torchrun on every hostfile host, started here over ssh | one per host |
| slurm | srun starts one `python -m hf_zero.run` per rank, no torchrun | 1 |

Worked example: hostfile `a slots=2`, `b slots=2`, `--include a@b:1` ->
hosts {a: (0, 1), b: (1,)}; ssh launcher; world size 3; node a runs torchrun with
--nproc_per_node 2 --node_rank 0 and CUDA_VISIBLE_DEVICES=0,1, node b --nproc_per_node 1
--node_rank 1 and CUDA_VISIBLE_DEVICES=1; both rendezvous at a:29500.
"""

from collections.abc import Mapping

from hf_zero.launcher import commands
from hf_zero.launcher.args import LaunchOptions
from hf_zero.launcher.commands import NodeCommand
from hf_zero.launcher.resources import LOCALHOST, Hosts

LOOPBACK = "127.0.0.1"


def choose_launcher(options: LaunchOptions, hosts: Hosts) -> str:
    if options.launcher is not None:
        return options.launcher
    return "ssh" if options.hostfile is not None and len(hosts) > 1 else "torchrun"


def build_commands(
    options: LaunchOptions,
    hosts: Hosts,
    launcher: str,
    *,
    python: str,
    cwd: str,
    exports: Mapping[str, str],
) -> list[NodeCommand]:
    """The commands to run (see the table above). `exports` is used by the ssh launcher only."""
    target = commands.run_argv(options.module, options.script, options.script_args)
    pin_devices = bool(options.include or options.exclude)
    if launcher == "torchrun":
        return [_torchrun_command(options, hosts, python, target, pin_devices)]
    if options.node_rank is not None:
        raise ValueError(
            f"--node_rank {options.node_rank} is for the torchrun launcher; the {launcher} "
            "launcher numbers the nodes itself: drop --node_rank"
        )
    if launcher == "ssh":
        return _ssh_commands(options, hosts, python, cwd, exports, target, pin_devices)
    if launcher == "slurm":
        return [_srun_command(options, hosts, python, target)]
    raise AssertionError(f"unknown launcher {launcher!r}; LaunchOptions validates it")


def _visible_devices(ids: tuple[int, ...]) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}


def _torchrun_command(
    options: LaunchOptions, hosts: Hosts, python: str, target: list[str], pin_devices: bool
) -> NodeCommand:
    names = list(hosts)
    nnodes = len(names) if options.hostfile is not None else options.num_nodes or 1
    if nnodes > 1 and options.node_rank is None:
        raise ValueError(
            f"the torchrun launcher runs one node of a {nnodes}-node job here: give --node_rank "
            f"(0..{nnodes - 1}) on each node, or use --launcher ssh / slurm to start every node"
        )
    node_rank = options.node_rank or 0
    if node_rank >= nnodes:
        raise ValueError(f"--node_rank {node_rank} is out of range for {nnodes} node(s) (0..{nnodes - 1})")
    if nnodes > 1 and options.hostfile is None and options.master_addr is None:
        raise ValueError(
            f"--num_nodes {nnodes} without --hostfile needs --master_addr (the address of "
            "node rank 0, the same on every node)"
        )
    host = names[node_rank] if options.hostfile is not None else LOCALHOST
    master_addr = options.master_addr or (names[0] if nnodes > 1 else LOOPBACK)
    ids = hosts[host]
    argv = commands.torchrun_argv(
        python,
        nproc_per_node=len(ids),
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=options.torchrun_port,
        target=target,
    )
    return NodeCommand(host=host, argv=tuple(argv), env=_visible_devices(ids) if pin_devices else {})


def _ssh_commands(
    options: LaunchOptions,
    hosts: Hosts,
    python: str,
    cwd: str,
    exports: Mapping[str, str],
    target: list[str],
    pin_devices: bool,
) -> list[NodeCommand]:
    if options.hostfile is None:
        raise ValueError("--launcher ssh needs --hostfile (the hosts to start nodes on)")
    master_addr = options.master_addr or next(iter(hosts))
    result = []
    for node_rank, (host, ids) in enumerate(hosts.items()):
        argv = commands.torchrun_argv(
            python,
            nproc_per_node=len(ids),
            nnodes=len(hosts),
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=options.torchrun_port,
            target=target,
        )
        env = {**exports, **(_visible_devices(ids) if pin_devices else {})}
        result.append(commands.ssh_command(host, argv, env, cwd))
    return result


def _srun_command(options: LaunchOptions, hosts: Hosts, python: str, target: list[str]) -> NodeCommand:
    for host, ids in hosts.items():
        if ids != tuple(range(len(ids))):
            raise ValueError(
                f"the slurm launcher cannot pin device ids (host {host!r} would use "
                f"{','.join(map(str, ids))}): srun gives each task its node's GPUs; select "
                "whole hosts in --include/--exclude, or use --num_gpus"
            )
    if options.hostfile is not None:
        counts = {len(ids) for ids in hosts.values()}
        if len(counts) > 1:
            per_host = ", ".join(f"{host}={len(ids)}" for host, ids in hosts.items())
            raise ValueError(
                "the slurm launcher starts the same number of tasks on every node, but the "
                f"hosts have different device counts ({per_host}); use --num_gpus"
            )
        nodes, nodelist = len(hosts), list(hosts)
    else:
        nodes, nodelist = options.num_nodes or 1, []
    # Without --master_port each task derives its job's own port (slurm.job_master_port).
    env = {} if options.master_port is None else {"MASTER_PORT": str(options.master_port)}
    if options.master_addr is not None:
        env["MASTER_ADDR"] = options.master_addr
    argv = commands.srun_argv(
        python,
        nodes=nodes,
        ntasks_per_node=len(next(iter(hosts.values()))),
        nodelist=nodelist,
        target=target,
    )
    return NodeCommand(host="slurm", argv=tuple(argv), env=env)
