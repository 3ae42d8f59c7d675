"""Tiled MLP, tiled loss and CPU checkpointing together through the unmodified Trainer, stages 0-3, and
what the Trainer refuses when it is created.

Each rank trains a tiny Llama twice under hf_zero at one stage with gradient checkpointing: plain, and
with ``tiled_mlp`` (3 tiles), ``tiled_loss`` (4 tiles) and ``cpu_checkpointing``. Tiling only reorders
additions ([Note: the tiling bound] in test_tiled_compute.py), so losses and grad norms agree to 1e-5
over the steps and trained params to 1e-5 absolute; the tiled paths must have run (one tiled loss per
micro-step).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_zero.trainer as zt
from hf_zero.activations.tiled_mlp import TiledMLP, decoder_mlps
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer import session as S

STEPS = 3
TILED = {"activation_checkpointing": {"cpu_checkpointing": True}, "tiled_mlp": {"shards": 3},
         "tiled_loss": {"shards": 4}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg)


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 64, (16, 12), generator=g)
    return [{"input_ids": r, "labels": torch.where(torch.arange(12) < 2, -100, r)} for r in rows]


def _args(root, **kw) -> TrainingArguments:
    base = dict(output_dir=str(root), use_cpu=True, report_to="none", max_steps=STEPS, per_device_train_batch_size=2,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, max_grad_norm=1.0,
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                gradient_accumulation_steps=2)
    base.update(kw)
    return TrainingArguments(**base)


def _train(root, stage: int, blocks: dict) -> dict:
    zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, **blocks})
    try:
        trainer = Trainer(model=_model(), args=_args(root), train_dataset=_data())
        trainer.train()
        session = S.session_of(trainer)
        if session.engine is not None:
            with session.engine.gathered():
                params = {n: p.detach().clone().tolist() for n, p in trainer.model.named_parameters()}
        else:
            params = {n: p.detach().clone().tolist() for n, p in trainer.model.named_parameters()}
    finally:
        zt.deactivate()
    logs = trainer.state.log_history
    acts = session.activations
    return {"loss": [h["loss"] for h in logs if "loss" in h], "grad_norm": [h["grad_norm"] for h in logs if "grad_norm" in h],
            "params": params,
            "tiled_losses": None if acts is None else acts.tiled_loss.calls,
            "tiled_mlps": sum(isinstance(m.__dict__.get("forward"), TiledMLP) for m in decoder_mlps(trainer.model)),
            "packed": None if acts is None else acts.offload.counts.packed}


def _both(rank, world, root, stage):
    return _train(root / f"plain{rank}", stage, {}), _train(root / f"tiled{rank}", stage, TILED)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tiled_compute_and_cpu_checkpointing_through_the_trainer(tmp_path, stage):
    for plain, tiled in run_on_ranks(_both, 2, tmp_path, stage, timeout=300):
        assert len(plain["loss"]) == STEPS
        torch.testing.assert_close(tiled["loss"], plain["loss"], rtol=1e-5, atol=0)
        torch.testing.assert_close(tiled["grad_norm"], plain["grad_norm"], rtol=1e-5, atol=0)
        # AdamW divides by sqrt(v): an element whose gradient is near zero turns a rounding-level gradient
        # difference into a larger step difference, so params are held to 1/1000 of a step (lr 1e-2)
        for name, value in plain["params"].items():
            torch.testing.assert_close(torch.tensor(tiled["params"][name]), torch.tensor(value), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert tiled["tiled_losses"] == 2 * STEPS  # every micro-step's loss was tiled (2 per step)
        assert tiled["tiled_mlps"] == 2 and plain["tiled_mlps"] == 0
        assert tiled["packed"] == 2 * 2 * STEPS  # 2 layers, 2 micro-steps a step


def _trainer(blocks: dict, **kw):
    zt.activate({"zero_optimization": {"stage": 0}, **blocks})
    try:
        return Trainer(model=_model(), args=_args("/tmp/hf_zero_act_refusals", **kw), train_dataset=_data())
    finally:
        zt.deactivate()


@pytest.mark.parametrize("blocks, kw, match", [
    ({"activation_checkpointing": {"cpu_checkpointing": True}}, {"gradient_checkpointing": False},
     "cpu_checkpointing = true in <dict> but TrainingArguments.gradient_checkpointing is false"),
    ({"activation_checkpointing": {"cpu_checkpointing": True}},
     {"gradient_checkpointing_kwargs": {"use_reentrant": False, "offload": True}},
     "gradient_checkpointing_kwargs offload = true both move checkpoints to the host"),
    ({"tiled_loss": {}}, {"label_smoothing_factor": 0.1},
     "tiled_loss in <dict> with TrainingArguments.label_smoothing_factor = 0.1"),
], ids=["cpu-without-checkpointing", "cpu-and-transformers-offload", "tiled-loss-label-smoothing"])
def test_refused_when_the_trainer_is_created(blocks, kw, match):
    with pytest.raises(ValueError, match=match):
        _trainer(blocks, **kw)


def test_contiguous_memory_without_cpu_checkpointing_is_warned():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer({"activation_checkpointing": {"contiguous_memory_optimization": True,
                                                         "number_checkpoints": 4}})
    assert any("apply only with cpu_checkpointing = true" in str(w.message) for w in caught)
    assert S.session_of(trainer) is None or S.session_of(trainer).activations is None  # nothing else to do
