"""Stage-3 ``save_model`` streams the weights unit by unit (hf_zero/checkpoint/hf_save.py) into the
very files ``save_pretrained`` writes for the same model, whole, on one process.

On 2 gloo ranks, for a tiny Llama with tied and with untied embeddings and a tiny T5 (tied
encoder/decoder/LM-head embeddings): after a few training steps, rank 0's folder holds the same
files as ``save_pretrained`` of a gathered copy, byte for byte (keys, shapes, dtypes, data,
config and generation config), plus the Trainer's ``training_args.bin``; plain
``from_pretrained`` gives the trained model's logits. With a small max shard size, the numbered
shards and the index equal ``save_pretrained``'s too.

Memory: during the save the full state dict is never gathered (``full_state_dict`` is not
called), and whenever a tensor is written, the params gathered at that moment are at most one
unit's (the largest unit, here a decoder layer: 1/5 of a 4-layer model's trainable bytes).

A Mixtral model (transformers 5.x fuses its experts in memory and ``save_pretrained`` writes them
back per expert, computed from the fused tensors) cannot be planned from shapes: it is saved the
old way (full gather, then ``save_pretrained``), announced by one warning, and its files again
equal ``save_pretrained``'s.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MixtralConfig, Seq2SeqTrainer,
                          T5ForConditionalGeneration, Trainer)

import hf_zero.trainer as zt
from hf_zero.checkpoint import hf_save
from hf_zero.checkpoint.safetensors_stream import StreamingWriter
from hf_zero.engine.stage3.units import ParamUnit, UnitState
from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny

KINDS = ["llama_tied", "llama_untied", "t5"]
SMALL_SHARD = 12_000  # bytes: several numbered shards for every tiny model here
PROBE = torch.tensor([[1, 5, 9, 2, 7, 3]])
TRAINER_FILES = {"training_args.bin", "hf_zero_report.json"}  # the Trainer's, and hf_zero's run report


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "t5":
        return tiny.t5(0)
    if kind == "mixtral":
        cfg = MixtralConfig(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=tiny.SEQ, tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=tiny.SEQ,
                          tie_word_embeddings=kind == "llama_tied")
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def _logits(model, kind: str) -> list:
    model.eval()
    with torch.no_grad():
        if kind == "t5":
            return model(input_ids=PROBE, decoder_input_ids=PROBE[:, :3]).logits.tolist()
        return model(input_ids=PROBE).logits.tolist()


class _Meter:
    """Counts, during a save, the params gathered whenever a tensor is written, and the writes."""

    def __init__(self, engine):
        self.engine, self.gathered_at_write, self.largest_write, self.writes = engine, 0, 0, 0

    def __enter__(self):
        meter, self._write, self._full = self, StreamingWriter.write, self.engine.full_state_dict

        def write(writer, name, tensor):
            held = sum(u.buffer.data.numel() * u.buffer.data.element_size()
                       for u in _sharded_units(meter.engine) if u.state is UnitState.UNSHARDED)
            meter.gathered_at_write = max(meter.gathered_at_write, held)
            meter.largest_write = max(meter.largest_write, tensor.numel() * tensor.element_size())
            meter.writes += 1
            return meter._write(writer, name, tensor)

        def no_full_gather(*args, **kwargs):
            raise AssertionError("the streamed save gathered the full state dict")

        StreamingWriter.write = write
        self.engine.full_state_dict = no_full_gather
        return self

    def __exit__(self, *exc):
        StreamingWriter.write = self._write
        del self.engine.full_state_dict


def _sharded_units(engine) -> list[ParamUnit]:
    """Units whose params are sharded between uses (not a persistent unit: always whole)."""
    return [u for u in engine.units if not getattr(u, "persistent", False)]


def _unit_bytes(unit: ParamUnit) -> int:
    return unit.bucket.range.size * torch.empty((), dtype=unit.buffer.dtype).element_size()


def _scenario(rank, world, root, kind):
    def run():
        model = _model(kind)
        out = tiny.out_dir(root, kind, "saved")
        if kind == "t5":
            trainer = Seq2SeqTrainer(model=model, args=tiny.args(out, seq2seq=True, max_steps=2),
                                     train_dataset=tiny.s2s_rows(8))
        else:
            trainer = Trainer(model=model, args=tiny.args(out, max_steps=2), train_dataset=tiny.lm_rows(8))
        trainer.train()
        engine = zt.session_of(trainer).engine
        result = {"out": out, "small": tiny.out_dir(root, kind, "small"), "ref": tiny.out_dir(root, kind, "ref"),
                  "ref_small": tiny.out_dir(root, kind, "ref_small")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if kind == "mixtral":
                trainer.save_model()
                trainer.save_model()  # the fallback is announced once
            else:
                with _Meter(engine) as meter:
                    trainer.save_model()
                result.update(gathered_at_write=meter.gathered_at_write, largest_write=meter.largest_write,
                              writes=meter.writes, largest_unit=max(_unit_bytes(u) for u in _sharded_units(engine)),
                              trainable=sum(_unit_bytes(u) for u in engine.units))
        result["warnings"] = [str(w.message) for w in caught if "hf_zero" in str(w.message)]
        if kind != "mixtral":  # sharded again after the save
            assert all(p.numel() == 0 for p in model.parameters() if p.requires_grad)
        if kind != "mixtral":  # a small max shard size, through the streamed writer itself
            plan = hf_save.plan_save(model, engine.units, max_shard_size=SMALL_SHARD)
            hf_save.save_streamed(model, engine.units, plan, result["small"], writer=rank == 0)
        full = engine.full_state_dict(to_cpu_on=0)
        if rank == 0:  # the reference: save_pretrained of a gathered copy, on one process
            ref = type(model)(copy.deepcopy(model.config))
            ref.generation_config = copy.deepcopy(model.generation_config)  # the trained model's, not one from its config
            ref.load_state_dict(full)
            ref.save_pretrained(result["ref"])
            ref.save_pretrained(result["ref_small"], max_shard_size=SMALL_SHARD)
        result["logits"] = _logits(model, kind)  # gathered by the forward hooks
        return result

    # Threshold 0: every param sharded, none in a persistent unit (tiny params all fall under the
    # default threshold); mixtral keeps the default, so a persistent unit is saved too.
    zero = {"stage": 3} if kind == "mixtral" else {"stage": 3, "stage3_param_persistence_threshold": 0}
    zt.activate({"zero_optimization": zero})
    try:
        return run()
    finally:
        zt.deactivate()


def _scenarios(rank, world, root, kinds):
    return {kind: _scenario(rank, world, root, kind) for kind in kinds}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every rank's ``_scenario`` result by kind, every kind in one rank start (mixtral, whose fallback
    warns, last)."""
    root = str(tmp_path_factory.mktemp("streamed"))
    ranks = run_on_ranks(_scenarios, 2, root, KINDS + ["mixtral"], timeout=600)
    return {kind: [r[kind] for r in ranks] for kind in ranks[0]}


def _same_folder(got: str, ref: str, extra: set[str] = frozenset()) -> list[str]:
    """``got`` holds ``ref``'s files byte for byte (plus ``extra``); returns the weight files."""
    assert set(os.listdir(got)) == set(os.listdir(ref)) | extra, (sorted(os.listdir(got)), sorted(os.listdir(ref)))
    for name in os.listdir(ref):
        with open(os.path.join(got, name), "rb") as a, open(os.path.join(ref, name), "rb") as b:
            mine, theirs = a.read(), b.read()
        if name.endswith(".safetensors"):  # say what differs before comparing every byte
            from safetensors import safe_open

            with safe_open(os.path.join(got, name), "pt") as a, safe_open(os.path.join(ref, name), "pt") as b:
                assert sorted(a.keys()) == sorted(b.keys()), name
                for key in b.keys():
                    x, y = a.get_tensor(key), b.get_tensor(key)
                    assert (x.shape, x.dtype) == (y.shape, y.dtype), (name, key)
                    assert torch.equal(x, y), (name, key)
        assert mine == theirs, name
    return sorted(n for n in os.listdir(ref) if n.endswith(".safetensors"))


def _reload(kind: str, path: str):
    return (T5ForConditionalGeneration if kind == "t5" else AutoModelForCausalLM).from_pretrained(path)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_save_writes_what_save_pretrained_writes(saved, kind):
    got = saved[kind][0]
    assert got["warnings"] == []  # streamed, not the fallback
    files = _same_folder(got["out"], got["ref"], extra=TRAINER_FILES)
    assert files == ["model.safetensors"]  # the Trainer's default max shard size: one file
    reloaded = _reload(kind, got["out"]).eval()  # plain transformers
    torch.testing.assert_close(torch.tensor(_logits(reloaded, kind)), torch.tensor(got["logits"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(saved[kind][1]["logits"]), torch.tensor(got["logits"]))
    if kind != "llama_untied":  # tied embeddings are written once and tied again on load
        assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_small_max_shard_size_gives_save_pretrained_shards_and_index(saved, kind):
    got = saved[kind][0]
    files = _same_folder(got["small"], got["ref_small"])
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(got["small"], "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files) and index["metadata"]["total_size"] > 0
    reloaded = _reload(kind, got["small"]).eval()
    torch.testing.assert_close(torch.tensor(_logits(reloaded, kind)), torch.tensor(got["logits"]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama_tied", "llama_untied"])
def test_no_rank_holds_the_full_model_while_saving(saved, kind):
    got = saved[kind][0]
    # Every tensor was written while at most one unit was gathered: the bound is the largest unit,
    # a decoder layer here (4 layers + the root, so well under half the trainable bytes).
    assert got["writes"] > 0
    assert 0 < got["gathered_at_write"] <= got["largest_unit"], got
    assert got["largest_unit"] < got["trainable"] / 2, got
    assert got["largest_write"] <= got["largest_unit"], got  # the host stages one tensor at a time


def test_converted_moe_falls_back_to_the_full_gather_once_warned(saved):
    got = saved["mixtral"][0]
    assert len(got["warnings"]) == 1, got["warnings"]  # two saves, one warning
    assert "revert_weight_conversion" in got["warnings"][0] and "experts" in got["warnings"][0]
    assert saved["mixtral"][1]["warnings"] == []  # once per job: rank 0 says it, rank 1 does not
    _same_folder(got["out"], got["ref"], extra=TRAINER_FILES)
    reloaded = _reload("mixtral", got["out"]).eval()
    torch.testing.assert_close(torch.tensor(_logits(reloaded, "mixtral")), torch.tensor(got["logits"]),
                               rtol=1e-5, atol=1e-6)
