"""A Trainer script through ``hf-zero launch`` (2 gloo ranks, ZeRO stage 3) with a ``sparse_attention``
block (fixed layout, block 4 of a 32-token sequence): the model ran hf_zero's sparse attention, and its
losses and grad norms equal those of the same script under plain ``torchrun`` (DDP, 2 ranks) attending
through dense SDPA under the layout's boolean mask (built in the script from the transcription of
DeepSpeed's layout builder, nothing of hf_zero), within 1e-5; they differ from plain causal attention's
(a block silently ignored would give those), and the loss falls.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from hf_zero.testing.multiprocess import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "clm_script.py")
BLOCK = {"mode": "fixed", "block": 4, "num_local_blocks": 2, "attention": "unidirectional"}
STEPS = 4
ARGS = ["--use_cpu", "--max_steps", str(STEPS), "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--max_grad_norm", "1.0", "--learning_rate", "1e-2",
        "--disable_tqdm", "true", "--seq_len", "32"]


def _run(cmd: list[str], out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning")
    proc = subprocess.run(cmd + ["--output_dir", out] + ARGS, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    history = result["log_history"]
    return {"attention": result["attn_implementation"],
            **{key: [h[key] for h in history if key in h] for key in ("loss", "grad_norm")}}


def _torchrun(out: str, *extra: str) -> dict:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(free_port()), SCRIPT, *extra], out)


@pytest.mark.slow
def test_launch_with_sparse_attention(tmp_path):
    config = tmp_path / "zero3_sparse.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                  "sparse_attention": BLOCK}))
    got = _run([sys.executable, "-m", "hf_zero", "launch", "--nproc_per_node", "2", "--master_port",
                str(free_port()), SCRIPT, "--zero_config", str(config)], str(tmp_path / "hf_zero"))
    reference = _torchrun(str(tmp_path / "reference"), "--attention", "reference", "--layout", json.dumps(BLOCK))
    dense = _torchrun(str(tmp_path / "dense"))

    assert got["attention"].startswith("hf_zero_sparse_attention_"), got["attention"]
    assert reference["attention"] == "fixed_layout_reference" and dense["attention"] == "sdpa"
    assert len(got["loss"]) == len(reference["loss"]) == len(dense["loss"]) == STEPS
    assert all(math.isfinite(x) for x in got["loss"] + got["grad_norm"]), got
    assert got["loss"][-1] < got["loss"][0] - 0.1, got["loss"]  # it learns
    for key in ("loss", "grad_norm"):
        for a, b in zip(got[key], reference[key]):
            assert abs(a - b) <= 1e-5 * abs(b), (key, got[key], reference[key])
    # the layout is in force: plain causal attention (the block ignored) trains differently
    assert max(abs(a - b) for a, b in zip(got["loss"], dense["loss"])) > 1e-2, (got["loss"], dense["loss"])
