"""`hf-zero launch` runs the cheap checks before any rank starts and refuses (exit 2) on a FAIL;
`--skip_doctor` turns them off. Only failures are printed."""

import importlib.metadata

import pytest

from hf_zero import cli
from hf_zero.doctor import versions
from hf_zero.launcher import multinode
from hf_zero.launcher.launch import HF_ZERO_OFF

OFF = HF_ZERO_OFF + "\n"


@pytest.fixture
def script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('train')\n")
    return "train.py"


@pytest.fixture
def started(monkeypatch):
    """Stub run_all: the list of command lists that would have been started."""
    calls = []

    def run_all(commands):
        calls.append(commands)
        return 0

    monkeypatch.setattr(multinode, "run_all", run_all)
    return calls


def launch(capsys, *argv):
    code = cli.main(["launch", *argv])
    out, err = capsys.readouterr()
    return code, out, err


BATCH_16 = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto"}


def test_dry_run_refuses_a_batch_size_that_does_not_divide(capsys, script, write_config):
    path = write_config(BATCH_16)
    code, out, err = launch(capsys, "--dry_run", "--num_gpus", "3", script, "--zero_config", path)
    assert (code, out) == (2, "")
    assert err == (
        "hf_zero: preflight check failed before any rank started (skip these checks with --skip_doctor):\n"
        f"  world size: train_batch_size = 16 in {path} is not divisible by train_micro_batch_size_per_gpu (2) * "
        'world_size (3) = 6; set it to "auto" or a multiple of 6\n'
        '    fix: set train_batch_size to "auto", or to train_micro_batch_size_per_gpu * '
        "gradient_accumulation_steps * 3, or change the number of ranks\n"
    )
    code, out, err = launch(capsys, "--dry_run", "--num_gpus", "4", script, "--zero_config", path)
    assert (code, err) == (0, "") and "--nproc_per_node 4" in out


def test_world_size_counts_every_node(capsys, script, write_config, tmp_path):
    (tmp_path / "hosts").write_text("a slots=3\nb slots=3\n")
    path = write_config(BATCH_16)
    code, _, err = launch(capsys, "--dry_run", "--hostfile", "hosts", script, "--zero_config", path)
    assert code == 2 and "world_size (6) = 12" in err  # 2 nodes x 3: W = 6


def test_skip_doctor(capsys, script, write_config):
    path = write_config(BATCH_16)
    code, out, err = launch(capsys, "--dry_run", "--skip_doctor", "--num_gpus", "3", script, "--zero_config", path)
    assert (code, err) == (0, "")
    assert "--nproc_per_node 3" in out


def test_refuses_an_old_torch(capsys, script, monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(versions.metadata, "version", lambda name: "2.10.0" if name == "torch" else real(name))
    code, out, err = launch(capsys, "--dry_run", "--num_gpus", "1", script)
    assert (code, out) == (2, "")
    assert "  version torch: torch 2.10.0 is installed; hf-zero needs torch>=2.11\n" in err
    assert launch(capsys, "--dry_run", "--skip_doctor", "--num_gpus", "1", script)[0] == 0


def test_a_config_error_is_reported_once(capsys, script, write_config):
    path = write_config({"zero_optimization": {"stgae": 2}})
    code, out, err = launch(capsys, "--dry_run", script, "--zero_config", path)
    assert (code, out) == (2, "")
    assert err == f"hf_zero: unknown key 'zero_optimization.stgae' in {path}; did you mean 'stage'?\n"


def test_busy_port_refuses_before_starting(capsys, script, busy_port, started):
    code, out, err = launch(capsys, "--num_gpus", "1", "--master_port", str(busy_port), script)
    assert code == 2 and started == []
    assert f"  master port: 127.0.0.1:{busy_port} is already in use on this machine\n" in err
    code, _, err = launch(capsys, "--skip_doctor", "--num_gpus", "1", "--master_port", str(busy_port), script)
    assert (code, err) == (0, OFF) and len(started) == 1


def test_more_ranks_than_gpus(capsys, script, machine, free_port, started):
    machine.update(cuda=True, devices=2)
    code, _, err = launch(capsys, "--num_gpus", "4", "--master_port", str(free_port), script)
    assert code == 2 and started == []
    assert "  gpus: 4 ranks per node but only 2 CUDA device(s) visible" in err
    # a CPU run (TrainingArguments --use_cpu) may start more ranks than GPUs
    code, _, err = launch(capsys, "--num_gpus", "4", "--master_port", str(free_port), script, "--use_cpu")
    assert (code, err) == (0, OFF) and len(started) == 1
    # a dry run prints commands that may run elsewhere: no machine checks
    assert launch(capsys, "--dry_run", "--num_gpus", "4", script)[0] == 0


def test_warnings_print_nothing(capsys, script, free_port, started):
    """No CUDA here: the gpus check WARNs (gloo), which the launcher does not print (only that
    hf_zero is off, without a zero config)."""
    code, out, err = launch(capsys, "--num_gpus", "2", "--master_port", str(free_port), script)
    assert (code, out, err) == (0, "", OFF)
    assert len(started) == 1


def test_torchrun_node_with_an_unresolvable_master(capsys, script, tmp_path, free_port, started):
    (tmp_path / "hosts").write_text("no-such-host.invalid slots=1\nhere slots=1\n")
    code, _, err = launch(capsys, "--launcher", "torchrun", "--hostfile", "hosts", "--node_rank", "1",
                          "--master_port", str(free_port), script)
    assert code == 2 and started == []
    assert "  master address: --master_addr 'no-such-host.invalid' does not resolve" in err


def test_slurm_launch_with_a_stale_rank(capsys, script, monkeypatch, started):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    code, _, err = launch(capsys, "--launcher", "slurm", "--num_gpus", "2", script)
    assert code == 2 and started == []
    assert "  launcher env: RANK=0 WORLD_SIZE=1 is set here and would reach every srun task" in err
