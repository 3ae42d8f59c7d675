"""Hang reports (``hf_zero/engine/diagnostics/watchdog.py``): ranks that disagree on the next collective, or a
rank that raises, stop the whole job with one report per rank naming ranks, collectives and units.

The multi-rank tests start each rank as its own ``python -m hf_zero.run tests/engine/data/watchdog_job.py``
process on gloo (a rank that the watchdog stops ends with ``os._exit``, which ``run_on_ranks`` would
only see as a timeout), and check each rank's exit code, output, and how long after the ranks went
separate ways it ended (each rank prints "diverging at <time.time()>")."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_zero.config import HfZeroConfig, load_config
from hf_zero.engine.diagnostics import flight_recorder as FR
from hf_zero.engine.diagnostics import watchdog as W
from hf_zero.testing.multiprocess import run_rank_processes

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "engine" / "data" / "watchdog_job.py"


def _launch(tmp_path, scenario: str, timeout_s: float, world: int = 2, limit: float = 90.0,
            runner: bool = True) -> list[dict]:
    """Run the job's ranks; per rank: exit code, output, and seconds from divergence to exit.

    ``runner=False``: ``python watchdog_job.py`` without ``hf_zero.run`` (as a script that calls
    hf_zero itself)."""
    command = [sys.executable, *(["-m", "hf_zero.run"] if runner else []), str(JOB), scenario, str(timeout_s)]
    ranks = run_rank_processes(command, world, tmp_path, limit=limit, cwd=ROOT,
                               env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    out = []
    for got in ranks:
        diverged = re.search(r"diverging at ([\d.]+)", got["text"])
        after = got["ended"] - float(diverged.group(1)) if diverged and got["ended"] is not None else None
        out.append({"code": got["code"], "text": got["text"], "after": after})
    return out


def _report_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("hf_zero:")]


def test_unit_skipped_on_one_rank_stops_every_rank_naming_rank_unit_and_collective(tmp_path):
    """Rank 1's forward skips block 1: its gather of unit 0 pairs with rank 0's gather of unit 1
    (same size), so rank 0 then waits in unit 0's gather that rank 1 never starts."""
    ranks = _launch(tmp_path, "skip", timeout_s=3)
    for rank, got in enumerate(ranks):
        assert got["code"] == W.EXIT_CODE, got["text"]
        assert got["after"] < 3 + 8, got  # the timeout, a poll, the report exchange
        report = "\n".join(_report_lines(got["text"]))
        assert f"watchdog on rank {rank} of 2" in report
        assert 'collective timeout: rank 0 has waited' in report
        assert '#4 all_gather "unit 0 (blocks.2, Block)"' in report
        assert re.search(r'rank 0( \(this rank\))?: waiting [\d.]+ s in #4 all_gather "unit 0 \(blocks.2, Block\)"', report)
        assert re.search(r'rank 1( \(this rank\))?: not in an hf_zero collective; last started #3 all_gather '
                         r'"unit 0 \(blocks.2, Block\)"', report)
        assert 'main thread at busy (watchdog_job.py' in report  # where rank 1 is instead
        assert ('ranks first disagree at #3: rank 0 all_gather "unit 1 (blocks.1, Block)" (512 B); '
                'rank 1 all_gather "unit 0 (blocks.2, Block)" (512 B)') in report
        assert f"rank {rank} exits with code {W.EXIT_CODE}" in report


def test_ranks_with_the_same_status_are_grouped(tmp_path):
    """No engine: labelled all-reduces on 3 ranks; rank 1 skips "flags of step 2"."""
    ranks = _launch(tmp_path, "labels", timeout_s=3, world=3)
    for got in ranks:
        assert got["code"] == W.EXIT_CODE, got["text"]
        assert got["after"] < 3 + 8, got
        report = "\n".join(_report_lines(got["text"]))
        assert re.search(r'ranks 0, 2( \(this rank: \d\))?: waiting [\d.]+ s in #4 all_reduce "flags of step 3" \(16 B\)',
                         report)
        assert ('ranks first disagree at #3: ranks 0, 2 all_reduce "flags of step 2" (16 B); '
                'rank 1 all_reduce "flags of step 3" (16 B)') in report


@pytest.mark.parametrize("runner", [True, False], ids=["hf_zero.run", "excepthook"])
def test_a_rank_that_raises_stops_the_others_promptly(tmp_path, runner):
    """comm_timeout_s = 60, yet rank 0 (waiting in a gather rank 1 never joins) ends within seconds.

    Under ``python -m hf_zero.run`` the runner reports the exception; in a plain script, the
    ``sys.excepthook`` the watchdog chains does."""
    rank0, rank1 = _launch(tmp_path, "raise", timeout_s=60, runner=runner)
    # the exception itself, raised again after the report (a plain script leaves its gloo group
    # to interpreter exit, which may abort instead: any failure code will do there)
    assert rank1["code"] == 1 if runner else rank1["code"] != 0, rank1["text"]
    assert "ValueError: boom on purpose" in rank1["text"]  # the traceback
    assert rank0["code"] == W.EXIT_CODE, rank0["text"]
    assert rank0["after"] < 10, rank0
    for got in (rank0, rank1):
        report = "\n".join(_report_lines(got["text"]))
        assert "rank 1 raised ValueError: boom on purpose at watchdog_job.py:" in report
        assert re.search(r'rank 0( \(this rank\))?: waiting [\d.]+ s in #\d+ all_gather "unit 3 \(root, Net\)"', report)
        assert re.search(r"rank 1( \(this rank\))?: raised ValueError: boom on purpose", report)
        assert "raised in main (watchdog_job.py:" in report
        assert "rank 1 never started #" in report and "which rank 0 waits in" in report
    assert "rank 1 ends with its exception (traceback below)" in rank1["text"]
    # the report comes before the traceback on the raising rank
    assert rank1["text"].index("hf_zero: watchdog on rank 1") < rank1["text"].index("Traceback")


def test_a_clean_run_prints_nothing_and_stops_its_watchdog(tmp_path):
    ranks = _launch(tmp_path, "normal", timeout_s=3)
    for rank, got in enumerate(ranks):
        assert got["code"] == 0, got["text"]
        assert f"rank {rank}: watchdog running: True" in got["text"]
        assert "watchdog threads at exit: 0" in got["text"]  # stopped by the runner's teardown
        assert not _report_lines(got["text"]), got["text"]


def test_recorder_cost_per_collective():
    """start + done of one collective, as collectives.py calls them while a watchdog runs."""
    recorder = FR.FlightRecorder()
    recorder.watched = True
    tensor = torch.empty(1024)
    per_pair = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10_000):
            rec = recorder.start("all_gather", "unit 3 (model.layers.2, LlamaDecoderLayer)", tensor)
            rec.work = None
            recorder.done(rec, tensor)
        per_pair = min(per_pair, (time.perf_counter() - t0) / 10_000)
    print(f"flight recorder: {per_pair * 1e6:.2f} us per start/done pair")
    assert per_pair < 20e-6
    assert not recorder.pending and len(recorder.ring) == FR.RING and recorder.seq == 50_000


def test_pending_until_waited_or_completed():
    recorder = FR.FlightRecorder()
    recorder.watched = True
    t = torch.zeros(3)
    a = recorder.start("all_reduce", "a", t)
    b = recorder.start("all_reduce", None, t)

    class Finished:
        def is_completed(self):
            return True

    assert recorder.oldest_pending() is a
    recorder.done(a, t)
    recorder.done(a, t)  # idempotent
    assert recorder.oldest_pending() is b
    b.work = Finished()  # a handle dropped without wait(): completes when its Work does
    recorder.retire()
    assert recorder.oldest_pending() is None and b.work is None
    assert b.describe() == "#2 all_reduce (12 B)" and a.describe() == '#1 all_reduce "a" (12 B)'


def _rep(rank, state, records, **extra):
    return {"rank": rank, "host": "h", "pid": 1, "state": state, "records": records,
            "last_seq": records[-1][0] if records else 0, "stack": [], **extra}


def test_report_names_missing_ranks_and_who_is_behind():
    reports = {
        0: _rep(0, "waiting", [[1, "all_gather", "u1", 64, 2.0, 9.0], [2, "all_gather", "u0", 64, None, 9.0]],
                pending=[2, "all_gather", "u0", 64, 9.0]),
        1: _rep(1, "idle", [[1, "all_gather", "u1", 64, 2.0, 9.0]]),
    }
    text = W.format_report({"rank": 0, "why": "timeout", "headline": "collective timeout: ..."}, reports, 4, 1, 5.0)
    assert text.splitlines()[0] == "hf_zero: watchdog on rank 1 of 4 (host h, pid 1): collective timeout: ..."
    assert 'hf_zero:   rank 0: waiting 9.0 s in #2 all_gather "u0" (64 B)' in text
    assert "hf_zero:   rank 1 (this rank): not in an hf_zero collective; last started #1" in text
    assert "hf_zero:   ranks 2-3: no report within" in text
    assert "rank 1 never started #2, which rank 0 waits in" in text
    assert all(line.startswith("hf_zero: ") for line in text.splitlines())


def test_large_jobs_print_their_own_line_and_point_to_rank_0():
    reports = {5: _rep(5, "idle", [[7, "all_reduce", "", 4, 1.0, 1.5]])}
    text = W.format_report({"rank": 9, "headline": "collective timeout: ..."}, reports, 128, 5, 300.0, full=False)
    lines = text.splitlines()
    assert lines[1] == "hf_zero:   rank 5 (this rank): not in an hf_zero collective; last started #7 all_reduce (4 B), completed 1.0 s ago"
    assert lines[2] == "hf_zero:   every rank's status and where they disagree: in the report of ranks 0, 9"
    assert len(lines) == 4 and "no report" not in text


def test_report_exception_is_a_no_op_without_a_watchdog():
    assert W.running() is None
    W.report_exception(ValueError("x"))  # nothing to tell, nothing raised


def test_config_key_in_both_formats_and_its_default():
    assert HfZeroConfig().comm_timeout_s == W.DEFAULT_TIMEOUT_S == 300.0
    assert load_config({"zero_optimization": {"stage": 3}, "comm_timeout_s": 45}).comm_timeout_s == 45.0
    assert load_config({"hf_zero": 1, "comm_timeout_s": 0}).comm_timeout_s == 0.0
    with pytest.raises(ValueError, match=r"comm_timeout_s = -1.0 in <dict>: out of range"):
        load_config({"comm_timeout_s": -1})
    saved = W.timeout_s()
    try:
        W.configure(12)
        assert W.timeout_s() == 12.0
        W.configure(None)
        assert W.timeout_s() == W.DEFAULT_TIMEOUT_S
        with pytest.raises(ValueError, match="comm_timeout_s"):
            W.configure(-3)
    finally:
        W.configure(saved)
