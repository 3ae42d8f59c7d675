"""Stage 3 with frozen params (PEFT LoRA's base, or layers frozen by hand), against DDP (CPU gloo, W=2).

Frozen params are sharded in their units' frozen buffers (unit_buffer.py): gathered with the unit,
never reduced, never in the optimizer. Models:
- ``lora``: a 3-layer tiny Llama with LoRA (q_proj, v_proj, B initialised non-zero) on layers 0
  and 2 only, so layer 1 is a unit of frozen params alone; embeddings, norms, MLPs are frozen.
- ``manual``: the 3-layer tiny Llama with layer 1 frozen whole, plus one frozen weight in layer 0
  and the (tied) embeddings frozen.
Per step without prefetch, the frozen-only layer 1 is gathered once in forward and once in
backward, one all-gather each (it has one part).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.stage3.units import UnitState
from hf_zero.engine.diagnostics.watchdog import RECORDER
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama
from tests.engine.test_parity import _optimizer, _rel

STEPS, ACCUM, RTOL = 6, 2, 1e-5


def _model(kind: str):
    model = tiny_llama(0, layers=3)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2],
                            init_lora_weights=False, task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    model.model.layers[1].requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


def _layers(model):
    return (model.base_model.model if hasattr(model, "peft_config") else model).model.layers


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _run(rank, world, kind, reentrant, save_dir=None):
    ref = _model(kind)
    model = copy.deepcopy(ref)
    if reentrant is not None:
        for m in (ref, model):
            m.gradient_checkpointing_enable({"use_reentrant": reentrant})
            m.enable_input_require_grads()  # as the Trainer does for PEFT + checkpointing
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ddp = DDP(ref)
    ref_opt, opt = _optimizer(ref, "adamw"), _optimizer(model, "adamw")
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1)
    wrapped = ZeroModule(model, engine)
    frozen_only = [u for u in engine.units if u.module is _layers(model)[1]]
    assert len(frozen_only) == 1 and frozen_only[0].buffer is None and frozen_only[0].frozen
    out = {"gathers": [], "states": [], "during": [], "per_unit": []}

    def probe(module, args, output):  # in layer 0's backward, layer 1's is over: it must be released
        t = output[0] if isinstance(output, tuple) else output
        if t.requires_grad:
            t.register_hook(lambda _: out["during"].append(frozen_only[0].state.name))

    _layers(model)[0].self_attn.register_forward_hook(probe)
    vocab = model.config.vocab_size
    for step in range(STEPS):
        first = RECORDER.seq
        for micro in range(ACCUM):
            inputs = batch(rank, step, micro, vocab)
            last = micro == ACCUM - 1
            with ddp.no_sync() if not last else torch.enable_grad():
                loss_ref = ddp(**inputs).loss / ACCUM
                loss_ref.backward()
            with wrapped.no_sync() if not last else torch.enable_grad():
                loss = wrapped(**inputs).loss / ACCUM
                loss.backward()
            assert abs(loss.item() - loss_ref.item()) <= RTOL * abs(loss_ref.item()), (step, micro, loss, loss_ref)
        norm_ref = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 1.0)
        norm = engine.clip_grad_norm_(1.0)
        assert abs(norm.item() - norm_ref.item()) <= RTOL * norm_ref.item(), (step, norm, norm_ref)
        ref_opt.step(); ref_opt.zero_grad()
        opt.step(); wrapped.zero_grad()
        out["gathers"].append(sum(1 for r in RECORDER.recent(256)
                                  if r.seq > first and r.kind == "all_gather" and r.label == frozen_only[0].label))
        labels = [r.label for r in RECORDER.recent(256) if r.seq > first and r.kind == "all_gather"]
        out["per_unit"].append({u.label: labels.count(u.label) for u in engine.units if not u.persistent})
        out["states"].append([u.state.name for u in engine.units if not u.persistent])
        # (1) between steps every frozen param is a shard
        assert all(p.numel() == 0 for p in model.parameters() if not p.requires_grad)
        with engine.gathered():
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert _rel(p.detach(), q.detach()) <= RTOL, (step, name, _rel(p, q))
                if not p.requires_grad:
                    assert torch.equal(p.detach(), frozen_before[name]), name
    held = engine.held_bytes()
    frozen_parts = [part for u in engine.units for part in u.frozen]
    out["frozen_local"] = sum(_nbytes(part.local) for part in frozen_parts)
    out["frozen_padded"] = sum(part.numel * part.local.element_size() for part in frozen_parts)
    out["frozen_full"] = sum(_nbytes(p) for p in frozen_before.values())
    out["frozen_params"] = len(frozen_before)
    out["trainable_local"] = sum(_nbytes(u.local) for u in engine.units if u.local is not None)
    out["held_params"] = held["params"]
    out["pieces"] = sum(len(g["params"]) for g in opt.param_groups)
    out["trainable"] = sum(1 for p in model.parameters() if p.requires_grad)
    # (4) the full state dict is the unsharded model's
    full = engine.full_state_dict(to_cpu_on=None)
    want = ref.state_dict()
    assert sorted(full) == sorted(want)
    for key, value in want.items():
        assert full[key].dtype == value.dtype and _rel(full[key].float(), value.float()) <= RTOL, key
    if save_dir is not None:
        from hf_zero.checkpoint import hf_save

        plan = hf_save.plan_save(model, engine.units)
        hf_save.save_streamed(model, engine.units, plan, save_dir, writer=rank == 0)
        torch.distributed.barrier()
    engine.close()
    return out


@pytest.mark.parametrize("kind,reentrant", [("lora", None), ("lora", True), ("lora", False), ("manual", False)])
def test_frozen_sharded_parity_with_ddp(kind, reentrant):
    world = 2
    for r in run_on_ranks(_run, world, kind, reentrant, timeout=400):
        # (2) parity is asserted in the ranks; (3) the frozen-only layer: gathered in forward and
        # backward (a checkpointed layer is gathered in backward for its recompute), one all-gather
        # each and per micro-step, and released after each step
        assert r["gathers"] == [2 * ACCUM] * STEPS, r["gathers"]
        assert all(s == "SHARDED" for states in r["states"] for s in states), r["states"]
        for counts in r["per_unit"]:  # one all-gather per unit and gather: its parts share one dtype
            assert all(n == (ACCUM if "root" in label else 2 * ACCUM) for label, n in counts.items()), counts
        assert r["during"] == ["SHARDED"] * (STEPS * ACCUM), r["during"]  # released before backward ends
        # (1) frozen shards: 1/W of the padded frozen buffers, within alignment padding of the params
        assert r["frozen_local"] * world == r["frozen_padded"]
        assert r["frozen_full"] <= r["frozen_padded"] < r["frozen_full"] + 4 * 32 * (r["frozen_params"] + 4 * world)
        assert r["held_params"] == r["frozen_local"] + r["trainable_local"]
        # only trainable params are in the optimizer (one piece each at most)
        assert r["pieces"] <= r["trainable"]


def test_streamed_save_writes_frozen_params(tmp_path):
    from safetensors.torch import load_file

    run_on_ranks(_run, 2, "manual", None, str(tmp_path), timeout=400)
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    ref = _model("manual")
    want = ref.state_dict()
    frozen = {n for n, p in ref.named_parameters() if not p.requires_grad}
    assert frozen and frozen <= set(saved)
    for name in frozen:  # frozen values never change
        assert torch.equal(saved[name], want[name]), name
    assert set(saved) <= set(want)


def _mixed_dtypes(rank, world):
    """fp32 adapters on a bf16 base: frozen buffers stay bf16, gathered by a second all-gather."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(0, layers=2).to(torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1)
    layer = [u for u in engine.units if u.buffer is not None and not u.root][0]
    dtypes = (layer.buffer.dtype, [part.buffer.dtype for part in layer.frozen])
    engine.ctx.take_counts()
    layer.unshard()
    gathers = engine.ctx.take_counts()["all_gather"]
    layer.reshard()
    full = engine.full_state_dict(to_cpu_on=None)
    same = all(torch.equal(full[k], v) for k, v in want.items())
    engine.close()
    return dtypes, gathers, same


def test_bf16_base_with_fp32_adapters():
    for dtypes, gathers, same in run_on_ranks(_mixed_dtypes, 2, timeout=200):
        assert dtypes == (torch.float32, [torch.bfloat16])
        assert gathers == 2  # one per dtype, launched together
        assert same


def _train_frozen(rank, world, out):
    import hf_zero.trainer as zt
    from transformers import Trainer, TrainingArguments

    model = _model("manual")
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, model.config.vocab_size, (16, 12), generator=g)]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=2, save_steps=2,
                             per_device_train_batch_size=2, learning_rate=1e-2, disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": 3, "param_persistence_threshold": 0}})  # every frozen param sharded
    try:
        Trainer(model=model, args=args, train_dataset=data).train()
    finally:
        zt.deactivate()


def test_sharded_checkpoint_consolidates_frozen_shards(tmp_path):
    """The Trainer's checkpoint: its sharded part stores the frozen shards (``extra/``), and
    consolidates to what the Trainer saved (the streamed save, frozen params included)."""
    from safetensors.torch import load_file

    from hf_zero.checkpoint.consolidate import consolidate

    run_on_ranks(_train_frozen, 2, tmp_path / "run", timeout=300)
    ckpt = tmp_path / "run" / "checkpoint-2"
    consolidate(str(ckpt / "hf_zero_sharded"), str(tmp_path / "out"), dtype="fp32")
    ours, trainers = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert sorted(ours) == sorted(trainers)
    want = _model("manual").state_dict()
    for name in trainers:
        assert torch.equal(ours[name], trainers[name]), name
    assert torch.equal(trainers["model.layers.1.mlp.up_proj.weight"], want["model.layers.1.mlp.up_proj.weight"])
