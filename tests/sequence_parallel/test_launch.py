"""An unmodified Trainer script through ``hf-zero launch``: 2 gloo ranks with sequence_parallel_size 2
(ZeRO stage 2) give the losses and grad norms of the same script under plain ``torchrun`` on 1 rank
(W / P), within 1e-5."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_zero.testing.multiprocess import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "integration_tests", "scripts", "run_clm_tiny.py")
ARGS = ["--use_cpu", "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--gradient_accumulation_steps", "2",
        "--max_grad_norm", "1.0", "--learning_rate", "1e-3", "--disable_tqdm", "true"]


def _run(cmd: list[str], out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ["--output_dir", out] + ARGS, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "log_history.json")) as f:
        history = json.load(f)
    return {key: [h[key] for h in history if key in h] for key in ("loss", "grad_norm")}


@pytest.mark.slow
def test_launch_with_sequence_parallelism(tmp_path):
    config = tmp_path / "zero2_sp2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "sequence_parallel_size": 2}))
    plain = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                  "--master_port", str(free_port()), SCRIPT], str(tmp_path / "torchrun"))
    got = _run([sys.executable, "-m", "hf_zero", "launch", "--nproc_per_node", "2", "--master_port",
                str(free_port()), SCRIPT, "--zero_config", str(config)], str(tmp_path / "hf_zero"))
    assert len(got["loss"]) == len(plain["loss"]) == 4
    for key in ("loss", "grad_norm"):
        for a, b in zip(got[key], plain[key]):
            assert abs(a - b) <= 1e-5 * abs(b), (key, got[key], plain[key])
