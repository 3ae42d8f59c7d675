"""Tensor parallelism through the Trainer (``tensor_parallel.autotp_size``), against one plain process:
tp 2 at W 2 (stage 0), and dp 2 x tp 2 at W 4 (stages 0-2): every logged loss and clipped grad norm, and
the trained params (tp parts gathered), within 1e-5 in fp32; the refusals. The runs of one world size
share one rank start, made once for the module (``tp_runs``), each in its own folder."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

import hf_zero.trainer as zt
from hf_zero.tensor_parallel import gather_split
from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from hf_zero.trainer import tensor_parallel as TP
from hf_zero.trainer.session import session_of
from tests.tensor_parallel.models import VOCAB, tiny_llama
from tests.trainer.tiny import args, history, same_training

STEPS = 3
TOL = 1e-5
MAX_NORM = 0.5  # below the norms of these steps (about 2): clipping acts


def _rows(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (n, 12), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def _args(out: str, batch: int, accum: int = 1):
    return args(out, max_steps=STEPS, max_grad_norm=MAX_NORM, per_device_train_batch_size=batch,
                gradient_accumulation_steps=accum, train_sampling_strategy="sequential", learning_rate=1e-3)


def _reference(out: str, batch: int, accum: int):
    trainer = Trainer(model=tiny_llama(), args=_args(out, batch, accum), train_dataset=_rows(), eval_dataset=_rows(8))
    trainer.train()
    return (history(trainer), {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()},
            trainer.evaluate()["eval_loss"])


def _tp_run(rank, world, stage, accum, out):
    # threshold 0: at stage 3 every param of this tiny model is sharded (none kept whole); zero3_init_flag false:
    # tp splits a whole model (at stage 3 the flag's default is the table's 'tensor-parallel-sharded-load' row)
    zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                       "zero3_init_flag": False}, "tensor_parallel": {"autotp_size": 2}})
    try:
        trainer = Trainer(model=tiny_llama(), args=_args(f"{out}/{rank}", 2, accum), train_dataset=_rows(),
                          eval_dataset=_rows(8))
        trainer.train()
        report = session_of(trainer).figures  # the run report's document, before evaluate
        tokens = ({r["rank"]: r["tokens"] for r in report["ranks"]}, report["tokens_per_s_total"])
        eval_loss = trainer.evaluate()["eval_loss"]  # every rank of a tp group evaluates the same rows
        trainer.save_model(f"{out}/saved")  # the consolidated save: full weights for from_pretrained
        state, engine = TP.of(trainer), session_of(trainer).engine
        params = {}
        with engine.gathered() if engine is not None else contextlib.nullcontext():
            for name, p in trainer.model.named_parameters():
                full = p.detach()
                if name in state.layout.split_dims:
                    full = gather_split(full, state.layout.split_dims[name], state.mesh.tp_group)
                params[name] = full.tolist()
        return history(trainer), params, eval_loss, tokens
    finally:
        zt.deactivate()


# accum 2: DDP's no_sync over the dp group (stage 0), stage 1's reduction at the boundary only
CASES = [(2, 0, 1), (4, 0, 1), (4, 1, 1), (4, 2, 1), (4, 3, 1), (4, 0, 2), (4, 1, 2)]


def _tp_runs(rank, world, cases, root):
    """``_tp_run`` for every ``(stage, accum)`` of ``cases``, one after another in this one rank start,
    each under ``root/{stage}-{accum}``."""
    return {(stage, accum): _tp_run(rank, world, stage, accum, f"{root}/{stage}-{accum}") for stage, accum in cases}


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory) -> dict[int, tuple[str, list[dict]]]:
    """Per world of ``CASES``: the folder the runs wrote in and every rank's ``_tp_runs`` of that world's
    cases, one rank start per world."""
    out = {}
    for world in sorted({w for w, _, _ in CASES}):
        root = str(tmp_path_factory.mktemp(f"w{world}"))
        cases = [(stage, accum) for w, stage, accum in CASES if w == world]
        out[world] = root, run_on_ranks(_tp_runs, world, cases, root, timeout=600)
    return out


@pytest.mark.parametrize("world,stage,accum", CASES)
def test_tp2_through_the_trainer(tmp_path, tp_runs, world, stage, accum):
    dp = world // 2
    # one process, the whole global batch of each micro-step
    ref_history, ref_params, ref_eval = _reference(str(tmp_path / "ref"), 2 * dp, accum)
    root, ranks = tp_runs[world]
    for got_history, params, eval_loss, (tokens, total) in (r[(stage, accum)] for r in ranks):
        # each batch counted once, by tp rank 0 of its group ([Note: tensor-parallel tokens]): rows of 12 tokens
        assert tokens == {r: (STEPS * accum * 2 * 12 if r % 2 == 0 else 0) for r in range(world)}, tokens
        assert total > 0
        assert abs(eval_loss - ref_eval) < TOL * abs(ref_eval), (eval_loss, ref_eval)
        same_training(got_history, ref_history, STEPS, f"W {world} stage {stage}")
        assert params.keys() == ref_params.keys()
        # absolute: AdamW's first steps move elements whose grads are near 0 by about lr, from rounding alone
        worst = max(abs(torch.tensor(v).numpy() - ref_params[n]).max() for n, v in params.items())
        assert worst < TOL, (world, stage, worst)
    saved = AutoModelForCausalLM.from_pretrained(f"{root}/{stage}-{accum}/saved")  # the full model, no hf_zero
    loaded = {n: p.detach().numpy() for n, p in saved.named_parameters()}
    assert loaded.keys() == ref_params.keys()
    assert max(abs(loaded[n] - ref_params[n]).max() for n in loaded) < TOL


def _refused(rank, world, config, save_strategy):
    zt.activate(config)
    try:
        Trainer(model=tiny_llama(), args=args(f"/tmp/unused-{rank}", save_strategy=save_strategy, max_steps=1),
                train_dataset=_rows())
    finally:
        zt.deactivate()


@pytest.mark.parametrize("config,save_strategy,message", [
    ({"tensor_parallel": {"autotp_size": 3}}, "no", r"autotp_size = 3 does not divide world_size = 2.*allowed: \[1, 2\]"),
    ({"tensor_parallel": {"autotp_size": 2}}, "steps", "checkpoint save.*not built yet"),
])
def test_refusals(config, save_strategy, message):
    with pytest.raises(RankFailure, match=message):
        run_on_ranks(_refused, 2, config, save_strategy, timeout=120)
