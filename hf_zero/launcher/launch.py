"""`hf-zero launch`: validate, plan, then print (--dry_run) or run the per-node commands.

Everything that can be checked here is checked before any rank starts, so a typo in
the config or the flags fails in a second instead of after spawning (and killing) ranks.
"""

import argparse
import dataclasses
import os
import sys
import tempfile

from hf_zero.launcher import error_file, multinode, placement, plan, preflight
from hf_zero.launcher.args import LaunchOptions, check_script
from hf_zero.launcher.commands import NodeCommand, format_command
from hf_zero.launcher.resources import resolve_hosts
from hf_zero.launcher.zero_config_arg import auto_precision_note, load_zero_config, split_config_flag

HF_ZERO_OFF = ("hf_zero: no --zero_config (or --deepspeed) FILE among the script's arguments: hf_zero is off, "
               "the script runs as under torchrun (unless it calls hf_zero.trainer.activate itself)")


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def launch(options: LaunchOptions) -> int:
    """Run (or with `dry_run` print) the job; returns the exit code. User errors raise ValueError."""
    flag = split_config_flag(options.script_args)
    config = load_zero_config(flag.path, flag.rest) if flag.path is not None else None
    if flag.from_deepspeed:  # the ranks get --zero_config: flag.note is said once, here (below)
        options = dataclasses.replace(options, script_args=(*flag.rest, "--zero_config", flag.path))
    hosts = resolve_hosts(options, device_count=cuda_device_count)
    if config is not None:  # tp groups inside a node ([Note: rank order] in placement.py)
        placement.check_tp_placement(config.tensor_parallel.autotp_size, placement.node_process_counts(options, hosts),
                                     source=config.source, hosts=list(hosts) if options.hostfile else ())
    launcher = plan.choose_launcher(options, hosts)
    if launcher == "torchrun" and not options.module:
        check_script(options.script)
    cwd = os.getcwd()
    exports = {}
    if launcher == "ssh":
        env_files = multinode.env_file_paths(os.path.expanduser("~"), cwd)
        exports = multinode.remote_exports(os.environ, cwd, env_files)
    node_commands = plan.build_commands(
        options, hosts, launcher, python=sys.executable, cwd=cwd, exports=exports
    )
    if not options.skip_doctor:
        preflight.check(options, hosts, launcher, config, device_count=cuda_device_count)
    for line in (flag.note, HF_ZERO_OFF if config is None else auto_precision_note(config, flag.rest)):
        if line is not None:  # said once the job is sure to start (or be printed)
            print(line, file=sys.stderr)
    if options.dry_run:
        for command in node_commands:
            print(format_command(command))
        return 0
    if launcher != "torchrun":  # ssh: each node's torchrun writes on its own host; srun: no torchrun
        return multinode.run_all(node_commands)
    return run_with_summary(node_commands)


def run_with_summary(node_commands: list[NodeCommand]) -> int:
    """Run this node's torchrun; if the job fails, end with one line naming the first failure.

    torchrun copies the error file of its first failing rank (the earliest one written by
    `hf_zero.run` or the watchdog, `error_file.py`) to its own `TORCHELASTIC_ERROR_FILE`; after
    torchrun's per-rank table that file's line is printed last: `hf_zero: job failed: rank 1
    raised CheckpointError: ...`. A rank that left no file (killed, a crash in C++) adds nothing."""
    with tempfile.TemporaryDirectory(prefix="hf_zero_launch_") as folder:
        path = os.path.join(folder, "first_failure.json")
        commands = [command._replace(env={**command.env, error_file.ENV: path}) for command in node_commands]
        code = multinode.run_all(commands)
        message = error_file.read(path) if code != 0 else None
    if message is not None:
        print(f"hf_zero: job failed: {message}", file=sys.stderr, flush=True)
    return code


def main(args: argparse.Namespace) -> int:
    """The `launch` subcommand's handler: `hf_zero: <message>` and exit code 2 on user errors."""
    try:
        return launch(LaunchOptions.from_namespace(args))
    except ValueError as error:
        print(f"hf_zero: {error}", file=sys.stderr)
        return 2
