"""A second Trainer on a model an earlier Trainer trained ([Note: a second Trainer] in
hf_zero/trainer/earlier_engine.py): as with the plain Trainer, it trains on from the model's values
with its own optimizer, at stages 1-3 and W = 1 and 2 (stage 3: the new engine laid out from the
earlier one's shards), also with optimizer offload, and a stage-3 model under a stage-2 Trainer
(its params gathered whole first). Before, every stage failed in the second Trainer's first
backward (the earlier engine's gradient hooks took each gradient first).

Rank starts: every run of the module at one world size, the plain references included, is made in
one start (``runs``: two starts in all, each run on a fresh model in its own folder)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Trainer

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny

STEPS = 3


def _two_trainers(rank, world, out, zero: dict | list | None, lora: bool = False):
    """Two Trainers, one after the other, on one model (fresh optimizers), under ``zero`` (one config
    for both, a list of one per Trainer, or None: plain); each one's log history, and the second's
    eval loss at the end."""
    model = tiny.llama(0)
    if lora:  # a LoRA adapter over the frozen base (peft)
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    rows = tiny.lm_rows(32)
    runs = []
    for phase, config in zip(("first", "second"), zero if isinstance(zero, list) else [zero, zero]):
        if config is not None:
            zt.activate(config)
        try:
            args = tiny.args(tiny.out_dir(out, phase), max_steps=STEPS, max_grad_norm=1.0)
            trainer = Trainer(model=model, args=args, train_dataset=rows)
            trainer.train()
            runs.append(tiny.history(trainer))
            if phase == "second":
                evaluated = trainer.evaluate(rows[:8])["eval_loss"]  # the second Trainer's engine serves the model
        finally:
            zt.deactivate()
    return runs, evaluated


def _same_as(got: list, ref: tuple, names: tuple[str, str]) -> None:
    """Every rank's two Trainers (``_two_trainers``) trained as ``ref``'s, and evaluate the same."""
    (ref_first, ref_second), ref_eval = ref
    for rank, ((first, second), evaluated) in enumerate(got):
        tiny.same_training(first, ref_first, STEPS, f"rank {rank} {names[0]}")
        tiny.same_training(second, ref_second, STEPS, f"rank {rank} {names[1]}")
        tiny.close(evaluated, ref_eval, what=f"rank {rank} eval_loss")


def _zero(stage: int, **optimizer_offload) -> dict:
    block = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if optimizer_offload:
        block["offload_optimizer"] = optimizer_offload
    return {"zero_optimization": block}


SECOND_CASES = [  # (stage, world, optimizer offload device)
    (1, 1, None), (2, 1, None), (3, 1, None), (2, 2, None), (3, 2, None), (2, 1, "cpu"), (3, 2, "cpu"),
]
LORA_STAGES = (2, 3)


def _cases_for(world: int) -> list[tuple]:
    """Every run of the module at ``world``, as ``(name, zero, lora)``: the plain Trainer's (the
    reference), each case of ``SECOND_CASES`` at that world, stage 3 then stage 2, and at W = 2 the
    LoRA model plain (DDP) and at each stage of ``LORA_STAGES``."""
    cases = [("plain", None, False)]
    cases += [(f"second-{stage}-{offload}", _zero(stage, **({"device": offload} if offload else {})), False)
              for stage, w, offload in SECOND_CASES if w == world]
    cases.append(("stage3-then-stage2", [_zero(3), _zero(2)], False))
    if world == 2:
        cases += [("lora-plain", None, True)] + [(f"lora-{stage}", _zero(stage), True) for stage in LORA_STAGES]
    return cases


def _each(rank, world, out, cases):
    """``_two_trainers`` for every ``(name, zero, lora)`` of ``cases``, one after another in this one
    rank start (each on a fresh model, under ``out/name``)."""
    return {name: _two_trainers(rank, world, os.path.join(out, name), zero, lora) for name, zero, lora in cases}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict[str, list]]:
    """Per world (1, 2), per run name of ``_cases_for``: the per-rank results, one rank start per world."""
    out = {}
    for world in (1, 2):
        per_rank = run_on_ranks(_each, world, str(tmp_path_factory.mktemp(f"w{world}")), _cases_for(world),
                                timeout=600)
        out[world] = {name: [r[name] for r in per_rank] for name in per_rank[0]}
    return out


@pytest.fixture(scope="module")
def plain(runs):
    return {w: runs[w]["plain"][0] for w in (1, 2)}


@pytest.mark.parametrize("stage,world,offload", SECOND_CASES)
def test_a_second_trainer_trains_on_like_the_plain_trainer(stage, world, offload, plain, runs):
    got = runs[world][f"second-{stage}-{offload}"]
    _same_as(got, plain[world], ("first Trainer", "second Trainer"))
    (ref_first, ref_second), _ = plain[world]
    assert ref_second["loss"][0] < ref_first["loss"][0]  # the second went on from the first's values


@pytest.mark.parametrize("world", [1, 2])
def test_a_stage3_model_trains_on_under_a_stage2_trainer(world, plain, runs):
    """Stage 3, then stage 2 on the same model: the earlier engine's units are gathered into whole
    params on every rank, then the stage-2 engine is built over them as for any model."""
    got = runs[world]["stage3-then-stage2"]
    _same_as(got, plain[world], ("stage-3 Trainer", "stage-2 Trainer"))


def test_an_engine_says_when_it_is_closed():
    from hf_zero.engine import ZeroEngine

    model = tiny.llama(0)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), stage=2, bucket_numel=1000)
    assert not engine.closed and set(model.parameters()) <= engine.laid_out_params()
    engine.close()
    assert engine.closed


@pytest.mark.parametrize("stage", LORA_STAGES)
def test_a_second_trainer_on_a_lora_model(stage, runs):
    """A PEFT model (LoRA over a frozen base) trained twice: at stage 3 the earlier units hold the
    frozen base too, and the new engine is laid out from them with the adapters trainable."""
    ref = runs[2]["lora-plain"][0]  # DDP
    got = runs[2][f"lora-{stage}"]
    _same_as(got, ref, ("first Trainer", "second Trainer"))
