"""`hf-zero doctor`: the table, exit code 1 on any FAIL (0 otherwise), 2 for bad flags."""

import subprocess
import sys

import pytest

from hf_zero import cli
from hf_zero.doctor import nvme

from .conftest import GiB


def doctor(capsys, *argv):
    code = cli.main(["doctor", *argv])
    out, err = capsys.readouterr()
    rows = {}
    for line in out.splitlines()[2:-1]:
        if not line.startswith(" "):
            name, status = line.split("  ")[0].strip(), line[line.index("  "):].split()[0]
            rows[name] = status
    return code, out, err, rows


def test_all_good(capsys, write_config, tiny_model, free_port):
    path = write_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "train_batch_size": 8,
                         "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2})
    code, out, err, rows = doctor(capsys, "--zero_config", path, "--model", tiny_model, "--nproc", "2",
                                  "--master_port", str(free_port), "--seq_len", "16")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert rows == {
        "config": "PASS", "world size": "PASS", "optimizer": "PASS", "scheduler": "PASS",
        "version torch": "PASS", "version transformers": "PASS",
        "version accelerate": "PASS", "gpus": "WARN", "master address": "PASS", "master port": "PASS",
        "launcher env": "SKIP", "model": "PASS", "gpu memory": "SKIP", "host memory": "PASS",
        "pinned memory": "SKIP", "nvme": "SKIP",
    }
    assert lines[-1] == "11 passed, 1 warning, 0 failed, 4 skipped"
    assert "fix: if you expected GPUs" in out  # a WARN shows its fix too


def test_nothing_given_still_runs(capsys, free_port):
    code, out, _, rows = doctor(capsys, "--master_port", str(free_port))
    assert code == 0
    assert rows["config"] == "SKIP" and rows["model"] == "SKIP" and rows["master port"] == "PASS"


def test_bad_config_exits_1_with_the_message_and_fix(capsys, write_config, free_port):
    path = write_config({"zero_optimization": {"stgae": 2}})
    code, out, _, rows = doctor(capsys, "--zero_config", path, "--master_port", str(free_port))
    assert code == 1
    assert rows["config"] == "FAIL" and rows["world size"] == "SKIP"
    assert f"unknown key 'zero_optimization.stgae' in {path}; did you mean 'stage'?" in out
    assert "fix: fix the key/value the message names" in out
    assert out.splitlines()[-1] == "5 passed, 1 warning, 1 failed, 9 skipped"


def test_world_size_from_nproc_and_nnodes(capsys, write_config, free_port):
    path = write_config({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3})
    code, out, _, rows = doctor(capsys, "--zero_config", path, "--nproc", "2", "--master_port", str(free_port))
    assert (code, rows["world size"]) == (0, "PASS")
    code, out, _, rows = doctor(capsys, "--zero_config", path, "--nproc", "2", "--nnodes", "2",
                                "--master_addr", "127.0.0.1", "--master_port", str(free_port))
    assert (code, rows["world size"]) == (1, "FAIL")
    assert "world_size (4) = 24" in out


def test_model_that_does_not_fit_host_memory(capsys, machine, tiny_model, free_port):
    machine["available"] = 2 * 2**20  # 2 MiB MemAvailable; 2 CPU ranks of ~1.5 MiB each
    code, out, _, rows = doctor(capsys, "--model", tiny_model, "--nproc", "2", "--master_port", str(free_port))
    assert code == 1
    assert rows["host memory"] == "FAIL"
    assert "MemAvailable 2.00 MiB" in out
    assert "fix: to fit 921.60 KiB per rank, try: " in out and "ranks in total at stage 3" in out
    machine["available"] = 2**10  # nothing fits 1 KiB
    code, out, _, rows = doctor(capsys, "--model", tiny_model, "--nproc", "2", "--master_port", str(free_port))
    assert code == 1 and "fix: nothing tried fits 460 B per rank" in out


def test_model_that_does_not_fit_gpu_memory(capsys, machine, write_config, tiny_model, free_port):
    machine.update(cuda=True, devices=2, free=[80 * GiB, 2**10])
    path = write_config({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}})
    code, out, _, rows = doctor(capsys, "--zero_config", path, "--model", tiny_model, "--nproc", "2",
                                "--master_port", str(free_port))
    assert code == 1
    assert rows["gpus"] == "PASS" and rows["gpu memory"] == "FAIL" and rows["host memory"] == "PASS"
    assert "GPU 1 has 1.00 KiB free" in out


def test_ratio_auto_starts_with_what_the_host_holds(capsys, machine, write_config, tiny_model, free_port):
    # a host too small for everything offloaded: ratio "auto" starts partly on the GPU (as the engine
    # does since host_room.auto_start), not a host memory FAIL sized with everything offloaded
    machine.update(cuda=True, devices=2, free=[80 * GiB] * 2, available=2 * 2**20, total=2 * 2**20)
    auto = {"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 2, "reduce_bucket_size": 5000, "offload_optimizer": {"device": "cpu", "ratio": "auto"}}}
    argv = ("--model", tiny_model, "--nproc", "2", "--master_port", str(free_port))
    code, out, _, rows = doctor(capsys, "--zero_config", write_config(auto), *argv)
    assert rows["host memory"] == "PASS" and rows["gpu memory"] == "PASS", out
    assert 'offload_optimizer.ratio "auto": the first step starts at ratio 0.' in out
    assert "available after the ranks' model copies)" in out
    auto["zero_optimization"]["offload_optimizer"]["ratio"] = 1.0  # everything offloaded does not fit
    code, out, _, rows = doctor(capsys, "--zero_config", write_config(auto), *argv)
    assert (code, rows["host memory"]) == (1, "FAIL")


def test_more_ranks_than_gpus(capsys, machine, free_port):
    machine.update(cuda=True, devices=2, free=[80 * GiB] * 2)
    code, out, _, rows = doctor(capsys, "--nproc", "4", "--master_port", str(free_port))
    assert (code, rows["gpus"]) == (1, "FAIL")


def test_nvme_config(capsys, write_config, tmp_path, monkeypatch, free_port):
    monkeypatch.setattr(nvme, "measure_throughput", lambda path, size: (2.5, 3.1))
    path = write_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(tmp_path)}}})  # bf16: an "auto" dtype WARNs (not with fp16)
    code, out, _, rows = doctor(capsys, "--zero_config", path, "--master_port", str(free_port))
    assert rows[f"nvme {tmp_path}"] == "PASS"
    assert "write 2.50 GB/s, read 3.10 GB/s" in out
    assert rows["config"] == "PASS"  # optimizer offload to NVMe is built


def test_busy_port(capsys, busy_port):
    code, out, _, rows = doctor(capsys, "--master_port", str(busy_port))
    assert (code, rows["master port"]) == (1, "FAIL")
    assert f"127.0.0.1:{busy_port} is already in use on this machine" in out


def test_inconsistent_launcher_variables(capsys, monkeypatch, free_port):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _, rows = doctor(capsys, "--master_port", str(free_port))
    assert (code, rows["launcher env"]) == (1, "FAIL")


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0"], "--nproc must be a positive integer, got 0"),
    (["--nnodes", "-1"], "--nnodes must be a positive integer, got -1"),
    (["--master_port", "70000"], "--master_port must be in 1..65535, got 70000"),
])
def test_bad_flags_exit_2(capsys, argv, message):
    code, out, err, _ = doctor(capsys, *argv)
    assert (code, out, err) == (2, "", f"hf_zero: {message}\n")


def test_console_entry_point(tmp_path):
    """Through `python -m hf_zero` in a fresh process: a failing config gives exit code 1."""
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = subprocess.run([sys.executable, "-m", "hf_zero", "doctor", "--zero_config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"invalid JSON in {bad} at line 1" in result.stdout
