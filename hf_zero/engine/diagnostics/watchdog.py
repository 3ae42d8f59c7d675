"""Hang reports: a per-process flight recorder of hf_zero's collectives and a watchdog thread.

When ranks disagree on which collective comes next (a stage-3 unit gathered on one rank but not
on another, a rank that raised and left the others waiting), NCCL and gloo wait until their own
timeout (30 minutes by default) and then stop without saying which rank went astray. This module
stops such a job within ``comm_timeout_s`` with one report, printed on every rank, that names the
ranks, the collectives and the stage-3 units.

Flight recorder (``RECORDER``, always on, local memory only): flight_recorder.py.

Watchdog (one daemon thread per rank, ``ensure_running``; started for every ``CommContext`` and
every Trainer hf_zero attaches to, when the default process group has more than one rank):
    every ``poll_s`` (1 s, or a quarter of the timeout if that is shorter) it
    * retires completed records (CUDA events, finished ``Work``s);
    * stops the job if the oldest pending collective is older than ``comm_timeout_s``;
    * checks one key in the rendezvous store (the default process group's): another rank asked
      the job to stop (it timed out, or raised);
    * publishes this rank's phase (``phases.py``: what it is doing, set at the Trainer's seams;
      with ``"; waiting in torch.distributed <function>"`` added once its main thread has sat in
      one such call for longer than ``comm_timeout_s``) when it changed, and, once that phase is
      older than ``comm_timeout_s``, reads the others':
      two ranks in different phases for longer than ``comm_timeout_s`` stop the job ([Note:
      phases]; this covers the Trainer's own collectives and the checkpoint save's barriers,
      which the recorder does not see).
    Stopping (``_Watchdog.stop_job``): publish this rank's report (what it waits in, its last
    ``PUBLISHED`` records, where its main thread is) to the store; wait up to ``GATHER_S`` for the
    other ranks' reports; print one report to stderr; ``os._exit(EXIT_CODE)`` so the launcher
    tears the job down. Before that, the headline goes to torchrun's error file
    (``hf_zero/launcher/error_file.py``), which ``os._exit`` would otherwise leave empty.

A rank that raises (``report_exception``, called by ``python -m hf_zero.run`` before it re-raises,
and by the ``sys.excepthook`` installed here for scripts that call ``activate()`` themselves)
publishes ``rank r raised <Type: message> at <file:line in function>``; the other ranks' watchdogs
see it within a poll, print the report and exit. The raising rank prints the same report and then
raises as before.

Store keys live under ``hf_zero/watchdog/<restart count>/`` (torchrun keeps its store across
restarts). A store that cannot be reached never stops the job by itself (a rank that finished
first may have taken a rank-0-hosted store with it): the timeout still does, with a report of
this rank alone.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from hf_zero.engine import phases
from hf_zero.launcher import error_file
from hf_zero.engine.diagnostics.hang_report import EXIT_CODE, GATHER_S, format_report, stall_headline
from hf_zero.engine.diagnostics.flight_recorder import RECORDER, _values

DEFAULT_TIMEOUT_S = 300.0  # HfZeroConfig.comm_timeout_s's default (tests/engine/test_watchdog.py checks)
PUBLISHED = 32  # records each rank publishes when the job stops (to find where ranks disagree)
FULL_REPORT_RANKS = 64  # above this world size only rank 0 and the rank that stopped the job read every report
STACK_FRAMES = 4  # innermost frames of each rank's main thread in the report

_now = time.monotonic


_UNSET = object()  # no phase published yet (None is a value: "no phase")
_WAITING = "; waiting in torch.distributed "  # added to the phase of a rank blocked in a collective


# ---- configuration and the running watchdog ---------------------------------------------------

_STATE: dict[str, Any] = {"timeout_s": DEFAULT_TIMEOUT_S, "watchdog": None, "hooks": False}


def configure(timeout_s: float | None) -> None:
    """Set this process's ``comm_timeout_s`` (0 turns the watchdog off); applies to a running one."""
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_S
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s >= 0:
        raise ValueError(f"comm_timeout_s must be a number >= 0, got {timeout_s!r}")
    _STATE["timeout_s"] = float(timeout_s)
    running = _STATE["watchdog"]
    if running is not None:
        if timeout_s == 0:
            stop()
        else:
            running.set_timeout(float(timeout_s))


def timeout_s() -> float:
    return _STATE["timeout_s"]


def running() -> "_Watchdog | None":
    wd = _STATE["watchdog"]
    return wd if wd is not None and wd.is_alive() else None


def ensure_running() -> "_Watchdog | None":
    """Start this rank's watchdog if the default process group has > 1 rank and it is not running.

    Idempotent and cheap; a new default process group (a new store) gets a new watchdog."""
    if _STATE["timeout_s"] <= 0 or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    store = _default_store()
    current = _STATE["watchdog"]
    if current is not None:
        if current.is_alive() and current.store is store:
            return current
        current.stop()
    wd = _Watchdog(store, dist.get_rank(), world, _STATE["timeout_s"])
    _STATE["watchdog"] = wd
    wd.start()
    if not _STATE["hooks"]:
        _STATE["hooks"] = True
        _chain_excepthook()
        atexit.register(stop)
    return wd


def stop() -> None:
    """Stop the watchdog thread (end of the run); idempotent."""
    wd = _STATE["watchdog"]
    _STATE["watchdog"] = None
    if wd is not None:
        wd.stop()


def report_exception(error: BaseException) -> None:
    """This rank raised ``error``: tell the other ranks, print the job's report; return to re-raise.

    No-op without a running watchdog, for a clean ``SystemExit``, for ``KeyboardInterrupt`` (Ctrl-C
    reaches every rank: stop at once), or once already reported."""
    if isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit) and error.code in (None, 0)):
        return
    wd = running()
    if wd is None:
        return
    wd.report_raise(error)


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: reports are this rank's alone
        return None


def _chain_excepthook() -> None:
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        try:
            report_exception(value)
        except Exception:  # noqa: BLE001 - never hide the original traceback
            pass
        previous(kind, value, tb)

    sys.excepthook = excepthook


class _Watchdog:
    """The thread, the store protocol and the report (see the module docstring)."""

    def __init__(self, store, rank: int, world: int, timeout: float) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.set_timeout(timeout)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.ns = f"hf_zero/watchdog/{restart}/"
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._claim = threading.Lock()  # whoever takes it (thread or raising main thread) reports
        self._claimed = False
        self._reported = threading.Event()  # set once this rank's report is printed
        self._published: Any = _UNSET  # the phase last written to the store
        self._in_torch: tuple | None = None  # (frame key, function, first seen): main thread in a torch collective
        self._phases_read_at = 0.0  # when this rank last read the others' phases
        self._thread = threading.Thread(target=self._run, name="hf_zero-watchdog", daemon=True)

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        self.poll_s = min(1.0, timeout / 4)

    def start(self) -> None:
        RECORDER.watched = True
        RECORDER.device_events = torch.cuda.is_available()
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        RECORDER.watched = False
        RECORDER.device_events = False
        for rec in _values(RECORDER.pending):  # handles never waited: let their Work objects go
            rec.work = rec.event = None
        RECORDER.pending.clear()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.poll_s + 1)

    # -- the thread --

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failed check
                pass

    def _check(self) -> None:
        RECORDER.retire()
        oldest = RECORDER.oldest_pending()
        if oldest is not None and _now() - oldest.t0 > self.timeout:
            age = _now() - oldest.t0
            headline = (f"collective timeout: rank {self.rank} has waited {age:.1f} s (comm_timeout_s = "
                        f"{self.timeout:g}) in {oldest.describe()}")
            self.stop_job({"rank": self.rank, "why": "timeout", "headline": headline, "time": time.time()},
                          publish_abort=True)
        if self.store is not None and not self._stop.is_set():
            if not dist.is_initialized() or _default_store() is not self.store:
                self.store = None  # the process group is gone (end of the run): nothing more to hear
                return
            try:
                asked = self.store.check([self.ns + "abort"])
            except Exception:  # noqa: BLE001 - see the module docstring: the store alone never stops
                self.store = None  # gone (a rank-0-hosted store whose rank finished): stop asking
                return
            if asked:
                abort = self._get_json(self.ns + "abort") or {"rank": "?", "headline": "another rank stopped the job"}
                if abort.get("by", abort.get("rank")) != self.rank:
                    self.stop_job(abort, publish_abort=False)
        if self.store is not None and not self._stop.is_set():
            try:
                self._check_phases()
            except Exception:  # noqa: BLE001 - as above: the store alone never stops the job
                pass

    def _check_phases(self) -> None:
        """[Note: phases]: publish this rank's phase; if it is older than the timeout, compare."""
        mine = phases.current()
        waiting = self._waiting_in_torch() if mine is not None else None
        if waiting:  # [Note: phases]: tells waiting ranks from stalled ones
            mine = mine._replace(label=f"{mine.label}{_WAITING}{waiting}")
        if mine != self._published:
            value = None if mine is None else [mine.label, mine.since, mine.seq]
            self.store.set(self.ns + f"phase/{self.rank}", json.dumps(value))
            self._published = mine
        now = time.time()
        if mine is None or now - mine.since <= self.timeout:
            return
        # Every rank in one long phase reads the others' at most every timeout / 8 s (W reads each).
        if _now() - self._phases_read_at < max(self.poll_s, self.timeout / 8):
            return
        self._phases_read_at = _now()
        stuck = {r: (label, now - since, seq) for r, (label, since, seq) in self._read_phases().items()
                 if now - since > self.timeout}
        stuck[self.rank] = (mine.label, now - mine.since, mine.seq)
        if len({label for label, _, _ in stuck.values()}) > 1:
            # the rank behind; of ranks as far, one not waiting in a collective; then the oldest
            stalled = min(stuck, key=lambda r: (stuck[r][2], _WAITING in stuck[r][0], -stuck[r][1]))
            headline = stall_headline(stalled, stuck, self.timeout)
            self.stop_job({"rank": stalled, "by": self.rank, "why": "stalled", "headline": headline, "time": now},
                          publish_abort=True)

    def _waiting_in_torch(self) -> str | None:
        """The torch.distributed function the main thread has been in, in one call, for longer
        than the timeout (seen at every poll since), or None."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        call = None
        while frame is not None:  # innermost first: the outermost frame of a run of c10d frames
            name = os.path.basename(frame.f_code.co_filename)
            if name == "distributed_c10d.py":
                call = frame
            elif name != "c10d_logger.py" and call is not None:
                break
            frame = frame.f_back
        if call is None:
            self._in_torch = None
            return None
        key = (id(call), call.f_code)
        if self._in_torch is None or self._in_torch[0] != key:
            self._in_torch = (key, call.f_code.co_name, _now())
        key, function, first = self._in_torch
        return function if _now() - first > self.timeout else None

    def _read_phases(self) -> dict[int, tuple[str, float, int]]:
        """The other ranks' published phases (ranks that published none, or None, are left out)."""
        others = [r for r in range(self.world) if r != self.rank]
        keys = [self.ns + f"phase/{r}" for r in others]
        if hasattr(self.store, "multi_get") and self.store.check(keys):  # one round trip
            values = self.store.multi_get(keys)
        else:  # a rank whose watchdog has not published yet: get() would block
            values = [self.store.get(k) if self.store.check([k]) else None for k in keys]
        out = {}
        for r, value in zip(others, values):
            try:
                label, since, seq = json.loads(value.decode())
                out[r] = (str(label), float(since), int(seq))
            except (ValueError, TypeError, AttributeError):  # None, or an unpublished phase
                continue
        return out

    # -- stopping --

    def _take_claim(self) -> bool:
        with self._claim:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def stop_job(self, abort: dict, publish_abort: bool) -> None:
        """Watchdog thread: report, then end this process."""
        if not self._take_claim():
            return
        when = abort.get("time")  # the cause's: torchrun takes the earliest error file as the root
        error_file.write(str(abort.get("headline")), timestamp=when if isinstance(when, (int, float)) else None)
        try:
            self._report(abort, publish_abort, state=None)
        finally:
            _flush_briefly()
            os._exit(EXIT_CODE)

    def report_raise(self, error: BaseException) -> None:
        """Main thread: this rank raised. Report and return (the caller re-raises)."""
        if not self._take_claim():
            # The watchdog thread is already stopping this rank: let it print and exit (code 3)
            # rather than race it with this exception's traceback.
            self._reported.wait(GATHER_S + 10)
            time.sleep(5.0)
            return
        what = _exception_text(error)
        abort = {"rank": self.rank, "why": "raised", "headline": f"rank {self.rank} raised {what}", "time": time.time()}
        publish = True
        try:
            if self.store is not None and self.store.check([self.ns + "abort"]):
                # Another rank stopped the job first; this exception is likely its consequence
                # (a collective that failed when that rank left).
                abort, publish = self._get_json(self.ns + "abort") or abort, False
        except Exception:  # noqa: BLE001
            pass
        tb = traceback.extract_tb(error.__traceback__)[-STACK_FRAMES:] if error.__traceback__ else []
        self._report(abort, publish, state={"state": "raised", "error": what, "stack": _frames(tb),
                                            "stack_kind": "raised in"})
        self._stop.set()

    def _report(self, abort: dict, publish_abort: bool, state: dict | None) -> None:
        mine = self._own_report(state)
        reports, reported = {self.rank: mine}, 1
        full = self.world <= FULL_REPORT_RANKS or self.rank in (0, abort.get("rank"))
        if self.store is not None:
            try:
                if publish_abort:
                    self.store.set(self.ns + "abort", json.dumps(abort))
                self.store.set(self.ns + f"report/{self.rank}", json.dumps(mine))
                reported = self.store.add(self.ns + "reported", 1)
                deadline = _now() + GATHER_S
                while reported < self.world and _now() < deadline:
                    time.sleep(0.1)
                    reported = self.store.add(self.ns + "reported", 0)
                if full:
                    reports = self._read_reports(reports, complete=reported >= self.world)
            except Exception:  # noqa: BLE001 - a store that went away: report what we know
                pass
        text = format_report(abort, reports, self.world, self.rank, self.timeout, full=full)
        try:
            os.write(2, text.encode("utf-8", "replace"))
        except OSError:
            pass
        self._reported.set()
        if self.store is not None:
            try:  # a rank-0-hosted store must outlive the others' reading of it
                printed = self.store.add(self.ns + "printed", 1)
                deadline = _now() + 2.0
                while printed < reported and _now() < deadline:
                    time.sleep(0.05)
                    printed = self.store.add(self.ns + "printed", 0)
                time.sleep(0.3)  # so that the others' last poll of the count still finds the store
            except Exception:  # noqa: BLE001
                pass

    def _read_reports(self, reports: dict, complete: bool) -> dict:
        others = [r for r in range(self.world) if r not in reports]
        keys = [self.ns + f"report/{r}" for r in others]
        if complete and hasattr(self.store, "multi_get"):  # one round trip
            values = self.store.multi_get(keys)
        else:  # some ranks never reported: only the keys that exist (get() would block)
            values = [self.store.get(k) if self.store.check([k]) else None for k in keys]
        for r, value in zip(others, values):
            try:
                reports[r] = json.loads(value.decode()) if value is not None else None
            except (ValueError, AttributeError):
                reports[r] = None
        return {r: v for r, v in reports.items() if v is not None}

    def _get_json(self, key: str):
        try:
            return json.loads(self.store.get(key).decode())
        except Exception:  # noqa: BLE001
            return None

    def _own_report(self, state: dict | None) -> dict:
        RECORDER.retire()
        now = _now()
        oldest = RECORDER.oldest_pending()
        records = [[r.seq, r.kind, r.label or "", r.nbytes, None if r.t1 is None else round(now - r.t1, 1),
                    round(now - r.t0, 1)] for r in RECORDER.recent(PUBLISHED)]
        report = {"rank": self.rank, "host": self.host, "pid": self.pid, "state": "idle",
                  "records": records, "last_seq": RECORDER.seq, "stack": _main_stack()}
        phase, waiting = phases.current(), self._waiting_in_torch()
        if phase is not None:
            label = f"{phase.label}{_WAITING}{waiting}" if waiting else phase.label
            report["phase"] = [label, round(time.time() - phase.since, 1)]
        if oldest is not None:
            report.update(state="waiting", pending=[oldest.seq, oldest.kind, oldest.label or "", oldest.nbytes,
                                                    round(now - oldest.t0, 1)])
        if state is not None:
            report.update(state)
        return report


def _flush_briefly() -> None:
    """Flush Python's stdout/stderr buffers before ``os._exit``, unless that blocks (a full pipe)."""

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass

    helper = threading.Thread(target=flush, daemon=True)
    helper.start()
    helper.join(timeout=1.0)


def _exception_text(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        what = f"SystemExit({error.code!r})"
    else:
        message = str(error).strip().splitlines()
        what = type(error).__name__ + (f": {message[0][:200]}" if message else "")
    tb = traceback.extract_tb(error.__traceback__) if error.__traceback__ is not None else []
    if tb:
        frame = tb[-1]
        what += f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"
    return what


def _main_stack() -> list[str]:
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return []
    return _frames(_callers_of_collectives(traceback.extract_stack(frame))[-STACK_FRAMES:])


def _callers_of_collectives(frames: list) -> list:
    """Keep the innermost frame of a torch.distributed collective but drop the frames of torch's
    own wrappers around it (``c10d_logger``, ``all_gather_object`` calling ``all_gather``), so that
    the frames shown reach the code that called the collective (the Trainer, DCP)."""
    kept: list = []
    for frame in frames:  # outermost first
        name = os.path.basename(frame.filename)
        if name == "c10d_logger.py":
            continue
        if name == "distributed_c10d.py" and kept and os.path.basename(kept[-1].filename) == "distributed_c10d.py":
            kept[-1] = frame  # the innermost of a run of c10d frames
            continue
        kept.append(frame)
    return kept


def _frames(frames) -> list[str]:
    """Innermost first: ``["wait (collectives.py:104)", "unshard (units.py:53)", ...]``."""
    return [f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})" for f in reversed(list(frames))]
