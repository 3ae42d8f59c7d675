"""`hf-zero launch` flags: cutting SCRIPT ARGS off verbatim, and LaunchOptions validation."""

import pytest

from hf_zero.cli import build_parser
from hf_zero.launcher.args import LaunchOptions, split_launch_argv


@pytest.mark.parametrize(
    "argv, head, tail",
    [
        (["t.py"], ["t.py"], []),
        (["--num_gpus", "2", "t.py", "--num_gpus", "3"], ["--num_gpus", "2", "t.py"], ["--num_gpus", "3"]),
        (["--num_gpus=2", "--dry_run", "t.py", "--", "-h"], ["--num_gpus=2", "--dry_run", "t.py"], ["--", "-h"]),
        (["--module", "pkg.train", "--module"], ["--module", "pkg.train"], ["--module"]),
        (["--hostfile", "hf", "--", "t.py", "--x"], ["--hostfile", "hf", "t.py"], ["--x"]),
        (["--master-port", "1", "t.py"], ["--master-port", "1", "t.py"], []),
        (["--dry_run"], ["--dry_run"], []),
    ],
)
def test_split_launch_argv(argv, head, tail):
    assert split_launch_argv(argv) == (head, tail)


def parse(argv):
    head, tail = split_launch_argv(argv)
    args = build_parser().parse_args(["launch", *head])
    args.script_args = tail
    return LaunchOptions.from_namespace(args)


def test_deepspeed_and_torchrun_spellings():
    options = parse(
        ["--num_gpus", "4", "--num_nodes", "2", "--node_rank", "1", "--master_addr", "n0",
         "--master_port", "1234", "--launcher", "torchrun", "--module", "--dry_run",
         "pkg.train", "--lr", "1e-4", "--", "x"]
    )  # fmt: skip
    assert options == LaunchOptions(
        script="pkg.train", script_args=("--lr", "1e-4", "--", "x"), nproc_per_node=4,
        num_nodes=2, node_rank=1, master_addr="n0", master_port=1234, launcher="torchrun",
        module=True, dry_run=True,
    )  # fmt: skip
    assert parse(["--nproc_per_node", "2", "--nnodes", "1", "t.py"]) == parse(
        ["--nproc-per-node", "2", "--num-nodes", "1", "t.py"]
    )


def test_defaults():
    assert parse(["t.py"]) == LaunchOptions(script="t.py")
    assert LaunchOptions(script="t.py").master_port is None  # slurm derives one from the job
    assert LaunchOptions(script="t.py").torchrun_port == 29500
    assert LaunchOptions(script="t.py", master_port=1234).torchrun_port == 1234


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nproc_per_node": 0}, "--num_gpus must be a positive integer, got 0"),
        ({"num_nodes": -1}, "--num_nodes must be a positive integer, got -1"),
        ({"node_rank": -1}, "--node_rank must be 0 or more, got -1"),
        ({"master_port": 70000}, "--master_port must be in 1..65535, got 70000"),
        ({"launcher": "pdsh"}, "--launcher 'pdsh' is not one of torchrun, ssh, slurm"),
        ({"include": "a", "exclude": "b"}, "--include 'a' and --exclude 'b' cannot be used together; keep one"),
        (
            {"include": "a:0", "nproc_per_node": 1},
            "--num_gpus/--num_nodes cannot be combined with --include: --include already picks "
            "the hosts and devices; drop one of them",
        ),
        (
            {"exclude": "a", "num_nodes": 1},
            "--num_gpus/--num_nodes cannot be combined with --exclude: --exclude already picks "
            "the hosts and devices; drop one of them",
        ),
    ],
)
def test_option_errors(kwargs, message):
    with pytest.raises(ValueError) as caught:
        LaunchOptions(script="t.py", **kwargs)
    assert str(caught.value) == message


def test_argparse_errors(capsys):
    with pytest.raises(SystemExit) as caught:
        parse(["--launcher", "mpi", "t.py"])
    assert caught.value.code == 2
    assert "argument --launcher: invalid choice: 'mpi'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--num_gpus", "two", "t.py"])
    assert "argument --num_gpus/--nproc_per_node/--num-gpus/--nproc-per-node: invalid int value: 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--dry_run"])
    assert "the following arguments are required: SCRIPT" in capsys.readouterr().err
