"""dp 2 x tp 2 on 4 gloo ranks, ZeRO over the dp group: the losses, the clipped global grad norm and the
trained params (tp parts gathered) equal one process's whole model on the whole batch within 1e-5."""

from __future__ import annotations

import pytest
import torch

from hf_zero.engine import ZeroEngine
from hf_zero.engine import collectives as C
from hf_zero.tensor_parallel import build_mesh, gather_split, split_model
from hf_zero.tensor_parallel.norm import engine_parts, global_norm
from hf_zero.testing.multiprocess import run_on_ranks
from tests.tensor_parallel.models import batch, tiny_llama

TOL = 1e-5
MAX_NORM = 0.5  # below the first steps' norms (about 2): clipping acts


def _half(b: dict, dp_rank: int) -> dict:
    return {k: v[2 * dp_rank : 2 * dp_rank + 2] for k, v in b.items()}


def _parity(rank, world, stage):
    mesh = build_mesh(2, "cpu")
    ref, model = tiny_llama(), tiny_llama()
    layout = split_model(model, mesh.tp_group)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), stage=stage, bucket_numel=3000,
                        group=mesh.dp_group)
    assert engine.ctx.world_size == 2  # ZeRO over dp only
    tp_comm, split = C.CommContext(mesh.tp_group), set(layout.split_dims)
    out = []
    for step in range(3):
        whole = batch(step, bsz=4)  # the global batch: dp rank d trains rows [2d, 2d + 2)
        loss_ref = ref(**whole).loss
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        opt_ref.step()
        opt_ref.zero_grad()
        loss = model(**_half(whole, mesh.dp_rank)).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss, group=mesh.dp_group)
        norm = global_norm(engine_parts(engine, split), tp=tp_comm, dp=engine.ctx, device=torch.device("cpu"))
        engine.clip_grad_norm_(MAX_NORM, total=norm)
        engine.optimizer.step()
        out.append((abs(mean_loss.item() / 2 - loss_ref.item()), abs(norm.item() - norm_ref.item())))
    params = dict(model.named_parameters())
    worst = 0.0
    with engine.gathered():
        for name, p in ref.named_parameters():
            mine = params[name].detach()
            if name in layout.split_dims:
                mine = gather_split(mine, layout.split_dims[name], mesh.tp_group)
            worst = max(worst, (mine - p.detach()).abs().max().item())
    return out, worst


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp2_tp2_zero_matches_one_process(stage):
    for steps, worst in run_on_ranks(_parity, 4, stage, timeout=300):
        for loss_diff, norm_diff in steps:
            assert loss_diff < TOL and norm_diff < TOL, steps
        assert worst < TOL, worst


def _checkpoint_refused(rank, world, directory):
    from hf_zero.checkpoint import sharded
    from hf_zero.engine.stages import NotAvailableYet

    mesh = build_mesh(2, "cpu")
    model = tiny_llama()
    split_model(model, mesh.tp_group)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), stage=2, bucket_numel=3000, group=mesh.dp_group)
    messages = []
    for call in (lambda: sharded.save(engine, directory), lambda: sharded.load(engine, directory)):
        try:
            call()
        except NotAvailableYet as e:
            messages.append(str(e))
    return messages


def test_sharded_checkpoint_of_a_dp_group_engine_is_refused(tmp_path):
    """The checkpoint files name ranks of the whole world and one tensor per param name: an engine over tp's
    dp group is refused before anything is written."""
    for messages in run_on_ranks(_checkpoint_refused, 4, str(tmp_path), timeout=180):
        assert len(messages) == 2 and all("2 of the 4 ranks" in m and "not built yet" in m for m in messages)
    assert not any(tmp_path.iterdir())
