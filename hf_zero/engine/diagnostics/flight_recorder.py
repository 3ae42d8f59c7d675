"""The flight recorder of hang reports (watchdog.py): a per-process record of hf_zero's collectives.

Flight recorder (``RECORDER``, always on, local memory only):
    ``collectives.start_*`` calls ``RECORDER.start(kind, label, tensor)`` before issuing the
    collective: a sequence number (per process, so rank r's #57 is the 57th collective rank r
    started), the kind, a label (``"unit 3 (model.layers.2, LlamaDecoderLayer)"``), the byte
    count and the start time go into a small record kept in a ring of the last ``RING`` records.
    ``collectives.wait`` calls ``RECORDER.done``. No communication, no logging, no lock: a few
    attribute writes (``tests/engine/test_watchdog.py`` measures the pair).

    A record is *pending* until its collective has completed: on CPU (gloo) when ``wait``
    returns; on CUDA, ``wait`` only orders the current stream after the collective, so it records
    a CUDA event there, and the record completes when the watchdog sees that event done. A handle
    dropped without ``wait`` completes when its ``Work`` reports ``is_completed()``.
"""

from __future__ import annotations

import collections
import time

import torch

from hf_zero.engine.diagnostics.hang_report import _size

RING = 64  # records kept per process

_now = time.monotonic


class CollectiveRecord:
    """One collective this process started. ``t1`` is None while it is pending."""

    __slots__ = ("seq", "kind", "label", "nbytes", "t0", "t1", "work", "event")

    def __init__(self, seq: int, kind: str, label: str | None, nbytes: int, t0: float) -> None:
        self.seq, self.kind, self.label, self.nbytes, self.t0 = seq, kind, label, nbytes, t0
        self.t1: float | None = None
        self.work = None  # the dist.Work until waited (only while a watchdog runs)
        self.event = None  # CUDA: the event recorded by wait() on the waiting stream

    def describe(self) -> str:
        label = f' "{self.label}"' if self.label else ""
        return f"#{self.seq} {self.kind}{label} ({_size(self.nbytes)})"


class FlightRecorder:
    """The last ``RING`` collectives of this process and the ones still pending (see module doc)."""

    def __init__(self) -> None:
        self.seq = 0
        self.ring: collections.deque[CollectiveRecord] = collections.deque(maxlen=RING)
        self.pending: dict[int, CollectiveRecord] = {}
        self.watched = False  # a watchdog runs: track completion (pending, Work, CUDA events)
        self.device_events = False  # CUDA collectives complete when an event after wait() does
        self._events: list = []  # free CUDA events

    def start(self, kind: str, label: str | None, tensor: torch.Tensor) -> CollectiveRecord:
        """Called before the collective is issued; ``tensor`` is the larger of its tensors."""
        self.seq += 1
        rec = CollectiveRecord(self.seq, kind, label, tensor.nbytes, _now())
        self.ring.append(rec)
        if self.watched:
            self.pending[rec.seq] = rec
        return rec

    def discard(self, rec: CollectiveRecord) -> None:
        """Issuing raised: the collective never started."""
        rec.t1 = _now()
        self.pending.pop(rec.seq, None)

    def done(self, rec: CollectiveRecord, output: torch.Tensor) -> None:
        """``wait`` returned. Idempotent."""
        rec.work = None
        if rec.t1 is not None or rec.event is not None:
            return
        if self.device_events and output.is_cuda:
            event = self._events.pop() if self._events else torch.cuda.Event()
            event.record()  # on the stream that now waits for the collective
            rec.event = event
        else:
            rec.t1 = _now()
            self.pending.pop(rec.seq, None)

    def retire(self) -> None:
        """Watchdog thread: mark completed what has completed on the device or in the backend."""
        now = _now()
        for rec in _values(self.pending):
            event, work = rec.event, rec.work
            try:
                finished = event.query() if event is not None else work is not None and work.is_completed()
            except Exception:  # noqa: BLE001 - a failed collective: leave it to the main thread
                finished = False
            if finished:
                rec.t1 = rec.t1 or now
                rec.work = rec.event = None
                self.pending.pop(rec.seq, None)
                if event is not None:
                    self._events.append(event)

    def oldest_pending(self) -> CollectiveRecord | None:
        pending = [r for r in _values(self.pending) if r.t1 is None]
        return min(pending, key=lambda r: r.seq) if pending else None

    def recent(self, n: int) -> list[CollectiveRecord]:
        return list(self.ring)[-n:]


def _values(d: dict) -> list:
    for _ in range(5):
        try:
            return list(d.values())
        except RuntimeError:  # changed size during iteration (another thread)
            continue
    return []


RECORDER = FlightRecorder()
