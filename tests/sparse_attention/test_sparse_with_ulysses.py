"""Sparse attention inside Ulysses sequence parallelism equals the unsplit model with the same sparse
attention: losses and gradients within 1e-5 (fp32, gloo CPU ranks).

The layout differs per head (fixed, four global patterns over the tiny Llama's four heads: every head's
own), so a rank that took the wrong heads' rows after the all-to-all fails: rank r holds heads
r * H / P .. (r + 1) * H / P - 1 ([Note: sparse attention inside Ulysses],
hf_zero/sequence_parallel/inner.py). P = 2 (2 KV heads split) and P = 4 (each KV head repeated), in
both orders (sparse then ``enable``, the Trainer's; ``enable`` then ``ulysses.wrap`` around the sparse
function), without ZeRO (gradients compared by hand) and under the ZeRO engine at stages 2 and 3 (its
SGD steps land on the reference's parameters); a batch given with its padding mask (left padding: a
causal model's real tokens would attend to it) gets the whole sequence's padding; and the Trainer with
both blocks in the config equals the plain Trainer on one rank with the sparse attention (training at
stage 2, then evaluation, which runs unsplit).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hf_zero.config.sparse_attention import SparseAttentionConfig
from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.sequence_parallel import build_layout, enable, split_batch, token_mean, ulysses
from hf_zero.sparse_attention import flex
from hf_zero.sparse_attention.layouts import make_layout
from hf_zero.testing.multiprocess import run_on_ranks
from tests.sequence_parallel.models import SEQ, lm_batch, tiny_llama
from tests.trainer import tiny

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PER_HEAD = {"mode": "fixed", "block": 4, "num_local_blocks": 4, "num_global_blocks": 1, "attention": "unidirectional",
            "different_layout_per_head": True, "num_different_global_patterns": 4}
RTOL = 1e-5
LR = 0.5
STEPS = 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _models(layout, config: SparseAttentionConfig, order: str):
    """The unsplit reference with the sparse attention, and its copy under Ulysses around it."""
    ref = tiny_llama("sdpa")
    model = copy.deepcopy(ref)
    name = flex.apply(ref, config)
    if order == "sparse first":  # the Trainer's order (hf_zero/trainer/seams.py)
        flex.apply(model, config)
        enable(model, layout)
    else:  # the sparse function set inside Ulysses in place (flex.apply refuses, naming this way)
        enable(model, layout)
        with pytest.raises(NotImplementedError, match=r"ulysses\.wrap\(model, flex\.register\(config\)\)"):
            flex.apply(model, config)
        ulysses.wrap(model, flex.register(config))
    assert model.config._attn_implementation == ulysses.key_for(name), model.config._attn_implementation
    return ref, model


def _split(batch: dict, layout, keep_mask: bool) -> dict:
    """This rank's slice as the Trainer's batch splitter cuts it (which drops a right-padding mask), or
    with its slice of the mask given to the model (any padding)."""
    if not keep_mask:
        return split_batch(batch, layout.size, layout.rank)
    part = split_batch({k: v for k, v in batch.items() if k != "attention_mask"}, layout.size, layout.rank)
    chunk = SEQ // layout.size
    return {**part, "attention_mask": batch["attention_mask"][:, layout.rank * chunk:(layout.rank + 1) * chunk]}


def _left_padded(group: int, step: int) -> dict:
    """Row 0 padded on the left (5 tokens: only rank 0's slice holds padding), row 1 on the right."""
    batch = lm_batch(group, step)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :5] = 0
    mask[1, SEQ - 9:] = 0
    return {**batch, "attention_mask": mask, "labels": torch.where(mask.bool(), batch["input_ids"], -100)}


def _parity(rank, world, sp, stage, order, padded):
    layout = build_layout(sp)
    config = SparseAttentionConfig(**PER_HEAD)
    ref, model = _models(layout, config, order)
    ref_opt, opt = torch.optim.SGD(ref.parameters(), lr=LR), torch.optim.SGD(model.parameters(), lr=LR)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=5000) if stage else None
    runner = ZeroModule(model, engine) if engine else model
    batch_of = _left_padded if padded else lm_batch
    model.train()
    for step in range(STEPS):
        ref.zero_grad()
        ref_losses = []
        for group in range(layout.dp_size):  # each group's whole batch; gradients averaged as DDP's
            loss = ref(**batch_of(group, step)).loss
            (loss / layout.dp_size).backward()
            ref_losses.append(loss.item())
        part = _split(batch_of(layout.dp_rank, step), layout, keep_mask=padded)
        loss = token_mean(runner(**part, num_items_in_batch=1).loss, part["shift_labels"], layout)
        want = ref_losses[layout.dp_rank]
        assert abs(loss.item() - want) <= RTOL * abs(want), (order, step, loss.item(), want)
        loss.backward()
        if engine is None:
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                dist.all_reduce(p.grad)
                p.grad /= world
                assert _rel(p.grad, q.grad) <= RTOL, (order, step, name, _rel(p.grad, q.grad))
        ref_opt.step()
        opt.step()
        runner.zero_grad()
        with engine.gathered() if engine else torch.no_grad():
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert _rel(p.detach(), q.detach()) <= RTOL, (order, step, name, _rel(p.detach(), q.detach()))
    if engine:
        engine.close()
    return loss.item()


def _runs(rank, world, sp, runs):
    return [_parity(rank, world, sp, *run) for run in runs]


def test_every_head_has_its_own_layout():
    """What makes a wrong head offset fail the parity tests below: no two heads share a layout."""
    layout = make_layout(SparseAttentionConfig(**PER_HEAD), 4, SEQ).tril()
    assert all(not torch.equal(layout[a], layout[b]) for a in range(4) for b in range(a))


@pytest.mark.parametrize("grad", [False, True])  # FlexAttention's block mask; the dense CPU path
def test_a_share_of_the_heads_attends_as_those_heads_of_the_whole(grad):
    """``head_share``: heads 2, 3 of 4 (the second of two ranks) compute what heads 2, 3 of the whole do."""
    attention = flex.SparseAttention(SparseAttentionConfig(**PER_HEAD))
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(3, 1, 4, SEQ, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(grad)
    whole, _ = attention(module, q, k, v, None)  # [b, s, heads, d]
    share, _ = attention(module, q[:, 2:], k[:, 2:], v[:, 2:], None, head_share=flex.HeadShare(2, 4))
    torch.testing.assert_close(share, whole[:, :, 2:], rtol=0, atol=1e-6)
    first, _ = attention(module, q[:, 2:], k[:, 2:], v[:, 2:], None)  # as heads 0, 1: another layout
    assert (first - share).abs().max() > 1e-3


def test_sp2_equals_the_unsplit_sparse_model():
    """P = 2 at W = 2: both orders, no ZeRO and stage 3, and a batch with its padding mask."""
    runs = [(0, "sparse first", False), (3, "ulysses first", False), (0, "sparse first", True)]
    losses = run_on_ranks(_runs, 2, 2, runs, timeout=240)
    assert losses[0] == losses[1]  # one group: one loss


def test_sp4_repeats_kv_heads():
    """P = 4 > 2 KV heads, one query head per rank, at stage 2."""
    losses = run_on_ranks(_runs, 4, 4, [(2, "ulysses first", False)], timeout=240)
    assert len(set(map(tuple, losses))) == 1


def _rows() -> list[dict]:
    rows = []
    for group in range(4):
        batch = lm_batch(group, step=7)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(2)]
    return rows


def _train(rank, world, out, sp):
    from transformers import Trainer, TrainingArguments

    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S

    model = tiny_llama("sdpa")
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=STEPS, save_strategy="no",
                             logging_steps=1, per_device_train_batch_size=2, optim="sgd", learning_rate=LR,
                             max_grad_norm=1.0, disable_tqdm=True, seed=0)
    if sp > 1:
        zt.activate({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5000}, "sequence_parallel_size": sp,
                     "sparse_attention": PER_HEAD})
    else:  # the reference: the plain Trainer, the model made sparse by hand
        flex.apply(model, SparseAttentionConfig(**PER_HEAD))
    try:
        trainer = Trainer(model=model, args=args, train_dataset=_rows(), eval_dataset=_rows()[:4])
        attention = model.config._attn_implementation
        trainer.train()
        evaluated = trainer.evaluate()["eval_loss"]  # eval mode: the sparse attention runs unsplit, with the padding
        session = S.session_of(trainer)
        engine = session.engine if session is not None else None
        with engine.gathered() if engine is not None else torch.no_grad():
            params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    finally:
        zt.deactivate()
    return tiny.history(trainer), params, attention, evaluated


def test_trainer_with_both_blocks(tmp_path):
    want, want_params, want_attention, want_eval = run_on_ranks(_train, 1, tmp_path / "ref", 1, timeout=240)[0]
    assert want_attention.startswith(flex.PREFIX)
    for got, got_params, attention, got_eval in run_on_ranks(_train, 2, tmp_path / "sp", 2, timeout=240):
        assert attention == ulysses.key_for(want_attention)
        tiny.same_training(got, want, STEPS, "sparse + sp")
        tiny.close(got_eval, want_eval, what="eval_loss")
        for name, value in want_params.items():
            err = np.linalg.norm(got_params[name] - value) / np.linalg.norm(value)
            assert err <= RTOL, (name, err)
