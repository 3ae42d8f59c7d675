"""How much of one profiled step's communication the GPU hid behind compute.

    python bench/profile_summary.py results/NAME_hfzero-s3_step5.trace.json.gz   # prints the summary

Input: the GPU kernel events of a torch.profiler chrome trace (``"cat": "kernel"``, start ``ts``
and ``dur`` in microseconds, the CUDA stream in ``args.stream``). Kernels whose name starts with
``nccl`` are communication; every other kernel is compute. Each class becomes the union of its
kernels' intervals (kernels of one stream never overlap; kernels of several compute streams may),
and

    nccl_us      = |union(NCCL kernels)|          (time some NCCL kernel runs)
    compute_us   = |union(compute kernels)|       (time some compute kernel runs)
    overlap_us   = |union(NCCL) ∩ union(compute)| (both at once: necessarily on different streams)
    exposed_nccl_us = nccl_us - overlap_us        (communication nothing hid)
    hidden_fraction = overlap_us / nccl_us

Worked example: compute runs [0, 10) and [12, 20), NCCL runs [8, 14): nccl_us = 6, overlap_us
= 2 + 2 = 4 ([8, 10) and [12, 14)), exposed 2 ([10, 12)), hidden_fraction 2/3.

[Note: idle gaps] ``idle_gaps`` says where the GPU waited for the host: the gaps of at least
``min_us`` between the union of all kernels (first start to last end), each with the kernel that
ended it and the host ops that were running when that kernel was launched (its ``cuda_runtime``
launch event, matched by ``args.correlation``, inside ``cpu_op`` / ``user_annotation`` events),
outermost first. Issue 21's compiled step had 10 ms of such gaps before ``hf_zero::clip_grad_norm``
and 6 ms before ``Optimizer.step``: host Python between the end of backward and the step.
``idle_breakdown`` sums every gap (any length) by its length class, by the class and the stream of
the kernel that ended it, and by the tenth of the kernels' span it fell in: issue 18's 7B offload
step idled 1.76 s, of which its 8 longest gaps held only 0.2 s, so where the rest went (many short
gaps: a starved launching thread; before upload casts: PCIe; early in the step: forward waiting for
the host step) needs all of them. ``idle_by_host`` says what held each gap of at least ``min_us``:
when the kernel that ended it was launched after the GPU went idle, the host thread that launched
it was late, and the gap is charged to what that thread was doing halfway between (its outermost
annotation and innermost op around that instant, e.g. ``Optimizer.step > cudaEventSynchronize``);
when it was launched before, the kernel waited for another stream's work (an event, a copy), and
the gap is charged to ``queued`` and the kernel's stream.

An NCCL kernel's duration includes the time it waits for the slowest rank to arrive, so nccl_us
is an upper bound on transfer time, and exposed_nccl_us also counts waiting for stragglers.
[Note: kernel time] ``kernel_time`` says where the compute went: the summed duration of every
kernel, by class (``gemm``, ``attention``, ``triton`` (compiled regions), ``norm``, ``optimizer``,
``copy``, ``elementwise``, ``nccl``, ``other``: the first pattern of ``_CLASSES`` a kernel's name
matches), by the outermost ``user_annotation`` its launch ran in (not counting the profiler's own
``ProfilerStep#N``) (``Optimizer.step``,
``hf_zero::clip_grad_norm``, ...; ``(none)`` outside any), and the ``top`` kernel names by total
time. Issue 21 asked where a compiled step's 154 ms of kernels went, which the interval summary
above cannot say. Sums, not unions: kernels on several streams may add up to more than the span.

Pure Python, no torch: unit tests feed it synthetic intervals (tests/test_profile_summary.py).
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable

Interval = tuple[float, float]

_NCCL_KIND = re.compile(r"^nccl(?:Dev)?Kernel_([A-Za-z]+)")


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering exactly the points of ``intervals`` (empty ones dropped)."""
    merged: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def length(intervals: Iterable[Interval]) -> float:
    """Measure of the union of ``intervals`` (overlaps counted once)."""
    return sum(e - s for s, e in union(intervals))


def intersection(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Points covered by both ``a`` and ``b``, as sorted disjoint intervals."""
    a, b = union(a), union(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return out


def is_nccl(name: str) -> bool:
    return name.lower().startswith("nccl")


def collective_kind(name: str) -> str:
    """``AllGather`` from ``ncclDevKernel_AllGather_RING_LL(...)``; ``other`` if unrecognised."""
    m = _NCCL_KIND.match(name)
    return m.group(1) if m else "other"


def summarize_kernels(kernels: list[dict], step_wall_us: float | None = None) -> dict:
    """Summary of kernel dicts with ``name``, ``ts``, ``dur`` (us) and optionally ``stream``."""
    nccl = [(k["ts"], k["ts"] + k["dur"]) for k in kernels if is_nccl(k["name"])]
    compute = [(k["ts"], k["ts"] + k["dur"]) for k in kernels if not is_nccl(k["name"])]
    by_kind: dict[str, list[Interval]] = defaultdict(list)
    streams: dict[str, set] = {"nccl": set(), "compute": set()}
    for k in kernels:
        cls = "nccl" if is_nccl(k["name"]) else "compute"
        streams[cls].add(k.get("stream"))
        if cls == "nccl":
            by_kind[collective_kind(k["name"])].append((k["ts"], k["ts"] + k["dur"]))
    nccl_us, compute_us = length(nccl), length(compute)
    overlap_us = length(intersection(nccl, compute))
    everything = nccl + compute
    span = (max(e for _, e in everything) - min(s for s, _ in everything)) if everything else 0.0
    return {
        "step_wall_us": step_wall_us,
        "gpu_span_us": span,  # first kernel start to last kernel end
        "gpu_busy_us": length(everything),
        "compute_us": compute_us,
        "nccl_us": nccl_us,
        "overlap_us": overlap_us,
        "exposed_nccl_us": nccl_us - overlap_us,
        "hidden_fraction": overlap_us / nccl_us if nccl_us > 0 else None,
        "nccl_us_by_collective": {kind: length(iv) for kind, iv in sorted(by_kind.items())},
        "kernels": len(kernels),
        "nccl_kernels": len(nccl),
        "streams": {cls: sorted(s for s in ids if s is not None) for cls, ids in streams.items()},
    }


def kernels_from_trace(trace: dict) -> list[dict]:
    """The GPU kernel events of a chrome trace as exported by ``torch.profiler``."""
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") == "X" and str(ev.get("cat", "")).lower() == "kernel" and "dur" in ev:
            args = ev.get("args") or {}
            out.append({"name": ev.get("name", ""), "ts": float(ev["ts"]), "dur": float(ev["dur"]),
                        "stream": args.get("stream", ev.get("tid"))})
    return out


def idle_gaps(trace: dict, min_us: float = 50.0, top: int = 8) -> dict:
    """[Note: idle gaps]: ``idle_us`` (all gaps in the kernels' span, any length) and the ``top``
    longest gaps of at least ``min_us``, longest first, times relative to the first kernel."""
    events = [ev for ev in trace.get("traceEvents", []) if ev.get("ph") == "X" and "dur" in ev]
    kernels = sorted((ev for ev in events if str(ev.get("cat", "")).lower() == "kernel"), key=lambda ev: ev["ts"])
    if not kernels:
        return {"idle_us": 0.0, "gaps": []}
    launches = {(ev.get("args") or {}).get("correlation"): ev for ev in events
                if str(ev.get("cat", "")).lower() == "cuda_runtime"}
    host = [ev for ev in events if str(ev.get("cat", "")).lower() in ("cpu_op", "user_annotation")]
    first, busy = float(kernels[0]["ts"]), union((float(k["ts"]), float(k["ts"]) + float(k["dur"])) for k in kernels)
    gaps, idle = [], 0.0
    for (_, end), (start, _) in zip(busy, busy[1:]):
        idle += start - end
        if start - end >= min_us:
            gaps.append((end, start))
    out = []
    for end, start in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        kernel = next(k for k in kernels if float(k["ts"]) >= start)
        launch = launches.get((kernel.get("args") or {}).get("correlation"))
        around = [] if launch is None else sorted(
            (ev for ev in host if ev["ts"] <= launch["ts"] <= ev["ts"] + ev["dur"]), key=lambda ev: (ev["ts"], -ev["dur"]))
        out.append({"at_us": end - first, "idle_us": start - end, "next_kernel": kernel.get("name", ""),
                    "launched_in": [ev.get("name", "") for ev in around]})
    return {"idle_us": idle, "gaps": out}


GAP_CLASSES = ((20.0, "<20us"), (100.0, "20-100us"), (1000.0, "0.1-1ms"), (10000.0, "1-10ms"), (float("inf"), ">=10ms"))


def idle_breakdown(trace: dict) -> dict:
    """[Note: idle gaps]: every gap's microseconds summed by length class (with counts), by the class
    and the stream of the kernel that ended it, and by tenth of the kernels' span."""
    kernels = sorted((ev for ev in trace.get("traceEvents", []) if ev.get("ph") == "X" and "dur" in ev
                      and str(ev.get("cat", "")).lower() == "kernel"), key=lambda ev: float(ev["ts"]))
    out = {"by_length": {name: [0.0, 0] for _, name in GAP_CLASSES}, "by_next_class": defaultdict(float),
           "by_next_stream": defaultdict(float), "by_tenth": [0.0] * 10}
    if not kernels:
        return {k: dict(v) if isinstance(v, defaultdict) else v for k, v in out.items()}
    first = float(kernels[0]["ts"])
    span = max(float(k["ts"]) + float(k["dur"]) for k in kernels) - first
    reach = float(kernels[0]["ts"]) + float(kernels[0]["dur"])
    for k in kernels[1:]:
        start = float(k["ts"])
        if start > reach:
            gap = start - reach
            name = next(n for bound, n in GAP_CLASSES if gap < bound)
            out["by_length"][name][0] += gap
            out["by_length"][name][1] += 1
            out["by_next_class"][kernel_class(k.get("name", ""))] += gap
            out["by_next_stream"][str((k.get("args") or {}).get("stream", k.get("tid")))] += gap
            out["by_tenth"][min(9, int(10 * (reach - first) / span)) if span > 0 else 0] += gap
        reach = max(reach, start + float(k["dur"]))
    return {"by_length": {n: [round(us, 1), c] for n, (us, c) in out["by_length"].items()},
            "by_next_class": {k: round(v, 1) for k, v in sorted(out["by_next_class"].items(), key=lambda kv: -kv[1])},
            "by_next_stream": {k: round(v, 1) for k, v in sorted(out["by_next_stream"].items(), key=lambda kv: -kv[1])},
            "by_tenth": [round(v, 1) for v in out["by_tenth"]]}


def idle_by_host(trace: dict, min_us: float = 50.0, top: int = 12) -> list[list]:
    """[Note: idle gaps]: the ``top`` causes of idle time (gaps of at least ``min_us``), longest
    first, each ``[cause, microseconds, gaps]``. One sweep over each thread's host events (a trace
    holds hundreds of thousands)."""
    events = [ev for ev in trace.get("traceEvents", []) if ev.get("ph") == "X" and "dur" in ev]
    kernels = sorted((ev for ev in events if str(ev.get("cat", "")).lower() == "kernel"), key=lambda ev: float(ev["ts"]))
    if not kernels:
        return []
    launches = {(ev.get("args") or {}).get("correlation"): ev for ev in events
                if str(ev.get("cat", "")).lower() == "cuda_runtime"}
    busy = union((float(k["ts"]), float(k["ts"]) + float(k["dur"])) for k in kernels)
    starts = [float(k["ts"]) for k in kernels]
    causes: dict[str, list] = defaultdict(lambda: [0.0, 0])
    late: list[tuple[float, object, float]] = []  # (instant, thread, gap): a late launch's thread, asked below
    for (_, end), (start, _) in zip(busy, busy[1:]):
        if start - end < min_us:
            continue
        kernel = kernels[bisect.bisect_left(starts, start)]
        launch = launches.get((kernel.get("args") or {}).get("correlation"))
        if launch is None:
            cause = "(no launch event)"
        elif float(launch["ts"]) <= end:
            cause = f"queued (stream {(kernel.get('args') or {}).get('stream', kernel.get('tid'))})"
        else:
            late.append(((end + float(launch["ts"])) / 2, launch.get("tid"), start - end))
            continue
        causes[cause][0] += start - end
        causes[cause][1] += 1
    for cause, gap in zip(_doing(events, late), (g for _, _, g in late)):
        causes[cause][0] += gap
        causes[cause][1] += 1
    ranked = sorted(causes.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]  # ties by name
    return [[cause, round(us, 1), n] for cause, (us, n) in ranked]


def _doing(events: list[dict], asked: list[tuple[float, object, float]]) -> list[str]:
    """For each ``(instant, thread, _)``: what that thread was doing then, ``outer > inner`` (its
    outermost annotation and innermost op around the instant), in the order asked."""
    host = sorted((ev for ev in events if str(ev.get("cat", "")).lower() in ("cpu_op", "user_annotation", "cuda_runtime")
                   and not str(ev.get("name", "")).startswith("ProfilerStep")), key=lambda ev: float(ev["ts"]))
    by_thread: dict = defaultdict(list)
    for ev in host:
        by_thread[ev.get("tid")].append(ev)
    seen = {tid: 0 for tid in by_thread}
    active: dict = defaultdict(list)
    out: list[str] = [""] * len(asked)
    for k in sorted(range(len(asked)), key=lambda k: asked[k][0]):
        t, tid, _ = asked[k]
        evs = by_thread.get(tid, [])
        while seen.get(tid, 0) < len(evs) and float(evs[seen[tid]]["ts"]) <= t:
            active[tid].append(evs[seen[tid]])
            seen[tid] += 1
        active[tid] = around = [ev for ev in active[tid] if float(ev["ts"]) + float(ev["dur"]) >= t]
        outer = next((ev["name"] for ev in around if str(ev.get("cat", "")).lower() == "user_annotation"), None)
        inner = around[-1]["name"] if around else "(host idle: Python between ops)"
        out[k] = inner if outer is None or outer == inner else f"{outer} > {inner}"
    return out

_CLASSES = (
    ("nccl", re.compile(r"^nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|attention", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|wgmma", re.I)),
    ("triton", re.compile(r"^triton_", re.I)),
    ("norm", re.compile(r"reduce_kernel|norm", re.I)),  # before optimizer: the foreach norm is a multi_tensor_apply
    ("optimizer", re.compile(r"adam|multi_tensor_apply", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|cat_|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
)


def kernel_class(name: str) -> str:
    """[Note: kernel time]: the first class of ``_CLASSES`` whose pattern ``name`` matches."""
    return next((cls for cls, pattern in _CLASSES if pattern.search(name)), "other")


def kernel_time(trace: dict, top: int = 15) -> dict:
    """[Note: kernel time]: summed kernel microseconds by class, by outermost host annotation, and
    the ``top`` kernel names, each list longest first."""
    events = [ev for ev in trace.get("traceEvents", []) if ev.get("ph") == "X" and "dur" in ev]
    kernels = [ev for ev in events if str(ev.get("cat", "")).lower() == "kernel"]
    launches = {(ev.get("args") or {}).get("correlation"): ev for ev in events
                if str(ev.get("cat", "")).lower() == "cuda_runtime"}
    regions = sorted((ev for ev in events if str(ev.get("cat", "")).lower() == "user_annotation"
                      and not str(ev.get("name", "")).startswith("ProfilerStep")),
                     key=lambda ev: (float(ev["ts"]), -float(ev["dur"])))
    by_class: dict[str, float] = defaultdict(float)
    by_region: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for k in kernels:
        dur, name = float(k["dur"]), k.get("name", "")
        by_class[kernel_class(name)] += dur
        by_name[name] += dur
        launch = launches.get((k.get("args") or {}).get("correlation"))
        region = "(none)"
        if launch is not None:  # the outermost annotation around the launch: the first that covers it
            t = float(launch["ts"])
            region = next((ev.get("name", "") for ev in regions
                           if float(ev["ts"]) <= t <= float(ev["ts"]) + float(ev["dur"])), "(none)")
        by_region[region] += dur

    def ranked(d: dict[str, float], n: int | None = None) -> list[list]:
        return [[k, round(v, 1)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"total_us": round(sum(by_class.values()), 1), "by_class": ranked(by_class),
            "by_region": ranked(by_region), "top_kernels": ranked(by_name, top)}


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def summarize_trace(path: str, step_wall_us: float | None = None) -> dict:
    trace = load_trace(path)
    return {**summarize_kernels(kernels_from_trace(trace), step_wall_us), "idle": idle_gaps(trace),
            "idle_breakdown": idle_breakdown(trace), "idle_by_host": idle_by_host(trace),
            "kernel_time": kernel_time(trace)}


def describe(summary: dict) -> str:
    """One paragraph for a results note."""
    s = summary
    hidden = "n/a" if s["hidden_fraction"] is None else f"{100 * s['hidden_fraction']:.0f}%"
    wall = "" if s.get("step_wall_us") is None else f"step {s['step_wall_us'] / 1e3:.1f} ms wall, "
    kinds = ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in s["nccl_us_by_collective"].items())
    return (f"{wall}GPU busy {s['gpu_busy_us'] / 1e3:.1f} ms of a {s['gpu_span_us'] / 1e3:.1f} ms span; "
            f"compute {s['compute_us'] / 1e3:.1f} ms, NCCL {s['nccl_us'] / 1e3:.1f} ms ({kinds}); "
            f"{s['overlap_us'] / 1e3:.1f} ms of NCCL ran under compute: {hidden} hidden, "
            f"{s['exposed_nccl_us'] / 1e3:.1f} ms exposed" + _describe_idle(s.get("idle")))


def _describe_idle(idle: dict | None) -> str:
    if not idle or not idle["gaps"]:
        return ""
    worst = idle["gaps"][0]
    where = " > ".join(worst["launched_in"]) or "no host op"
    return (f"; GPU idle {idle['idle_us'] / 1e3:.1f} ms between kernels, the longest {worst['idle_us'] / 1e3:.1f} ms "
            f"before a kernel launched in {where}")


if __name__ == "__main__":
    for trace_path in sys.argv[1:]:
        result = summarize_trace(trace_path)
        print(json.dumps(result, indent=2))
        print(describe(result))
