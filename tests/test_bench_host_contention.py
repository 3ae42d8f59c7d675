"""bench/host_contention.py on CPU, small: the AdamW part runs and its rate is the bytes it moves
over its time (the copies and the contention need CUDA: the GPU run measures them)."""

from __future__ import annotations

import json

from tests.test_bench_scaling import _load

host_contention = _load("host_contention")


def test_the_adamw_rate_is_its_bytes_over_its_time(tmp_path):
    out = host_contention.main(["--device", "cpu", "--numel", "100000", "--reps", "2", "--results_dir", str(tmp_path),
                                "--name", "check", "--git_commit", "abc"])
    assert out["adamw"]["s"] > 0
    assert out["adamw"]["gb_s"] == 28 * 100000 / out["adamw"]["s"] / 1e9
    assert "copies" not in out and "both" not in out
    assert json.loads((tmp_path / "check.json").read_text()) == out
    by_threads = out["adamw_by_threads"]  # all, all-1, half of this machine's threads, each once
    assert list(by_threads) == [str(n) for n in host_contention._thread_counts("all,all-1,half", out["threads"])]
    assert all(r["gb_s"] == 28 * 100000 / r["s"] / 1e9 for r in by_threads.values())


def test_thread_counts():
    assert host_contention._thread_counts("all,all-1,half", 16) == [16, 15, 8]
    assert host_contention._thread_counts("all,all-1,half", 2) == [2, 1]  # half is 1 as well: once
    assert host_contention._thread_counts("4,all", 1) == [4, 1]
