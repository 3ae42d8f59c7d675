"""The doctor's cheap checks before `hf-zero launch` starts any rank (`--skip_doctor` turns them off).

`check` translates the launch plan into what `hf_zero.doctor.runner.preflight` needs and raises
ValueError listing the failed checks, so `launch.main` prints `hf_zero: <message>` and exits 2
like every other pre-start error. Passing, warning and skipped checks print nothing. The config
was already loaded (and its errors reported) by `launch`; only its train_batch_size is checked
against the planned world size here.
"""

from collections.abc import Callable
from typing import Any

from hf_zero.launcher.args import LaunchOptions
from hf_zero.launcher.plan import LOOPBACK
from hf_zero.launcher.resources import LOCALHOST, Hosts


def check(options: LaunchOptions, hosts: Hosts, launcher: str, config: Any, *,
          device_count: Callable[[], int]) -> None:
    """Run the preflight for this plan; ValueError with every failure and its fix."""
    from hf_zero.doctor.render import render_failures
    from hf_zero.doctor.runner import preflight

    per_node = len(next(iter(hosts.values())))
    nnodes = len(hosts) if options.hostfile is not None else options.num_nodes or 1
    world = sum(len(ids) for ids in hosts.values()) if options.hostfile is not None else nnodes * per_node
    names = list(hosts)
    ranks_here = None
    master = options.master_addr
    if launcher == "torchrun":  # this machine runs one node's ranks (plan._torchrun_command)
        host = names[options.node_rank or 0] if options.hostfile is not None else LOCALHOST
        ranks_here = len(hosts[host])
        master = master or (names[0] if nnodes > 1 else LOOPBACK)
    results = preflight(
        config, world_size=world, ranks_here=ranks_here, master_addr=master, master_port=options.torchrun_port,
        nnodes=nnodes, launcher=launcher, node_rank=options.node_rank or 0, script_args=options.script_args,
        machine_checks=not options.dry_run, device_count=device_count,
    )
    message = render_failures(results)
    if message:
        raise ValueError(message)
