"""Checkpoints with pipeline stages through the Trainer ([Note: pipeline parts]): a pp 2 save (W 2) resumed
at pp 2 (bit for bit), at pp 1 (W 2: dp 2; W 1) and a pp 1 save (dp 2) resumed at pp 2; a dp 2 x pp 2 save
(W 4: stage 1's ranks write boxes of their shards) resumed at dp 4; each within 1e-5 of the uninterrupted
losses, and the bytes each rank of the dp 2 x pp 2 run holds are ``hf-zero estimate --pp 2``'s for its stage. The checkpoint's description lists the whole model; ``hf-zero consolidate`` and ``from_pretrained``
of the checkpoint folder give the trained params; a resume with stages warns of no unexpected keys (the
other stages' are expected), a key no stage has still is. One rank start per world size: each rank runs its cases
in turn."""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoModelForCausalLM, Trainer

import hf_zero.trainer as zt
from hf_zero.checkpoint import sharded
from hf_zero.checkpoint.consolidate import consolidate
from hf_zero.estimate import count_params, estimate_bytes, meta_model
from hf_zero.estimate_parallel import Axes
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer import pipeline as PP
from tests.pipeline.test_trainer import TINY, _rows
from tests.tensor_parallel.models import tiny_llama
from tests.trainer.tiny import args, history

STEPS = 4
TOL = 1e-5
# every run's global batch is 4 rows (dp x per-device batch x accumulation): 1F1B needs 2 micro-batches


def _config(stage: int, stages: int) -> dict:
    config = {"zero_optimization": {"stage": stage}}
    if stages > 1:
        config["pipeline"] = {"stages": stages, "schedule": "1F1B"}
    return config


class _Warnings(logging.Handler):
    """The Trainer's warnings (transformers.trainer's logger) while a run lasts."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def _train(out: str, stage: int, stages: int, batch: int, accum: int, resume: str | None, warned=None):
    """The losses and this rank's trained params; ``warned``: a list that gets the Trainer's warnings of
    unexpected keys at resume, then those of a probe load naming a key no stage has and another stage's."""
    zt.activate(_config(stage, stages))
    warnings = _Warnings()
    logging.getLogger("transformers.trainer").addHandler(warnings)
    try:
        trainer = Trainer(model=tiny_llama(**TINY), train_dataset=_rows(),
                          args=args(out, max_steps=STEPS, save_strategy="steps", save_steps=2, max_grad_norm=0.5,
                                    per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                                    train_sampling_strategy="sequential", learning_rate=1e-3))
        trainer.train(resume_from_checkpoint=resume)
        if warned is not None:
            warned.extend(m for m in warnings.messages if "unexpected keys" in m)
            other = min(PP.of(trainer).others)
            trainer._issue_warnings_after_load(_IncompatibleKeys([], ["lm_head.extra", other]))
            warned.extend(m for m in warnings.messages[len(warnings.messages) - 1:] if "unexpected keys" in m)
        params = {n: p.detach().tolist() for n, p in trainer.model.named_parameters()}
        return history(trainer)["loss"], params
    finally:
        logging.getLogger("transformers.trainer").removeHandler(warnings)
        zt.deactivate()


def _runs(rank, world, root):
    """name: (ZeRO stage, pipeline stages, per-device batch, accumulation, resumed from): every case on both ranks."""
    cases = {"pp": (1, 2, 2, 2, None), "pp-pp": (1, 2, 2, 2, "pp"), "dp": (2, 1, 1, 2, None),
             "pp-dp": (2, 1, 1, 2, "pp"), "dp-pp": (1, 2, 2, 2, "dp")}
    out, warned = {}, {}
    for name, (stage, stages, batch, accum, source) in cases.items():
        resume = os.path.join(root, source, "checkpoint-2") if source else None
        warned[name] = [] if resume and stages > 1 else None
        out[name] = _train(os.path.join(root, name), stage, stages, batch, accum, resume, warned[name])
        dist.barrier()
    return out, {k: v for k, v in warned.items() if v is not None}


def _continues(resumed: list[float], whole: list[float], what: str) -> None:
    assert len(whole) == STEPS and resumed[:2] == whole[:2], what  # the first two come from the checkpoint's log
    assert all(abs(r - w) < TOL * abs(w) for r, w in zip(resumed[2:], whole[2:])), (what, resumed, whole)


def test_pipeline_checkpoints_resume_at_any_stage_count(tmp_path):
    root = str(tmp_path)
    ranks, warned = zip(*run_on_ranks(_runs, 2, root, timeout=300))
    # resumed with stages, each stage loads the full weights: only the probe's key no stage has is unexpected
    for w in warned:
        assert w.keys() == {"pp-pp", "dp-pp"}, w
        for messages in w.values():
            assert len(messages) == 1 and "['lm_head.extra']" in messages[0], messages
    (pp_losses, stage0), (_, stage1) = ranks[0]["pp"], ranks[1]["pp"]
    assert ranks[1]["pp-pp"][0] == pp_losses and ranks[0]["pp-pp"][0] == pp_losses  # same split: bit for bit
    _continues(ranks[0]["pp-dp"][0], pp_losses, "pp 2 -> dp 2")
    _continues(ranks[0]["dp-pp"][0], ranks[0]["dp"][0], "dp 2 -> pp 2")
    dp_losses = ranks[0]["dp"][0]  # the two uninterrupted runs agree too
    assert all(abs(d - p) < TOL * abs(p) for d, p in zip(dp_losses, pp_losses)), (dp_losses, pp_losses)

    # W 1, no process group: the pp 2 checkpoint resumed by one process
    alone, alone_params = _train(os.path.join(root, "one"), 2, 1, 2, 2, os.path.join(root, "pp", "checkpoint-2"))
    _continues(alone, pp_losses, "pp 2 -> W 1")

    # the description lists every stage's params (rank 0 alone wrote it), stage 0's first
    folder = os.path.join(root, "pp", "checkpoint-4")
    with open(os.path.join(folder, sharded.DIR_NAME, sharded.META_NAME)) as f:
        meta = json.load(f)
    trained = {**stage0, **stage1}
    assert set(stage0).isdisjoint(stage1) and sorted(meta["layout"]) == sorted(trained) == sorted(meta["params"])
    assert meta["layout"][: len(stage0)] == [n for n in meta["layout"] if n in stage0]
    assert sorted(n for g in meta["optimizer"]["param_groups"] for n in g["params"]) == sorted(trained)

    # the checkpoint's weights: from_pretrained of the folder and hf-zero consolidate, the trained params
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    consolidate(folder, os.path.join(root, "consolidated"))
    merged = load_file(os.path.join(root, "consolidated", "model.safetensors"))
    for name, value in trained.items():
        expected = torch.tensor(value)
        assert torch.equal(loaded.get_parameter(name).detach(), expected), name
        assert torch.equal(merged[name], expected), name
    assert max((torch.tensor(v) - torch.tensor(alone_params[n])).abs().max().item() for n, v in trained.items()) < TOL



def _runs_w4(rank, world, root):
    out = {"pp": _train(os.path.join(root, "pp4"), 1, 2, 1, 2, None)}  # dp 2 x pp 2
    dist.barrier()
    out["pp-dp"] = _train(os.path.join(root, "dp4"), 2, 1, 1, 1, os.path.join(root, "pp4", "checkpoint-2"))
    return out


def test_dp_and_pipeline_checkpoint_resumes_at_dp_4(tmp_path):
    ranks = run_on_ranks(_runs_w4, 4, str(tmp_path), timeout=300)
    whole = ranks[0]["pp"][0]
    assert all(r["pp"][0] == whole for r in ranks)  # the logged loss is the step's on every stage
    _continues(ranks[0]["pp-dp"][0], whole, "dp 2 x pp 2 -> dp 4")
    trained = {n: v for r in ranks for n, v in r["pp"][1].items()}
    resumed = ranks[0]["pp-dp"][1]
    # the bytes each rank holds, measured by the run report, are hf-zero estimate's for its stage at dp 2
    counts = count_params(meta_model(tiny_llama(**TINY).config))
    report = json.loads((tmp_path / "pp4" / "hf_zero_report.json").read_text())
    assert sorted(r["rank"] for r in report["ranks"]) == [0, 1, 2, 3]
    for stage in (0, 1):  # stage-outer: ranks 2 * stage, 2 * stage + 1
        stage_counts, dp = counts.per_rank(Axes(world=4, pp=2), stage)
        want = estimate_bytes(stage_counts, stage=1, world=dp, dtype="fp32", optimizer="adamw")
        got = [r["bytes"] for r in report["ranks"] if r["rank"] // 2 == stage]
        for g in got:
            assert (g["params"], g["grads"], g["peak_grads"]) == (
                want["params"], want["grads_at_step"], want["peak_grads"]), (stage, g, want)
        # optimizer state covers each rank's real elements: the estimate is the mean over the stage's ranks
        assert sum(g["optimizer_state"] for g in got) == dp * want["optimizer_state"], (stage, got, want)
    assert sorted(trained) == sorted(resumed)
    assert max((torch.tensor(v) - torch.tensor(resumed[n])).abs().max().item() for n, v in trained.items()) < TOL
