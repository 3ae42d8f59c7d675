"""Whether the host step of optimizer offload is bound by host memory: the fused CPU AdamW alone,
the pinned copies alone, and both at once.

    python bench/host_contention.py [--numel 268435456] [--copy_gb 4] [--name NAME --results_dir DIR --git_commit SHA]

Issue 18's 7B offload step (bench/results/h100_session20_summary.md) spends about 1.25 s after the
global norm stepping 4.7 G offloaded elements: the CPU's part with torch's fused AdamW (28 bytes an
element of host memory traffic: master, grad and two moments read, three written), the device
leg's part by DMA (the same 28 bytes through the copy engines), the uploads (4 more). If host
memory bandwidth is the bound, the two legs slow each other down when they run together, and a
lower offloaded share is the only lever. This measures, on ``numel`` fp32 elements:

- ``adamw``: one fused CPU AdamW step (after one untimed), as GB/s at 28 bytes an element;
- ``copies``: ``copy_gb`` each way between pinned host memory and the device on two streams at
  once (the leg's up and down), GB/s each way (CUDA only);
- ``both``: the copies looping on their streams while the CPU steps: each one's rate then;
- ``adamw_by_threads``: the AdamW step alone at each of ``--thread_counts`` intra-op threads, in a
  thread of its own as the host step's worker runs it (step_overlap.StepWorker takes all cores but
  one): whether one core less costs the host step, and whether its rate still grows with cores
  (it does not, if memory is the bound).

Prints one JSON object; ``--device cpu`` runs the AdamW part small, as a check of the script
(tests/test_bench_host_contention.py).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

ADAMW_BYTES = 28  # per element: param, grad, exp_avg, exp_avg_sq read; param, exp_avg, exp_avg_sq written


def _adamw(numel: int) -> torch.optim.Optimizer:
    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = torch.full((numel,), 1e-3)
    opt = torch.optim.AdamW([param], lr=1e-3, fused=True)
    opt.step()  # creates the state: the timed steps read and write it
    return opt


def _step_seconds(opt: torch.optim.Optimizer, reps: int) -> float:
    began = time.perf_counter()
    for _ in range(reps):
        opt.step()
    return (time.perf_counter() - began) / reps


def _thread_counts(spec: str, cores: int) -> list[int]:
    """``spec``: comma list of counts, ``all``, ``all-1`` or ``half`` (of ``cores``); each at least 1, once."""
    named = {"all": cores, "all-1": cores - 1, "half": cores // 2}
    out = []
    for item in spec.split(","):
        n = max(1, named[item] if item in named else int(item))
        if n not in out:
            out.append(n)
    return out


def _in_a_thread(opt: torch.optim.Optimizer, reps: int, threads: int) -> float:
    """``_step_seconds`` in a new thread with ``threads`` intra-op threads (as StepWorker steps)."""
    out = {}

    def run():
        torch.set_num_threads(threads)
        opt.step()  # (its thread pool starts here, untimed)
        out["s"] = _step_seconds(opt, reps)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out["s"]


def _copies(copy_bytes: int):
    """Pinned host buffers and device buffers for one copy each way, and the two streams."""
    n = copy_bytes // 4
    host_up, host_down = torch.empty(n, pin_memory=True), torch.empty(n, pin_memory=True)
    dev_up, dev_down = torch.empty(n, device="cuda"), torch.zeros(n, device="cuda")
    return host_up, host_down, dev_up, dev_down, torch.cuda.Stream(), torch.cuda.Stream()


def _queue_copies(bufs, rounds: int) -> tuple:
    """``rounds`` copies each way, queued; returns (start, up end, down end) events."""
    host_up, host_down, dev_up, dev_down, up, down = bufs
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    ends = []
    for stream, (dst, src) in ((up, (dev_up, host_up)), (down, (host_down, dev_down))):
        stream.wait_event(start)
        with torch.cuda.stream(stream):
            for _ in range(rounds):
                dst.copy_(src, non_blocking=True)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        ends.append(end)
    return start, ends[0], ends[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=1 << 28)
    p.add_argument("--copy_gb", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3, help="timed steps (fewer when --budget_s would not hold them)")
    p.add_argument("--budget_s", type=float, default=90.0, help="seconds the measurements may take, about")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--thread_counts", default="all,all-1,half",
                   help="the AdamW step alone in a thread of its own at each of these intra-op thread counts")
    p.add_argument("--name", default="host_contention")
    p.add_argument("--results_dir", default="bench/results")
    p.add_argument("--git_commit", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    opt = _adamw(args.numel)
    first = _step_seconds(opt, 1)
    # alone, then under the copies: 2 x reps steps, and the copies about as long again
    args.reps = max(1, min(args.reps, int(args.budget_s / (4 * first))))
    alone = _step_seconds(opt, args.reps)
    out = {"numel": args.numel, "reps": args.reps, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "git_commit": args.git_commit, "device": args.device,
           "adamw": {"s": alone, "gb_s": ADAMW_BYTES * args.numel / alone / 1e9}}
    if args.device == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
        bufs = _copies(int(args.copy_gb * 1e9))
        nbytes = bufs[0].numel() * 4
        _queue_copies(bufs, 1)
        torch.cuda.synchronize()
        start, up, down = _queue_copies(bufs, args.reps)
        torch.cuda.synchronize()
        out["copies"] = {"up_gb_s": args.reps * nbytes / (start.elapsed_time(up) / 1e3) / 1e9,
                         "down_gb_s": args.reps * nbytes / (start.elapsed_time(down) / 1e3) / 1e9}
        # Both at once: enough rounds of copies to outlast the CPU's steps (about as long as they took alone).
        rounds = max(1, round(alone * args.reps / (nbytes / (out["copies"]["up_gb_s"] * 1e9))))
        start, up, down = _queue_copies(bufs, rounds)
        stepped = _step_seconds(opt, args.reps)
        torch.cuda.synchronize()
        out["both"] = {"adamw_s": stepped, "adamw_gb_s": ADAMW_BYTES * args.numel / stepped / 1e9,
                       "up_gb_s": rounds * nbytes / (start.elapsed_time(up) / 1e3) / 1e9,
                       "down_gb_s": rounds * nbytes / (start.elapsed_time(down) / 1e3) / 1e9, "rounds": rounds}
    cores = torch.get_num_threads()
    out["adamw_by_threads"] = {}
    for n in _thread_counts(args.thread_counts, cores):
        seconds = _in_a_thread(opt, args.reps, n)
        out["adamw_by_threads"][str(n)] = {"s": seconds, "gb_s": ADAMW_BYTES * args.numel / seconds / 1e9}
    print(json.dumps(out))
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, f"{args.name}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
