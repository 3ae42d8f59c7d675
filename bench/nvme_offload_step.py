"""Optimizer step time of CPU offload against NVMe offload, the engine alone, one GPU.

    python bench/nvme_offload_step.py --nvme_path /local_nvme [--preset 1b1] [--steps 4] [--state_dtype bf16]

Per tier, after one warm-up step: mean wall seconds of ``optimizer.step()`` (the host step:
for NVMe, reads, host AdamW, writes), the bytes the NVMe tier reads and writes per step (the swap
files' sizes: 4 bytes of master + 2 moments of 4 bytes, or 2 with ``--state_dtype bf16``, per
offloaded element, chunk padding included) and what that is per second of
step, beside the drive's own read and write speed measured in the same run (``dd`` with O_DIRECT,
bench/nvme_bandwidth.py). The swap files move with O_DIRECT where the file system takes it (the
run says which); through the page cache otherwise, where reads after the first step may come
from memory, not the drive.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload
from nvme_bandwidth import dd  # bench/ is on sys.path when this script runs

PRESETS = {"small": (1024, 8, 2816, 16, 4, 32000), "1b1": (2048, 22, 5632, 32, 4, 32000)}


def run(offload: OptimizerOffload, args) -> tuple[float, int]:
    h, layers, inter, heads, kv, vocab = PRESETS[args.preset]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=h * h, param_dtype=torch.bfloat16, offload=offload)
    wrapped, times = ZeroModule(model, engine), []
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq), device="cuda")
    for _ in range(args.steps + 1):
        wrapped(input_ids=ids, labels=ids).loss.backward()
        engine.clip_grad_norm_(1.0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        wrapped.zero_grad()
    tier = engine._host_step.tier
    moved = sum(f.nbytes for f in tier.dir.files.values()) if offload.device == "nvme" else 0
    direct = offload.device == "nvme" and tier.dir.direct
    engine.close()
    return sum(times[1:]) / args.steps, moved, direct


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nvme_path", required=True)
    p.add_argument("--preset", default="1b1", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro_batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--buffer_size", type=int, default=1 << 26)
    p.add_argument("--buffer_count", type=int, default=4)
    p.add_argument("--state_dtype", default="fp32", choices=["fp32", "bf16"])  # offload_optimizer.state_dtype
    args = p.parse_args()
    print(f"preset {args.preset}, threads {torch.get_num_threads()}, state {args.state_dtype}", flush=True)
    cpu, _, _ = run(OptimizerOffload("cpu", pin_memory=True, state_dtype=args.state_dtype), args)
    print(f"cpu offload:  optimizer step {cpu:.3f} s", flush=True)
    nvme, moved, direct = run(OptimizerOffload("nvme", pin_memory=True, chunk_numel=args.buffer_size,
                                               nvme_path=args.nvme_path, buffer_count=args.buffer_count,
                                               state_dtype=args.state_dtype), args)
    print(f"nvme offload: optimizer step {nvme:.3f} s; {moved / 1e9:.2f} GB read and {moved / 1e9:.2f} GB written "
          f"per step, {2 * moved / nvme / 1e9:.2f} GB/s both ways together "
          f"({'O_DIRECT' if direct else 'page cache'})", flush=True)
    drive = dd(os.path.join(args.nvme_path, "hf_zero-bench.dat"), max(moved, 1 << 30) // (8 << 20) * (8 << 20))
    print(f"the drive (dd, O_DIRECT, {max(moved, 1 << 30) / 1e9:.2f} GB): write {drive['write']:.2f} GB/s, "
          f"read {drive['read']:.2f} GB/s; a step that only moved the bytes at those speeds: "
          f"{moved / 1e9 / drive['read'] + moved / 1e9 / drive['write']:.3f} s", flush=True)


if __name__ == "__main__":
    main()
