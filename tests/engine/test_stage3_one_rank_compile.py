"""Stage 3 at one rank, shards on the device: no unit hooks ([Note: nothing to gather] in
unit_strategy.py), so a compiled model is one graph as at stage 2, and its losses and params are
eager stage 3's.

Against eager stage 3 on a copy of the model (aot_eager runs the same aten ops): three optimizer
steps, losses and updated params within 1e-5; dynamo makes as many graphs and breaks as for the
plain model compiled alone (the unit hooks, eager, broke it into one graph per unit). With
parameter offload the shards live on the host, so the hooks are still there to upload them.
"""

from __future__ import annotations

import copy

import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import ParamOffload
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch, tiny_llama

STEPS = 3


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def _train(model: torch.nn.Module, compiled: bool, offload: bool = False) -> tuple[list[float], dict, dict, list]:
    """STEPS steps of stage 3; losses, params, dynamo's counts, and the model's forward hooks."""
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    kwargs = {"offload_param": ParamOffload(device="cpu", pin_memory=False)} if offload else {}
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), stage=3, bucket_numel=3000, **kwargs)
    wrapped = ZeroModule(model, engine)
    forward = torch.compile(wrapped, backend="aot_eager") if compiled else wrapped
    losses = []
    for step in range(STEPS):
        loss = forward(**batch(0, 0, step, model.config.vocab_size)).loss
        loss.backward()
        engine.optimizer.step()
        engine.optimizer.zero_grad()
        losses.append(loss.item())
    hooks = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    with engine.gathered():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    counts = _counts()
    engine.close()
    return losses, params, counts, hooks


def _plain_counts(model: torch.nn.Module) -> dict[str, int]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(**batch(0, 0, 0, model.config.vocab_size)).loss.backward()
    return _counts()


def _check(rank, world):
    model = tiny_llama(0)
    plain = _plain_counts(copy.deepcopy(model))
    eager_losses, eager_params, _, eager_hooks = _train(copy.deepcopy(model), compiled=False)
    assert eager_hooks == [], f"stage 3 at one rank installed forward hooks on {eager_hooks}"
    losses, params, counts, _ = _train(copy.deepcopy(model), compiled=True)
    assert counts == plain, f"stage 3 compiled: {counts}; the plain model compiled: {plain}"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    for name, value in eager_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-7, msg=name)
    # Parameter offload: the shards are on the host, the hooks upload them.
    _, offload_params, _, offload_hooks = _train(copy.deepcopy(model), compiled=False, offload=True)
    assert offload_hooks, "stage 3 with parameter offload at one rank has no unit hooks"
    for name, value in eager_params.items():
        torch.testing.assert_close(offload_params[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_one_rank_stage3_compiles_as_one_graph_and_matches_eager():
    run_on_ranks(_check, 1, timeout=240)
