"""How fast the GPU upcasts bf16 grads into fp32 main grads, by the ways torch offers.

    python bench/cast_copy.py [--numel 1100000000] [--tensors 201] [--budget_s 60] [--name NAME --results_dir DIR --git_commit SHA]

[Note: one rank's grads] (hf_zero/engine/grad_sync.py) copies each bf16 grad into its fp32 main
grad slot as it arrives (``slot.copy_(grad)``). The session-18 profile of compiled stage 3
(h100_session18_summary.md) shows those copies in torch's unrolled casting kernel at about
1.6 TB/s, where the fp32 -> bf16 write-back runs a vectorized kernel at about 3 TB/s. This
measures, on the same sizes (``numel`` elements in ``tensors`` equal slots of one flat fp32
buffer), each alternative: per-slot ``copy_``; one ``torch._foreach_copy_`` over all slots; one
flat ``copy_`` (the bound for a whole bucket at once); per-slot ``torch.add(zero, grad, out=)``
is left out (it reads a third tensor). Prints one JSON line per way: ms and GB/s (6 bytes an
element moved). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1_100_000_000)
    p.add_argument("--tensors", type=int, default=201)
    p.add_argument("--name", default="cast_copy", help="writes RESULTS_DIR/NAME.json")
    p.add_argument("--results_dir", default=None, help="no JSON written without it")
    p.add_argument("--git_commit", default=None)
    p.add_argument("--budget_s", type=float, default=60.0, help="ways not started once this many seconds have passed")
    return p.parse_args(argv)


def main() -> None:
    a = parse_args()
    began = time.monotonic()
    per = a.numel // a.tensors // 8 * 8
    src_flat = torch.randn(per * a.tensors, device="cuda", dtype=torch.bfloat16)
    dst_flat = torch.empty(per * a.tensors, device="cuda", dtype=torch.float32)
    srcs = [src_flat[i * per:(i + 1) * per].clone() for i in range(a.tensors)]  # separate grads
    dsts = list(dst_flat.split(per))
    ways = {
        "per-slot copy_": lambda: [d.copy_(s) for d, s in zip(dsts, srcs)],
        "foreach_copy_": lambda: torch._foreach_copy_(dsts, srcs),
        "flat copy_": lambda: dst_flat.copy_(src_flat),
    }
    rows = []
    for name, fn in ways.items():
        if time.monotonic() - began > a.budget_s:
            print(json.dumps({"way": name, "skipped": f"past --budget_s {a.budget_s:g}"}), flush=True)
            continue
        ms = _time(fn)
        rows.append({"way": name, "ms": round(ms, 3), "GB_per_s": round(6 * per * a.tensors / ms / 1e6, 1),
                     "numel": per * a.tensors, "tensors": a.tensors, "device": torch.cuda.get_device_name(),
                     "torch": torch.__version__, "git_commit": a.git_commit})
        print(json.dumps(rows[-1]), flush=True)
    for d, s in zip(dsts, srcs):  # every way wrote the same values
        assert torch.equal(d, s.float())
    if a.results_dir:
        with open(os.path.join(a.results_dir, f"{a.name}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
