"""Stage 3 device memory during forward on the GPU: the layers' full params are gone after their
forward, though autograd saved views of them for backward ([Note: full storage] in
hf_zero/engine/stage3/unit_buffer.py; the CPU census: tests/engine/test_stage3_memory.py).

Model: a bf16 Llama whose layers are large (6 x 12.6M params, 25 MB each) and whose activations are
small (1 x 32 tokens: about 1 MB per layer), so the bounds below are the params':

* W = 1 with parameter offload (the shards in pinned host memory; without it, W = 1 holds the whole
  model by design: each unit's shard is the whole unit). Measured from just before the forward of
  step 2 (allocator warm, grads of step 1 freed):
  - held at the end of forward <= the root's full params (embeddings + final norm + LM head; held
    from its forward to its backward) + SLACK; before the fix it was the root + every layer;
  - peak during forward <= the root + 2 layers (the one in use + one prefetched: ``prefetch_numel``
    = one layer) + SLACK.
* W = 2 (two GPUs, NCCL; skipped with fewer): the same, each rank holding its shards besides.

Values: the prefetched run's losses (gathers on the gather stream, one layer ahead) equal the
unprefetched one's bit for bit, over steps whose backward reads the re-gathered storage: a backward
that read freed or reused storage would show here.

    pytest tests/gpu/test_stage3_memory_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.testing.multiprocess import run_on_ranks

pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

LAYERS, STEPS = 6, 3
SLACK = 16 << 20  # activations (about 1 MB a layer), logits, the allocator's rounding


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)


def _run(base, world: int, prefetch_layers: int) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    model = copy.deepcopy(base).to(device)
    layer_numel = sum(p.numel() for p in model.model.layers[0].parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    offload = {} if world > 1 else {"offload": OptimizerOffload("cpu"), "offload_param": ParamOffload(pin_memory=True)}
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1, param_dtype=torch.bfloat16,
                        prefetch_numel=prefetch_layers * layer_numel, **offload)
    wrapped = ZeroModule(model, engine)
    root = next(u for u in engine.units if u.root)
    root_bytes = sum(part.numel * part.buffer.dtype.itemsize for part in root.parts)
    layer_bytes = max(sum(part.numel * part.buffer.dtype.itemsize for part in u.parts)
                      for u in engine.units if not u.root and not u.persistent)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 1000, (1, 32), generator=g).to(device) for _ in range(STEPS)]
    losses, held, peak = [], None, None
    for step in range(STEPS):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = wrapped(input_ids=ids[step], labels=ids[step]).loss
        if step == 1:
            held = torch.cuda.memory_allocated() - before
            peak = torch.cuda.max_memory_allocated() - before
        loss.backward()
        opt.step()
        wrapped.zero_grad()
        losses.append(loss.item())
    engine.close()
    return {"losses": losses, "held": held, "peak": peak, "root": root_bytes, "layer": layer_bytes,
            "model": sum(p.numel() for p in base.parameters()) * 2}


def _check(r: dict) -> None:
    assert r["held"] <= r["root"] + SLACK, (
        f"{r['held'] / 2**20:.1f} MiB held after forward; root {r['root'] / 2**20:.1f} MiB, "
        f"model {r['model'] / 2**20:.1f} MiB: the layers' gathered params outlived their forward")
    assert r["peak"] <= r["root"] + 2 * r["layer"] + SLACK, (r["peak"], r["root"], r["layer"])


def test_w1_param_offload_frees_each_layer_after_its_forward():
    base = _model()
    runs = [_run(base, 1, prefetch) for prefetch in (0, 1)]
    for r in runs:
        _check(r)
    assert runs[0]["losses"] == runs[1]["losses"]
    assert all(torch.isfinite(torch.tensor(runs[0]["losses"])))


def _rank(rank, world):
    base = _model()
    return [_run(base, world, prefetch) for prefetch in (0, 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_w2_frees_each_layer_after_its_forward():
    for runs in run_on_ranks(_rank, 2, timeout=600, backend="nccl"):
        for r in runs:
            _check(r)
        assert runs[0]["losses"] == runs[1]["losses"]
        assert all(torch.isfinite(torch.tensor(runs[0]["losses"])))
