"""Unbounded or odd inputs get one clear error (naming the file or key, the value and what is
allowed) before any work: config files that are not small regular files, numeric settings out of
range, planted files in the NVMe swap directory, a config that disagrees with TrainingArguments,
impossible model shapes for `estimate`, a directory as the script, a zero shard size."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from hf_zero import cli, run
from hf_zero.config import ConfigError, load_config
from hf_zero.config.small_file import MAX_BYTES
from hf_zero.engine.offload import nvme_files

# ---- config files: regular files of at most 1 MiB only ------------------------------------------


def _odd_file(kind: str, tmp_path: Path) -> tuple[str, str]:
    """(path, what the error calls it) for a path that is not a regular file."""
    if kind == "fifo":
        path = tmp_path / "zero.json"
        os.mkfifo(path)  # open() for reading would wait for a writer forever
        return str(path), "a FIFO (named pipe)"
    if kind == "dev_zero":
        return "/dev/zero", "a character device"  # reading it never ends
    return str(tmp_path), "a directory"


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_config_that_is_not_a_regular_file_is_refused(kind, tmp_path):
    path, what = _odd_file(kind, tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"cannot read config file {path}: it is {what}, not a regular file; "
                                 "allowed: a regular file")


def test_config_over_one_mib_is_refused_naming_its_size(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("{}" + " " * (MAX_BYTES - 1))  # valid JSON, one byte over the cap
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"config file {path} is too large: {MAX_BYTES + 1} bytes; "
                                 f"allowed: at most {MAX_BYTES} bytes (1 MiB)")


def test_check_config_on_a_fifo_is_one_line_and_exit_2(tmp_path, capsys):
    path, _ = _odd_file("fifo", tmp_path)
    assert cli.main(["check-config", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hf_zero: cannot read config file {path}: it is a FIFO")


def test_launch_with_a_dev_zero_config_is_one_line_and_exit_2(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("")
    assert cli.main(["launch", "--dry_run", "--skip_doctor", str(script), "--zero_config", "/dev/zero"]) == 2
    assert capsys.readouterr().err == ("hf_zero: cannot read config file /dev/zero: it is a character device, "
                                       "not a regular file; allowed: a regular file\n")


def test_activate_refuses_a_config_over_the_cap(tmp_path):
    from hf_zero.trainer import activate, active_config

    path = tmp_path / "big.json"
    path.write_text('{"zero_optimization": {"stage": 2}}' + " " * MAX_BYTES)
    with pytest.raises(ConfigError, match=f"config file {path} is too large"):
        activate(str(path))
    assert active_config() is None


# ---- numeric settings: each in a sane range -----------------------------------------------------


@pytest.mark.parametrize("value", [1e-9, 0.5, -1])
def test_comm_timeout_below_one_second_is_refused(value):
    with pytest.raises(ConfigError) as caught:
        load_config({"comm_timeout_s": value})
    assert str(caught.value) == (f"comm_timeout_s = {float(value)!r} in <dict>: out of range; "
                                 "allowed: 0 (no watchdog) or a finite number of seconds >= 1")
    assert [load_config({"comm_timeout_s": ok}).comm_timeout_s for ok in (0, 1, 3600)] == [0, 1, 3600]


@pytest.mark.parametrize("key", ["reduce_bucket_size", "allgather_bucket_size", "sub_group_size"])
def test_zero_sized_buckets_are_refused(key):
    with pytest.raises(ConfigError) as caught:
        load_config({"zero_optimization": {"stage": 2, key: 0}})
    assert str(caught.value).startswith(f"zero_optimization.{key} = 0 in <dict>: out of range; "
                                        "allowed: an integer >= 1")


# ---- NVMe swap directory: only our own regular files are removed --------------------------------


def _dead_pid() -> int:
    pid = 4_000_000  # above any pid_max: no such process
    if nvme_files.pid_alive(pid):
        raise AssertionError(f"pid {pid} is alive")
    return pid


def _stale_name() -> str:
    return f"{nvme_files.PREFIX}-{nvme_files.host_name()}-{_dead_pid()}-rank0-0"


def test_stale_cleanup_does_not_follow_a_symlink_with_a_swap_name(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "master.swap").write_bytes(b"precious")
    swap_root = tmp_path / "nvme"
    swap_root.mkdir()
    (swap_root / _stale_name()).symlink_to(victim, target_is_directory=True)
    nvme_files.remove_stale(str(swap_root))
    assert (victim / "master.swap").read_bytes() == b"precious"
    assert (swap_root / _stale_name()).is_symlink()  # not ours to remove either


def test_stale_cleanup_removes_only_our_file_names_and_regular_files(tmp_path):
    stale = tmp_path / _stale_name()
    stale.mkdir()
    (stale / "master.swap").write_bytes(b"x")
    (stale / "state.exp_avg.swap").write_bytes(b"x")
    (stale / "param.3.swap").write_bytes(b"x")
    (stale / "notes.swap").write_bytes(b"not ours")  # *.swap, but not a name we create
    (stale / "state.exp_avg_sq.swap").mkdir()  # our name, but a directory: never recursed into
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (stale / "param.0.swap").symlink_to(victim)  # our name, but a link: left alone
    nvme_files.remove_stale(str(tmp_path))
    assert sorted(p.name for p in stale.iterdir()) == ["notes.swap", "param.0.swap", "state.exp_avg_sq.swap"]
    assert victim.read_bytes() == b"precious"


def test_stale_cleanup_leaves_another_users_directory(tmp_path, monkeypatch):
    stale = tmp_path / _stale_name()
    stale.mkdir()
    (stale / "master.swap").write_bytes(b"x")
    owner = os.lstat(stale).st_uid
    monkeypatch.setattr(nvme_files.os, "getuid", lambda: owner + 1)  # as seen by another user
    nvme_files.remove_stale(str(tmp_path))
    assert (stale / "master.swap").exists()


# ---- config vs TrainingArguments: one line, exit 2 ----------------------------------------------

MISMATCH_SCRIPT = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
args = TrainingArguments(output_dir=OUT, use_cpu=True, report_to="none", per_device_train_batch_size=2)
Trainer(model=LlamaForCausalLM(config), args=args)
raise SystemExit("the Trainer was created")
"""


@pytest.mark.parametrize("rank, printed", [(None, True), ("0", True), ("1", False)])
def test_config_that_disagrees_with_training_args_is_one_line_and_exit_2(rank, printed, tmp_path, capsys,
                                                                         monkeypatch):
    from hf_zero.trainer import deactivate

    script = tmp_path / "train.py"
    script.write_text(f"OUT = {str(tmp_path / 'out')!r}\n" + MISMATCH_SCRIPT)
    config = tmp_path / "zero.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    monkeypatch.setattr(sys, "argv", ["python -m hf_zero.run"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    try:
        with pytest.raises(SystemExit) as caught:
            run.main([str(script), "--zero_config", str(config)])
    finally:
        deactivate()
    assert caught.value.code == 2
    expected = (f"hf_zero: train_micro_batch_size_per_gpu = 4 in {config} but "
                "TrainingArguments.per_device_train_batch_size = 2; make them equal or set the file's value "
                'to "auto"\n')
    assert capsys.readouterr().err == (expected if printed else "")


# ---- hf-zero estimate: impossible shapes ---------------------------------------------------------

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 64}


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": -8}, "hidden_size = -8: must be a positive integer"),
    ({"num_hidden_layers": -1}, "num_hidden_layers = -1: must be a positive integer"),
    ({"vocab_size": 0}, "vocab_size = 0: must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads = 0: must be a positive integer"),
    ({"hidden_size": 30}, "hidden_size = 30 is not divisible by num_attention_heads = 4"),
    ({"num_key_value_heads": 3}, "num_attention_heads = 4 is not divisible by num_key_value_heads = 3"),
])
def test_estimate_refuses_impossible_shapes_in_one_line(change, message, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, **change}))
    assert cli.main(["estimate", str(path), "--world", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf_zero: MODEL_CONFIG {str(path)!r}: {message}") and err.count("\n") == 1


def test_estimate_refuses_a_model_config_that_is_a_fifo(tmp_path, capsys):
    path, _ = _odd_file("fifo", tmp_path)
    assert cli.main(["estimate", path]) == 2
    assert capsys.readouterr().err.startswith(f"hf_zero: cannot read MODEL_CONFIG {path}: it is a FIFO")


# ---- a directory as the script; a zero shard size ------------------------------------------------


def test_launch_names_a_directory_given_as_the_script(tmp_path, capsys):
    assert cli.main(["launch", "--dry_run", "--skip_doctor", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"hf_zero: script {str(tmp_path)!r} is a directory, not a file; "
                                       "give the training script in it (or --module NAME)\n")


def test_run_names_a_directory_given_as_the_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        run.main([str(tmp_path)])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (f"hf_zero: script {str(tmp_path)!r} is a directory, not a file; "
                                       "give the training script in it (or --module NAME)\n")


@pytest.mark.parametrize("size", ["0", "0B", "0.4", "-1", "-5GB"])
def test_consolidate_refuses_a_shard_size_below_one_byte(size, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["consolidate", str(tmp_path / "ckpt"), str(out), f"--max_shard_size={size}"]) == 2
    assert capsys.readouterr().err == (f"hf_zero: --max_shard_size {size!r}: allowed: a size of at least 1 byte, "
                                       "such as 5GB, 500MB, 2GiB or a number of bytes\n")
    assert not out.exists()



def test_launch_with_a_fifo_hostfile_is_one_line_and_exit_2(tmp_path, capsys):
    path, _ = _odd_file("fifo", tmp_path)
    script = tmp_path / "train.py"
    script.write_text("")
    assert cli.main(["launch", "--dry_run", "--skip_doctor", "--hostfile", path, str(script)]) == 2
    assert capsys.readouterr().err == (f"hf_zero: cannot read hostfile {path}: it is a FIFO (named pipe), "
                                       "not a regular file; allowed: a regular file\n")
