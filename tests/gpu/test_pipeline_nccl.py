"""Pipeline stages under NCCL, one GPU per rank: pp 2 (W 2, 1F1B) and dp 2 x pp 2 with ZeRO-2 over each
stage's dp group (W 4, interleaved 1F1B) against one process's whole model on the whole batch, fp32
with TF32 off, every step: losses and the clipped global norm within 1e-5 relative, trained params
(every stage's, from the ranks that hold them) within 1e-5.

Run on a lent machine with 2 or 4 GPUs: ``pytest -q tests/gpu/test_pipeline_nccl.py``. Its CPU twin
(``_run`` on gloo ranks) passes; the Trainer path is tests/pipeline/test_trainer.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hf_zero.engine import ZeroEngine
from hf_zero.pipeline import build
from hf_zero.tensor_parallel.mesh import build_pp_mesh
from hf_zero.testing.multiprocess import run_on_ranks
from tests.tensor_parallel.models import batch, tiny_llama

TOL = 1e-5
MAX_NORM = 0.5
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4)


def _run(rank, world, device_type="cuda"):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    mesh = build_pp_mesh(2, device_type)
    schedule = "1F1B" if mesh.dp == 1 else "interleaved_1F1B"
    ref, model = tiny_llama(**TINY).to(device), tiny_llama(**TINY).to(device)
    runner = build(model, stages=2, schedule=schedule, group=mesh.pp_group, device=device)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000, group=mesh.dp_group) if mesh.dp > 1 else None
    out = []
    for step in range(3):
        whole = {k: v.to(device) for k, v in batch(step, bsz=4 * mesh.dp).items()}
        loss_ref = ref(**whole).loss
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        opt_ref.step()
        opt_ref.zero_grad()
        mine = {k: v[4 * mesh.dp_rank: 4 * mesh.dp_rank + 4] for k, v in whole.items()}
        tokens = (whole["labels"][:, 1:] != -100).sum()
        loss = runner.train_step(mine, 4, tokens=tokens, dp=mesh.dp)
        local = engine.grad_norm() if engine is not None else torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters()])
        square = local.float().pow(2)
        dist.all_reduce(square, group=mesh.pp_group)
        norm = square.sqrt()
        if engine is None:
            torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), MAX_NORM, norm)
        else:
            engine.clip_grad_norm_(MAX_NORM, total=norm)
        opt.step()
        if engine is None:
            opt.zero_grad()
        dist.all_reduce(loss, group=mesh.dp_group)  # each share is (its token losses / tokens) * dp
        out.append((loss.item() / mesh.dp, loss_ref.item(), norm.item(), norm_ref.item()))
    ref_params = dict(ref.named_parameters())
    worst = max((p.detach() - ref_params[n].detach()).abs().max().item() for n, p in model.named_parameters())
    return out, worst, sorted(n for n, _ in model.named_parameters())


def check(results, names):
    held = set()
    for steps, worst, mine in results:
        for loss, loss_ref, norm, norm_ref in steps:
            assert abs(loss - loss_ref) <= TOL * abs(loss_ref) and abs(norm - norm_ref) <= TOL * norm_ref, steps
        assert worst < TOL, worst
        held |= set(mine)
    assert held == set(names)  # every param is on some stage


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_under_nccl_matches_one_process(world):
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    check(run_on_ranks(_run, world, timeout=300, backend="nccl"), [n for n, _ in tiny_llama(**TINY).named_parameters()])
