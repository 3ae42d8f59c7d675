"""Does the device leg pay on this machine? (issue 18, [Note: device leg] in hf_zero/engine/offload/device_leg.py)

    python bench/device_leg_probe.py --results_dir "$OUT"          # on a lent GPU: ~30 s, ~17 GB pinned

The offloaded AdamW step of ``--elements`` fp32 elements, with a share f streamed through the
device (master, moments up; fused AdamW there with grads already on the device; master, moments
down; chunks of ``--chunk`` elements on two streams) while the CPU steps the rest with the fused
CPU AdamW, both at once, for f in 0, 0.2, ..., 1. Whether the copy engines add bandwidth the host
cores lack (the leg pays), or take it from them (it does not), shows as the wall time of each f
against f = 0 (the CPU alone). Not the engine: the kernels and copies it queues, without its
bookkeeping; the engine's leg also copies each chunk's grads up (4 bytes more per element).
``--device cpu`` runs the same arithmetic on host copies (tests/test_bench_device_leg_probe.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ADAMW = dict(lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)


def probe(device: torch.device, total: int, chunk: int, shares: list[float]) -> dict:
    cuda = device.type == "cuda"
    p, m, v = (torch.empty(total, pin_memory=cuda).normal_() for _ in range(3))
    g = torch.empty(total).normal_().mul_(1e-3)
    step_cpu = torch.tensor(1.0)
    buffers = [[torch.empty(chunk, device=device) for _ in range(3)] for _ in range(2)]
    grad = torch.empty(chunk, device=device).normal_().mul_(1e-3)
    step_dev = torch.tensor(1.0, device=device)
    streams = (torch.cuda.Stream(), torch.cuda.Stream()) if cuda else None

    def device_part(start: int) -> None:
        for k, s in enumerate(range(start, total, chunk)):
            e = min(s + chunk, total)
            bufs = [b[: e - s] for b in buffers[k % 2]]
            ctx = torch.cuda.stream(streams[k % 2]) if cuda else _null()
            with ctx:  # one stream per buffer set: its reuse is ordered by the stream
                for b, h in zip(bufs, (p, m, v)):
                    b.copy_(h[s:e], non_blocking=cuda)
                torch._fused_adamw_([bufs[0]], [grad[: e - s]], [bufs[1]], [bufs[2]], [], [step_dev], **ADAMW)
                for b, h in zip(bufs, (p, m, v)):
                    h[s:e].copy_(b, non_blocking=cuda)

    def run(share: float) -> dict:
        split = int(total * (1 - share)) // chunk * chunk
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if split < total:
            device_part(split)  # queued first: the copies and kernels run while the CPU steps
        if split:
            torch._fused_adamw_([p[:split]], [g[:split]], [m[:split]], [v[:split]], [], [step_cpu], **ADAMW)
        cpu_done = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
        return {"share": round(1 - split / total, 3), "wall_s": round(time.perf_counter() - t0, 4),
                "cpu_done_s": round(cpu_done, 4)}

    run(0.0), run(0.5)  # warm-up
    rows = [min((run(f) for _ in range(2)), key=lambda r: r["wall_s"]) for f in shares]
    base = rows[0]["wall_s"]
    for r in rows:
        r["x_cpu_alone"] = round(base / r["wall_s"], 3)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "elements": total, "chunk": chunk, "rows": rows}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--elements", type=int, default=1 << 30, help="offloaded fp32 elements (1.1B model: ~2^30)")
    ap.add_argument("--chunk", type=int, default=1 << 25, help="elements a streamed chunk")
    ap.add_argument("--shares", default="0,0.2,0.3,0.4,0.5,1", help="comma list, the first is the baseline")
    ap.add_argument("--results_dir", default=None, help="writes device_leg_probe.json there")
    args = ap.parse_args(argv)
    out = probe(torch.device(args.device), args.elements, args.chunk, [float(f) for f in args.shares.split(",")])
    out["command"] = " ".join(["python", "bench/device_leg_probe.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(out, indent=1))
    if args.results_dir:
        Path(args.results_dir, "device_leg_probe.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
