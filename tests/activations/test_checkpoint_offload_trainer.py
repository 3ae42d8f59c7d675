"""CPU checkpointing through the Trainer is bit for bit plain gradient checkpointing, at every stage.

Each rank trains the same tiny Llama twice with ``--gradient_checkpointing`` under hf_zero at one stage:
once as is, once with ``activation_checkpointing.cpu_checkpointing``. On CPU the host is the device, but
the offload still copies every checkpointed layer's input into a separate host buffer in forward and
back out in backward (one layer ahead), so the test checks that machinery: values copied, never
recomputed differently. Losses and grad norms at every step and the final full params must be equal
(``==``), and the offload's counts must say that every layer's input went through it.

Rank starts: the cases of ``test_cpu_checkpointing_is_plain_checkpointing`` at one world size (every
stage, reentrant or not) share one start, made once for the module; each buffer case starts alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer import session as S

STEPS = 3
LAYERS = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg)


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (16, 12), generator=g)]


def _train(root, stage: int, reentrant: bool, block: dict) -> dict:
    config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    if block:
        config["activation_checkpointing"] = block
    args = TrainingArguments(output_dir=str(root), use_cpu=True, report_to="none", max_steps=STEPS,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant},
                             disable_tqdm=True, max_grad_norm=1.0)
    zt.activate(config)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(model=_model(), args=args, train_dataset=_data())
            trainer.train()
        session = S.session_of(trainer)
        if session.engine is not None:
            with session.engine.gathered():
                params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        else:
            params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    finally:
        zt.deactivate()
    logs = trainer.state.log_history
    offload = session.activations.offload if session.activations is not None else None
    return {"loss": [h["loss"] for h in logs if "loss" in h], "grad_norm": [h["grad_norm"] for h in logs if "grad_norm" in h],
            "params": {n: p.tolist() for n, p in params.items()},
            "warned": [str(w.message) for w in caught if "number_checkpoints" in str(w.message)],
            "counts": None if offload is None else dict(packed=offload.counts.packed, unpacked=offload.counts.unpacked,
                                                        prefetched=offload.counts.prefetched, kept=offload.counts.kept,
                                                        held=offload.counts.held,
                                                        allocations=offload.buffers.allocations,
                                                        overflows=offload.buffers.overflows)}


def _both(rank, world, root, stage, reentrant, block):
    plain = _train(root / f"plain{rank}", stage, reentrant, {})
    offloaded = _train(root / f"offload{rank}", stage, reentrant, block)
    return plain, offloaded


def _check(results, block):
    for plain, offloaded in results:
        assert len(plain["loss"]) == STEPS
        assert offloaded["loss"] == plain["loss"]
        assert offloaded["grad_norm"] == plain["grad_norm"]
        assert offloaded["params"] == plain["params"]
        counts = offloaded["counts"]
        # every checkpointed layer's input went to the host once per forward and came back once; all but
        # the first one a backward needs (the last layer's) came back ahead, prefetched while the layer
        # after it ran
        assert counts["packed"] == counts["unpacked"] == LAYERS * STEPS, counts
        assert counts["prefetched"] == (LAYERS - 1) * STEPS, counts
        # one buffer per layer, reused by every later step (fewer with number_checkpoints: the rest overflow)
        slots = block.get("number_checkpoints") or LAYERS
        assert counts["allocations"] == slots, counts
        assert counts["overflows"] == (LAYERS - slots) * STEPS, counts
        assert len(offloaded["warned"]) == (1 if slots < LAYERS else 0), offloaded["warned"]  # once per job


STAGES = (0, 1, 2, 3)
REENTRANT = (False, True)
CPU_CHECKPOINTING = {"cpu_checkpointing": True}


def _every_case(rank, world, root):
    """``_both`` with ``CPU_CHECKPOINTING`` for every stage and reentrant setting, one after another in
    this one rank start (each case in its own folder): per ``(stage, reentrant)``, this rank's pair."""
    return {(stage, reentrant): _both(rank, world, root / f"{stage}-{reentrant}", stage, reentrant, CPU_CHECKPOINTING)
            for stage in STAGES for reentrant in REENTRANT}


@pytest.fixture(scope="module")
def cpu_checkpointing(tmp_path_factory) -> dict[int, list[dict]]:
    """Per world (1, 2): every rank's results of ``_every_case``, one rank start per world."""
    return {world: run_on_ranks(_every_case, world, tmp_path_factory.mktemp(f"w{world}"), timeout=600)
            for world in (1, 2)}


@pytest.mark.parametrize("reentrant", REENTRANT, ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", [1, 2])
def test_cpu_checkpointing_is_plain_checkpointing(cpu_checkpointing, world, stage, reentrant):
    _check([ranks[(stage, reentrant)] for ranks in cpu_checkpointing[world]], CPU_CHECKPOINTING)


@pytest.mark.parametrize("block", [
    {"cpu_checkpointing": True, "number_checkpoints": 2},
    {"cpu_checkpointing": True, "number_checkpoints": LAYERS, "contiguous_memory_optimization": True},
    {"cpu_checkpointing": True, "number_checkpoints": 2, "contiguous_memory_optimization": True},
], ids=["bounded", "arena", "arena-overflow"])
def test_bounded_and_contiguous_host_buffers(tmp_path, block):
    """number_checkpoints bounds the pinned buffers (the rest go to pageable memory, warned once); the
    contiguous arena holds that many slots; training is bit for bit the same either way."""
    _check(run_on_ranks(_both, 1, tmp_path, 2, False, block, timeout=300), block)


@pytest.mark.parametrize("reentrant", REENTRANT, ids=["non-reentrant", "reentrant"])
def test_device_checkpoints_stay_and_the_rest_go_to_the_host(tmp_path, reentrant):
    """device_checkpoints 2 of 3 layers: each forward's first two inputs stay where they are (held,
    never copied), the third goes to the host and back; bit for bit plain checkpointing, at a stage
    that gathers (3) and one that does not (0)."""
    block = {"cpu_checkpointing": True, "device_checkpoints": 2}
    for stage in (0, 3):
        ((plain, offloaded),) = run_on_ranks(_both, 1, tmp_path / str(stage), stage, reentrant, block, timeout=300)
        assert len(plain["loss"]) == STEPS
        assert offloaded["loss"] == plain["loss"] and offloaded["grad_norm"] == plain["grad_norm"]
        assert offloaded["params"] == plain["params"]
        counts = offloaded["counts"]
        # per forward two held (a new two each step: backward let go of the last), one to the host,
        # every one unpacked once; the host one is the first backward needs, so none is prefetched
        assert counts["held"] == 2 * STEPS and counts["packed"] == STEPS, counts
        assert counts["unpacked"] == LAYERS * STEPS and counts["prefetched"] == 0, counts
        assert counts["allocations"] == 1, counts


def test_device_checkpoints_without_cpu_checkpointing_is_warned_about():
    from hf_zero.activations.trainer_activations import TrainerActivations
    from hf_zero.config import ConfigError, load_config

    config = load_config({"activation_checkpointing": {"device_checkpoints": 2}})
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", gradient_checkpointing=True)
    with pytest.warns(UserWarning, match="device_checkpoints.*Not applied"):
        TrainerActivations(config, args, _model())
    with pytest.raises(ConfigError, match="device_checkpoints"):
        load_config({"activation_checkpointing": {"cpu_checkpointing": True, "device_checkpoints": -1}})
