"""Parameter offload on one GPU (W = 1, bf16): each unit's shards in pinned host memory, uploaded
on the gather stream before each use (prefetch on), written by the host step on the CPU, against
the same engine with optimizer offload only.

Bit for bit: both runs step the same fp32 masters on the host with the same AdamW; the bf16
params then come from the same masters, cast on the device (optimizer offload: fp32 uploaded,
cast there) or on the CPU (parameter offload: cast into the host shard, then uploaded as bf16).
Both casts round to nearest even, so every forward and backward sees the same bf16 params and the
losses, grad norms and final params are equal. A stale host shard (a step not written back), an
upload that raced the host's write, or a gather of the wrong unit would show up as a difference
in the losses within the first steps.

    pytest tests/gpu/test_param_offload.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload

pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

STEPS = 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a frozen part: one fused upload + gather
    return model.cuda()


def _run(base, param_offload: bool):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1, param_dtype=torch.bfloat16,
                        offload=OptimizerOffload("cpu", chunk_numel=200_000),
                        offload_param=ParamOffload(pin_memory=True) if param_offload else None,
                        prefetch_numel=10**9, persistence_threshold=1000)
    wrapped = ZeroModule(model, engine)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 1000, (4, 64), generator=g).cuda() for _ in range(2)]  # the same two each step
    losses, norms, held = [], [], None
    for _ in range(STEPS):
        for micro, ids in enumerate(batches):
            with (wrapped.no_sync() if micro == 0 else torch.enable_grad()):
                loss = wrapped(input_ids=ids, labels=ids).loss
                (loss / 2).backward()
            losses.append(loss.item())
        norms.append(engine.clip_grad_norm_(1.0).item())
        held = engine.held_bytes()
        opt.step()
        wrapped.zero_grad()
    with engine.gathered():
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    units = [(u.host is not None, u.persistent, u.local is None or (u.local.device.type, u.local.is_pinned()))
             for u in engine.units]
    engine.close()
    return losses, norms, params, held, units


def test_param_offload_bit_equal_to_optimizer_offload_only():
    base = _model()
    plain_losses, plain_norms, plain_params, plain_held, _ = _run(base, False)
    losses, norms, params, held, units = _run(base, True)
    assert losses == plain_losses
    assert norms == plain_norms
    for name, value in plain_params.items():
        assert torch.equal(params[name], value), name
    # every unit but the persistent one keeps pinned host shards; the device holds only the persistent params
    assert all(on_host != persistent for on_host, persistent, _ in units)
    assert all(where == ("cpu", True) for on_host, _, where in units if on_host)
    moved = plain_held["params"] - held["params"]
    assert moved > 0 and held["host_offload"] - plain_held["host_offload"] == moved
    assert losses[-1] < losses[0]  # it trains
