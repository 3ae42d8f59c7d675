"""Where an optimizer-offload step spends its time: the engine alone (no Trainer), phase by phase.

    torchrun --nproc_per_node 1 bench/offload_probe.py [--preset 1b1] [--steps 6] [--ratio 1.0] [--early]

Prints, per step, wall seconds of forward, backward, clip, optimizer step (with the host step's
own split: waiting for grads, host optimizer, uploads queued), and the raw speed of the host
optimizer on the same number of elements, so a slow offload step can be blamed on its part.

``--early``: no clipping, the host step runs during backward (host_step.py, [Note: step in
backward]); each step then also prints when the worker stepped its first and last chunk, counted
from the start of backward, and how long it was busy. ``--overlap_forward`` as well: no syncs
inside a step (the worker runs on into the next forward); per step its wall time, the CPU time of
forward, backward and ``optimizer.step()``, how long the forward's gates waited for chunks, and the
worker's timeline from the step's start. ``--worker_threads N``: its CPU threads
(default: the engine's choice, all cores but one). ``--speculate B`` with ``--early``: clipping on
(``--clip``, default 1.0) with the host step speculating ([Note: speculation] in
hf_zero/engine/offload/speculation.py), copies for at most the share B of the offloaded elements;
``--state_dtype bf16``: bf16 moments on the host ([Note: bf16 host state]; compare its host optimizer
time with the same command without it);
``--clip 1e9`` makes every speculation stand; ``--clip 1e-3`` clips at every step: the first is
redone, then the policy waits for the norm (a clipping streak).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from hf_zero.engine import ZeroEngine
from hf_zero.engine.offload import host_step as H
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy

PRESETS = {"tiny": (64, 2, 128, 4, 2, 256), "1b1": (2048, 22, 5632, 32, 4, 32000)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b1")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ratio", type=float, default=1.0)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--early", action="store_true", help="no clipping: the host step runs in backward")
    p.add_argument("--overlap_forward", action="store_true",
                   help="with --early: optimizer.step() returns before the host is done (no syncs inside a step)")
    p.add_argument("--worker_threads", type=int, default=None)
    p.add_argument("--chunk_numel", type=int, default=OptimizerOffload.chunk_numel)
    p.add_argument("--speculate", type=float, default=None, help="with --early: clip, speculating (budget share)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--max_backoff", type=int, default=64)
    p.add_argument("--state_dtype", choices=("fp32", "bf16"), default="fp32",
                   help="offloaded optimizer state between steps (bf16: [Note: bf16 host state]; changes numerics)")
    args = p.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    print(f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    h, layers, inter, heads, kv, vocab = PRESETS[args.preset]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=h * h, param_dtype=torch.bfloat16,
                        offload=OptimizerOffload("cpu", ratio=args.ratio, chunk_numel=args.chunk_numel,
                                                 state_dtype=args.state_dtype))
    policy = None if args.speculate is None else SpeculationPolicy(budget=args.speculate, max_backoff=args.max_backoff)
    engine.set_step_in_backward(args.early, overlap_forward=args.overlap_forward, speculation=policy)
    if args.worker_threads:
        H.os.cpu_count = lambda: args.worker_threads + 1  # the worker takes all cores but one
    chunks: list[tuple[float, float]] = []  # (start, end) of each chunk's step, this step
    orig_chunk = H.HostStep._step_chunk

    def timed_chunk(self, *a):
        t = time.perf_counter()
        orig_chunk(self, *a)
        chunks.append((t, time.perf_counter()))

    H.HostStep._step_chunk = timed_chunk

    split = {"wait": 0.0, "host_opt": 0.0, "upload": 0.0}
    orig_step_on, orig_upload = H._step_on, H.HostStep._upload

    def timed_step_on(view, optimizer, pieces):
        t = time.perf_counter()
        orig_step_on(view, optimizer, pieces)
        split["host_opt"] += time.perf_counter() - t

    def timed_upload(self, *a):
        t = time.perf_counter()
        orig_upload(self, *a)
        split["upload"] += time.perf_counter() - t

    H._step_on, H.HostStep._upload = timed_step_on, timed_upload
    orig_low = H.LowPrecisionState.step

    def timed_low(self, view, groups, pieces):  # --state_dtype bf16: the host optimizer is this
        t = time.perf_counter()
        orig_low(self, view, groups, pieces)
        split["host_opt"] += time.perf_counter() - t

    H.LowPrecisionState.step = timed_low
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if args.overlap_forward:
        gate = {"wait": 0.0}
        orig_wait = H.HostStep.wait_chunk_of

        def timed_wait(self, i):
            t = time.perf_counter()
            orig_wait(self, i)
            gate["wait"] += time.perf_counter() - t

        H.HostStep.wait_chunk_of = timed_wait
        sync()
        last = time.perf_counter()
        for step in range(args.steps):
            t0, gate["wait"] = last, 0.0
            done = list(chunks)
            chunks.clear()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            t1 = time.perf_counter()
            loss.backward()
            if policy is not None:
                engine.clip_grad_norm_(args.clip)
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            loss.item()  # the GPU is done with this step (the worker may not be)
            last = time.perf_counter()
            late = [c for c in done if c[1] > t0]
            print(f"step {step}: {last - t0:.3f} s; CPU fwd {t1-t0:.3f} (gates waited {gate['wait']:.3f}) bwd "
                  f"{t2-t1:.3f} step {t3-t2:.3f}; last step's chunks done after this one began: {len(late)}"
                  + (f", the last at +{late[-1][1] - t0:.3f}" if late else ""), flush=True)
            if chunks:
                print(f"  worker (this step so far): {len(chunks)} chunks from +{chunks[0][0]-t0:.3f} to "
                      f"+{chunks[-1][1]-t0:.3f}; busy {sum(e - b for b, e in chunks):.3f} s", flush=True)
        args.steps = 0
    for step in range(args.steps):
        for k in split:
            split[k] = 0.0
        chunks.clear()
        sync(); t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        sync(); t1 = time.perf_counter()
        loss.backward()
        sync(); t2 = time.perf_counter()
        if not args.early or policy is not None:
            engine.clip_grad_norm_(args.clip)
        sync(); t3 = time.perf_counter()
        opt.step()
        sync(); t4 = time.perf_counter()
        opt.zero_grad()
        print(f"step {step}: fwd {t1-t0:.3f} bwd {t2-t1:.3f} clip {t3-t2:.3f} opt {t4-t3:.3f} "
              f"(host optimizer {split['host_opt']:.3f}, uploads queued {split['upload']:.3f}) "
              f"total {t4-t0:.3f} s, peak {torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.2f} GiB",
              flush=True)
        if args.early and chunks:
            print(f"  worker: {len(chunks)} chunks, first from {chunks[0][0]-t1:.3f}, last until {chunks[-1][1]-t1:.3f} "
                  f"s after backward began; busy {sum(e - b for b, e in chunks):.3f} s", flush=True)

    n = sum(m.numel() for m in engine.masters)
    params = [torch.zeros(n // 8, pin_memory=dev.type == "cuda") for _ in range(8)]
    for q in params:
        q.grad = torch.randn_like(q)
    raw = torch.optim.AdamW(params, lr=1e-5, fused=True)
    for _ in range(2):
        raw.step()
    t = time.perf_counter()
    raw.step()
    dt = time.perf_counter() - t
    print(f"raw fused CPU AdamW on {n/1e9:.2f} G elements: {dt:.3f} s ({n/dt/1e9:.2f} Gparam/s)", flush=True)
    if policy is not None:
        print(f"speculation: {policy.speculated_steps} steps speculated, {policy.redone_steps} redone, "
              f"{policy.clipped_steps} clipped; copies {engine._host_step.speculation.snapshots.nbytes() / 2**30:.2f} GiB",
              flush=True)
    if dev.type == "cuda":
        g = torch.empty(n // 8, device=dev)
        host = torch.empty(n // 8, pin_memory=True)
        torch.cuda.synchronize(); t = time.perf_counter()
        host.copy_(g, non_blocking=True); torch.cuda.synchronize()
        d2h = g.numel() * 4 / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        g.copy_(host, non_blocking=True); torch.cuda.synchronize()
        h2d = g.numel() * 4 / (time.perf_counter() - t) / 1e9
        print(f"pinned copies: d2h {d2h:.1f} GB/s, h2d {h2d:.1f} GB/s", flush=True)
    engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
