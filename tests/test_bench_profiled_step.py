"""bench/job.py's tok/s leaves out the profiled step and the step after it ([Note: profile]): the
profiled step runs under the profiler, and the next one finishes work the profiled one left running
(an offloaded host step), so it is short; keeping it made session 16's profiled offload rows 4% fast."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.test_bench_scaling import _load

STEPS = [2.0, 1.0, 0.5, 0.5, 1.5, 0.2, 0.5, 0.5]  # step 5 profiled, step 6 the short one after it


def _summary(profile_step, output_dir="/nonexistent"):
    job = _load("job")
    timer = job.StepTimer(cuda=False)
    timer.step_seconds = lambda: list(STEPS)
    bench = SimpleNamespace(profile_step=profile_step, bench_warmup_steps=2, seq_len=16, init_device="cpu", alst=False)
    targs = SimpleNamespace(world_size=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                            device=torch.device("cpu"), output_dir=str(output_dir))
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    return job.summarize(bench, targs, timer, [], model, 1000, 0.0, 0.0,
                         profile={"note": "x"} if profile_step is not None else None)


@pytest.mark.parametrize("profile_step", [None, 5])
def test_tok_s_leaves_out_the_profiled_step_and_the_one_after(profile_step):
    out = _summary(profile_step)
    steady = STEPS[2:] if profile_step is None else [0.5, 0.5, 0.5, 0.5]
    assert out["steady_steps"] == len(steady)
    assert out["mean_step_s"] == pytest.approx(sum(steady) / len(steady))
    assert out["tok_per_s"] == pytest.approx(len(steady) * 2 * 16 / sum(steady))


def test_the_run_reports_engine_figures_come_with_the_summary(tmp_path):
    """What ratio "auto" chose, the device leg and the redone host steps explain a row's speed: they
    are taken from hf_zero's run report in the output dir (None without one: other systems' modes)."""
    import json

    assert _summary(None, tmp_path)["run_report"] is None
    auto = {"ratio": 0.58, "headroom_bytes": 1, "moved_bytes": 2, "left_bytes": 3, "margin_bytes": 4}
    (tmp_path / "hf_zero_report.json").write_text(json.dumps({"ranks": [
        {"rank": 0, "offload_auto": auto, "device_leg": {"share": 0.3}, "host_steps_redone": 1, "tokens": 9}]}))
    assert _summary(None, tmp_path)["run_report"] == [
        {"rank": 0, "offload_auto": auto, "device_leg": {"share": 0.3}, "host_steps_redone": 1}]
