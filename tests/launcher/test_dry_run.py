"""`hf-zero launch --dry_run`: the exact per-node commands, and planning errors."""

import shlex
import sys

import pytest

from hf_zero.cli import main
from hf_zero.launcher import plan
from hf_zero.launcher.args import LaunchOptions
from hf_zero.launcher.commands import format_command
from hf_zero.launcher.launch import HF_ZERO_OFF
from hf_zero.launcher.resources import resolve_hosts

PY = shlex.quote(sys.executable)


def dry_run(capsys, *argv):
    code = main(["launch", "--dry_run", *argv])
    out, err = capsys.readouterr()
    said = "" if any(a.startswith("--zero_config") for a in argv) else HF_ZERO_OFF + "\n"
    assert (code, err) == (0, said), err
    return out.splitlines()


@pytest.fixture
def script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('train')\n")
    return "train.py"


@pytest.fixture
def two_hosts(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    return str(path)


def test_single_node(capsys, script, fake_config):
    lines = dry_run(capsys, "--num_gpus", "2", script, "--flag", "x", "--zero_config", "z 3.json")
    assert fake_config == [("z 3.json", {})]
    assert lines == [
        f"{PY} -m torch.distributed.run --nproc_per_node 2 --nnodes 1 --node_rank 0 "
        "--master_addr 127.0.0.1 --master_port 29500 -m hf_zero.run train.py --flag x "
        "--zero_config 'z 3.json'"
    ]


def test_single_node_defaults_to_local_devices(capsys, script, monkeypatch):
    monkeypatch.setattr("hf_zero.launcher.launch.cuda_device_count", lambda: 0)
    assert "--nproc_per_node 1 " in dry_run(capsys, script)[0]
    monkeypatch.setattr("hf_zero.launcher.launch.cuda_device_count", lambda: 8)
    assert "--nproc_per_node 8 " in dry_run(capsys, script)[0]


def test_include_pins_devices(capsys, script, monkeypatch):
    monkeypatch.setattr("hf_zero.launcher.launch.cuda_device_count", lambda: 4)
    lines = dry_run(capsys, "--include", "localhost:1,3", "--master_port", "1234", "--module", "pkg.train", "-x")
    assert lines == [
        f"CUDA_VISIBLE_DEVICES=1,3 {PY} -m torch.distributed.run --nproc_per_node 2 --nnodes 1 "
        "--node_rank 0 --master_addr 127.0.0.1 --master_port 1234 -m hf_zero.run --module pkg.train -x"
    ]


def test_one_node_of_a_manual_multi_node_job(capsys, script):
    lines = dry_run(capsys, "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
                    "--nproc_per_node", "8", script)  # fmt: skip
    assert lines == [
        f"{PY} -m torch.distributed.run --nproc_per_node 8 --nnodes 2 --node_rank 1 "
        "--master_addr 10.0.0.1 --master_port 29500 -m hf_zero.run train.py"
    ]


def test_hostfile_ssh_exact(two_hosts):
    """Two hosts over ssh, with a fixed export list (plan level, so the line is exact)."""
    options = LaunchOptions(script="train.py", script_args=("--lr", "1e-4"), hostfile=two_hosts,
                            include="worker-0@worker-1:1")  # fmt: skip
    hosts = resolve_hosts(options, device_count=lambda: 0)
    launcher = plan.choose_launcher(options, hosts)
    commands = plan.build_commands(options, hosts, launcher, python="/venv/bin/python",
                                   cwd="/home/me/my job", exports={"PYTHONPATH": "/home/me/my job"})  # fmt: skip
    remote = (
        "cd '/home/me/my job' && export PYTHONPATH='/home/me/my job' CUDA_VISIBLE_DEVICES={ids} && "
        "/venv/bin/python -m torch.distributed.run --nproc_per_node {n} --nnodes 2 --node_rank {rank} "
        "--master_addr worker-0 --master_port 29500 -m hf_zero.run train.py --lr 1e-4"
    )
    assert launcher == "ssh"
    assert [format_command(c) for c in commands] == [
        "ssh -tt worker-0 " + shlex.quote(remote.format(ids="0,1", n=2, rank=0)),
        "ssh -tt worker-1 " + shlex.quote(remote.format(ids="1", n=1, rank=1)),
    ]


def test_hostfile_ssh_through_cli(capsys, script, two_hosts, tmp_path, monkeypatch, restore_environ):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".hf_zero_env").write_text("FROM_HOME=1\nSHARED=home\n")
    (tmp_path / ".hf_zero_env").write_text("# job settings\nSHARED=job dir\nNCCL_DEBUG=WARN\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    lines = dry_run(capsys, "--hostfile", two_hosts, "--master_port", "29600", script, "--flag", "x")
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        ssh, tt, host, remote = shlex.split(line)
        assert (ssh, tt, host) == ("ssh", "-tt", f"worker-{rank}")
        cd, export, torchrun = remote.split(" && ")
        assert cd == f"cd {shlex.quote(str(tmp_path))}"
        exported = dict(word.split("=", 1) for word in shlex.split(export)[1:])
        assert exported["PYTHONPATH"] == str(tmp_path)
        assert exported["HF_HOME"] == "/data/hf"
        assert exported["NCCL_DEBUG"] == "WARN"  # ./.hf_zero_env wins over the shell
        assert exported["SHARED"] == "job dir"  # ./.hf_zero_env wins over ~/.hf_zero_env
        assert exported["FROM_HOME"] == "1"
        assert "UNRELATED_SECRET" not in exported
        assert "CUDA_VISIBLE_DEVICES" not in exported or "CUDA_VISIBLE_DEVICES" in restore_environ
        assert torchrun == (
            f"{PY} -m torch.distributed.run --nproc_per_node 2 --nnodes 2 --node_rank {rank} "
            "--master_addr worker-0 --master_port 29600 -m hf_zero.run train.py --flag x"
        )


def test_slurm(capsys, script):
    """No MASTER_PORT: each task derives its job's own (slurm.job_master_port)."""
    lines = dry_run(capsys, "--launcher", "slurm", "--num_nodes", "4", "--num_gpus", "8", script, "--bf16")
    assert lines == [
        f"srun --nodes 4 --ntasks-per-node 8 --kill-on-bad-exit=1 {PY} -m hf_zero.run train.py --bf16"
    ]
    lines = dry_run(capsys, "--launcher", "slurm", "--master_port", "29600", script)
    assert lines == [f"MASTER_PORT=29600 srun --nodes 1 --ntasks-per-node 1 --kill-on-bad-exit=1 {PY} "
                     "-m hf_zero.run train.py"]


def test_slurm_with_hostfile(capsys, script, two_hosts):
    lines = dry_run(capsys, "--launcher", "slurm", "--hostfile", two_hosts, "--master_addr", "worker-0", script)
    assert lines == [
        f"MASTER_ADDR=worker-0 srun --nodes 2 --ntasks-per-node 2 --nodelist "
        f"worker-0,worker-1 --kill-on-bad-exit=1 {PY} -m hf_zero.run train.py"
    ]


def test_torchrun_launcher_runs_one_hostfile_node(capsys, script, two_hosts):
    lines = dry_run(capsys, "--launcher", "torchrun", "--hostfile", two_hosts, "--node_rank", "1", script)
    assert lines == [
        f"{PY} -m torch.distributed.run --nproc_per_node 2 --nnodes 2 --node_rank 1 "
        "--master_addr worker-0 --master_port 29500 -m hf_zero.run train.py"
    ]


def test_one_host_hostfile_runs_here(capsys, script, tmp_path):
    (tmp_path / "one").write_text("gpu-box slots=4\n")
    assert dry_run(capsys, "--hostfile", "one", script) == [
        f"{PY} -m torch.distributed.run --nproc_per_node 4 --nnodes 1 --node_rank 0 "
        "--master_addr 127.0.0.1 --master_port 29500 -m hf_zero.run train.py"
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_nodes", "3", "--hostfile", "{hostfile}"],
         "--num_nodes 3 does not fit hostfile '{hostfile}', which lists 2 host(s): worker-0, worker-1"),
        (["--nproc_per_node", "0"], "--num_gpus must be a positive integer, got 0"),
        (["--nproc_per_node", "3", "--hostfile", "{hostfile}"],
         "--num_gpus 3 does not fit hostfile '{hostfile}': host 'worker-0' has slots=2"),
        (["--num_nodes", "2", "--master_addr", "n0"],
         "the torchrun launcher runs one node of a 2-node job here: give --node_rank (0..1) on "
         "each node, or use --launcher ssh / slurm to start every node"),
        (["--num_nodes", "2", "--node_rank", "1"],
         "--num_nodes 2 without --hostfile needs --master_addr (the address of node rank 0, the "
         "same on every node)"),
        (["--num_nodes", "2", "--node_rank", "2", "--master_addr", "n0"],
         "--node_rank 2 is out of range for 2 node(s) (0..1)"),
        (["--hostfile", "{hostfile}", "--node_rank", "1"],
         "--node_rank 1 is for the torchrun launcher; the ssh launcher numbers the nodes itself: drop --node_rank"),
        (["--launcher", "ssh"], "--launcher ssh needs --hostfile (the hosts to start nodes on)"),
        (["--launcher", "slurm", "--hostfile", "{hostfile}", "--include", "worker-0:1@worker-1"],
         "the slurm launcher cannot pin device ids (host 'worker-0' would use 1): srun gives each "
         "task its node's GPUs; select whole hosts in --include/--exclude, or use --num_gpus"),
        (["--launcher", "slurm", "--hostfile", "{uneven}"],
         "the slurm launcher starts the same number of tasks on every node, but the hosts have "
         "different device counts (a=2, b=4); use --num_gpus"),
        (["--hostfile", "{hostfile}", "--include", "worker-3"],
         "--include 'worker-3' names unknown host 'worker-3'; known hosts: worker-0, worker-1"),
        (["--hostfile", "{missing}"], "hostfile '{missing}' not found"),
    ],
)
def test_errors(capsys, script, two_hosts, tmp_path, argv, message):
    (tmp_path / "uneven").write_text("a slots=2\nb slots=4\n")
    names = {"hostfile": two_hosts, "uneven": "uneven", "missing": str(tmp_path / "missing")}
    argv = [a.format(**names) for a in argv]
    assert main(["launch", "--dry_run", *argv, script]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"hf_zero: {message.format(**names)}\n")


def test_missing_script(capsys, script):
    assert main(["launch", "--dry_run", "--num_gpus", "1", "tran.py"]) == 2
    assert capsys.readouterr().err.startswith("hf_zero: script 'tran.py' not found (from ")
