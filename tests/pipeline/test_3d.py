"""dp 2 x tp 2 x pp 2 on one (pp, dp, tp) mesh through the Trainer (``pipeline.stages`` with
``tensor_parallel.autotp_size``), against one plain process: 8 gloo ranks started once, each running its
Trainers in turn. Training (ZeRO stage 2 with 1F1B, then stage 0 with GPipe split micro-batches), clipping
on: every logged loss and clipped grad norm, the eval loss and the trained params (each stage's tp parts
gathered, the stages put together) within 1e-5 in fp32; ``save_model`` read back by ``from_pretrained``;
each rank's place on the mesh and its groups. Checkpoints (ZeRO 1, interleaved 1F1B): a 3D save resumed
at the same split (bit for bit), at dp 4 x tp 2 and at dp 4 x pp 2 (within 1e-5 of the uninterrupted losses); its
description lists the whole model and ``from_pretrained`` of the folder gives the trained params; ZeRO 0
checkpoints refused at Trainer creation (not built yet, as for tp or stages alone).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Trainer

import hf_zero.trainer as zt
from hf_zero.checkpoint import sharded
from hf_zero.engine.stages import NotAvailableYet
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer import pipeline as PP
from hf_zero.trainer import tensor_parallel as TP
from hf_zero.trainer.session import session_of
from tests.pipeline.test_trainer import EVAL, MAX_NORM, STEPS, TINY, TOL, _rows, _args
from tests.tensor_parallel.models import tiny_llama
from tests.trainer.tiny import args

WORLD, PP_SIZE, TP_SIZE = 8, 2, 2
DP = WORLD // (PP_SIZE * TP_SIZE)
# (ZeRO stage, schedule, micro_batches, per-device batch, accumulation): global batches (2, 2) and (4, 1)
CASES = [(2, "1F1B", "auto", 1, 2), (0, "GPipe", 2, 2, 1)]
# checkpoint runs: saved at step 2, every global batch 4 rows; 3D with interleaved 1F1B (4 pieces of a layer)
CK_STEPS = 4
# name: (ZeRO stage, tp, pp, per-device batch, accumulation, resumed from)
CHECKPOINTS = {"3d": (1, 2, 2, 1, 2, None), "3d-3d": (1, 2, 2, 1, 2, "3d"), "3d-tp": (2, 2, 1, 1, 1, "3d"),
               "3d-pp": (2, 1, 2, 1, 1, "3d")}


def _config(stage, schedule, micro, tp=TP_SIZE, pp=PP_SIZE):
    config = {"zero_optimization": {"stage": stage}}
    if tp > 1:
        config["tensor_parallel"] = {"autotp_size": tp}
    if pp > 1:
        config["pipeline"] = {"stages": pp, "schedule": schedule, "micro_batches": micro}
    return config


def _reference(out: str, batch: int, accum: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        trainer = Trainer(model=tiny_llama(**TINY), args=_args(out, batch, accum), train_dataset=_rows(),
                          eval_dataset=_rows(EVAL))
        trainer.train()
        return (trainer.state.log_history, {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()},
                trainer.evaluate()["eval_loss"])
    finally:
        torch.set_num_threads(threads)


def _place(trainer) -> dict:
    """This rank's coordinates and the global ranks of its three groups."""
    mesh = PP.of(trainer).mesh
    assert TP.of(trainer).mesh is mesh  # one mesh for both
    groups = {name: dist.get_process_group_ranks(group) for name, group in
              (("dp", mesh.dp_group), ("tp", mesh.tp_group), ("pp", mesh.pp_group))}
    engine = session_of(trainer).engine
    return {"coords": (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank), "groups": groups,
            "engine_group": None if engine is None else dist.get_process_group_ranks(engine.ctx.group)}


def _train_cases(rank, out) -> list:
    results = []
    for i, (stage, schedule, micro, batch, accum) in enumerate(CASES):
        zt.activate(_config(stage, schedule, micro))
        try:
            trainer = Trainer(model=tiny_llama(**TINY), args=_args(f"{out}/{i}-{rank}", batch, accum),
                              train_dataset=_rows(), eval_dataset=_rows(EVAL))
            trainer.train()
            eval_loss = trainer.evaluate()["eval_loss"]
            if i == 0:
                trainer.save_model(f"{out}/saved")  # tp parts gathered, then every stage's to rank 0
            if stage == 0:
                with pytest.raises(NotAvailableYet, match="resume_from_checkpoint with pipeline.stages = 2 and "
                                                          "tensor_parallel.autotp_size = 2 at ZeRO stage 0 is not built"):
                    trainer.train(resume_from_checkpoint=f"{out}/saved")
            # this stage's trained params, tp parts gathered whole (a collective over tp)
            names = dict(trainer.model.named_parameters())
            params = {n: t.tolist() for n, t in TP.whole_tensors(trainer, session_of(trainer).engine) if n in names}
            results.append((trainer.state.log_history, params, eval_loss, _place(trainer)))
        finally:
            zt.deactivate()
        dist.barrier()
    return results


def _checkpoint_cases(out) -> dict:
    """name: (logged losses, this rank's trained params, tp parts gathered, when the split has tp)."""
    done = {}
    for name, (stage, tp, pp, batch, accum, source) in CHECKPOINTS.items():
        zt.activate(_config(stage, "GPipe" if accum == 1 else "interleaved_1F1B", "auto", tp=tp, pp=pp))
        try:
            trainer = Trainer(model=tiny_llama(**TINY), train_dataset=_rows(),
                              args=args(f"{out}/{name}", max_steps=CK_STEPS, save_strategy="steps", save_steps=2,
                                        max_grad_norm=MAX_NORM, per_device_train_batch_size=batch,
                                        gradient_accumulation_steps=accum, train_sampling_strategy="sequential",
                                        learning_rate=1e-3))
            trainer.train(resume_from_checkpoint=f"{out}/{source}/checkpoint-2" if source else None)
            names = dict(trainer.model.named_parameters())
            tensors = TP.whole_tensors(trainer, session_of(trainer).engine) if tp > 1 else names.items()
            done[name] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                          {n: t.tolist() for n, t in tensors if n in names})
        finally:
            zt.deactivate()
        dist.barrier()
    return done


def _run(rank, world, out):
    results = _train_cases(rank, out)
    checkpoints = _checkpoint_cases(out)
    zt.activate(_config(0, "1F1B", "auto"))
    try:  # refused at creation, before any process group: said now, not at the first save
        Trainer(model=tiny_llama(**TINY), args=_args(f"{out}/refused-{rank}", 1, 2, save_strategy="steps"),
                train_dataset=_rows())
        refusal = "not refused"
    except NotAvailableYet as error:
        refusal = str(error)
    finally:
        zt.deactivate()
    return results, checkpoints, refusal


def _losses(log_history) -> dict:
    return {key: [h[key] for h in log_history if key in h] for key in ("loss", "grad_norm")}


def test_dp2_tp2_pp2_through_the_trainer(tmp_path):
    refs = [_reference(str(tmp_path / f"ref-{i}"), batch * DP, accum)
            for i, (_, _, _, batch, accum) in enumerate(CASES)]
    per_rank = run_on_ranks(_run, WORLD, str(tmp_path), timeout=600)
    for rank, (results, _, refusal) in enumerate(per_rank):
        assert "save_strategy 'steps': a checkpoint save with pipeline.stages = 2 and tensor_parallel.autotp_size = " \
               "2 at ZeRO stage 0 is not built yet" in refusal and "use zero_optimization.stage 1 or 2" in refusal, refusal
        # stage-outer, tp-inner: rank = (stage * dp + dp rank) * tp + tp rank
        place = results[0][3]
        stage, dp_rank, tp_rank = rank // (DP * TP_SIZE), rank // TP_SIZE % DP, rank % TP_SIZE
        assert place["coords"] == (stage, dp_rank, tp_rank), (rank, place)
        assert place["groups"] == {"dp": [stage * DP * TP_SIZE + d * TP_SIZE + tp_rank for d in range(DP)],
                                   "tp": [rank - tp_rank + t for t in range(TP_SIZE)],
                                   "pp": [s * DP * TP_SIZE + dp_rank * TP_SIZE + tp_rank for s in range(PP_SIZE)]}, place
        assert place["engine_group"] == place["groups"]["dp"]  # ZeRO over the stage's ranks of one tp rank
    for i, case in enumerate(CASES):
        ref_log, ref_params, ref_eval = refs[i]
        ref = _losses(ref_log)
        assert len(ref["loss"]) == len(ref["grad_norm"]) == STEPS and max(ref["grad_norm"]) > MAX_NORM  # clipping acts
        merged = {}
        for results, _, _ in per_rank:
            log, params, eval_loss, _ = results[i]
            got = _losses(log)
            for key in ref:
                assert len(got[key]) == STEPS, (case, key, got)
                assert all(abs(g - r) <= TOL * abs(r) for g, r in zip(got[key], ref[key])), (case, key, got, ref)
            assert abs(eval_loss - ref_eval) < TOL * abs(ref_eval), (case, eval_loss, ref_eval)
            for name, value in params.items():
                merged.setdefault(name, value)
                assert value == merged[name], (case, name, "the dp and tp ranks of a stage disagree")
        assert merged.keys() == ref_params.keys(), (case, set(merged) ^ set(ref_params))
        # absolute: AdamW's first steps move elements whose grads are near 0 by about lr, from rounding alone
        worst = max(abs(torch.tensor(v).numpy() - ref_params[n]).max() for n, v in merged.items())
        assert worst < TOL, (case, worst)
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))  # the whole model, no hf_zero
    loaded = {n: p.detach().numpy() for n, p in saved.named_parameters()}
    assert loaded.keys() == refs[0][1].keys()
    assert max(abs(loaded[n] - refs[0][1][n]).max() for n in loaded) < TOL
    _checkpoints_resume(str(tmp_path), [checkpoints for _, checkpoints, _ in per_rank])


def _checkpoints_resume(root: str, per_rank: list[dict]) -> None:
    whole = per_rank[0]["3d"][0]
    assert len(whole) == CK_STEPS and whole[-1] != whole[0]
    for name in CHECKPOINTS:
        for checkpoints in per_rank:
            losses = checkpoints[name][0]
            assert losses[:2] == whole[:2], name  # the first two come from the checkpoint's log (or are the run's)
            if name in ("3d", "3d-3d"):  # the same split: bit for bit
                assert losses == whole, (name, losses, whole)
            assert all(abs(r - w) < TOL * abs(w) for r, w in zip(losses[2:], whole[2:])), (name, losses, whole)
    trained = {}
    for checkpoints in per_rank:  # every stage's params (tp parts gathered): the whole model
        for name, value in checkpoints["3d"][1].items():
            assert trained.setdefault(name, value) == value, name
    # the description lists every stage's params (rank 0 wrote the union); the folder's weights are the trained ones
    folder = os.path.join(root, "3d", f"checkpoint-{CK_STEPS}")
    with open(os.path.join(folder, sharded.DIR_NAME, sharded.META_NAME)) as f:
        meta = json.load(f)
    assert sorted(meta["layout"]) == sorted(meta["params"]) == sorted(trained)
    assert meta["params"] == {n: list(torch.tensor(v).shape) for n, v in trained.items()}  # full shapes
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(loaded.get_parameter(n).detach(), torch.tensor(v)) for n, v in trained.items())
    for name in ("3d-tp", "3d-pp"):  # resumed elsewhere: the same trained params
        other = {}
        for checkpoints in per_rank:
            other.update(checkpoints[name][1])
        assert other.keys() == trained.keys(), name
        assert max((torch.tensor(v) - torch.tensor(trained[n])).abs().max().item() for n, v in other.items()) < TOL
