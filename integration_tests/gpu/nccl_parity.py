"""The engine (stages 1-3) under NCCL on GPUs vs DDP + the same optimizer, step by step.

    torchrun --nproc_per_node 2 integration_tests/gpu/nccl_parity.py

fp32 with TF32 off: losses, grad norms and parameters agree to 1e-5 relative after 10 steps, as
on CPU gloo ranks. Prints one PASS/FAIL line per case on rank 0; exits non-zero on any failure.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_zero.engine import ZeroEngine, ZeroModule  # noqa: E402
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama  # noqa: E402

RTOL = 1e-5


def case(stage: int, grad_accum: int, device: torch.device, rank: int) -> str | None:
    ref = add_frozen_and_unused(tiny_llama(0)).to(device)
    model = copy.deepcopy(ref)
    ddp = DDP(ref, device_ids=[device.index], find_unused_parameters=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000)
    wrapped = ZeroModule(model, engine)
    for step in range(10):
        for micro in range(grad_accum):
            inputs = {k: v.to(device) for k, v in batch(rank, step, micro, ref.config.vocab_size).items()}
            last = micro == grad_accum - 1
            with (ddp.no_sync() if not last else torch.enable_grad()):
                (ddp(**inputs).loss / grad_accum).backward()
            with (wrapped.no_sync() if not last else torch.enable_grad()):
                (wrapped(**inputs).loss / grad_accum).backward()
        n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        n = engine.clip_grad_norm_(1.0)
        ref_opt.step(); ref_opt.zero_grad()
        opt.step(); wrapped.zero_grad()
        if abs(n.item() - n_ref.item()) > RTOL * n_ref.item():
            return f"step {step}: grad norm {n.item()} vs {n_ref.item()}"
        with engine.gathered():
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                rel = ((p - q).norm() / q.norm().clamp_min(1e-12)).item()
                if rel > RTOL:
                    return f"step {step}: {name} rel error {rel:.2e}"
    engine.close()
    return None


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    failed = 0
    for stage, grad_accum in [(1, 1), (2, 1), (3, 1), (1, 4), (2, 4), (3, 4)]:
        error = case(stage, grad_accum, device, rank)
        flags = torch.tensor([0 if error is None else 1], device=device)
        dist.all_reduce(flags)
        failed += int(flags.item() > 0)
        if rank == 0:
            print(f"{'PASS' if flags.item() == 0 else 'FAIL'} stage {stage} grad_accum {grad_accum} "
                  f"world {dist.get_world_size()}" + (f": {error}" if error else ""), flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
