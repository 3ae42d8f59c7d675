"""bench/largest_model.py (issue 18 D5): the placement arithmetic of each plan, the configs it writes
(hf_zero loads them as meant; DeepSpeed's differs only by its optimizer block), and the command path
end to end at a tiny shape on CPU: the same plan, config and job flags the GPU run gets."""

from __future__ import annotations

import json
import warnings

import pytest

from hf_zero.config.loader import load_config
from tests.test_bench_scaling import _BENCH, _load

largest = _load("largest_model")
GIB = 1 << 30
GPU_GIB = 79.1  # an H100 80GB as torch sees it
DISK_GIB = 64  # the lent machine's disk


def test_13b_count_matches_the_estimate():
    assert largest.n_params("13b", 40) == 13_015_864_320  # hf-zero estimate on the same LlamaConfig


@pytest.mark.parametrize("name", list(largest.PLANS))
def test_each_plan_fits_the_lent_machine(name):
    """[Note: placement]: the host tiers take at most H, the GPU's optimizer share plus the working
    set leaves at least 4 GiB of an H100 (the CUDA context and the allocator's slack)."""
    plan = largest.PLANS[name]
    n = largest.n_params("13b", plan.layers)
    ratio = largest.ratio_for(plan, n)
    where = largest.placement(plan, n, ratio)
    assert 0.55 < ratio < 0.75
    assert where["host_tier_bytes"] <= largest.HOST_TIER_BYTES
    unit = largest.n_params("13b", 1) - largest.n_params("13b", 0)  # one layer: the split's granularity
    assert where["host_tier_bytes"] > largest.HOST_TIER_BYTES - unit * largest.host_bytes_per_element(plan)  # H spent
    assert where["gpu_optimizer_bytes"] + where["gpu_work_bytes_est"] <= (GPU_GIB - 4) * GIB
    if plan.optimizer == "nvme":  # the GPU sets the ratio (the smallest that fits), the host its share
        smaller = largest.placement(plan, n, round(ratio - 0.001, 3))
        assert smaller["gpu_optimizer_bytes"] + smaller["gpu_work_bytes_est"] > largest.GPU_TIER_BYTES
        more = largest.placement(plan, n, ratio, host_share=where["host_share"] + 0.01)
        assert more["host_tier_bytes"] > largest.HOST_TIER_BYTES  # the largest share
        offloaded = largest.offloaded_elements(plan.layers, ratio)
        assert where["host_tier_bytes"] + where["disk_bytes"] == 16 * offloaded + 2 * n  # grads, state, params
        assert where["disk_bytes"] < DISK_GIB * GIB
        bigger = largest.n_params("13b", plan.layers + 4)  # the largest that fits: 4 more layers overflow the disk
        assert largest.placement(plan, bigger, largest.ratio_for(plan, bigger))["disk_bytes"] > DISK_GIB * GIB
        return
    assert largest.placement(plan, n, ratio + 0.001)["host_tier_bytes"] > largest.HOST_TIER_BYTES  # the largest ratio
    assert where["disk_bytes"] == (2 * n if plan.params == "nvme" else 0)
    if plan.state_dtype == "fp32":  # the fp32 plans are the largest that fit: 4 more layers would not
        bigger = largest.n_params("13b", plan.layers + 4)
        over = largest.placement(plan, bigger, largest.ratio_for(plan, bigger))
        assert over["gpu_optimizer_bytes"] + over["gpu_work_bytes_est"] > (GPU_GIB - 8) * GIB


def test_configs_say_what_the_plan_says(tmp_path):
    plan = largest.PLANS["13b-bf16state"]
    ours = largest.zero_json(plan, 0.687, str(tmp_path))
    theirs = largest.zero_json(plan, 0.687, str(tmp_path), deepspeed=True)
    assert {k: v for k, v in theirs.items() if k != "optimizer"} == ours
    assert theirs["optimizer"]["type"] == "AdamW"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keys accepted but not applied (steps_per_print, buffer_size)
        zero = load_config(ours).zero
        fp32 = load_config(largest.zero_json(largest.PLANS["fp32-9b"], 0.5, str(tmp_path))).zero
    assert (zero.stage, zero.offload_optimizer.device, zero.offload_optimizer.ratio) == (3, "cpu", 0.687)
    assert zero.offload_optimizer.state_dtype == "bf16"
    assert (zero.offload_param.device, zero.offload_param.nvme_path) == ("nvme", str(tmp_path))
    assert (fp32.offload_optimizer.state_dtype, fp32.offload_param.device) == ("fp32", "cpu")
    split = largest.PLANS["13b-fp32-split"]
    ours = largest.zero_json(split, 0.683, str(tmp_path), host_share=0.67)
    theirs = largest.zero_json(split, 0.683, str(tmp_path), deepspeed=True, host_share=0.67)
    assert "host_share" not in theirs["zero_optimization"]["offload_optimizer"]  # DeepSpeed's: all on NVMe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offload = load_config(ours).zero.offload_optimizer
    assert (offload.device, offload.nvme_path, offload.ratio, offload.host_share) == ("nvme", str(tmp_path), 0.683, 0.67)


@pytest.mark.parametrize("plan", ["13b-bf16state", "13b-fp32-split"])
def test_tiny_dry_run_on_cpu(tmp_path, monkeypatch, capsys, plan):
    """The GPU command with --shape tiny --device cpu: a 13B plan's config (its ratio; bf16 state and
    params on NVMe, or fp32 state split over host and NVMe) through hf_zero.run and the Trainer;
    results and progress written."""
    monkeypatch.chdir(_BENCH.parent)
    monkeypatch.syspath_prepend(str(_BENCH))
    rc = largest.main(["--plan", plan, "--shape", "tiny", "--device", "cpu", "--tools", "hfzero",
                       "--seq_len", "32", "--max_steps", "2", "--warmup_steps", "1", "--nvme_path", str(tmp_path / "nvme"),
                       "--results_dir", str(tmp_path), "--name", "dry", "--budget_s", "300"])
    doc = json.loads((tmp_path / "dry.json").read_text())
    run = doc["runs"][0]
    assert rc == 0, run.get("error_tail")
    assert (run["status"], run["steps_done"]) == ("ok", 2) and run["tok_per_s"] > 0
    assert doc["placement"]["ratio"] == largest.ratio_for(largest.PLANS[plan], largest.n_params("13b", 40))
    log = (tmp_path / "dry_hfzero.log").read_text()
    assert "--zero_config" in log and "hf_zero: ZeRO stage 3" in log  # the engine ran, at stage 3
    assert "step 2:" in capsys.readouterr().out  # progress echoed as it came
    assert "| hfzero | ok | 2 |" in (tmp_path / "dry.md").read_text()
