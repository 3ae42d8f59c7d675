"""No silent hang: a rank that stalls outside hf_zero's own collectives is reported too.

Before phases (``hf_zero/engine/phases.py``), the watchdog saw only hf_zero's collectives: a rank
that stalled where the Trainer runs its own collectives (the loss all-gather between steps) or
inside the checkpoint save (its collectives) or in its data loader left the others waiting until
gloo's own timeout, with no report. Each rank now publishes what it is doing (and whether it has
been waiting in a torch.distributed call past the timeout); two ranks in different phases for
longer than ``comm_timeout_s`` stop the job with a report naming the stalled rank and its phase.

Each rank runs as its own ``python -m hf_zero.run tests/faults/data/hang_job.py`` process on gloo
(the watchdog ends a rank with ``os._exit``); the stall is the job script's ``time.sleep``."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import json

import torch.distributed as dist

from hf_zero.engine import phases
from hf_zero.launcher import error_file
from hf_zero.engine.diagnostics import watchdog as W
from hf_zero.testing.multiprocess import run_rank_processes

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "faults" / "data" / "hang_job.py"
TIMEOUT_S = 3  # comm_timeout_s
SLACK_S = 8  # a poll, the report exchange (up to 5 s if a rank cannot answer), process exit


def _launch(tmp_path, scenario: str, limit: float = 60.0) -> list[dict]:
    """Both ranks' exit code, output and seconds from rank 1's stall to their exit (None: still
    running at ``limit`` seconds, then killed)."""
    # each rank its own torchrun-style error file, error<RANK>.json, as torchrun gives it
    command = ["sh", "-c", 'TORCHELASTIC_ERROR_FILE="$ERRORS/error$RANK.json" exec "$0" "$@"',
               sys.executable, "-m", "hf_zero.run", str(JOB), scenario, str(TIMEOUT_S)]
    ranks = run_rank_processes(command, 2, tmp_path, limit=limit, cwd=ROOT, env={
        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HANG_JOB_OUT": str(tmp_path / "out"),
        "HANG_JOB_STALL_S": os.environ.get("HANG_JOB_STALL_S", "40"),
        "ERRORS": str(tmp_path)})
    stalled = re.search(r"stalling at ([\d.]+)", ranks[1]["text"])
    return [{"code": got["code"], "text": got["text"], "error_file": error_file.read(str(tmp_path / f"error{r}.json")),
             "after": got["ended"] - float(stalled.group(1)) if stalled and got["ended"] is not None else None}
            for r, got in enumerate(ranks)]


def _report(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("hf_zero:"))


def _check_stopped(ranks: list[dict], stalled_phase: str, waiting_phase: str) -> None:
    for rank, got in enumerate(ranks):
        assert got["code"] == W.EXIT_CODE, got["text"][-3000:]
        assert got["after"] is not None and got["after"] < TIMEOUT_S + SLACK_S, got["after"]
        report = _report(got["text"])
        assert f"watchdog on rank {rank} of 2" in report, report
        assert (f'stalled: rank 1 has been in "{stalled_phase}" for ') in report, report
        # the waiting rank's phase names the torch.distributed call once it has waited there for
        # longer than the timeout (when both came to pass first is a matter of a poll)
        waiting = rf'"{re.escape(waiting_phase)}(; waiting in torch.distributed \w+)?" for [\d.]+ s'
        assert re.search(rf"while rank 0 has been in {waiting}", report), report
        assert re.search(rf'rank 1( \(this rank\))?: .*; phase "{re.escape(stalled_phase)}" for [\d.]+ s',
                         report), report
        assert re.search(rf"rank 0( \(this rank\))?: .*; phase {waiting}", report), report
        assert re.search(r"rank 1( \(this rank\))?: .*main thread at stall \(hang_job.py:", report), report
        # rank 0 waits in a torch.distributed collective, not in one of hf_zero's
        assert re.search(r"rank 0( \(this rank\))?: not in an hf_zero collective; .*main thread at \w+ "
                         r"\(distributed_c10d.py:\d+\) < ", report), report
        assert f"rank {rank} exits with code {W.EXIT_CODE}" in report
        # what torchrun shows in its table (and hf-zero launch prints last): the headline
        assert (got["error_file"] or "").startswith(f'stalled: rank 1 has been in "{stalled_phase}" for '), got


def test_stall_between_steps_before_the_trainers_own_collective_is_reported(tmp_path):
    """Rank 1 sleeps in on_step_end of step 2; rank 0 waits in the Trainer's loss all-gather."""
    ranks = _launch(tmp_path, "between_steps")
    _check_stopped(ranks, stalled_phase="step 2: after the optimizer step (scheduler, zero_grad, on_step_end)",
                   waiting_phase="after step 2: logging, evaluation, checkpoint, next batches")
    # the Trainer's own all-gather of the logged loss
    assert "main thread at all_gather (distributed_c10d.py:" in _report(ranks[0]["text"])
    assert "_maybe_log_save_evaluate (trainer.py:" in _report(ranks[0]["text"])


def test_stall_inside_the_sharded_checkpoint_save_is_reported(tmp_path):
    """Rank 1 sleeps before writing its part of checkpoint-2; rank 0 waits in the sharded save's
    collectives (torch.distributed.checkpoint's, not hf_zero's)."""
    ranks = _launch(tmp_path, "checkpoint")
    _check_stopped(ranks, stalled_phase="checkpoint save checkpoint-2",
                   waiting_phase="checkpoint save checkpoint-2: sharded optimizer state, then RNG and trainer state")


def test_stall_in_the_data_loader_while_the_other_waits_in_the_same_phase_is_reported(tmp_path):
    """Rank 1 sleeps fetching a row (accelerate fetches one batch ahead: during "after step 3");
    rank 0 waits in the Trainer's all-gather of the next batches' token count, in the same phase.
    Its phase carries the torch.distributed function once it has waited there past the timeout."""
    ranks = _launch(tmp_path, "data")
    phase = "after step 3: logged; evaluation, checkpoint, next batches"
    _check_stopped(ranks, stalled_phase=phase, waiting_phase=f"{phase}; waiting in torch.distributed all_gather")
    assert "main thread at stall (hang_job.py:" in _report(ranks[1]["text"])
    assert "< __getitem__ (hang_job.py:" in _report(ranks[1]["text"])


# ---- the rule on one rank, against a store the test fills in for the other rank ---------------


def _watchdog_of_rank_0(monkeypatch, mine: tuple[str, float, int], other: tuple[str, float, int] | None):
    """Rank 0's watchdog (thread not started) with phase ``mine`` = (label, seconds in it, count);
    rank 1 published ``other``. Returns the aborts it would stop the job with."""
    store, now = dist.HashStore(), time.time()
    monkeypatch.setattr(phases, "_CURRENT", [phases.Phase(mine[0], now - mine[1], mine[2])])
    wd = W._Watchdog(store, rank=0, world=2, timeout=2.0)
    aborts: list[dict] = []
    monkeypatch.setattr(wd, "stop_job", lambda abort, publish_abort: aborts.append(abort))
    if other is not None:
        store.set(wd.ns + "phase/1", json.dumps([other[0], now - other[1], other[2]]))
    wd._check_phases()
    assert json.loads(store.get(wd.ns + "phase/0"))[::2] == [mine[0], mine[2]]  # published
    return aborts


def test_ranks_long_in_the_same_phase_agree(monkeypatch):
    """Every rank in one long evaluation batch or a slow save: no report."""
    assert _watchdog_of_rank_0(monkeypatch, ("checkpoint save checkpoint-4", 9.0, 30),
                               ("checkpoint save checkpoint-4", 9.5, 30)) == []


def test_a_rank_just_arrived_in_another_phase_is_not_a_hang(monkeypatch):
    """Rank 1 moved on a moment ago (its phase is younger than comm_timeout_s); nor is a rank that
    published no phase (a watchdog that has not polled yet)."""
    assert _watchdog_of_rank_0(monkeypatch, ("evaluation after step 3: batch 9 done", 9.0, 40),
                               ("step 4: forward and backward", 0.5, 41)) == []
    assert _watchdog_of_rank_0(monkeypatch, ("step 4: forward and backward", 9.0, 41), None) == []


def test_two_ranks_long_in_different_phases_name_the_rank_behind(monkeypatch):
    """Rank 0 entered its phase first (it is the one stalled: fewer phases), although rank 1 has
    waited almost as long."""
    aborts = _watchdog_of_rank_0(monkeypatch, ("step 2: forward and backward", 5.0, 7),
                                 ("after step 2: logging, evaluation, checkpoint, next batches", 4.9, 10))
    assert len(aborts) == 1 and aborts[0]["rank"] == 0 and aborts[0]["by"] == 0
    assert aborts[0]["headline"] == (
        'stalled: rank 0 has been in "step 2: forward and backward" for 5.0 s while rank 1 has been in '
        '"after step 2: logging, evaluation, checkpoint, next batches" for 4.9 s (comm_timeout_s = 2)')
