"""Flags of `hf-zero launch`, compatible with the DeepSpeed launcher's.

    hf-zero launch [LAUNCHER FLAGS] SCRIPT [SCRIPT ARGS...]

Everything after SCRIPT belongs to the script and is passed on verbatim, `--` included.
argparse's `REMAINDER` would drop a `--`, so `split_launch_argv` cuts the command line at
SCRIPT first and argparse only ever sees the launcher's own flags.
Every flag is also accepted with hyphens (`--num-gpus`), like torchrun's.
"""

import argparse
import dataclasses
import os
from collections.abc import Sequence

LAUNCHERS = ("torchrun", "ssh", "slurm")
DEFAULT_MASTER_PORT = 29500

# (spellings, dest, metavar, help) of the flags that take a value.
_VALUE_FLAGS = (
    (("--num_gpus", "--nproc_per_node"), "nproc_per_node", "N",
     "processes per node; default: every hostfile slot, else the number of visible CUDA "
     "devices (1 without CUDA)"),
    (("--num_nodes", "--nnodes"), "num_nodes", "M",
     "nodes; default: every hostfile host, else 1. With a hostfile: its first M hosts"),
    (("--node_rank",), "node_rank", "I",
     "this node's index, for the torchrun launcher running one node of a multi-node job"),
    (("--hostfile",), "hostfile", "FILE",
     "lines 'HOSTNAME slots=N'; several hosts start one node per host over ssh"),
    (("--include",), "include", "SPEC",
     "only these hosts/devices, e.g. 'worker-0:0,1@worker-1' (not with --exclude)"),
    (("--exclude",), "exclude", "SPEC",
     "every host/device but these, e.g. 'worker-1:3' (not with --include)"),
    (("--master_addr",), "master_addr", "ADDR",
     "rank 0's address; default: 127.0.0.1 on one node, the first hostfile host on several"),
    (("--master_port",), "master_port", "PORT",
     f"rank 0's port; default {DEFAULT_MASTER_PORT}, under --launcher slurm one derived from SLURM_JOB_ID"),
    (("--launcher",), "launcher", "{" + ",".join(LAUNCHERS) + "}",
     "torchrun: this node; ssh: every hostfile host; slurm: one srun command. "
     "Default: ssh for a hostfile of several hosts, else torchrun"),
)
# (spellings, dest, help) of the on/off flags.
_SWITCHES = (
    (("--module",), "module", "SCRIPT is a module name, run like 'python -m SCRIPT'"),
    (("--dry_run",), "dry_run", "print the command each node would run, one per line, and exit"),
    (("--skip_doctor",), "skip_doctor", "do not run the preflight checks of `hf-zero doctor` before starting"),
)
_INT_DESTS = {"nproc_per_node", "num_nodes", "node_rank", "master_port"}


def _with_hyphens(spellings: Sequence[str]) -> list[str]:
    hyphenated = ["--" + s[2:].replace("_", "-") for s in spellings]
    return list(spellings) + [s for s in hyphenated if s not in spellings]


_TAKES_VALUE = {s for spellings, *_ in _VALUE_FLAGS for s in _with_hyphens(spellings)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """What `hf-zero launch` was asked to do; validated on construction."""

    script: str
    """Training script path, or a module name when `module` is set."""
    script_args: tuple[str, ...] = ()
    """The script's arguments, verbatim; may hold `--zero_config FILE` (hf_zero.run strips it)."""
    nproc_per_node: int | None = None
    """Processes per node. None: every slot of each hostfile host, or every local CUDA
    device (1 without CUDA), which is what a user with no flags expects."""
    num_nodes: int | None = None
    """Nodes. None: every hostfile host, or 1 without a hostfile (one machine is the common case)."""
    node_rank: int | None = None
    """This node's index when the torchrun launcher runs one node of a multi-node job. None
    on one node (where it is 0); required on several so two nodes never both claim rank 0."""
    hostfile: str | None = None
    """Path of a DeepSpeed-style hostfile; None: this machine alone (`localhost`)."""
    include: str = ""
    """`HOST[:ID,...]@...`: use only these hosts/device ids. Empty: no filter."""
    exclude: str = ""
    """`HOST[:ID,...]@...`: use every host/device id except these. Empty: no filter."""
    master_addr: str | None = None
    """Rank 0's address. None: 127.0.0.1 on one node, the first hostfile host on several."""
    master_port: int | None = None
    """Rank 0's port. None: 29500 (torchrun's and DeepSpeed's default) for torchrun and ssh; under
    slurm each task derives one from SLURM_JOB_ID (``slurm.job_master_port``), so two jobs on one
    node do not collide."""
    launcher: str | None = None
    """torchrun, ssh or slurm. None: ssh for a hostfile of several hosts, else torchrun."""
    module: bool = False
    """Run `script` as a module (`python -m script`) instead of a file."""
    dry_run: bool = False
    """Print the per-node commands instead of running them."""
    skip_doctor: bool = False
    """Skip the preflight checks (`hf_zero.launcher.preflight`) run before any rank starts."""

    def __post_init__(self) -> None:
        for name, flag in (("nproc_per_node", "--num_gpus"), ("num_nodes", "--num_nodes")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value}")
        if self.node_rank is not None and self.node_rank < 0:
            raise ValueError(f"--node_rank must be 0 or more, got {self.node_rank}")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ValueError(f"--master_port must be in 1..65535, got {self.master_port}")
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.include and self.exclude:
            raise ValueError(
                f"--include {self.include!r} and --exclude {self.exclude!r} cannot be used "
                "together; keep one"
            )
        if (self.include or self.exclude) and (
            self.nproc_per_node is not None or self.num_nodes is not None
        ):
            filter_flag = "--include" if self.include else "--exclude"
            raise ValueError(
                f"--num_gpus/--num_nodes cannot be combined with {filter_flag}: "
                f"{filter_flag} already picks the hosts and devices; drop one of them"
            )
        if not self.script:
            raise ValueError("SCRIPT is empty; give the training script (or module) to run")

    @property
    def torchrun_port(self) -> int:
        """The port torchrun's rendezvous gets: --master_port, else 29500."""
        return DEFAULT_MASTER_PORT if self.master_port is None else self.master_port

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> "LaunchOptions":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(namespace).items() if k in fields and v is not None}
        values["script_args"] = tuple(values.get("script_args", ()))
        return cls(**values)


def check_script(path: str) -> None:
    """ValueError unless ``path`` is an existing file: a directory is named as one, not "not found"."""
    if os.path.isdir(path):
        raise ValueError(f"script {path!r} is a directory, not a file; give the training script in it "
                         "(or --module NAME)")
    if not os.path.isfile(path):
        raise ValueError(f"script {path!r} not found (from {os.getcwd()})")


def add_launch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `launch` subcommand (its flags plus SCRIPT, shown in help) to `subparsers`."""
    parser = subparsers.add_parser(
        "launch",
        help="start a training script on one or more nodes",
        description="Start SCRIPT on every rank through torchrun, ssh or srun; "
        "SCRIPT ARGS are passed on verbatim.",
        allow_abbrev=False,
    )
    for spellings, dest, metavar, help_text in _VALUE_FLAGS:
        parser.add_argument(
            *_with_hyphens(spellings),
            dest=dest,
            metavar=metavar,
            type=int if dest in _INT_DESTS else str,
            choices=LAUNCHERS if dest == "launcher" else None,
            help=help_text,
        )
    for spellings, dest, help_text in _SWITCHES:
        parser.add_argument(*_with_hyphens(spellings), dest=dest, action="store_true", help=help_text)
    parser.add_argument("script", metavar="SCRIPT", help="training script (or module with --module)")
    parser.add_argument("script_args", metavar="SCRIPT ARGS", nargs="*",
                        help="passed to SCRIPT verbatim; may include --zero_config FILE")
    return parser


def split_launch_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Cut `launch`'s arguments into (launcher flags + SCRIPT, SCRIPT ARGS).

    >>> split_launch_argv(["--num_gpus", "2", "train.py", "--", "--num_gpus", "3"])
    (['--num_gpus', '2', 'train.py'], ['--', '--num_gpus', '3'])

    Without SCRIPT, everything is launcher flags (argparse then reports the missing SCRIPT).
    A `--` before SCRIPT ends the launcher flags and is dropped.
    """
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            return list(argv[:index]) + list(argv[index + 1 : index + 2]), list(argv[index + 2 :])
        if not arg.startswith("-") or arg == "-":
            return list(argv[: index + 1]), list(argv[index + 1 :])
        index += 2 if arg in _TAKES_VALUE else 1
    return list(argv), []
