"""``hf-zero estimate`` and ``hf-zero doctor`` with ``tensor_parallel.autotp_size``: a rank's model holds
the planned layers / tp and every other param whole, and ZeRO shards it over W / tp ranks, checked
against a hand count of the tiny Llama of the tensor-parallel tests ([Note: per-rank shares] in
hf_zero/estimate_parallel.py). That the engine holds these bytes is checked by the two-node job
(tests/launcher/test_two_nodes.py: its run report equals ``estimate_bytes`` of these counts).
"""

from __future__ import annotations

import json

import pytest

from hf_zero.cli import main
from hf_zero.doctor.result import Status
from hf_zero.doctor.runner import DoctorInputs, run_doctor
from hf_zero.doctor.sizing import RunSpec, load_model_info, rank_bytes, spec_from_config, tp_problem
from hf_zero.estimate import (
    ActivationShape,
    activation_bytes,
    count_params,
    estimate_bytes,
    gathered_params_bytes,
    load_model_config,
    meta_model,
)
from hf_zero.estimate_parallel import Axes

# tests/tensor_parallel/models.py's tiny_llama
TINY = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False, "dtype": "float32"}
# Hand count (head_dim 16: k and v project 64 -> 2 x 16 = 32):
SPLIT_PER_BLOCK = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64  # q, k, v, o, gate, up, down = 36,864
WHOLE_PER_BLOCK = 2 * 64  # input and post-attention RMSNorm
ROOT = 128 * 64 + 128 * 64 + 64  # embeddings, LM head (kept whole), final norm = 16,448
WHOLE_MODEL = 2 * (SPLIT_PER_BLOCK + WHOLE_PER_BLOCK) + ROOT  # 90,432
TP2_RANK = 2 * (SPLIT_PER_BLOCK // 2 + WHOLE_PER_BLOCK) + ROOT  # 53,568


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_tp") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def counts(tiny):
    return count_params(meta_model(load_model_config(tiny)))


def test_hand_count(counts):
    assert (SPLIT_PER_BLOCK, WHOLE_MODEL, TP2_RANK) == (36_864, 90_432, 53_568)
    assert counts.total == WHOLE_MODEL
    assert counts.per_rank(Axes(world=4)) == (counts, 4)  # no tp: the whole model over W ranks
    rank, dp = counts.per_rank(Axes(world=4, tp=2))
    assert dp == 2
    assert rank.total == TP2_RANK
    assert rank.blocks == [SPLIT_PER_BLOCK // 2 + WHOLE_PER_BLOCK] * 2 and rank.root == ROOT
    rank8, dp8 = counts.per_rank(Axes(world=8, tp=2))  # more ranks: the same model per rank, more dp
    assert (rank8.total, dp8) == (TP2_RANK, 4)


def test_bytes_per_rank_by_hand(counts):
    """W 4, tp 2, fp32, AdamW: one bucket holds the tp rank's 53,568 elements (every param a multiple of
    PARAM_ALIGN 32, the bucket a multiple of dp x 32 = 64), each dp rank a shard of 26,784."""
    rank, dp = counts.per_rank(Axes(world=4, tp=2))
    shard = TP2_RANK // 2
    stage2 = estimate_bytes(rank, stage=2, world=dp, dtype="fp32", optimizer="adamw")
    assert stage2 == {"params": 4 * TP2_RANK,  # whole params of this tp rank: 214,272, as the run report
                      "grads_at_step": 4 * shard,  # the fp32 main grad shard
                      "peak_grads": 4 * shard + 4 * TP2_RANK,  # + the one bucket's full gradient while it reduces
                      "optimizer_state": 2 * 4 * shard,  # exp_avg and exp_avg_sq of the shard, no master at fp32
                      "host_offload": 0, "nvme_offload": 0}
    stage0 = estimate_bytes(rank, stage=0, world=dp, dtype="fp32", optimizer="adamw")  # DDP over dp
    assert stage0["params"] == stage0["grads_at_step"] == 4 * TP2_RANK
    assert stage0["optimizer_state"] == 2 * 4 * TP2_RANK
    # stage 3: each unit (block of 18,560, root of 16,448) padded to a multiple of 64 and sharded over dp
    stage3 = estimate_bytes(rank, stage=3, world=dp, dtype="fp32", optimizer="adamw")
    assert stage3["params"] == 4 * (18_560 + 18_560 + 16_448) // 2
    assert gathered_params_bytes(rank, world=dp, dtype="fp32") == 4 * (16_448 + 18_560)  # root + largest block


def test_activations_with_tp():
    """Korthikanti et al.: a layer keeps s*b*h*(10 + 24/tp) 16-bit bytes; the logits stay whole."""
    shape = ActivationShape(layers=2, hidden=64, heads=4, vocab=128)
    s, b, h = 12, 2, 64
    logits = s * b * 128 * (4 + 4)
    for tp, per_layer in ((1, 34), (2, 22), (4, 16)):
        got = activation_bytes(shape, micro_batch=b, seq_len=s, dtype="fp32", gradient_checkpointing=False, tp=tp)
        assert got == 2 * per_layer * s * b * h * 4 // 2 + logits, tp


@pytest.mark.parametrize("world,tp,message", [
    (4, 3, r"autotp_size = 3 does not divide the world size 4.*allowed here: \[1, 2, 4\]"),
    (8, 4, r"autotp_size = 4: the model's num_key_value_heads = 2 is not divisible by 4"),
])
def test_refusals(counts, world, tp, message):
    with pytest.raises(ValueError, match=message):
        counts.per_rank(Axes(world=world, tp=tp))


def test_estimate_command(tiny, capsys):
    assert main(["estimate", tiny, "--world", "4", "--tp", "2", "--dtype", "fp32", "--stage", "2",
                 "--seq_len", "12", "--micro_batch", "2"]) == 0
    out = capsys.readouterr().out
    assert ("tensor parallel 2: each rank's model holds 53,568 params (the planned layers / 2, the rest whole; "
            "blocks of 18,560); ZeRO shards them over dp = 2 ranks") in out
    row = next(line.split() for line in out.splitlines() if line.lstrip().startswith("2 "))
    # params 214,272 B, grads 107,136 B, peak 321,408 B, optimizer 214,272 B; activations 159,744 B (2 layers x
    # 22 x 12 x 2 x 64 x 2 + logits 24,576)
    assert row[:13] == ["2", "209.25", "KiB", "0", "B", "104.62", "KiB", "313.88", "KiB", "209.25", "KiB",
                        "732.38", "KiB"], row
    assert row[13:15] == ["156.00", "KiB"], row
    for argv, message in ((["--tp", "4"], "num_key_value_heads = 2 is not divisible by 4"),
                          (["--tp", "2", "--offload", "cpu"], "optimizer offload with tensor parallelism is not built yet")):
        assert main(["estimate", tiny, "--world", "8", *argv]) == 2
        assert message in capsys.readouterr().err


def test_doctor_sizes_a_tp_rank(tiny, tmp_path):
    from hf_zero.config import load_config

    config = tmp_path / "tp.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 2}}))
    spec = spec_from_config(load_config(str(config)))
    assert spec.tp == 2 and spec.stage == 2
    model = load_model_info(tiny)
    got = rank_bytes(model, RunSpec(stage=2, dtype="fp32", tp=2), 4)
    assert got.device == {"params": 4 * TP2_RANK, "grads": 4 * (TP2_RANK // 2) + 4 * TP2_RANK,
                          "optimizer": 2 * 4 * (TP2_RANK // 2), "activations": 0}
    assert tp_problem(model, RunSpec(stage=2, tp=2), 4) is None
    # what the Trainer would refuse at the split, the doctor says as the model check's failure
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 4}}))
    results = {r.name: r for r in run_doctor(DoctorInputs(zero_config=str(config), model=tiny, nproc=8), environ={})}
    assert results["model"].status is Status.FAIL, results["model"]
    assert "num_key_value_heads = 2 is not divisible by 4" in results["model"].detail
    assert "tensor_parallel.autotp_size that divides" in results["model"].fix
    assert results["host memory"].status is Status.SKIP  # nothing to size


def test_doctor_checks_tp_groups_inside_a_node(tmp_path):
    """hf-zero doctor --nproc 3 --nnodes 2 with autotp_size 2: the launcher's refusal, as the world size check."""
    config = tmp_path / "tp2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2}}))
    world_size = {}
    for nproc in (3, 2):
        results = run_doctor(DoctorInputs(zero_config=str(config), nproc=nproc, nnodes=2), environ={})
        world_size[nproc] = next(r for r in results if r.name == "world size")
    assert world_size[2].status is Status.PASS, world_size[2]
    assert world_size[3].status is Status.FAIL
    assert "the tensor-parallel group of ranks 2..3 would span nodes 0 and 1" in world_size[3].detail
