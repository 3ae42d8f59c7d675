"""torchrun's error file as hf_zero writes it (hf_zero/launcher/error_file.py), read by torch itself.

The end-to-end check (hf-zero launch printing the first failure last) is in test_end_to_end.py."""

import json
import os

import pytest
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

from hf_zero.launcher import error_file


@pytest.fixture
def rank_file(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv(error_file.ENV, str(path))
    return path


def test_torchrun_reads_the_line_and_the_time(rank_file):
    """torchrun's ProcessFailure (its table, its choice of the first failure) takes the line as the
    message and the given time as the failure's; no traceback is shown for it."""
    error_file.write("rank 1 raised CheckpointError: checkpoint-4: digest mismatch", timestamp=1700000000.7)
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=1, error_file=str(rank_file))
    assert failure.timestamp == 1700000000
    assert failure.message["message"] == "rank 1 raised CheckpointError: checkpoint-4: digest mismatch"
    assert "py_callstack" not in failure.message["extraInfo"]
    assert [p.name for p in rank_file.parent.iterdir()] == ["error.json"]  # no temporary left


def test_the_copy_torchrun_makes_for_its_own_error_file_reads_back(rank_file, tmp_path, monkeypatch):
    """torch's @record on torchrun's main copies the first failure's file (adding errorCode)."""
    error_file.write(error_file.raised(1, ValueError("checkpoint-4 refused\n(second line)")))
    parent = tmp_path / "torchrun.json"
    monkeypatch.setenv(error_file.ENV, str(parent))
    ErrorHandler().dump_error_file(str(rank_file), error_code=1)
    assert json.loads(parent.read_text())["message"]["errorCode"] == 1
    assert error_file.read(str(parent)) == "rank 1 raised ValueError: checkpoint-4 refused\n(second line)"


def test_the_earliest_record_of_a_process_is_kept(rank_file):
    """A rank whose watchdog recorded another rank's raise (at that raise's time) and whose main
    thread then raises too (its peer left) keeps the cause; a later-stamped earlier write is replaced."""
    error_file.write("rank 1 raised CheckpointError: x at a.py:3 in f", timestamp=1700000000.2)
    error_file.write("rank 0 raised RuntimeError: Connection closed by peer", timestamp=1700000004.0)
    error_file.write("rank 0 raised RuntimeError: same second", timestamp=1700000000.9)
    assert error_file.read(str(rank_file)) == "rank 1 raised CheckpointError: x at a.py:3 in f"
    error_file.write("rank 1 raised ValueError: earlier", timestamp=1699999999.0)
    assert error_file.read(str(rank_file)) == "rank 1 raised ValueError: earlier"


def test_no_file_without_the_variable_and_no_message_from_other_files(tmp_path, monkeypatch):
    monkeypatch.delenv(error_file.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    error_file.write("rank 0 raised ValueError: x")
    assert list(tmp_path.iterdir()) == []
    assert error_file.read(str(tmp_path / "missing.json")) is None
    for text in ("not json", "[1, 2]", '{"message": {"extraInfo": {}}}', '{"message": "  "}'):
        (tmp_path / "other.json").write_text(text)
        assert error_file.read(str(tmp_path / "other.json")) is None, text
    (tmp_path / "other.json").write_text('{"message": "Signal 9", "timestamp": "1"}')  # torch's str form
    assert error_file.read(str(tmp_path / "other.json")) == "Signal 9"


def test_an_unwritable_path_is_not_an_error(tmp_path, monkeypatch):
    """The failure being recorded is what must come out: a bad path raises nothing."""
    monkeypatch.setenv(error_file.ENV, str(tmp_path / "no_such_folder" / "error.json"))
    error_file.write("rank 0 raised ValueError: x")
    assert list(tmp_path.iterdir()) == []


def test_a_rank_the_watchdog_stops_records_the_headline_at_the_time_of_the_cause(rank_file, monkeypatch):
    """os._exit skips torch's @record: the watchdog writes the job's headline itself, stamped with
    the abort's time (rank 1's raise), so that torchrun never takes this consequence for the cause."""
    from hf_zero.engine.diagnostics import watchdog as W

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(W.os, "_exit", exit_)
    wd = W._Watchdog(None, rank=0, world=2, timeout=2.0)  # no store: a report of this rank alone
    abort = {"rank": 1, "why": "raised", "headline": "rank 1 raised CheckpointError: x at a.py:3 in f",
             "time": 1700000000.2}
    with pytest.raises(SystemExit) as stopped:
        wd.stop_job(abort, publish_abort=False)
    assert stopped.value.code == W.EXIT_CODE
    failure = ProcessFailure(local_rank=0, pid=os.getpid(), exitcode=W.EXIT_CODE, error_file=str(rank_file))
    assert failure.message["message"] == "rank 1 raised CheckpointError: x at a.py:3 in f"
    assert failure.timestamp == 1700000000


def test_a_rank_that_lost_its_peer_is_dated_after_the_peers_raise(tmp_path, monkeypatch):
    """Rank 1 raises; in the same second rank 0's collective reports the closed connection. torchrun
    takes the earliest whole-second timestamp (a tie goes to the lower rank): the peer-lost error is
    dated one second late, so rank 1's raise is the root cause; an error of its own is not."""
    import time

    now = 1700000000.2
    monkeypatch.setattr(time, "time", lambda: now)
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2467")
    assert error_file.stamp_for(lost) == now + 1.0
    assert error_file.stamp_for(ValueError("checkpoint-4 refused")) == now
    failures = []
    for rank, error in ((0, lost), (1, ValueError("checkpoint-4 refused"))):
        path = tmp_path / f"{rank}.json"
        monkeypatch.setenv(error_file.ENV, str(path))
        error_file.write(error_file.raised(rank, error), timestamp=error_file.stamp_for(error))
        failures.append(ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=1, error_file=str(path)))
    first = min(failures, key=lambda f: f.timestamp)  # torchrun's ChildFailedError.get_first_failure
    assert first.local_rank == 1 and first.message["message"] == "rank 1 raised ValueError: checkpoint-4 refused"
