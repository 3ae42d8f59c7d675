"""GPU twin of ``tests/engine/test_split_speculation.py`` (W = 1, bf16): with a host/NVMe split
(``host_share`` 0.5, pinned chunk buffers) and clipping on, the host chunks speculate during
backward while the NVMe part reads its first chunk ahead and its chunks wait for the norm; the
losses, grad norms and params are those of CPU offload's waiting path bit for bit, through
test_speculation_gpu's schedule (stands, skipped, backoff, redone, NaN), and the policy counts
all-host's steps ([Note: speculation], [Note: host share]).

On the GPU a host chunk's speculative step uploads its params on the h2d stream during backward;
a redo or an undo uploads again, and the NVMe chunks' uploads after the verdict come from their
chunk buffers, each reused only after its upload's event.

    pytest tests/gpu/test_split_speculation_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from hf_zero.engine import ZeroEngine, ZeroModule  # noqa: E402
from hf_zero.engine.offload.settings import OptimizerOffload  # noqa: E402
from hf_zero.engine.offload.speculation import ChunkStep, SpeculationPolicy  # noqa: E402
from hf_zero.engine.offload.split_tier import SplitTier  # noqa: E402
from tests.engine.test_speculation import let_the_worker_start  # noqa: E402
from tests.gpu.test_speculation_gpu import SCHEDULE, _model  # noqa: E402


def _run(base, stage: int, offload: OptimizerOffload, speculate: bool):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    sharded = dict(prefetch_numel=10**9, persistence_threshold=1000) if stage == 3 else {}
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=100_000, param_dtype=torch.bfloat16,
                        offload=offload, **sharded)
    policy = SpeculationPolicy(budget=1.0, max_backoff=1) if speculate else None
    engine.set_step_in_backward(speculate, overlap_forward=speculate, speculation=policy)
    wrapped = ZeroModule(model, engine)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 1000, (4, 64), generator=g).cuda() for _ in range(2)]
    losses, norms, speculated = [], [], set()
    for threshold, factor in SCHEDULE:
        for micro, ids in enumerate(batches):
            with (wrapped.no_sync() if micro == 0 else torch.enable_grad()):
                loss = wrapped(input_ids=ids, labels=ids).loss
                (loss / 2 * (factor if micro == 1 else 1.0)).backward()
            losses.append(loss.item())
        if speculate:
            let_the_worker_start(engine, every_chunk=True)
            spec = engine._host_step.speculation
            speculated |= {c for c, s in spec.chunks.items() if s is ChunkStep.SPECULATED}
        norm = engine.clip_grad_norm_(threshold)
        norms.append(repr(norm.item()))
        if factor != float("inf"):
            opt.step()  # (inf: skipped, as GradScaler skips an overflowing step)
        wrapped.zero_grad()
    with engine.gathered():
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    tier = engine._host_step.tier
    host = tier.count if isinstance(tier, SplitTier) else None
    counts = (policy.speculated_steps, policy.redone_steps) if policy else None
    engine.close()
    return losses, norms, params, counts, speculated, host


@pytest.mark.parametrize("stage", [2, 3])
def test_split_speculation_on_gpu_bit_equal(stage, tmp_path):
    base = _model()
    waiting = _run(base, stage, OptimizerOffload("cpu", chunk_numel=200_000), False)
    split = OptimizerOffload("nvme", chunk_numel=200_000, nvme_path=str(tmp_path), buffer_count=3,
                             pin_memory=True, host_share=0.5)
    losses, norms, params, counts, speculated, host = _run(base, stage, split, True)
    assert host is not None and host > 0
    assert speculated == set(range(host))  # every host chunk, no NVMe chunk
    assert losses == waiting[0] and norms == waiting[1] and norms[-1] == "nan"
    for name, value in waiting[2].items():
        assert torch.equal(params[name].view(torch.int16), value.view(torch.int16)), name
    assert counts == (4, 3)  # as all-host's: speculated at steps 0, 1, 3, 6; undone or redone at 1, 3, 6
