"""An unmodified Trainer script through ``hf-zero launch`` at W = 2 gives the losses and grad
norms of plain ``torchrun`` (stage 0 is the Trainer's own DDP; stages 1 and 2 are the engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_zero.testing.multiprocess import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scripts", "run_clm_tiny.py")
ARGS = ["--use_cpu", "--max_steps", "6", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--gradient_accumulation_steps", "2",
        "--max_grad_norm", "1.0", "--learning_rate", "1e-3", "--disable_tqdm", "true"]
RTOL = 1e-5


def _run(cmd: list[str], out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ["--output_dir", out] + ARGS, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "log_history.json")) as f:
        history = json.load(f)
    return {
        "loss": [h["loss"] for h in history if "loss" in h],
        "grad_norm": [h["grad_norm"] for h in history if "grad_norm" in h],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("torchrun"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), SCRIPT]
    return _run(cmd, out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_launch_matches_torchrun(stage, reference, tmp_path):
    cmd = [sys.executable, "-m", "hf_zero", "launch", "--nproc_per_node", "2", "--master_port", str(free_port()),
           SCRIPT, "--zero_config", os.path.join(HERE, "configs", f"zero{stage}.json")]
    got = _run(cmd, str(tmp_path))
    assert len(got["loss"]) == len(reference["loss"]) == 6
    for key in ("loss", "grad_norm"):
        for a, b in zip(got[key], reference[key]):
            assert abs(a - b) <= RTOL * abs(b), (key, got[key], reference[key])
    with open(os.path.join(tmp_path, "hf_zero_report.json")) as f:
        report = json.load(f)
    assert report["stage"] == stage and report["world_size"] == 2
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
