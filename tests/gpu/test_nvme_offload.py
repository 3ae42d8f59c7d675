"""GPU twin of ``tests/engine/test_offload_nvme.py``: with CUDA the NVMe tier's chunk buffers are
pinned and the masters go up from them on the h2d stream while later chunks are read into other
buffers, so a buffer is reused only after its upload's event (nvme_swap.py). bf16 params, fp32
masters, fused AdamW on the host: NVMe offload must equal CPU offload bit for bit, every step."""

from __future__ import annotations

import os

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama

pytestmark = [pytest.mark.gpu]
STEPS = 5


def _train(rank, stage, offload):
    dev = torch.device("cuda", rank)
    model = add_frozen_and_unused(tiny_llama(0, layers=4)).to(dev).to(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1,
                            fused=True)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000, param_dtype=torch.bfloat16, offload=offload)
    wrapped, losses = ZeroModule(model, engine), []
    swap_dir = None
    for step in range(STEPS):
        inputs = {k: v.to(dev) for k, v in batch(rank, step, 0, model.config.vocab_size).items()}
        loss = wrapped(**inputs).loss
        loss.backward()
        engine.clip_grad_norm_(0.5)
        opt.step()
        wrapped.zero_grad()
        losses.append(loss.item())
        if offload.device == "nvme":
            swap_dir = engine._host_step.tier.dir.path
            assert len(engine._host_step.tier.chunks) > offload.buffer_count
    masters = [m.clone() for m in engine.masters]
    engine.close()
    return losses, masters, swap_dir


def _compare(rank, world, stage, nvme_path):
    cpu = _train(rank, stage, OptimizerOffload("cpu", chunk_numel=1500, pin_memory=True))
    nvme = _train(rank, stage, OptimizerOffload("nvme", chunk_numel=1500, pin_memory=True, nvme_path=nvme_path,
                                                buffer_count=3))
    assert nvme[0] == cpu[0]
    assert all(torch.equal(a, b) for a, b in zip(nvme[1], cpu[1]))
    assert not os.path.exists(nvme[2])
    return nvme[0]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nvme_equals_cpu_offload_on_gpu(stage, tmp_path):
    world = min(2, torch.cuda.device_count())
    losses = run_on_ranks(_compare, world, stage, str(tmp_path), backend="nccl", timeout=300)
    assert all(len(l) == STEPS for l in losses)


# ---- parameter offload to NVMe: pinned staging buffers, uploads on the gather stream -----------------


def _train_params(rank, param_offload, prefetch):
    from hf_zero.engine.offload.settings import ParamOffload

    dev = torch.device("cuda", rank)
    model = add_frozen_and_unused(tiny_llama(0, layers=6)).to(dev).to(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1,
                            fused=True)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=3000, param_dtype=torch.bfloat16,
                        offload=OptimizerOffload("cpu", chunk_numel=1500, pin_memory=True),
                        offload_param=param_offload, prefetch_numel=prefetch)
    wrapped, losses = ZeroModule(model, engine), []
    for step in range(STEPS):
        inputs = {k: v.to(dev) for k, v in batch(rank, step, 0, model.config.vocab_size).items()}
        loss = wrapped(**inputs).loss
        loss.backward()
        engine.clip_grad_norm_(0.5)
        opt.step()
        wrapped.zero_grad()
        losses.append(loss.item())
    masters = [m.clone() for m in engine.masters]
    staging = None
    if param_offload.device == "nvme":
        s = engine.strategy.param_memory.staging
        staging = (s.hits, all(b.data is None or b.data.is_pinned() for b in s.buffers))
    engine.close()
    return losses, masters, staging


def _compare_params(rank, world, nvme_path, prefetch):
    from hf_zero.engine.offload.settings import ParamOffload

    cpu = _train_params(rank, ParamOffload("cpu", pin_memory=True), prefetch)
    nvme = _train_params(rank, ParamOffload("nvme", pin_memory=True, nvme_path=nvme_path), prefetch)
    assert nvme[0] == cpu[0]
    assert all(torch.equal(a, b) for a, b in zip(nvme[1], cpu[1]))
    hits, pinned = nvme[2]
    assert pinned and (hits > 0 or prefetch > 0)
    return nvme[0]


@pytest.mark.parametrize("prefetch", [0, 10**9])
def test_nvme_params_equal_host_params_on_gpu(prefetch, tmp_path):
    """Staged reads (nvme_staging.py): pinned buffers reused only after their upload's event; with no
    gather prefetch the next unit's disk read runs ahead; bit for bit against host-memory shards."""
    world = min(2, torch.cuda.device_count())
    losses = run_on_ranks(_compare_params, world, str(tmp_path), prefetch, backend="nccl", timeout=300)
    assert all(len(l) == STEPS for l in losses)
    assert os.listdir(tmp_path) == []
