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


def test_idle_breakdown_sums_every_gap_by_length_next_kernel_and_tenth_of_the_span():
    """[Note: idle gaps]: kernels over a 200 us span, one of them on a second stream; each gap counted
    once, by where it starts."""
    def kernel(name, ts, dur, stream):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = {"traceEvents": [kernel("nvjet_a", 0.0, 10.0, 7), kernel("nvjet_b", 15.0, 5.0, 7),
                             kernel("bfloat16_copy_kernel", 70.0, 30.0, 21), kernel("vectorized_mul", 60.0, 5.0, 7),
                             kernel("nvjet_c", 190.0, 10.0, 7)]}
    b = ps.idle_breakdown(trace)
    # gaps: [10,15) 5 us before nvjet_b; [20,60) 40 us before vectorized_mul; [65,70) 5 us before the
    # copy (the mul ends at 65); [100,190) 90 us before nvjet_c
    assert b["by_length"] == {"<20us": [10.0, 2], "20-100us": [130.0, 2], "0.1-1ms": [0.0, 0],
                              "1-10ms": [0.0, 0], ">=10ms": [0.0, 0]}
    assert b["by_next_class"] == {"gemm": 95.0, "elementwise": 40.0, "copy": 5.0}
    assert b["by_next_stream"] == {"7": 135.0, "21": 5.0}
    assert b["by_tenth"] == [5.0, 40.0, 0.0, 5.0, 0.0, 90.0, 0.0, 0.0, 0.0, 0.0]
    assert sum(us for us, _ in b["by_length"].values()) == ps.idle_gaps(trace)["idle_us"]
    assert ps.idle_breakdown({"traceEvents": []})["by_tenth"] == [0.0] * 10


def test_idle_by_host_charges_late_launches_to_the_thread_and_early_ones_to_their_stream():
    """[Note: idle gaps]: the gap [10, 100) ends at k2, launched at 90 by thread 1 while it was in
    step > cudaEventSynchronize (at 50, halfway from 10 to 90); the gap [110, 200) ends at k3,
    launched at 20 (before the GPU went idle): it waited on another stream; [210, 260) ends at k4,
    launched at 250 with nothing around 230 on its thread; the 5 us gap [265, 270) is below min_us."""
    def kernel(name, ts, dur, corr, stream=7):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
                "args": {"correlation": corr, "stream": stream}}

    def launch(ts, corr, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1.0, "tid": tid,
                "args": {"correlation": corr}}

    trace = {"traceEvents": [
        kernel("k1", 0.0, 10.0, 1), kernel("k2", 100.0, 10.0, 2), kernel("k3", 200.0, 10.0, 3, stream=17),
        kernel("k4", 260.0, 5.0, 4), kernel("k5", 270.0, 5.0, 5),
        launch(0.0, 1), launch(90.0, 2), launch(20.0, 3, tid=2), launch(250.0, 4), launch(265.0, 5),
        {"ph": "X", "cat": "user_annotation", "name": "step", "ts": 5.0, "dur": 100.0, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "cudaEventSynchronize", "ts": 15.0, "dur": 70.0, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "elsewhere", "ts": 15.0, "dur": 70.0, "tid": 2},
    ]}
    assert ps.idle_by_host(trace, min_us=10.0) == [
        ["queued (stream 17)", 90.0, 1], ["step > cudaEventSynchronize", 90.0, 1],
        ["(host idle: Python between ops)", 50.0, 1]]
    assert ps.idle_by_host({"traceEvents": []}) == []


def test_kernel_time_by_class_by_outermost_region_and_top_names():
    """[Note: kernel time]: sums (not unions) by class, by the outermost annotation around each
    kernel's launch (ProfilerStep#N is not a region; no launch event or none around it: (none))."""
    def kernel(name, ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts, corr):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1.0,
                "args": {"correlation": corr}}

    trace = {"traceEvents": [
        kernel("nvjet_sm90_tst_256x128", 0.0, 40.0, 1), kernel("nvjet_sm90_tst_256x128", 40.0, 20.0, 2),
        kernel("triton_poi_fused_add_mul_0", 60.0, 5.0, 3),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 65.0, 10.0, 4),
        kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 100.0, 30.0, 5),
        kernel("multi_tensor_apply_kernel<LpNormFunctor>", 130.0, 4.0, 6),
        kernel("ncclDevKernel_AllGather_RING_LL", 0.0, 7.0, 7), kernel("mystery", 140.0, 1.0, 99),
        launch(0.5, 1), launch(1.0, 2), launch(2.0, 3), launch(3.0, 4), launch(90.0, 5), launch(85.0, 6),
        launch(0.2, 7),
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#12", "ts": 0.0, "dur": 200.0},
        {"ph": "X", "cat": "user_annotation", "name": "Torch-Compiled Region", "ts": 0.4, "dur": 5.0},
        {"ph": "X", "cat": "user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 88.0, "dur": 10.0},
        {"ph": "X", "cat": "user_annotation", "name": "hf_zero::clip_grad_norm", "ts": 80.0, "dur": 8.0},
        {"ph": "X", "cat": "user_annotation", "name": "hf_zero::grad_norm", "ts": 84.0, "dur": 2.0},
    ]}
    kt = ps.kernel_time(trace, top=2)
    assert kt["total_us"] == 117.0
    assert dict(map(tuple, kt["by_class"])) == {"gemm": 60.0, "optimizer": 30.0, "attention": 10.0, "nccl": 7.0,
                                                "triton": 5.0, "norm": 4.0, "other": 1.0}
    assert kt["by_class"][0] == ["gemm", 60.0]
    assert dict(map(tuple, kt["by_region"])) == {"Torch-Compiled Region": 75.0, "Optimizer.step#AdamW.step": 30.0,
                                                 "(none)": 8.0, "hf_zero::clip_grad_norm": 4.0}
    assert kt["top_kernels"] == [["nvjet_sm90_tst_256x128", 60.0],
                                 ["multi_tensor_apply_kernel<FusedAdamMathFunctor>", 30.0]]
    assert ps.kernel_class("void at::native::vectorized_elementwise_kernel<4, FillFunctor>") == "copy"
    assert ps.kernel_class("void at::native::reduce_kernel<512, 1>") == "norm"
    assert ps.kernel_time({"traceEvents": []}) == {"total_us": 0.0, "by_class": [], "by_region": [], "top_kernels": []}
