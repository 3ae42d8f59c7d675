"""The device leg of the host step: a share of the offloaded chunks stepped on the device.

[Note: device leg] With clipping on, the host step of optimizer offload waits for the global norm
whenever clipping fired lately ([Note: speculation] in speculation.py: a clipping streak takes
the waiting path), and then the CPU steps every offloaded element alone, bound by what the host
cores move through memory (a fused CPU AdamW reads and writes 28 bytes per element), while the
device and the copy engines sit idle. With ``offload_optimizer.device_share`` S > 0, the chunks
that wait for the verdict are split: those the next forward uses first (the highest chunk
indices), up to S of all offloaded elements, are stepped on the device, the rest on the CPU as
before, both at once:

    after the verdict:
    CPU worker:  [launch leg] [step c3 on the CPU]      [step c2]      [step c1] ...
    leg stream A:  [up c5: master, grad, state][step][params][down c5: master, state]
    leg stream B:       [up c4 ...                  ][step][params][down c4 ...]

Per leg chunk, on one of two side streams (``Streams.leg``, alternating so that one chunk's
copies up overlap the other's copies down): its fp32 masters, host grads and optimizer state are
copied up (16 bytes per AdamW element), the user's optimizer steps device copies of the chunk's
pieces (the same class and hyperparameters; the clip scale as ``grad_scale`` for fused Adam(W),
else a multiply of the grads), the new masters are cast into the param shards there (nothing is
uploaded afterwards), and the masters and state are copied back down (12 bytes). The copy engines
move those bytes without the host cores, so the host's share of the step shrinks by S and the
two legs overlap. The masters, state and grads stay where they live between steps (host memory):
nothing is kept on the device, whose memory for a chunk in flight comes from the caching
allocator on the leg's stream and goes back to it when the chunk's work is queued (the stream
orders its reuse by the next chunk on it), so at most two chunks' copies are held at a time.

The state of a leg chunk's pieces is moved into pinned host memory the first time it goes up
(``HostMemory``, same values), so that the copies run asynchronously. A chunk goes to the device
only when all of its stepped pieces have optimizer state (a first step creates it on the host)
and only when the step waits for the norm: a chunk that speculates is stepped on the CPU during
backward, which is free. The step computes what the device optimizer computes for a kept share
(``ratio`` < 1): the same kernels, so the result equals the CPU's within the two kernels'
rounding, not bit for bit; without CUDA the leg runs on host copies and is bit for bit the host
step (the tests check the bookkeeping so). With parameter offload (stage 3, shards in host memory)
the new params are cast on the device and copied down into the host shards (2 bytes per element
instead of the CPU's cast), which the unit's next use uploads after the leg's event. The NVMe
tiers take no device leg (their state or params are in files, not in host memory the leg reaches).

[Note: leg room] The two chunks in flight take device memory the rest of the run did not plan for
(``FLIGHT_BYTES`` an element: fp32 master, grad and AdamW's two moments up, the cast params; about
2.3 GiB at the default chunk size), and they are in flight while the next forward builds its
activations. So a waiting step puts chunks on the device only while the device had room for them
at the run's peak so far (``device_room.headroom``: free + reserved - peak reserved) beyond
``ROOM_MARGIN`` of its memory; otherwise the CPU steps every chunk of that step, and the run report
counts the step (``no_room_steps``), with one log line the first time. Once the leg ran, the peak
includes its chunks, so the check counts them twice: it errs towards the CPU, never towards an
out-of-memory error. Without CUDA there is no device memory to ask about and no check.

[Note: kept leg grads] A leg chunk's grads were copied down during backward (4 bytes an element)
and up again after the verdict (4 more), and being the first layers' they are the last to come
down, at the very end of backward, where nothing hides the copy. When a step will wait for the
verdict (no speculation this step: a clipping streak, or no step in backward at all), the chunks
the verdict's ``choose`` will take are known when the first grad comes down: the same highest
chunks with optimizer state, within the same share (``keep``). Their main grads then stay on the
device (``GradsDown.download`` in grads_down.py keeps the reference; the engine allocates a new
main grad each step, so nothing writes over it), and the leg steps them in place: 8 bytes an element less over
the link, half of them at the end of backward. ``keep`` asks for room for those grads beside the
two chunks in flight (``KEPT_BYTES`` an element more); without it every grad comes down as before.
A kept chunk the verdict does not take after all (its ``choose`` saw less room, or a chunk
speculated) has its grads copied down then, before the CPU steps it: slower, the same result.
The leg's stream reads a kept grad after the compute stream made it, so the allocator is told
(``record_stream``) not to hand its memory out again before the leg's step is done with it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from typing import Callable

import torch

from hf_zero.byte_units import fmt_bytes
from hf_zero.engine.offload import device_room
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.offload.leg_share import LegShare, Phase

logger = logging.getLogger(__name__)


class DeviceLeg:
    """The device leg of one ``HostStep`` ([Note: device leg]): which waiting chunks go to the
    device (``choose``), their step there (``step``), and the wait for their copies back
    (``settle``). ``chunk_numel``: each chunk's elements; ``share``: of all of them, at most, or
    "auto" ([Note: leg share] in leg_share.py: ``begin``, ``cpu_done`` and ``settle`` time each
    waiting step's two legs for it)."""

    FLIGHT_BYTES = 18  # device bytes per element of a chunk in flight ([Note: leg room])
    KEPT_BYTES = 4  # device bytes per element of a chunk whose fp32 grads wait for the leg ([Note: kept leg grads])
    IN_FLIGHT = 2  # chunks in flight at once: one per leg stream
    ROOM_MARGIN = 0.05  # of the device's memory, left free beyond the leg's chunks

    def __init__(self, share: float | str, chunk_numel: list[int], device: torch.device, streams: tuple | None,
                 memory: HostMemory) -> None:
        self.device, self.memory = device, memory
        self.auto = LegShare() if share == "auto" else None
        self._share = 0.0 if self.auto is not None else float(share)
        self._streams = streams  # two side streams (Streams.leg), None without CUDA
        self._chunk_numel = chunk_numel
        self._next = 0  # which of the two streams takes the next chunk
        self._down: list = []  # events after each queued chunk's copies down, this step
        self.stepped_chunks = 0  # counters for the run report
        self.stepped_elements = 0
        self.no_room_steps = 0  # waiting steps the CPU stepped alone for want of device memory
        self.kept_elements = 0  # leg elements stepped from grads kept on the device ([Note: kept leg grads])
        # A waiting step's timing, from ``begin`` (the verdict) to ``settle`` (for "auto"):
        self._timed: tuple | None = None  # (host time, device event) at the verdict
        self._cpu = [0, 0.0]  # elements the CPU stepped after it, host time of the last
        self._leg = [0, 0.0]  # elements the leg stepped after it, host time of the last (without CUDA)

    @property
    def share(self) -> float:
        """The share of the offloaded elements the next waiting step puts on the device."""
        return self.auto.share if self.auto is not None else self._share

    def begin(self, after) -> None:
        """The verdict of a waiting step: ``after`` is the event the leg's streams wait for (a
        timing event with "auto", or None); the times of both legs count from here."""
        if self.auto is not None and self.auto.phase is not Phase.OFF:
            self._timed, self._cpu, self._leg = (time.perf_counter(), after), [0, 0.0], [0, 0.0]

    def cpu_done(self, elements: int) -> None:
        """The CPU stepped a chunk of ``elements`` after the verdict (for "auto")."""
        if self._timed is not None:
            self._cpu = [self._cpu[0] + elements, time.perf_counter()]

    def choose(self, waiting: list[int], ready: Callable[[int], bool], kept: set[int] = frozenset()) -> list[int]:
        """Of the chunks ``waiting`` for the verdict, those the device steps: the highest indices
        first (the next forward uses them first) while their elements stay within the share;
        ``ready(c)``: chunk ``c`` can go (its stepped pieces have optimizer state); ``kept``: chunks
        whose grads are on the device already ([Note: kept leg grads]: none go up)."""
        chosen = self._within_share(waiting, ready)
        if chosen and not self._room(chosen, kept):
            return []
        return chosen

    def keep(self, chunks: list[int], ready: Callable[[int], bool]) -> list[int]:
        """[Note: kept leg grads]: of ``chunks`` (a step that will wait for the verdict), those
        whose grads stay on the device: what ``choose`` takes at the verdict, where the device has
        room for their grads as well (none: every grad comes down)."""
        chosen = self._within_share(chunks, ready)
        room = device_room.headroom(self.device) if chosen else None
        if room is None:
            return chosen
        free, total = room
        need = self._flight_bytes(chosen, set(chosen)) + self.KEPT_BYTES * sum(self._chunk_numel[c] for c in chosen)
        return chosen if free >= need + int(self.ROOM_MARGIN * total) else []

    def _within_share(self, waiting: list[int], ready: Callable[[int], bool]) -> list[int]:
        chosen, total, budget = [], 0, self.share * sum(self._chunk_numel)
        for c in sorted(waiting, reverse=True):
            n = self._chunk_numel[c]
            if total + n > budget:
                break
            if ready(c):
                chosen.append(c)
                total += n
        return chosen

    def _flight_bytes(self, chosen: list[int], kept: set[int]) -> int:
        """Device bytes of the largest ``IN_FLIGHT`` of the ``chosen`` chunks in flight at once
        (a kept chunk's grads are on the device already: [Note: kept leg grads])."""
        largest = sorted(((self._chunk_numel[c], c in kept) for c in chosen), reverse=True)[: self.IN_FLIGHT]
        return sum(n * (self.FLIGHT_BYTES - self.KEPT_BYTES * k) for n, k in largest)

    def _room(self, chosen: list[int], kept: set[int] = frozenset()) -> bool:
        """[Note: leg room]: the device had room at the run's peak so far for the largest
        ``IN_FLIGHT`` of the ``chosen`` chunks beyond ``ROOM_MARGIN`` of its memory."""
        room = device_room.headroom(self.device)
        if room is None:  # no device memory to ask about (CPU)
            return True
        free, total = room
        need = self._flight_bytes(chosen, kept) + int(self.ROOM_MARGIN * total)
        if free >= need:
            return True
        if not self.no_room_steps:
            logger.warning("offload_optimizer.device_share: the device had %s free at the run's peak, less than the "
                           "%s its leg needs (two chunks in flight and %.0f%% of its memory kept free); the CPU "
                           "steps every chunk while that holds ([Note: leg room] in device_leg.py)",
                           fmt_bytes(free), fmt_bytes(need), 100 * self.ROOM_MARGIN)
        self.no_room_steps += 1
        return False

    @torch.no_grad()
    def step(self, view: torch.optim.Optimizer, groups: list[dict], items: list[tuple], masters: dict[int, torch.Tensor],
             grads: dict[int, torch.Tensor], shards: dict[int, torch.Tensor], scale: float | None, fused_scale: bool,
             after, settle_host: Callable[[int], None] = lambda i: None, kept: frozenset = frozenset()) -> object:
        """Queue one chunk's step on the device. ``items``: (piece, bucket, range in its shard) of
        the pieces that get a gradient; ``masters``, ``grads``, ``shards``: per bucket of the
        chunk its host master, host grad and param shard; ``scale``: the clip coefficient (None:
        none); ``fused_scale``: the optimizer takes it as ``grad_scale`` (torch's fused Adam(W),
        whose step counts live with the params; any other keeps 0-d state such as its step count
        on the host, as torch's non-capturable optimizers want it); ``after``: an event of
        the compute stream the leg waits for (None: none); ``settle_host(i)``: before bucket
        ``i``'s param shard in host memory (parameter offload) is written, no upload reads it any
        more. ``kept``: the buckets whose ``grads`` are the device's own ([Note: kept leg grads]).
        ``view``: a chunk view of the optimizer (host_step._chunk_view), whose ``state`` is
        replaced by the device copies.
        Returns the event after the param shards are written (None without CUDA)."""
        cuda = self._streams is not None
        stream = self._streams[self._next] if cuda else None
        self._next = 1 - self._next
        state = view.state
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            if after is not None:
                stream.wait_event(after)
            up = (lambda t: t.to(self.device, non_blocking=True)) if cuda else (lambda t: t.clone())
            d_master = {i: up(m) for i, m in masters.items()}
            d_grad = {i: up(grads[i]) for i in {i for _, i, _ in items}}
            kept_elements = 0
            for i in kept & d_grad.keys():  # on the device already ([Note: kept leg grads]): ``up`` copied nothing
                if cuda:
                    d_grad[i].record_stream(stream)  # made on the compute stream, read on this one
                kept_elements += d_grad[i].numel()
            if scale is not None and not fused_scale:
                for g in d_grad.values():
                    g.mul_(scale)  # as the host step multiplies its host grads
            twins, d_state = {}, collections.defaultdict(dict)
            for piece, i, local in items:
                twin = torch.nn.Parameter(d_master[i][local.start : local.end].view_as(piece))
                twin.grad = d_grad[i][local.start : local.end].view_as(piece)
                twins[id(piece)] = twin
                d_state[twin] = {k: v if not torch.is_tensor(v) or (v.dim() == 0 and not fused_scale)
                                 else up(self._pin(state[piece], k)) for k, v in state[piece].items()}
            view.state = d_state
            if scale is not None and fused_scale:
                # A fill on the leg's stream: torch.tensor(x, device=...) would copy from pageable
                # memory, which synchronizes the stream, so the worker would wait for the previous
                # chunk on this stream before it could step the CPU's chunks (the legs serialized).
                view.grad_scale = torch.full((), 1.0 / scale if scale != 0.0 else float("inf"),  # 0: an inf norm
                                             dtype=torch.float32, device=self.device)
            view.param_groups = [{**g, "params": [twins[id(p)] for p in g["params"] if id(p) in twins]} for g in groups]
            view.step()
            for i, shard in shards.items():  # the new params, cast to the param dtype on the device
                if cuda and shard.device.type == "cpu":  # parameter offload: down into the host shard
                    settle_host(i)
                    shard.copy_(d_master[i].to(shard.dtype), non_blocking=True)
                else:
                    shard.copy_(d_master[i])
            written = stream.record_event() if cuda else None
            for i, m in masters.items():
                m.copy_(d_master[i], non_blocking=cuda)
            for piece, _, _ in items:
                host, dev = state[piece], d_state[twins[id(piece)]]
                for k, v in dev.items():
                    if v is host.get(k):
                        continue  # a step count the twin shared with the host (no copy up)
                    if torch.is_tensor(v) and torch.is_tensor(host.get(k)):
                        host[k].copy_(v, non_blocking=cuda)
                    else:
                        host[k] = v.to("cpu") if torch.is_tensor(v) else v
            if cuda:
                self._down.append(_timed_event(stream) if self._timed is not None else stream.record_event())
        view.param_groups, view.state = [], {}
        elements = sum(m.numel() for m in masters.values())
        self.stepped_chunks += 1
        self.stepped_elements += elements
        self.kept_elements += kept_elements
        if self._timed is not None:
            self._leg = [self._leg[0] + elements, time.perf_counter()]
        return written

    def prepare(self, pieces: list, state: dict) -> None:
        """Before a waiting step's verdict is timed: the per-element state of ``pieces`` (those of
        the chunks it chose) moved into pinned memory now, so that a chunk's first time on the
        device (its state pinned then, once) does not count as the leg's time for "auto"."""
        for piece in pieces:
            piece_state = state.get(piece, {})
            for key, value in list(piece_state.items()):
                if torch.is_tensor(value) and value.dim():
                    self._pin(piece_state, key)

    def _pin(self, piece_state: dict, key: str) -> torch.Tensor:
        """``piece_state[key]``, moved into pinned host memory the first time (same values) so
        that its copies up and down run asynchronously."""
        t = piece_state[key]
        if self._streams is None or not self.memory.pin or t.is_pinned():
            return t
        piece_state[key] = self.memory.like(t, t.dtype)
        return piece_state[key]

    def settle(self) -> None:
        """Every queued chunk's masters and state are back in host memory; with "auto", the
        waiting step's two legs are timed and the share for the next chosen ([Note: leg share])."""
        for event in self._down:
            event.synchronize()
        down, self._down = self._down, []
        if self._timed is None:
            return
        (t0, start), self._timed = self._timed, None
        if start is not None and down:
            leg_seconds = max(start.elapsed_time(e) for e in down) / 1e3
        else:  # without CUDA the worker ran the leg on host copies
            leg_seconds = self._leg[1] - t0 if self._leg[0] else 0.0
        cpu_seconds = self._cpu[1] - t0 if self._cpu[0] else 0.0
        self.auto.record(self._cpu[0], cpu_seconds, self._leg[0], leg_seconds)

    def summary(self) -> dict:
        """For the run report ([Note: device leg])."""
        out = {"share": "auto" if self.auto is not None else self._share, "chunks": self.stepped_chunks,
               "elements": self.stepped_elements, "no_room_steps": self.no_room_steps,
               "kept_grad_elements": self.kept_elements}
        if self.auto is not None:
            out["auto"] = self.auto.summary()
        return out


def _timed_event(stream):
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event
