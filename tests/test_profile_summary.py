"""bench/profile_summary.py: interval arithmetic and the hidden-communication summary, on synthetic
kernels (bench/ is not a package: the module is loaded from its file)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "profile_summary.py"
_spec = importlib.util.spec_from_file_location("bench_profile_summary", _PATH)
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)


def test_union_merges_overlapping_touching_and_nested():
    assert ps.union([(5, 7), (0, 2), (1, 3), (3, 4), (10, 12), (10.5, 11)]) == [(0, 4), (5, 7), (10, 12)]
    assert ps.union([]) == []
    assert ps.union([(2, 2), (3, 1)]) == []  # empty and reversed intervals count for nothing


def test_length_counts_overlaps_once():
    assert ps.length([(0, 10), (5, 15), (20, 21)]) == 16
    assert ps.length([(0, 1)] * 5) == 1


def test_intersection():
    a = [(0, 10), (12, 20)]
    b = [(8, 14), (19, 30)]
    assert ps.intersection(a, b) == [(8, 10), (12, 14), (19, 20)]
    assert ps.intersection(a, []) == []
    assert ps.intersection([(0, 5)], [(5, 9)]) == []  # touching is not overlapping
    # unsorted, self-overlapping inputs are normalised first
    assert ps.intersection([(4, 6), (0, 5)], [(3, 4), (3, 5)]) == [(3, 5)]


def _k(name, ts, dur, stream):
    return {"name": name, "ts": ts, "dur": dur, "stream": stream}


def test_worked_example_from_the_docstring():
    kernels = [_k("ampere_bf16_gemm", 0, 10, 7), _k("elementwise", 12, 8, 7),
               _k("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 8, 6, 20)]
    s = ps.summarize_kernels(kernels, step_wall_us=25.0)
    assert s["nccl_us"] == 6 and s["compute_us"] == 18 and s["overlap_us"] == 4
    assert s["exposed_nccl_us"] == 2
    assert s["hidden_fraction"] == pytest.approx(2 / 3)
    assert s["gpu_span_us"] == 20 and s["gpu_busy_us"] == 20
    assert s["nccl_us_by_collective"] == {"AllGather": 6}
    assert s["streams"] == {"nccl": [20], "compute": [7]}
    assert s["step_wall_us"] == 25.0


def test_two_compute_streams_and_two_collectives_overlapping_each_other():
    kernels = [_k("gemm", 0, 10, 7), _k("copy_kernel", 5, 10, 9),  # compute union [0, 15)
               _k("ncclKernel_ReduceScatter_RING", 12, 8, 20),  # [12, 20)
               _k("ncclDevKernel_AllGather_RING_LL", 14, 2, 21)]  # inside the reduce-scatter
    s = ps.summarize_kernels(kernels)
    assert s["compute_us"] == 15
    assert s["nccl_us"] == 8  # the two NCCL kernels' union, not their sum (10)
    assert s["overlap_us"] == 3  # [12, 15)
    assert s["nccl_us_by_collective"] == {"AllGather": 2, "ReduceScatter": 8}
    assert s["hidden_fraction"] == pytest.approx(3 / 8)


def test_no_communication_and_no_kernels():
    s = ps.summarize_kernels([_k("gemm", 0, 4, 7)])
    assert s["nccl_us"] == 0 and s["hidden_fraction"] is None
    empty = ps.summarize_kernels([])
    assert empty["gpu_span_us"] == 0 and empty["kernels"] == 0


def test_kernels_from_a_gzipped_chrome_trace(tmp_path):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 100.0, "dur": 50.0, "tid": 7, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "ts": 120.0, "dur": 60.0,
         "tid": 13, "args": {"stream": 13}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 90.0, "dur": 5.0},  # host events are ignored
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 0.0, "dur": 5.0},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1.0},
    ]}
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    s = ps.summarize_trace(str(path), step_wall_us=200.0)
    assert s["kernels"] == 2 and s["nccl_kernels"] == 1
    assert s["overlap_us"] == 30 and s["exposed_nccl_us"] == 30
    assert s["nccl_us_by_collective"] == {"AllReduce": 60}
    assert "50% hidden" in ps.describe(s)


def test_idle_gaps_name_the_host_ops_that_launched_the_kernel_after_each_gap():
    """[Note: idle gaps]: kernels [0,10) [10,20) [100,110) [112,130); the 80 us gap ends at k3, launched
    inside step > clip (host events around the launch, outermost first); the 2 us gap is below min_us."""
    def kernel(name, ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    trace = {"traceEvents": [
        kernel("k1", 0.0, 10.0, 1), kernel("k2", 10.0, 10.0, 2), kernel("k3", 100.0, 10.0, 3),
        kernel("k4", 112.0, 18.0, 4),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 95.0, "dur": 1.0, "args": {"correlation": 3}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 105.0, "dur": 1.0, "args": {"correlation": 4}},
        {"ph": "X", "cat": "user_annotation", "name": "step", "ts": 20.0, "dur": 90.0},
        {"ph": "X", "cat": "cpu_op", "name": "clip", "ts": 90.0, "dur": 10.0},
        {"ph": "X", "cat": "cpu_op", "name": "other", "ts": 101.0, "dur": 10.0},
    ]}
    idle = ps.idle_gaps(trace, min_us=5.0)
    assert idle["idle_us"] == 82.0
    assert idle["gaps"] == [{"at_us": 20.0, "idle_us": 80.0, "next_kernel": "k3", "launched_in": ["step", "clip"]}]
    assert ps.idle_gaps(trace, min_us=1.0)["gaps"][1]["launched_in"] == ["step", "other"]
    assert ps.idle_gaps({"traceEvents": []}) == {"idle_us": 0.0, "gaps": []}
