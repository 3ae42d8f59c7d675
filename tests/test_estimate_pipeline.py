"""``hf-zero estimate --pp`` and ``hf-zero doctor`` with ``pipeline.stages``: a rank holds its stage's layers
(stage 0 also the embeddings, the last stage the norm and LM head), ZeRO shards them over W / (tp * pp)
ranks, activations count the micro-batches in flight on the stage, and the heaviest stage is reported;
checked against a hand count of the tiny Llama of the tensor-parallel tests ([Note: pipeline stage
shares] in hf_zero/estimate_pipeline.py)."""

from __future__ import annotations

import json

import pytest

from hf_zero.cli import main
from hf_zero.doctor.result import Status
from hf_zero.doctor.runner import DoctorInputs, run_doctor
from hf_zero.doctor.sizing import RunSpec, load_model_info, rank_bytes, spec_from_config
from hf_zero.estimate import (ActivationShape, count_params, estimate_bytes, load_model_config, meta_model,
                              stage_activation_bytes)
from hf_zero.estimate_parallel import Axes
from hf_zero.estimate_pipeline import in_flight
from tests.test_estimate_parallel import SPLIT_PER_BLOCK, TINY, WHOLE_PER_BLOCK

BLOCK = SPLIT_PER_BLOCK + WHOLE_PER_BLOCK  # 36,992
EMBED = HEAD = 128 * 64
NORM = 64
STAGE0, STAGE1 = BLOCK + EMBED, BLOCK + NORM + HEAD  # 45,184 and 45,248
S, B, H, V = 12, 2, 64, 128  # seq len, micro batch, hidden, vocab
LAYER = 34 * S * B * H * 4 // 2  # fp32 activations of one layer, one micro-batch: 104,448
LOGITS = S * B * V * (4 + 4)  # 24,576
INPUT = S * B * H * 4  # a layer's input, what gradient checkpointing keeps: 6,144


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_pp") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def counts(tiny):
    return count_params(meta_model(load_model_config(tiny)))


def test_stage_params_by_hand(counts):
    assert (STAGE0, STAGE1) == (45_184, 45_248)
    assert [(r.total, dp) for r, dp in (counts.per_rank(Axes(world=2, pp=2), s) for s in (0, 1))] == \
        [(STAGE0, 1), (STAGE1, 1)]
    assert counts.per_rank(Axes(world=8, pp=2), 1)[1] == 4  # dp = W / pp
    # tp 2 inside each stage: the block's split layers halve, embeddings, norm and head stay whole; dp = 8 / 4
    tp = [counts.per_rank(Axes(world=8, tp=2, pp=2), s) for s in (0, 1)]
    half = SPLIT_PER_BLOCK // 2 + WHOLE_PER_BLOCK
    assert [(r.total, dp) for r, dp in tp] == [(half + EMBED, 2), (half + NORM + HEAD, 2)]


def test_in_flight_micro_batches():
    assert [in_flight(s, 4, "1F1B", 8) for s in range(4)] == [4, 3, 2, 1]  # stage s: pp - s
    assert [in_flight(s, 4, "1F1B", 3) for s in range(4)] == [3, 3, 2, 1]  # never more than M
    assert [in_flight(s, 4, "GPipe", 8) for s in range(4)] == [8] * 4
    with pytest.raises(ValueError, match="interleaved_1F1B is not modelled yet"):
        in_flight(0, 2, "interleaved_1F1B", 4)


def test_stage_activations_by_hand():
    shape = ActivationShape(layers=2, hidden=H, heads=4, vocab=V)
    common = dict(pp=2, layers=1, micro_batch=B, seq_len=S, dtype="fp32")

    def act(stage, schedule="1F1B", m=2, checkpointing=False):
        return stage_activation_bytes(shape, stage=stage, schedule=schedule, micro_batches=m,
                                      gradient_checkpointing=checkpointing, **common)

    assert (act(0), act(1)) == (2 * LAYER, LAYER + LOGITS)  # 1F1B: 2 micro-batches on stage 0, 1 on the last
    assert (act(0, "GPipe", 4), act(1, "GPipe", 4)) == (4 * LAYER, 4 * (LAYER + LOGITS))
    # checkpointing: each micro-batch in flight keeps the layers' inputs; one layer rebuilt at a time
    assert act(0, m=4, checkpointing=True) == 2 * INPUT + LAYER
    assert act(1, "GPipe", 4, checkpointing=True) == 4 * (INPUT + LOGITS) + LAYER


def test_estimate_command_shows_the_heaviest_stage(tiny, capsys):
    assert main(["estimate", tiny, "--world", "2", "--pp", "2", "--dtype", "fp32", "--seq_len", str(S),
                 "--micro_batch", str(B)]) == 0
    out = capsys.readouterr().out
    assert "pipeline 2 stages (1F1B, 2 micro-batches a step" in out
    assert "0: 1 layer(s), 45,184 params; 1: 1 layer(s), 45,248 params; ZeRO shards each over dp = 1 ranks" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:5].strip() in "012" and line.strip()
            and line.split()[0].isdigit()}
    assert sorted(rows) == ["0", "1", "2"]  # no stage 3 row: not built with pipeline stages
    # stage 2, W 1 per stage: params, main grads (one rank: no staging), AdamW state; stage 0's 2 layers in flight
    # outweigh stage 1's 64 more params: its row is stage 0's
    stage2 = estimate_bytes(count_params_stage(tiny, 0), stage=2, world=1, dtype="fp32", optimizer="adamw")
    assert stage2["params"] == 4 * STAGE0 and stage2["optimizer_state"] == 8 * STAGE0
    total = stage2["params"] + stage2["peak_grads"] + stage2["optimizer_state"] + 2 * LAYER
    assert rows["2"][-1] == "0" and " ".join(rows["2"][15:17]) == _kib(total), rows["2"]
    for argv, message in ((["--pp", "4", "--world", "4"], "4 pipeline pieces for 2 decoder layers"),
                          (["--pp", "2", "--stage", "3"], "ZeRO stage 3 with pipeline stages is not built yet"),
                          (["--pp", "2", "--micro_batches", "1"], "--micro_batches 1: allowed")):
        assert main(["estimate", tiny, *argv]) == 2
        assert message in capsys.readouterr().err


def count_params_stage(tiny, stage):
    return count_params(meta_model(load_model_config(tiny))).per_rank(Axes(world=2, pp=2), stage)[0]


def _kib(n: int) -> str:
    return f"{n / 1024:.2f} KiB"


def test_doctor_sizes_the_heaviest_stage(tiny, tmp_path):
    from hf_zero.config import load_config

    config = tmp_path / "pp.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "pipeline": {"stages": 2, "schedule": "GPipe",
                                                                                  "micro_batches": 4}}))
    spec = spec_from_config(load_config(str(config)), seq_len=S, micro_batch=B)
    assert (spec.pp, spec.pp_schedule, spec.micro_batches) == (2, "GPipe", 4)
    got = rank_bytes(load_model_info(tiny), RunSpec(stage=2, dtype="fp32", pp=2, pp_schedule="GPipe", micro_batches=4,
                                                    seq_len=S, micro_batch=B), 2)
    # GPipe: 4 micro-batches on each stage; the last stage's logits make it the heaviest
    assert got.device == {"params": 4 * STAGE1, "grads": 4 * STAGE1, "optimizer": 8 * STAGE1,
                          "activations": 4 * (LAYER + LOGITS)}
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "pipeline": {"stages": 4}}))
    results = {r.name: r for r in run_doctor(DoctorInputs(zero_config=str(config), model=tiny, nproc=4), environ={})}
    assert results["model"].status is Status.FAIL, results["model"]
    assert "4 pipeline pieces for 2 decoder layers" in results["model"].detail
    assert "pipeline.stages at most the decoder layers" in results["model"].fix
