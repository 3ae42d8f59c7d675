"""How fast the GPU upcasts bf16 grads into fp32 main grads, by the ways torch offers.

    python bench/cast_copy.py [--numel 1100000000] [--tensors 201] [--budget_s 60] [--name NAME --results_dir DIR --git_commit SHA]

[Note: one rank's grads] (hf_zero/engine/grad_sync.py) copies each bf16 grad into its fp32 main
grad slot as it arrives (``slot.copy_(grad)``). The session-18 profile of compiled stage 3
(h100_session18_summary.md) shows those copies in torch's unrolled casting kernel at about
1.6 TB/s, where the fp32 -> bf16 write-back runs a vectorized kernel at about 3 TB/s. This
measures, on the same sizes (``numel`` elements in ``tensors`` equal slots of one flat fp32
buffer), each alternative: per-slot ``copy_``; one ``torch._foreach_copy_`` over all slots; one
flat ``copy_`` (the bound for a whole bucket at once); the bf16 halves of each fp32 slot written
by two copies without a cast; inductor's cast (CUDA only). Prints one JSON line per way: ms,
GB/s (6 bytes an element moved) and whether it wrote the exact upcast. ``--device cpu`` runs the
same ways small, as a check of the script (tests/test_bench_cast_copy.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _time(fn, device: str, reps: int = 10) -> float:
    """Milliseconds per call of ``fn`` (after one untimed call)."""
    fn()
    if device != "cuda":
        began = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - began) * 1e3 / reps
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
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a check of the script)")
    p.add_argument("--name", default="cast_copy", help="writes RESULTS_DIR/NAME.json")
    p.add_argument("--results_dir", default=None, help="no JSON written without it")
    p.add_argument("--git_commit", default=None)
    p.add_argument("--budget_s", type=float, default=60.0, help="ways not started once this many seconds have passed")
    return p.parse_args(argv)


def ways(dsts: list, srcs: list, dst_flat: torch.Tensor, src_flat: torch.Tensor, device: str) -> dict:
    """Each way of writing every ``srcs[i]`` (bf16) into ``dsts[i]`` (fp32 slots of ``dst_flat``)."""
    # A bf16 -> fp32 upcast is exact: the fp32 word is the bf16 bits above 16 zero bits. Viewed as
    # bf16 pairs (little-endian: the low half first), a slot takes the grad in its odd halves and
    # zeros in its even ones: two copies without a cast.
    halves = [d.view(torch.bfloat16).view(-1, 2) for d in dsts]

    def by_halves():
        for h, s in zip(halves, srcs):
            h[:, 1].copy_(s)
            h[:, 0].zero_()

    out = {
        "per-slot copy_": lambda: [d.copy_(s) for d, s in zip(dsts, srcs)],
        "foreach_copy_": lambda: torch._foreach_copy_(dsts, srcs),
        "flat copy_ (one bucket at once)": lambda: dst_flat.copy_(src_flat),
        "per-slot bf16 halves": by_halves,
    }
    if device == "cuda":  # inductor's cast kernel (a C++ compiler on CPU: not worth the check's time)
        compiled = torch.compile(lambda d, s: d.copy_(s), dynamic=True)
        out["per-slot torch.compile copy_"] = lambda: [compiled(d, s) for d, s in zip(dsts, srcs)]
    return out


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    began = time.monotonic()
    per = a.numel // a.tensors // 8 * 8
    src_flat = torch.randn(per * a.tensors, device=a.device, dtype=torch.bfloat16)
    dst_flat = torch.empty(per * a.tensors, device=a.device, dtype=torch.float32)
    srcs = [src_flat[i * per:(i + 1) * per].clone() for i in range(a.tensors)]  # separate grads
    dsts = list(dst_flat.split(per))
    rows = []
    for name, fn in ways(dsts, srcs, dst_flat, src_flat, a.device).items():
        if time.monotonic() - began > a.budget_s:
            print(json.dumps({"way": name, "skipped": f"past --budget_s {a.budget_s:g}"}), flush=True)
            continue
        dst_flat.fill_(float("nan"))
        ms = _time(fn, a.device)
        exact = all(torch.equal(d, s.float()) for d, s in zip(dsts, srcs))
        rows.append({"way": name, "ms": round(ms, 3), "GB_per_s": round(6 * per * a.tensors / ms / 1e6, 1),
                     "exact": exact, "numel": per * a.tensors, "tensors": a.tensors,
                     "device": torch.cuda.get_device_name() if a.device == "cuda" else a.device,
                     "torch": torch.__version__, "git_commit": a.git_commit})
        print(json.dumps(rows[-1]), flush=True)
    if a.results_dir:
        with open(os.path.join(a.results_dir, f"{a.name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
