"""Stage 3: what of the gathered units autograd keeps from forward to backward (CPU gloo ranks).

Autograd saves views of the weights for backward (``nn.Linear`` saves ``weight.t()``; a view keeps the
storage it was made on). Each unit gathers into one full tensor whose storage its release frees
([Note: full storage] in hf_zero/engine/stage3/unit_buffer.py), so at the end of forward the views
saved by every layer point at freed storage, and only the root (held from its forward to its
backward by design: embeddings, final norm, tied LM head) is still there. With a new tensor per
gather every layer's full params stayed alive until backward: the whole model at W = 2 (and at W = 1
with parameter offload), whatever stage 3's sharding.

The census: a ``saved_tensors_hooks`` pack hook notes each tensor autograd saves whose storage is one
of the units' full tensors at that moment; at the end of forward the bytes those storages still hold
are summed per unit. Bound: the root unit's full bytes, whatever the prefetch (prefetches not used by
the end of forward are dropped: [Note: prefetch] in units.py). Then backward and the optimizer step
run, which read the re-gathered storage (their values: the parity tests, test_prefetch.py,
test_stage3_frozen.py, test_param_offload.py).

W = 1 without parameter offload is not here: each unit's shard is then the whole unit and its params
stay views of it, never released (``single`` in units.py), so the whole model is held by design.
"""

from __future__ import annotations

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.engine.stage3.units import UnitState
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama

LAYERS, STEPS = 4, 2


def _freeze(model: torch.nn.Module) -> None:
    """A LoRA-like base: every layer's projections frozen, and layer 0 wholly frozen (a unit of frozen
    params only); norms stay trainable."""
    for name, p in model.named_parameters():
        if name.startswith("model.layers.0.") or ("layers." in name and "proj" in name):
            p.requires_grad_(False)


def _full_storages(engine) -> dict[int, int]:
    """Storage of every gathered full tensor of a released-between-uses unit -> the unit's index."""
    out = {}
    for unit in engine.units:
        if unit.persistent:
            continue
        for part in unit.parts:
            if part.buffer.data is not None:
                out[part.buffer.data.untyped_storage()._cdata] = unit.index
    return out


def _census(rank, world, frozen, param_offload, prefetch, checkpointing, nvme_dir):
    model = tiny_llama(0, layers=LAYERS)
    if frozen:
        _freeze(model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    offload = {}
    if param_offload is not None:
        offload = {"offload": OptimizerOffload("cpu"),
                   "offload_param": ParamOffload(param_offload, nvme_path=nvme_dir if param_offload == "nvme" else None)}
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1, prefetch_numel=prefetch, **offload)
    wrapped = ZeroModule(model, engine)
    unit_bytes = {u.index: sum(part.numel * part.buffer.dtype.itemsize for part in u.parts)
                  for u in engine.units if not u.persistent}
    root = next(u.index for u in engine.units if u.root)
    steps = []
    for step in range(STEPS):
        saved: dict[int, tuple[int, torch.Tensor]] = {}

        def pack(t):
            unit = _full_storages(engine).get(t.untyped_storage()._cdata)
            if unit is not None:
                saved[t.untyped_storage()._cdata] = (unit, t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = wrapped(**batch(rank, step, 0, model.config.vocab_size)).loss
        alive: dict[int, int] = {}
        for unit, t in saved.values():
            alive[unit] = alive.get(unit, 0) + t.untyped_storage().nbytes()
        gathered = sorted(u.index for u in engine.units if not u.persistent and u.state is not UnitState.SHARDED)
        steps.append({"seen": sorted({u for u, _ in saved.values()}), "alive": alive, "gathered": gathered})
        saved.clear()
        loss.backward()
        engine.optimizer.step()
        wrapped.zero_grad()
        steps.append({"loss": loss.item()})
    engine.close()
    return {"steps": steps, "unit_bytes": unit_bytes, "root": root}


CASES = {  # id: (world, frozen, param offload, prefetch elements, gradient checkpointing (use_reentrant))
    "w2": (2, False, None, 0, None),
    "w2-frozen": (2, True, None, 0, None),
    "w2-prefetch": (2, False, None, 10**9, None),
    "w2-cpu-offload": (2, False, "cpu", 0, None),
    "w2-nvme-frozen": (2, True, "nvme", 0, None),
    "w1-cpu-offload": (1, False, "cpu", 0, None),
    "w1-nvme-frozen": (1, True, "nvme", 0, None),
    "w2-checkpointing": (2, False, None, 0, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_keeps_only_the_root_gathered_for_backward(case, tmp_path):
    world, frozen, param_offload, prefetch, checkpointing = CASES[case]
    results = run_on_ranks(_census, world, frozen, param_offload, prefetch, checkpointing, str(tmp_path),
                           timeout=300)
    for r in results:
        root, unit_bytes = r["root"], r["unit_bytes"]
        layers = sorted(u for u in unit_bytes if u != root)
        assert len(layers) == LAYERS, unit_bytes
        for step in r["steps"][::2]:
            # The root is all that stays gathered, and all that autograd's saved views still hold.
            assert step["gathered"] == [root], step
            held = sum(step["alive"].values())
            assert held <= unit_bytes[root], (case, step["alive"], unit_bytes)
            assert all(step["alive"][u] == 0 for u in layers if u in step["alive"]), (case, step["alive"])
            if checkpointing is None:
                # Not vacuous: every layer's weights were saved for backward, from its gathered storage
                # (with checkpointing the layers save nothing in forward: they recompute in backward).
                assert set(layers) <= set(step["seen"]), (case, step["seen"], layers)
        losses = [s["loss"] for s in r["steps"][1::2]]
        assert all(torch.isfinite(torch.tensor(losses))), losses
