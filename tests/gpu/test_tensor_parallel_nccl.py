"""Tensor parallelism under NCCL, one GPU per rank: tp 2 (W 2) and dp 2 x tp 2 with ZeRO-2 over the dp
group (W 4) against one process's whole model on the whole batch, fp32 with TF32 off, every step: losses
and the clipped global norm within 1e-5 relative, trained params (tp parts gathered) within 1e-5.

Run on a lent machine with 2 or 4 GPUs: ``pytest -q tests/gpu/test_tensor_parallel_nccl.py``."""

from __future__ import annotations

import pytest
import torch

from hf_zero.engine import ZeroEngine
from hf_zero.engine import collectives as C
from hf_zero.tensor_parallel import build_mesh, gather_split, split_model
from hf_zero.tensor_parallel.norm import engine_parts, global_norm, module_parts
from hf_zero.testing.multiprocess import run_on_ranks
from tests.tensor_parallel.models import batch, tiny_llama

TOL = 1e-5
MAX_NORM = 0.5


def _run(rank, world):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mesh = build_mesh(2, "cuda")
    ref, model = tiny_llama().cuda(), tiny_llama().cuda()
    layout = split_model(model, mesh.tp_group)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000, group=mesh.dp_group) if mesh.dp > 1 else None
    tp_comm, split = C.CommContext(mesh.tp_group), set(layout.split_dims)
    out = []
    for step in range(3):
        whole = {k: v.cuda() for k, v in batch(step, bsz=2 * mesh.dp).items()}
        loss_ref = ref(**whole).loss
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        opt_ref.step()
        opt_ref.zero_grad()
        mine = {k: v[2 * mesh.dp_rank : 2 * mesh.dp_rank + 2] for k, v in whole.items()}
        loss = model(**mine).loss
        loss.backward()
        if engine is None:
            norm = global_norm(module_parts(model, split), tp=tp_comm, dp=None, device=loss.device)
            torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), MAX_NORM, norm)
        else:
            norm = global_norm(engine_parts(engine, split), tp=tp_comm, dp=engine.ctx, device=loss.device)
            engine.clip_grad_norm_(MAX_NORM, total=norm)
        opt.step()
        if engine is None:
            opt.zero_grad()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean, group=mesh.dp_group)
        out.append((mean.item() / mesh.dp, loss_ref.item(), norm.item(), norm_ref.item()))
    params = dict(model.named_parameters())
    worst = 0.0
    for name, p in ref.named_parameters():
        got = params[name].detach()
        if name in layout.split_dims:
            got = gather_split(got, layout.split_dims[name], mesh.tp_group)
        worst = max(worst, (got - p.detach()).abs().max().item())
    return out, worst


@pytest.mark.parametrize("world", [2, 4])
def test_tp2_under_nccl_matches_one_process(world):
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    for steps, worst in run_on_ranks(_run, world, timeout=300, backend="nccl"):
        for loss, loss_ref, norm, norm_ref in steps:
            assert abs(loss - loss_ref) <= TOL * abs(loss_ref) and abs(norm - norm_ref) <= TOL * norm_ref, steps
        assert worst < TOL, worst
