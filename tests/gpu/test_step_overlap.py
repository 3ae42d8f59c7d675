"""The host step in backward and overlapping the next forward, on one GPU (W = 1, bf16): the same
losses, grad norms and params, bit for bit, as the host step after backward.

[Note: step in backward] (hf_zero/engine/offload/host_step.py): without clipping, a worker thread steps
each offloaded chunk as its grads land and uploads its params on the h2d stream; with
``overlap_forward`` ``optimizer.step()`` returns before it is done and the next forward waits for
each module's (stage 3: each unit's) chunk, then for its upload on the device. Both runs step the
same fp32 masters with the same AdamW in the same order per element, so any difference means a
forward read params before their upload landed, or a chunk was stepped with the wrong grads or
hyperparameters. Stage 3 also with parameter offload to NVMe (swap files under pytest's tmp_path).

    pytest tests/gpu/test_step_overlap.py
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
    return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda()


def _run(base, stage: int, early: bool, param_offload: ParamOffload | None = None):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    sharded = dict(prefetch_numel=10**9, persistence_threshold=1000) if stage == 3 else {}
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=100_000, param_dtype=torch.bfloat16,
                        offload=OptimizerOffload("cpu", chunk_numel=200_000), offload_param=param_offload,
                        **sharded)
    engine.set_step_in_backward(early, overlap_forward=early)
    wrapped = ZeroModule(model, engine)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 1000, (4, 64), generator=g).cuda() for _ in range(2)]
    losses, norms = [], []
    for _ in range(STEPS):
        for micro, ids in enumerate(batches):
            with (wrapped.no_sync() if micro == 0 else torch.enable_grad()):
                loss = wrapped(input_ids=ids, labels=ids).loss
                (loss / 2).backward()
            losses.append(loss.item())
        norms.append(engine.grad_norm().item())
        opt.step()
        wrapped.zero_grad()
    with engine.gathered():
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    chunks = len(engine._host_step.chunks)
    engine.close()
    return losses, norms, params, chunks


@pytest.mark.parametrize("stage,nvme", [(2, False), (3, False), (3, True)])
def test_step_in_backward_and_overlapping_forward_bit_equal(stage, nvme, tmp_path):
    base = _model()
    offload = ParamOffload("nvme", nvme_path=str(tmp_path)) if nvme else None
    after = _run(base, stage, False, offload)
    during = _run(base, stage, True, offload)
    assert during[3] == after[3] > 1  # several chunks: the worker runs while backward and forward go on
    assert during[0] == after[0]
    assert during[1] == after[1]
    for name, value in after[2].items():
        assert torch.equal(during[2][name], value), name
    assert list(tmp_path.iterdir()) == []  # the NVMe swap files went at close
