"""What a Trainer user touches still behaves as without hf_zero: PEFT, evaluate/predict, the
optimizer and LR scheduler, Seq2SeqTrainer with generation, gradient checkpointing, gradient
accumulation with clipping, and the run report.

Every scenario trains the same model on the same data with the plain Trainer (no hf_zero: at
W = 2 the Trainer's own DDP) and with hf_zero stage 1 and/or 2, and compares the numbers (fp32,
relative tolerance 1e-5). A scenario is one module-level function ``fn(rank, world, root)``
returning ``{stage: figures}`` (stage ``None``: plain); W = 1 calls it in this process, W = 2
runs every scenario, one after another, in one start of two gloo ranks through ``run_on_ranks``
(the ``w2`` fixture). Checks that need the live Trainer (the engine's buffers, frozen weights)
run inside ``fn`` itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import Seq2SeqTrainer, Trainer

import hf_zero.trainer as zt
from hf_zero.engine.layout import PARAM_ALIGN
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer.report import REPORT_NAME
from tests.trainer import tiny
from tests.trainer.tiny import close, same_training, with_zero

STEPS = 4
WORLDS = [1, 2]


def _scenarios(rank, world, root, names) -> dict[str, dict]:
    """Every scenario of ``names`` (``SCENARIOS``), one after another, each under ``root/name``."""
    return {name: SCENARIOS[name](rank, world, os.path.join(root, name)) for name in names}


@pytest.fixture(scope="module")
def w2(tmp_path_factory) -> tuple[str, dict[str, list[dict]]]:
    """The root and, per scenario, the per-rank results at W = 2: every scenario in one rank start."""
    root = str(tmp_path_factory.mktemp("w2"))
    ranks = run_on_ranks(_scenarios, 2, root, list(SCENARIOS), timeout=600)
    return root, {name: [r[name] for r in ranks] for name in SCENARIOS}


def _on(world: int, name: str, request, root) -> list[dict]:
    """Per-rank results of the scenario ``name`` at ``world``: W = 1 here, in ``root``; W = 2 from ``w2``."""
    if world == 1:
        return [SCENARIOS[name](0, 1, str(root))]
    return request.getfixturevalue("w2")[1][name]


def _trainable_numel(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- 1. PEFT LoRA -------------------------------------------------------------------------------


def _lora_model():
    from peft import LoraConfig, get_peft_model

    model = tiny.llama(0)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _lora(rank, world, root):
    results = {}
    for stage in (None, 1, 2):

        def run():
            model = _lora_model()
            trainable = [p for p in model.parameters() if p.requires_grad]
            frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            n_trainable = sum(p.numel() for p in trainable)
            assert 0 < n_trainable < sum(t.numel() for t in frozen.values()) / 4
            out = tiny.out_dir(root, "lora", stage)
            trainer = Trainer(model=model, args=tiny.args(out, max_steps=STEPS), train_dataset=tiny.lm_rows(16))
            trainer.train()

            if stage is not None:
                engine = zt.session_of(trainer).engine
                assert engine is not None
                buffered = [p for buf in engine.buffers for p in buf.params]
                # exactly the requires_grad params, each once; no frozen base weight in a buffer
                assert len(buffered) == len(trainable)
                assert {id(p) for p in buffered} == {id(p) for p in trainable}
                numel = sum(buf.numel for buf in engine.buffers)
                n_buckets = sum(len(buf.buckets) for buf in engine.buffers)
                slack = PARAM_ALIGN * len(trainable) + world * PARAM_ALIGN * n_buckets
                assert n_trainable <= numel < 2 * n_trainable + slack, (numel, n_trainable, slack)
                report = None
                if rank == 0:
                    with open(os.path.join(out, REPORT_NAME)) as f:
                        report = json.load(f)
            else:
                assert zt.session_of(trainer) is None
                report = None
            for name, p in trainer.model.named_parameters():
                if name in frozen:
                    assert torch.equal(p.detach(), frozen[name]), f"frozen weight {name} changed"
            assert set(frozen) == {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
            state = tiny.trainable_state(trainer.model)
            assert any(np.abs(v).max() > 0 for k, v in state.items() if "lora_B" in k)  # LoRA trained
            return {"history": tiny.history(trainer), "trainable": state, "n_trainable": n_trainable,
                    "report": report}

        results[stage] = with_zero(stage, run)
    return results


@pytest.mark.parametrize("world", WORLDS)
def test_peft_lora_matches_plain(world, request, tmp_path):
    ranks = _on(world, "lora", request, tmp_path)
    ref = ranks[0][None]
    for stage in (1, 2):
        for rank, got in enumerate(ranks):
            same_training(got[stage]["history"], ref["history"], STEPS, f"stage {stage} rank {rank}")
            close(got[stage]["trainable"], ref["trainable"], what=f"stage {stage} rank {rank} LoRA weights",
                  elementwise=False)
        # AdamW state for the LoRA params only: 8 bytes per trainable element over all ranks
        report = ranks[0][stage]["report"]
        assert report["world_size"] == world and len(report["ranks"]) == world
        held = sum(r["bytes"]["optimizer_state"] for r in report["ranks"])
        assert held == 8 * ref["n_trainable"]


# ---- 2. evaluate / predict ----------------------------------------------------------------------


def _eval(rank, world, root):
    results = {}
    for stage in (None, 1, 2):

        def run():
            out = tiny.out_dir(root, "eval", stage)
            targs = tiny.args(out, max_steps=STEPS, eval_strategy="steps", eval_steps=2)

            def make():
                return Trainer(model=tiny.llama(0), args=targs, train_dataset=tiny.lm_rows(16),
                               eval_dataset=tiny.lm_rows(8, seed=1))

            trainer = make()
            if stage is None and world > 1:
                # The plain Trainer at W > 1 must not evaluate before train() on the Trainer it then
                # trains: that evaluate() marks the model prepared (accelerate, evaluation_mode) and
                # train() then skips the DDP wrap, so ranks step on unsynchronized gradients
                # (transformers 5.24 / accelerate 1.15). The reference evaluates a twin instead.
                before = make().evaluate()
            else:
                before = trainer.evaluate()
            trainer.train()
            after = trainer.evaluate()
            pred = trainer.predict(tiny.lm_rows(8, seed=2))
            assert (zt.session_of(trainer) is not None) == (stage is not None)
            in_training = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
            return {
                "before": before["eval_loss"],
                "after": after["eval_loss"],
                "during": in_training,  # at steps 2 and 4 (in training), then after
                "test_loss": pred.metrics["test_loss"],
                "predictions": pred.predictions,
                "label_ids": pred.label_ids,
                "history": tiny.history(trainer),
            }

        results[stage] = with_zero(stage, run)
    return results


@pytest.mark.parametrize("world", WORLDS)
def test_evaluate_and_predict_match_plain(world, request, tmp_path):
    ranks = _on(world, "eval", request, tmp_path)
    ref = ranks[0][None]
    assert len(ref["during"]) == 3 and ref["after"] < ref["before"]
    assert ref["predictions"].shape == (8, tiny.SEQ, tiny.VOCAB)
    for stage in (1, 2):
        for rank, got in enumerate(ranks):
            what = f"stage {stage} rank {rank}"
            same_training(got[stage]["history"], ref["history"], STEPS, what)
            for key in ("before", "after", "during", "test_loss"):
                close(got[stage][key], ref[key], what=f"{what} {key}")
            close(got[stage]["predictions"], ref["predictions"], what=f"{what} predictions", elementwise=False)
            assert np.array_equal(got[stage]["label_ids"], ref["label_ids"])


# ---- 3. optimizer and LR scheduler --------------------------------------------------------------


def _optim(rank, world, root):
    results = {}
    for stage in (None, 1, 2):

        def run():
            out = tiny.out_dir(root, "optim", stage)
            targs = tiny.args(out, max_steps=STEPS, weight_decay=0.1, warmup_steps=2, lr_scheduler_type="cosine")
            trainer = Trainer(model=tiny.llama(0), args=targs, train_dataset=tiny.lm_rows(16))
            trainer.train()
            opt, sched = trainer.optimizer, trainer.lr_scheduler
            groups = [{"weight_decay": g["weight_decay"], "lr": g["lr"],
                       "numel": sum(p.numel() for p in g["params"])} for g in opt.param_groups]
            last_lr = list(sched.get_last_lr())
            sched.step()  # still a working scheduler of the optimizer's groups
            next_lr = list(sched.get_last_lr())
            assert [g["lr"] for g in opt.param_groups] == next_lr
            sd = opt.state_dict()
            assert len(sd["param_groups"]) == len(opt.param_groups)
            assert [g["weight_decay"] for g in sd["param_groups"]] == [g["weight_decay"] for g in groups]
            exp_avg = sum(s["exp_avg"].numel() for s in sd["state"].values())
            exp_avg_sq = sum(s["exp_avg_sq"].numel() for s in sd["state"].values())
            steps = {float(s["step"]) for s in sd["state"].values()}
            opt.load_state_dict(sd)  # round trip
            assert all(torch.equal(opt.state_dict()["state"][k]["exp_avg"], sd["state"][k]["exp_avg"])
                       for k in sd["state"])
            return {"groups": groups, "last_lr": last_lr, "next_lr": next_lr, "exp_avg": exp_avg,
                    "exp_avg_sq": exp_avg_sq, "steps": steps, "history": tiny.history(trainer),
                    "n_trainable": _trainable_numel(trainer.model)}

        results[stage] = with_zero(stage, run)
    return results


@pytest.mark.parametrize("world", WORLDS)
def test_optimizer_and_scheduler_stay_usable(world, request, tmp_path):
    ranks = _on(world, "optim", request, tmp_path)
    ref = ranks[0][None]
    n = ref["n_trainable"]
    assert [g["weight_decay"] for g in ref["groups"]] == [0.1, 0.0]
    assert sum(g["numel"] for g in ref["groups"]) == n and ref["exp_avg"] == n
    assert ref["steps"] == {float(STEPS)}
    for stage in (1, 2):
        for rank, got in enumerate(ranks):
            what = f"stage {stage} rank {rank}"
            same_training(got[stage]["history"], ref["history"], STEPS, what)
            assert [g["weight_decay"] for g in got[stage]["groups"]] == [0.1, 0.0], what
            close(got[stage]["last_lr"], ref["last_lr"], what=f"{what} last_lr")
            close(got[stage]["next_lr"], ref["next_lr"], what=f"{what} next_lr")
            close([g["lr"] for g in got[stage]["groups"]], [g["lr"] for g in ref["groups"]], what=what)
            assert got[stage]["steps"] <= {float(STEPS)}, what
        # the shards of each group add up to the plain group; the state to one copy of the params
        for i, g in enumerate(ref["groups"]):
            assert sum(r[stage]["groups"][i]["numel"] for r in ranks) == g["numel"], (stage, i)
        assert sum(r[stage]["exp_avg"] for r in ranks) == n
        assert sum(r[stage]["exp_avg_sq"] for r in ranks) == n


# ---- 4. Seq2SeqTrainer + T5, generation ---------------------------------------------------------


def _seq2seq(rank, world, root):
    results = {}
    for stage in (None, 2):

        def run():
            out = tiny.out_dir(root, "s2s", stage)
            targs = tiny.args(out, seq2seq=True, max_steps=STEPS, predict_with_generate=True,
                              generation_max_length=5, generation_num_beams=1)
            trainer = Seq2SeqTrainer(model=tiny.t5(0), args=targs, train_dataset=tiny.s2s_rows(16),
                                     eval_dataset=tiny.s2s_rows(8, seed=1))
            trainer.train()
            metrics = trainer.evaluate()
            pred = trainer.predict(tiny.s2s_rows(8, seed=2))
            return {"history": tiny.history(trainer), "eval_loss": metrics["eval_loss"],
                    "test_loss": pred.metrics["test_loss"], "generated": pred.predictions,
                    "trainable": tiny.trainable_state(trainer.model)}

        results[stage] = with_zero(stage, run)
    return results


@pytest.mark.parametrize("world", WORLDS)
def test_seq2seq_t5_stage2_trains_and_generates_like_plain(world, request, tmp_path):
    ranks = _on(world, "seq2seq", request, tmp_path)
    ref = ranks[0][None]
    assert ref["generated"].shape[0] == 8 and ref["generated"].shape[1] > 1
    for rank, got in enumerate(ranks):
        what = f"rank {rank}"
        same_training(got[2]["history"], ref["history"], STEPS, what)
        close(got[2]["trainable"], ref["trainable"], what=f"{what} params", elementwise=False)
        close(got[2]["eval_loss"], ref["eval_loss"], what=f"{what} eval_loss")
        close(got[2]["test_loss"], ref["test_loss"], what=f"{what} test_loss")
        assert np.array_equal(got[2]["generated"], ref["generated"]), what


# ---- 5. gradient checkpointing ------------------------------------------------------------------


def _checkpointing(rank, world, root):
    results = {}
    for reentrant in (False, True):
        for stage in (None, 2):

            def run():
                out = tiny.out_dir(root, "gc", reentrant, stage)
                targs = tiny.args(out, max_steps=STEPS, gradient_checkpointing=True,
                                  gradient_checkpointing_kwargs={"use_reentrant": reentrant})
                trainer = Trainer(model=tiny.llama(0), args=targs, train_dataset=tiny.lm_rows(16))
                trainer.train()
                # What is_activation_checkpointing (transformers >= 5.2x) and the older
                # is_gradient_checkpointing both compute, so the oldest supported transformers runs it too.
                assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
                return {"history": tiny.history(trainer), "trainable": tiny.trainable_state(trainer.model)}

            results[(reentrant, stage)] = with_zero(stage, run)
    return results


@pytest.mark.parametrize("world", WORLDS)
def test_gradient_checkpointing_stage2_matches_plain(world, request, tmp_path):
    ranks = _on(world, "checkpointing", request, tmp_path)
    for reentrant in (False, True):
        ref = ranks[0][(reentrant, None)]
        for rank, got in enumerate(ranks):
            what = f"use_reentrant={reentrant} rank {rank}"
            same_training(got[(reentrant, 2)]["history"], ref["history"], STEPS, what)
            close(got[(reentrant, 2)]["trainable"], ref["trainable"], what=f"{what} params", elementwise=False)


# ---- 6. + 7. gradient accumulation with clipping at W = 2, the run report -----------------------

GA_STEPS = 3
GA = 3


def _accumulation(rank, world, root):
    results = {}
    for stage in (None, 1, 2):

        def run():
            out = tiny.out_dir(root, "ga", stage)
            targs = tiny.args(out, max_steps=GA_STEPS, gradient_accumulation_steps=GA, max_grad_norm=0.5)
            trainer = Trainer(model=tiny.llama(0), args=targs, train_dataset=tiny.lm_rows(24))
            trainer.train()
            logged = {k: v for h in trainer.state.log_history for k, v in h.items() if k.startswith("hf_zero/")}
            return {"history": tiny.history(trainer), "trainable": tiny.trainable_state(trainer.model),
                    "n_trainable": _trainable_numel(trainer.model), "logged": logged}

        results[stage] = with_zero(stage, run)
    return results


SCENARIOS = {"lora": _lora, "eval": _eval, "optim": _optim, "seq2seq": _seq2seq, "checkpointing": _checkpointing,
             "accumulation": _accumulation}


@pytest.fixture(scope="module")
def accumulation_w2(w2):
    root, ranks = w2
    return os.path.join(root, "accumulation"), ranks["accumulation"]


@pytest.mark.parametrize("world", WORLDS)
def test_grad_accumulation_and_clipping_match_plain(world, request, tmp_path):
    ranks = _on(world, "accumulation", request, tmp_path)
    ref = ranks[0][None]
    assert max(ref["history"]["grad_norm"]) > 0.5  # clipping really acts
    assert all(r[None]["history"] == ref["history"] for r in ranks)
    for stage in (1, 2):
        for rank, got in enumerate(ranks):
            what = f"stage {stage} rank {rank}"
            same_training(got[stage]["history"], ref["history"], GA_STEPS, what)
            close(got[stage]["trainable"], ref["trainable"], what=f"{what} params", elementwise=False)


def test_report_has_both_ranks_and_sharded_optimizer_state(accumulation_w2):
    root, ranks = accumulation_w2
    n = ranks[0][None]["n_trainable"]
    assert not os.path.exists(os.path.join(root, "ga", "None", REPORT_NAME))  # plain run: no report
    tokens_per_rank = 2 * tiny.SEQ * GA * GA_STEPS  # batch 2 x seq x micro-steps x steps
    for stage in (1, 2):
        with open(os.path.join(root, "ga", str(stage), REPORT_NAME)) as f:
            report = json.load(f)
        assert report["stage"] == stage and report["world_size"] == 2 and report["precision"] == "fp32"
        assert [r["rank"] for r in report["ranks"]] == [0, 1]
        for r in report["ranks"]:
            assert r["steps"] == GA_STEPS and r["tokens"] == tokens_per_rank, r
            assert r["bytes"]["params"] >= 4 * n and r["bytes"]["peak_grads"] > 0, r
            assert 0 < r["bytes"]["optimizer_state"] < 8 * n, r  # a shard, not a full copy
            assert r["collectives_per_step"]["all_gather"] > 0 and r["collectives_per_step"]["all_reduce"] == 2  # clip norm + used-params bitmap
        assert sum(r["bytes"]["optimizer_state"] for r in report["ranks"]) == 8 * n  # AdamW fp32
        assert report["tokens_per_s_total"] > 0
        # rank 0's figures also reach the Trainer's log history, on each rank its own
        for rank, got in enumerate(ranks):
            assert got[stage]["logged"]["hf_zero/optimizer_state_bytes"] == \
                report["ranks"][rank]["bytes"]["optimizer_state"]
