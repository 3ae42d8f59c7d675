"""Speculation then validation on one GPU (W = 1, bf16): with clipping on, the host step in backward
and across the next forward gives the losses, grad norms and params of the host step after the
norm, bit for bit, whichever way each step goes ([Note: speculation] in
hf_zero/engine/offload/speculation.py).

On the GPU the grads come down on the d2h stream and each chunk's params go up on the h2d stream:
a redone chunk uploads twice, an undone one (a skipped step) uploads its old params again, and the
next forward must see the last upload. The clip threshold per step forces each case in turn:
stands, skipped (inf grads: undone), waiting (backoff), redone, redone with a NaN norm (last).

    pytest tests/gpu/test_speculation_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from tests.engine.test_speculation import let_the_worker_start

pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

HUGE, TINY = 1e9, 1e-3
# (threshold, loss factor of the last micro-step): speculated and stands; speculated and skipped
# (undone); waits (backoff) and stands; speculated and redone; waits and clips; waits and stands;
# speculated and redone with a NaN norm
SCHEDULE = [(HUGE, 1.0), (HUGE, float("inf")), (HUGE, 1.0), (TINY, 1.0), (TINY, 1.0), (HUGE, 1.0),
            (HUGE, float("nan"))]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda()


def _run(base, stage: int, speculate: bool, param_offload: ParamOffload | None):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    sharded = dict(prefetch_numel=10**9, persistence_threshold=1000) if stage == 3 else {}
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=100_000, param_dtype=torch.bfloat16,
                        offload=OptimizerOffload("cpu", chunk_numel=200_000), offload_param=param_offload,
                        **sharded)
    policy = SpeculationPolicy(budget=1.0, max_backoff=1) if speculate else None
    engine.set_step_in_backward(speculate, overlap_forward=speculate, speculation=policy)
    wrapped = ZeroModule(model, engine)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 1000, (4, 64), generator=g).cuda() for _ in range(2)]
    losses, norms, before_nan = [], [], None
    for step, (threshold, factor) in enumerate(SCHEDULE):
        for micro, ids in enumerate(batches):
            with (wrapped.no_sync() if micro == 0 else torch.enable_grad()):
                loss = wrapped(input_ids=ids, labels=ids).loss
                (loss / 2 * (factor if micro == 1 else 1.0)).backward()
            losses.append(loss.item())
        if speculate:
            let_the_worker_start(engine, every_chunk=True)  # which steps speculate: the policy's choice alone
        norm = engine.clip_grad_norm_(threshold)
        norms.append(norm.item())
        if factor != float("inf"):
            opt.step()  # (inf: skipped, as GradScaler skips an overflowing step)
        wrapped.zero_grad()
        if step == len(SCHEDULE) - 2:
            with engine.gathered():
                before_nan = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    with engine.gathered():
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    counts = (policy.speculated_steps, policy.redone_steps) if policy else None
    chunks = len(engine._host_step.chunks)
    engine.close()
    return losses, norms, before_nan, params, counts, chunks


@pytest.mark.parametrize("stage,param_offload", [(2, False), (3, False), (3, True)])
def test_speculation_on_gpu_bit_equal(stage, param_offload):
    base = _model()
    offload = ParamOffload("cpu") if param_offload else None
    after = _run(base, stage, False, offload)
    during = _run(base, stage, True, offload)
    assert during[5] == after[5] > 1  # several chunks
    assert during[0] == after[0]  # losses
    assert list(map(repr, during[1])) == list(map(repr, after[1]))  # grad norms (NaN at the skipped and last steps)
    assert repr(after[1][-1]) == "nan"
    for i in (2, 3):  # params before the NaN step, and after it (NaN where the waiting path has NaN)
        for name, value in after[i].items():
            got = during[i][name]
            assert torch.equal(got.view(torch.int16), value.view(torch.int16)), (i, name)
    assert during[4] == (4, 3)  # speculated at steps 0, 1, 3, 6; undone or redone at 1, 3, 6
