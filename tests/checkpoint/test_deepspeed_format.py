"""DeepSpeedCheckpoint against real DeepSpeed checkpoints (tests/data/deepspeed_ckpt/, made by
make_fixture.py there with deepspeed 0.19.8): every param's fp32 master must equal DeepSpeed's own
consolidation bit for bit, and broken folders must be refused with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_zero.checkpoint.deepspeed_format import (
    DeepSpeedCheckpoint,
    DeepSpeedCheckpointError,
    IncompleteCheckpoint,
    NotADeepSpeedCheckpoint,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "deepspeed_ckpt"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
CASES = {case["path"]: case for case in MANIFEST["cases"]}
FROZEN = "model.layers.0.mlp.up_proj.weight"


def _reference(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(DATA / path / "reference_fp32.safetensors"))


def _expected_params(case: dict) -> list[tuple[str, torch.Size]]:
    """The trainable params in DeepSpeed's packing order: the fixture's two optimizer groups
    (matrices, then biases and norms), each in ``named_parameters()`` order, tied pairs once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=66, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=case["tie"], mlp_bias=case["mlp_bias"],
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = [(n, p.shape) for n, p in model.named_parameters() if n != case["frozen"]]
    no_decay = [(n, s) for n, s in params if "norm" in n or n.endswith("bias")]
    return [(n, s) for n, s in params if (n, s) not in no_decay] + no_decay


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request) -> dict:
    return CASES[request.param]


@pytest.fixture
def ckpt(case) -> DeepSpeedCheckpoint:
    return DeepSpeedCheckpoint(str(DATA / case["path"]))


def _copy(tmp_path: Path, path: str) -> Path:
    """A writable copy of one fixture checkpoint; returns its tag folder (global_stepN/)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(DATA / path, dst)
    return dst / CASES[path]["tag"]


# ---- reading ------------------------------------------------------------------------------------


def test_stage_and_world_size(case, ckpt):
    assert (ckpt.stage, ckpt.world_size) == (case["stage"], case["world_size"])


def test_names_and_shapes_in_packing_order(case, ckpt):
    expected = _expected_params(case)
    assert ckpt.names() == [n for n, _ in expected]
    assert [ckpt.shape(n) for n in ckpt.names()] == [s for _, s in expected]


def test_every_param_equals_deepspeeds_fp32_master(case, ckpt):
    ref = _reference(case["path"])
    for name in ckpt.names():
        value = ckpt.load_fp32(name)
        assert value.dtype == torch.float32 and value.shape == ckpt.shape(name), name
        assert torch.equal(value, ref[name]), name


def test_tag_folder_reads_the_same_as_its_parent(case, ckpt):
    direct = DeepSpeedCheckpoint(str(DATA / case["path"] / case["tag"]))
    assert direct.names() == ckpt.names()
    name = ckpt.names()[-1]
    assert torch.equal(direct.load_fp32(name), ckpt.load_fp32(name))


def test_load_fp32_returns_a_fresh_tensor(ckpt):
    name = ckpt.names()[0]
    first = ckpt.load_fp32(name)
    first.add_(1.0)
    assert not torch.equal(ckpt.load_fp32(name), first)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_rank_files_are_memory_mapped(case, ckpt):
    """The fp32 partitions stay in the page cache: every rank's optimizer file is mapped, not read."""
    ckpt.load_fp32(ckpt.names()[0])
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    folder = DATA / case["path"] / case["tag"]
    optim = {str(p) for p in folder.glob("*_optim_states.pt")}
    assert len(optim) == case["world_size"] and optim <= mapped


def test_tied_weight_listed_once_under_its_first_name(case, ckpt):
    if not case["tie"]:
        assert ckpt.tied_aliases() == {}
        return
    assert ckpt.tied_aliases() == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in ckpt.names() and "lm_head.weight" not in ckpt.extra_tensors()
    with pytest.raises(KeyError, match="tied to 'model.embed_tokens.weight'"):
        ckpt.load_fp32("lm_head.weight")
    ref = _reference(case["path"])
    if "lm_head.weight" in ref:  # zero_to_fp32 writes the alias too
        assert torch.equal(ckpt.load_fp32("model.embed_tokens.weight"), ref["lm_head.weight"])


def test_extra_tensors_are_buffers_and_frozen_params(case, ckpt):
    extra = ckpt.extra_tensors()
    if not case["frozen"]:
        assert extra == {}
        return
    assert sorted(extra) == sorted(["model.marker", FROZEN])
    assert torch.equal(extra["model.marker"], torch.arange(5, dtype=torch.float32) / 7)
    assert extra[FROZEN].shape == (66, 32) and extra[FROZEN].dtype == torch.bfloat16
    ref = _reference(case["path"])
    if FROZEN in ref:  # zero_to_fp32 keeps frozen params at stages 2-3 only
        assert torch.equal(extra[FROZEN], ref[FROZEN])


def test_frozen_param_is_the_same_at_every_stage():
    """Stage 1 keeps it in the module state dict, stage 2 whole in frozen_param_fragments, stage 3
    partitioned per rank: all three are the same untrained value."""
    values = [DeepSpeedCheckpoint(str(DATA / f"stage{s}" / "untied")).extra_tensors()[FROZEN] for s in (1, 2, 3)]
    assert torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])


def test_unknown_name_is_a_key_error(ckpt):
    with pytest.raises(KeyError, match="not a trainable param"):
        ckpt.load_fp32("model.nope.weight")


# ---- refusing broken folders --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, victim",
    [
        ("stage1/tied", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("stage2/untied", "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"),
        ("stage3/untied", "zero_pp_rank_1_mp_rank_00_model_states.pt"),
        ("stage2/tied", "mp_rank_00_model_states.pt"),
        ("stage3/tied", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ],
)
def test_missing_rank_file_is_named(tmp_path, path, victim):
    folder = _copy(tmp_path, path)
    (folder / victim).unlink()
    with pytest.raises(IncompleteCheckpoint, match="missing") as err:
        DeepSpeedCheckpoint(str(folder.parent))
    assert str(folder / victim) in str(err.value)


def test_rank_beyond_world_size_is_named(tmp_path):
    folder = _copy(tmp_path, "stage1/tied")
    extra = folder / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    shutil.copy(folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", extra)
    with pytest.raises(IncompleteCheckpoint, match="rank 2 in a checkpoint of world size 2") as err:
        DeepSpeedCheckpoint(str(folder))
    assert str(extra) in str(err.value)


def test_model_states_of_another_model_are_refused(tmp_path):
    folder = _copy(tmp_path, "stage1/tied")
    shutil.copy(DATA / "stage1" / "untied" / "global_step2" / "mp_rank_00_model_states.pt", folder)
    with pytest.raises(NotADeepSpeedCheckpoint, match="param_shapes need") as err:
        DeepSpeedCheckpoint(str(folder))
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in str(err.value)


def test_folder_without_deepspeed_files_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADeepSpeedCheckpoint, match="not a DeepSpeed checkpoint") as err:
        DeepSpeedCheckpoint(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(NotADeepSpeedCheckpoint, match="no such folder"):
        DeepSpeedCheckpoint(str(tmp_path / "absent"))


def test_latest_naming_a_missing_tag_is_named(tmp_path):
    (tmp_path / "latest").write_text("global_step7")
    with pytest.raises(IncompleteCheckpoint, match="global_step7") as err:
        DeepSpeedCheckpoint(str(tmp_path))
    assert str(tmp_path / "latest") in str(err.value)


def test_file_that_is_not_a_torch_checkpoint_is_named(tmp_path):
    folder = _copy(tmp_path, "stage1/tied")
    bad = folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(NotADeepSpeedCheckpoint, match="cannot be read as a torch checkpoint") as err:
        DeepSpeedCheckpoint(str(folder))
    assert str(bad) in str(err.value)


def test_tensor_parallel_files_are_refused(tmp_path):
    folder = _copy(tmp_path, "stage1/tied")
    shutil.copy(folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                folder / "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt")
    with pytest.raises(DeepSpeedCheckpointError, match="model-parallel rank 1"):
        DeepSpeedCheckpoint(str(folder))


def test_errors_are_value_errors():
    assert issubclass(DeepSpeedCheckpointError, ValueError)
