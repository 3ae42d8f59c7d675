"""Parameter offload (``offload_param.device`` "cpu" and "nvme") through the Trainer, on 2 CPU gloo ranks:
a DeepSpeed-style config trains exactly as optimizer offload alone, ``save_model`` streams the
same files, and its checkpoints resume bit for bit."""

from __future__ import annotations

import os

import pytest
from transformers import Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny


def _run(rank, world, out, offload_param, resume_from=None, max_steps=4):
    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S

    model, data = tiny.offload_job()
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=max_steps, save_steps=2,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                             weight_decay=0.1, max_grad_norm=0.5, logging_steps=1, disable_tqdm=True, seed=0)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    if offload_param == "nvme":
        swap = os.path.join(str(out), "swap")
        os.makedirs(swap, exist_ok=True)
        zero["offload_param"] = {"device": "nvme", "nvme_path": swap}
    elif offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    zt.activate({"zero_optimization": zero})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
        engine = S.session_of(trainer).engine
        on_host = [u.host is not None for u in engine.units]
        trainer.save_model(os.path.join(str(out), "final"))  # streamed unit by unit (every rank)
    finally:
        zt.deactivate()
    saved = None
    if rank == 0:
        with open(os.path.join(str(out), "final", "model.safetensors"), "rb") as f:
            saved = f.read()
    losses = {h["step"]: (h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h}
    return losses, on_host, saved


DEVICES = ("cpu", "nvme")


def _all_runs(rank, world, out):
    """Optimizer offload alone (``out/a``), then per device parameter offload (``out/{device}``) and
    the latter resumed from its checkpoint-2 (``out/{device}-resumed``): every Trainer in one process
    per rank (one start-up of the ranks)."""
    runs = {"plain": _run(rank, world, out / "a", False)}
    for device in DEVICES:
        runs[device] = _run(rank, world, out / device, device)
        runs[f"{device}-resumed"] = _run(rank, world, out / f"{device}-resumed", device,
                                         resume_from=out / device / "checkpoint-2")
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder and rank 0's ``_all_runs``, made once for the module."""
    out = tmp_path_factory.mktemp("offload")
    return out, run_on_ranks(_all_runs, 2, out, timeout=400)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_trains_saves_and_resumes_as_optimizer_offload_alone(device, runs):
    out, got = runs
    (plain, plain_units, plain_file), (off, off_units, off_file) = got["plain"], got[device]
    resumed, _, resumed_file = got[f"{device}-resumed"]
    assert not any(plain_units) and all(off_units)  # persistence threshold 0: every unit's shards on the host
    assert off == plain and len(off) == 4  # same losses and grad norms, bit for bit
    assert off_file == plain_file  # save_model: the same bytes
    assert [resumed[s] for s in (3, 4)] == [off[s] for s in (3, 4)]  # resumed from its checkpoint: bit for bit
    assert resumed_file == off_file
    if device == "nvme":  # each rank removed its swap files, at the latest when it exited
        assert not any(p.name.startswith("hf_zero-swap") for p in (out / device / "swap").iterdir())
