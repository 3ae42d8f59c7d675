"""The ``pipeline`` block: read from DeepSpeed files (its own keys of DeepSpeed's block accepted with a
warning), the batch-size product counting world_size / stages ranks, and every refusal that needs no
rank: combinations not built yet (unsupported.py), a world the stages do not divide, micro-batches that
do not divide the batch, and models that cannot be split (tied embeddings, no decoder-layer list, fewer
layers than pieces)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, TrainingArguments

from hf_zero.config import ConfigError, load_config, resolve_config
from hf_zero.config.unsupported import UnsupportedConfig, refuse
from hf_zero.pipeline.build import check
from hf_zero.pipeline.split import NotSplittable, layer_ranges
from tests.tensor_parallel.models import tiny_llama


def _resolve(tmp_path, block: dict, world: int, stage: int = 1, **args):
    config = load_config({"zero_optimization": {"stage": stage}, **block})
    return resolve_config(config, TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **args), world_size=world)


def test_keys_and_deepspeed_block():
    config = load_config({"pipeline": {"stages": 4, "schedule": "GPipe", "micro_batches": 8}})
    assert (config.pipeline.stages, config.pipeline.schedule, config.pipeline.micro_batches) == (4, "GPipe", 8)
    with pytest.warns(UserWarning, match="pipeline.partition"):  # DeepSpeed's PipelineModule key, not applied
        assert load_config({"pipeline": {"stages": "auto", "partition": "parameters"}}).pipeline.stages == 1
    with pytest.raises(ConfigError, match=r"pipeline.schedule.*allowed: one of '1F1B', 'interleaved_1F1B', 'GPipe'"):
        load_config({"pipeline": {"stages": 2, "schedule": "zero_bubble"}})
    with pytest.raises(ConfigError, match=r"pipeline.stages.*allowed: an integer >= 1"):
        load_config({"pipeline": {"stages": 0}})


def test_train_batch_size_counts_data_parallel_ranks(tmp_path):
    pp = {"pipeline": {"stages": 2}}
    assert _resolve(tmp_path, pp, 4, per_device_train_batch_size=2).train_batch_size == 4  # 2 x 1 x 4 / 2
    with pytest.raises(ConfigError, match=r"world_size / pipeline.stages \(2\) = 4"):
        _resolve(tmp_path, {**pp, "train_batch_size": 8}, 4, per_device_train_batch_size=2)
    from hf_zero.doctor.config_checks import check_train_batch_size

    config = load_config({**pp, "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
                          "gradient_accumulation_steps": 1})
    check_train_batch_size(config, 4)
    with pytest.raises(ValueError, match=r"pipeline.stages = 2 .* does not divide world_size 3"):
        check_train_batch_size(config, 3)


def test_stages_and_micro_batches_must_divide(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.stages = 3 does not divide world_size = 4.*allowed: \[1, 2, 4\]"):
        _resolve(tmp_path, {"pipeline": {"stages": 3}}, 4)
    with pytest.raises(ConfigError, match=r"micro_batches = 3 does not divide per_device_train_batch_size = 4.*"
                                          r"allowed: \[1, 2, 4\]"):
        _resolve(tmp_path, {"pipeline": {"stages": 2, "micro_batches": 3}}, 2, per_device_train_batch_size=4)
    assert _resolve(tmp_path, {"pipeline": {"stages": 2, "micro_batches": 2}}, 2,
                    per_device_train_batch_size=4).pipeline.micro_batches == 2
    assert _resolve(tmp_path, {"pipeline": {"stages": 2}}, 2,  # "auto": the accumulation steps
                    gradient_accumulation_steps=4).pipeline.micro_batches == 4


@pytest.mark.parametrize("block,message", [
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 inside pipeline stages \\(not built yet\\)"),
    ({"sequence_parallel_size": 2}, "pipeline and sequence parallelism together \\(not built yet\\)"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "offload with pipeline stages \\(not built yet\\)"),
    ({"fp16": {"enabled": True}}, "fp16 loss scaling across pipeline stages \\(not built yet\\)"),
])
def test_combinations_not_built(block, message):
    config = {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 1}, **block}
    with pytest.raises(UnsupportedConfig, match=message):  # the table check-config, doctor and the Trainer read
        refuse(load_config(config))


def test_models_that_cannot_be_split():
    check(tiny_llama(num_hidden_layers=4), 2, "interleaved_1F1B")  # 4 pieces of one layer
    with pytest.raises(NotSplittable, match="ties lm_head to embed_tokens"):
        check(tiny_llama(tie_word_embeddings=True), 2, "1F1B")
    with pytest.raises(NotSplittable, match=r"4 pipeline pieces for 2 decoder layers.*allowed: pieces <= 2"):
        check(tiny_llama(num_hidden_layers=2), 2, "interleaved_1F1B")
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(NotSplittable, match=r"GPT2LMHeadModel is not a decoder model hf_zero can split \(it lacks "
                                            r"transformer.embed_tokens"):
        check(gpt2, 2, "1F1B")


def test_layers_split_as_evenly_as_possible():
    assert layer_ranges(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert layer_ranges(4, 4) == [range(i, i + 1) for i in range(4)]


def test_with_tensor_parallelism(tmp_path):
    """pp x tp: no row of the table refuses it; the world must be a multiple of stages * autotp_size, said
    naming both (resolve, the mesh, doctor); checkpoint saves refused at ZeRO stage 0 (not built yet)."""
    from hf_zero.config import stage0_saves
    from hf_zero.doctor.config_checks import check_train_batch_size
    from hf_zero.tensor_parallel.mesh import check_sizes

    both = {"pipeline": {"stages": 2}, "tensor_parallel": {"autotp_size": 2}}
    for stage in (0, 1, 2):
        refuse(load_config({**both, "zero_optimization": {"stage": stage}}))
    assert _resolve(tmp_path, both, 8, per_device_train_batch_size=2).train_batch_size == 4  # 2 x 1 x 8 / (2 * 2)
    with pytest.raises(ConfigError, match=r"pipeline.stages = 2 with tensor_parallel.autotp_size = 2: stages \* "
                                          r"autotp_size = 4 does not divide world_size = 6.*allowed stages: \[1, 3\]"):
        _resolve(tmp_path, both, 6)
    with pytest.raises(ValueError, match=r"pipeline.stages = 2 with tensor_parallel.autotp_size = 2: stages \* "
                                         r"autotp_size = 4 does not divide the world size 6.*allowed stages here: \[1, 3\]"):
        check_sizes(6, tp=2, pp=2)
    config = load_config({**both, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1})
    with pytest.raises(ValueError, match=r"pipeline.stages = 2 .* does not divide world_size / "
                                         r"tensor_parallel.autotp_size 3"):
        check_train_batch_size(config, 6)
    stage0 = load_config({**both, "zero_optimization": {"stage": 0}})
    assert stage0_saves.refusal(stage0, "no") is None
    assert stage0_saves.refusal(stage0, "epoch") == (
        "save_strategy 'epoch': a checkpoint save with pipeline.stages = 2 and tensor_parallel.autotp_size = 2 at ZeRO "
        "stage 0 is not built yet (the Trainer's optimizer file would hold one stage's tp rank's state only); use "
        "zero_optimization.stage 1 or 2, whose sharded checkpoints hold every part, or save_strategy \"no\" and "
        "trainer.save_model() for the full weights")
    assert "the script must pass --save_strategy no" in stage0_saves.needs_no_saves(stage0)
    for stage in (1, 2):  # each stage's tp parts in its sharded checkpoint (tests/pipeline/test_3d.py)
        assert stage0_saves.refusal(load_config({**both, "zero_optimization": {"stage": stage}}), "steps") is None
