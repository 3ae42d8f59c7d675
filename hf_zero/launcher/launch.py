"""`hf-zero launch`: validate, plan, then print (--dry_run) or run the per-node commands.

Everything that can be checked here is checked before any rank starts, so a typo in
the config or the flags fails in a second instead of after spawning (and killing) ranks.
"""

import argparse
import os
import sys

from hf_zero.launcher import multinode, plan, preflight
from hf_zero.launcher.args import LaunchOptions, check_script
from hf_zero.launcher.commands import format_command
from hf_zero.launcher.resources import resolve_hosts
from hf_zero.launcher.zero_config_arg import load_zero_config, pop_zero_config


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def launch(options: LaunchOptions) -> int:
    """Run (or with `dry_run` print) the job; returns the exit code. User errors raise ValueError."""
    config_path, _ = pop_zero_config(options.script_args)
    config = load_zero_config(config_path) if config_path is not None else None
    hosts = resolve_hosts(options, device_count=cuda_device_count)
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
    if options.dry_run:
        for command in node_commands:
            print(format_command(command))
        return 0
    return multinode.run_all(node_commands)


def main(args: argparse.Namespace) -> int:
    """The `launch` subcommand's handler: `hf_zero: <message>` and exit code 2 on user errors."""
    try:
        return launch(LaunchOptions.from_namespace(args))
    except ValueError as error:
        print(f"hf_zero: {error}", file=sys.stderr)
        return 2
