"""Issue 18 D2 and D3 through the Trainer on 2 gloo ranks: ``offload_optimizer.ratio: "auto"``
([Note: auto ratio], the device's headroom a stand-in: CPU has none) trains as the ratio it chose
given by hand, and says its choice in the run report and the logs; bf16 host optimizer state
([Note: bf16 host state]) trains close to fp32 state, its state in bf16, checkpointed and resumed."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny


def _run(rank, world, out, offload: dict, share=None, resume=None, bf16_state=False):
    import hf_zero.trainer as zt
    from hf_zero.engine.offload import auto_ratio, device_room
    from hf_zero.trainer import session as S

    held = {}
    if share is not None:  # the stand-in device: the margin and room for ``share`` of the elements
        def headroom(device):
            n = sum(b.shard_numel for b in S.session_of(held["trainer"]).engine.buckets)
            return int(auto_ratio.MARGIN * (1 << 20) + 12 * share * n), 1 << 20

        device_room.headroom = headroom
    model, data = tiny.offload_job()
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=4,
                             save_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=1e-2, max_grad_norm=1.0, logging_steps=1, disable_tqdm=True, seed=0)
    config = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "offload_optimizer": offload}}
    if bf16_state:
        config["bf16"] = {"bf16_optimizer_states": True}
    zt.activate(config)
    try:
        trainer = held["trainer"] = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        engine = S.session_of(trainer).engine
        dtypes = sorted({str(v.dtype) for s in engine.optimizer.state.values() for v in s.values() if v.dim() > 0})
        placed = [b.offloaded for b in engine.buckets]
    finally:
        zt.deactivate()
    with open(os.path.join(str(out), "hf_zero_report.json")) as f:
        report = json.load(f)
    logs = trainer.state.log_history
    return {"losses": [h["loss"] for h in logs if "loss" in h], "dtypes": dtypes, "placed": placed,
            "auto": [r["offload_auto"] for r in report["ranks"]],
            "scalar": [h.get("hf_zero/offload_ratio") for h in logs if "loss" in h],
            "config": report["config"]["zero"]["offload_optimizer"]}


def test_ratio_auto_trains_as_the_chosen_ratio_by_hand(tmp_path):
    auto = run_on_ranks(_run, 2, tmp_path / "auto", {"device": "cpu", "ratio": "auto"}, 0.5, timeout=300)[0]
    [choice, other] = auto["auto"]
    assert choice == other and 0 < choice["ratio"] < 1  # both ranks, one choice, some state on the device
    assert choice["left_bytes"] == choice["headroom_bytes"] - choice["moved_bytes"] >= choice["margin_bytes"]
    assert auto["scalar"] == [choice["ratio"]] * 4  # logged from the first logging step on
    assert auto["config"]["ratio"] == "auto"
    assert not all(auto["placed"]) and any(auto["placed"])
    hand = run_on_ranks(_run, 2, tmp_path / "hand", {"device": "cpu", "ratio": choice["ratio"]}, timeout=300)[0]
    assert hand["placed"] == auto["placed"] and hand["auto"] == [None, None]
    assert auto["losses"] == hand["losses"]  # the first step differs in where it ran, not in its numbers


def _fp32_then_bf16(rank, world, out):
    """The fp32-state run (``out/fp32``), then the bf16-state one (``out/bf16``), in this one rank start."""
    return [_run(rank, world, out / name, {"device": "cpu"}, None, None, bf16) for name, bf16 in
            (("fp32", False), ("bf16", True))]


def test_bf16_state_trains_close_to_fp32_state_and_resumes(tmp_path):
    fp32, bf16 = run_on_ranks(_fp32_then_bf16, 2, tmp_path, timeout=300)[0]
    assert bf16["dtypes"] == ["torch.bfloat16"] and fp32["dtypes"] == ["torch.float32"]
    assert bf16["config"]["state_dtype"] == "bf16"
    assert bf16["losses"][0] == fp32["losses"][0]  # the first loss comes before any step
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2e-2)
    assert bf16["losses"] != fp32["losses"]
    # resume the bf16 run from its step-2 checkpoint (bf16 state in it): steps 3-4 as before
    checkpoint = str(tmp_path / "bf16" / "checkpoint-2")
    resumed = run_on_ranks(_run, 2, tmp_path / "bf16", {"device": "cpu"}, None, checkpoint, True, timeout=300)[0]
    assert resumed["losses"][-2:] == bf16["losses"][-2:]
    assert resumed["dtypes"] == ["torch.bfloat16"]
    assert torch.tensor(bf16["losses"]).isfinite().all()
