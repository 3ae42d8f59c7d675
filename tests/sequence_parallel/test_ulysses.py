"""Ulysses sequence parallelism equals the unsplit model: losses and gradients within 1e-5 (fp32, gloo).

Every rank builds the same tiny Llama (or Qwen2, Qwen3, Mistral: ``FAMILY_RUNS``, models.py; the
sliding windows of Qwen3's second layer and of Mistral's layers are shorter than a rank's slice). The reference runs the unsplit model on each data-parallel
group's batch in one process and averages the groups' gradients, as DDP over W / P ranks would. The
SP run splits each group's batch over its P ranks (batch_split.py), attends through the all-to-alls
(ulysses.py), combines the loss over the group (loss.py) and averages gradients over all W ranks:
by hand (no ZeRO) or through the ZeRO engine at stages 1-3, whose SGD step must land on the
reference's parameters.

Rank starts: the runs of one world size and sp size share one start, made once for the module (``parity``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.sequence_parallel import build_layout, enable, split_batch, token_mean
from hf_zero.testing.multiprocess import run_each, run_on_ranks
from tests.sequence_parallel.models import lm_batch, tiny_model

RTOL = 1e-5
STEPS = 2
LR = 0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _reference_step(ref, dp: int, step: int, device: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Each group's loss on its whole batch, and the gradients averaged over the groups."""
    ref.zero_grad()
    losses = []
    for group in range(dp):
        loss = ref(**_on(lm_batch(group, step), device)).loss
        (loss / dp).backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in ref.named_parameters()}


def _sp_loss(model, layout, step: int, device: str) -> torch.Tensor:
    part = split_batch(_on(lm_batch(layout.dp_rank, step), device), layout.size, layout.rank)
    local_sum = model(**part, num_items_in_batch=1).loss  # this slice's sum of token losses
    return token_mean(local_sum, part["shift_labels"], layout)


def _parity(rank, world, sp, stage, attn, family="llama", device="cpu"):
    layout = build_layout(sp)
    ref = tiny_model(family, attn).to(device)
    model = copy.deepcopy(ref)
    enable(model, layout)
    assert model.config._attn_implementation == f"hf_zero_ulysses_{attn}"
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=5000) if stage else None
    runner = ZeroModule(model, engine) if engine else model
    model.train()
    for step in range(STEPS):
        ref_losses, ref_grads = _reference_step(ref, layout.dp_size, step, device)
        loss = _sp_loss(runner, layout, step, device)
        assert abs(loss.item() - ref_losses[layout.dp_rank]) <= RTOL * abs(ref_losses[layout.dp_rank]), (
            step, loss.item(), ref_losses)
        loss.backward()
        if engine is None:  # DDP's average over all W ranks, by hand
            for name, p in model.named_parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
                assert _rel(p.grad, ref_grads[name]) <= RTOL, (step, name, _rel(p.grad, ref_grads[name]))
        ref_opt.step()
        opt.step()
        runner.zero_grad()
        with engine.gathered() if engine else torch.no_grad():
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert _rel(p.detach(), q.detach()) <= RTOL, (step, name, _rel(p.detach(), q.detach()))
    if engine:
        engine.close()
    return loss.item()


# The other model families issue 19 names, at W = 2, P = 2: (family, stage, attn). Stage 0 checks the
# gradients themselves; a ZeRO stage checks the parameters its SGD step lands on.
FAMILY_RUNS = [("qwen2", 0, "sdpa"), ("qwen2", 2, "sdpa"), ("qwen3", 0, "sdpa"), ("qwen3", 3, "sdpa"),
               ("mistral", 0, "sdpa"), ("mistral", 3, "sdpa"), ("mistral", 0, "eager")]

# Every _parity run of the module, one rank start per entry (a process holds one layout, so one sp
# size): (world, {key: (sp, stage, attn[, family])}).
STARTS = [
    (2, {**{("sp2", stage): (2, stage, "sdpa") for stage in (0, 1, 2, 3)}, "eager": (2, 2, "eager"),
         **{run: (2, run[1], run[2], run[0]) for run in FAMILY_RUNS}}),
    (4, {("sp2", stage): (2, stage, "sdpa") for stage in (0, 1, 2, 3)}),
    (4, {("sp4", stage): (4, stage, "sdpa") for stage in (0, 1, 2, 3)}),
]


@pytest.fixture(scope="module")
def parity():
    """Per world size, per run of ``STARTS``: every rank's last loss; one rank start per entry. Every
    run checks losses, gradients and params against the unsplit reference inside the ranks."""
    out = {}
    for world, runs in STARTS:
        ranks = run_on_ranks(run_each, world, _parity, runs, timeout=600)
        out.setdefault(world, {}).update({key: [r[key] for r in ranks] for key in runs})
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sp2_w2(stage, parity):
    losses = parity[2][("sp2", stage)]
    assert losses[0] == losses[1]  # one group: one loss


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sp2_dp2_w4(stage, parity):
    losses = parity[4][("sp2", stage)]
    assert losses[0] == losses[1] and losses[2] == losses[3] and losses[0] != losses[2]


def test_eager_attention(parity):
    assert len(parity[2]["eager"]) == 2  # ran on both ranks, checked inside them


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sp4_repeats_kv_heads(stage, parity):
    """P = 4 > 2 KV heads: each KV head is repeated so every rank holds the one its query heads use."""
    losses = parity[4][("sp4", stage)]
    assert len(set(losses)) == 1


@pytest.mark.parametrize("family, stage, attn", FAMILY_RUNS)
def test_model_families(family, stage, attn, parity):
    """Qwen2, Qwen3 (a sliding-window layer) and Mistral (sliding-window layers) at P = 2: losses, grads
    (stage 0) or the ZeRO step's params equal the unsplit model's within 1e-5, checked inside the ranks."""
    losses = parity[2][(family, stage, attn)]
    assert losses[0] == losses[1]  # one group: one loss
