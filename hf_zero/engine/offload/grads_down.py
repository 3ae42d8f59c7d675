"""The grads of offloaded buckets on their way to the host step (host_step.py): copied down as
their reductions land, or kept on the device for the device leg.

Each offloaded bucket's main grad is copied down (``Streams.d2h``) as soon as its reduction lands,
while backward goes on, its norm taken on the device first; the device grad is dropped once its
copy is done, with at most ``max_in_flight_bytes`` of grads waiting for their copies (the CPU runs
ahead of the GPU in backward: unbounded, every grad of the model would be waiting at once). A
second download of the same bucket in one step (gradients accumulated without ``no_sync``) lands
in an extra buffer that ``settle`` adds in, and from then on (``accumulating``) the engine keeps
later parts on the device until the step.

A grad the device leg will step is kept where backward left it instead ([Note: kept leg grads] in
device_leg.py): ``download(..., keep=True)`` holds the reference, ``take`` hands it to the leg,
``fetch`` copies it down after all when the CPU steps its chunk.
"""

from __future__ import annotations

import collections

import torch
from torch.nn.utils import get_total_norm

from hf_zero.engine.diagnostics.labels import labelled
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.streams import Streams


class GradsDown:
    """One step's offloaded grads, by bucket index: ``download`` as each lands, ``norm``,
    ``settle`` before the host step reads ``host[i]``, ``end_step``. ``host`` (the fp32 host grad
    shards, pinned) lives as long as the layout; ``close`` gives it back."""

    def __init__(self, device: torch.device, streams: Streams, memory: HostMemory, max_in_flight_bytes: int) -> None:
        self.device, self.streams, self.memory = device, streams, memory
        self.host: dict[int, torch.Tensor] = {}  # bucket index -> fp32 host grad shard
        self.max_in_flight_bytes = max_in_flight_bytes
        self._ready: dict[int, list] = {}  # bucket index -> its download events (None without CUDA)
        self._norms: dict[int, torch.Tensor] = {}  # bucket index -> its grad norm (device)
        self._extra: dict[int, list[torch.Tensor]] = {}  # later partial grads, added at the step
        # Device grads whose download is queued: (event, grad). Kept referenced until the copy is
        # done, and bounded (``max_in_flight_bytes``).
        self._in_flight: collections.deque = collections.deque()
        self._in_flight_bytes = 0
        self.kept: dict[int, torch.Tensor] = {}  # device grads the leg steps in place ([Note: kept leg grads])
        # Set once a bucket was downloaded twice in one step (gradients accumulated without a
        # boundary signal): from then on later parts stay on the device until the step.
        self.accumulating = False

    def downloaded(self, i: int) -> bool:
        """Bucket ``i``'s grad left the engine this step (copied down, or kept for the leg)."""
        return i in self._ready

    @labelled("hf_zero::grad_download")
    def download(self, i: int, grad: torch.Tensor, keep: bool = False) -> None:
        """Bucket ``i``'s reduced main grad: copied to the host (the caller then drops ``grad``),
        or with ``keep`` (its first part only) held here for the device leg."""
        norm = get_total_norm([grad])  # on the compute stream, before the grad can go
        first = i not in self._ready
        if first and keep:
            self.kept[i] = grad
            self._ready[i], self._norms[i] = [], norm
            return
        if i in self.kept:  # a second part: the first joins the host grad first
            self.fetch(i)
        if first and i not in self.host:
            self.host[i] = self.memory.empty(grad.numel())
        target = self.host[i] if first else torch.empty(grad.numel())  # rare: not worth pinning
        self._ready.setdefault(i, []).append(self._copy(grad, target))
        while self._in_flight_bytes > self.max_in_flight_bytes:
            self._release_oldest()
        if first:
            self._norms[i] = norm
        else:
            self._extra.setdefault(i, []).append(target)
            self._norms.pop(i, None)
            self.accumulating = True

    def _copy(self, grad: torch.Tensor, target: torch.Tensor):
        """Queue ``grad``'s copy into ``target`` after what the compute stream did to it; the
        event after it (None without CUDA, where the copy is done on return)."""
        d2h = self.streams.d2h
        if d2h is None:
            target.copy_(grad)
            return None
        d2h.wait_stream(torch.cuda.current_stream(self.device))  # after the reduction landed
        with torch.cuda.stream(d2h):
            target.copy_(grad, non_blocking=True)
        event = torch.cuda.Event()
        event.record(d2h)
        self._in_flight.append((event, grad))
        self._in_flight_bytes += grad.numel() * grad.element_size()
        return event

    def fetch(self, i: int) -> list:
        """Bucket ``i``'s kept grad down after all, as ``download`` would have copied it (the CPU
        steps it); the events to wait for before reading ``host[i]``."""
        grad = self.kept.pop(i)
        if i not in self.host:
            self.host[i] = self.memory.empty(grad.numel())
        event = self._copy(grad, self.host[i])
        self._ready[i].append(event)
        return [event]

    def take(self, buckets: list[int]) -> dict[int, torch.Tensor]:
        """The kept grads of ``buckets``, handed to the leg (no longer held here)."""
        return {i: self.kept.pop(i) for i in buckets if i in self.kept}

    def _release_oldest(self) -> None:
        event, grad = self._in_flight.popleft()
        event.synchronize()  # the CPU waits for the GPU here, at most a chunk's worth behind
        self._in_flight_bytes -= grad.numel() * grad.element_size()

    def norm(self, i: int) -> torch.Tensor:
        """Bucket ``i``'s grad norm (a 0-d tensor on the device), as ``get_total_norm`` gives it."""
        if i not in self._norms:  # partial grads were added up: settle them on the host
            self.settle(i)
            self._norms[i] = get_total_norm([self.host[i]]).to(self.device)
        return self._norms[i]

    def settle(self, i: int, keep: bool = False) -> None:
        """Wait for bucket ``i``'s downloads and fold any partial grads into ``host[i]``; a kept
        grad comes down first unless ``keep`` (the leg steps it)."""
        if i in self.kept and not keep:
            self.fetch(i)
        for event in self._ready[i]:
            if event is not None:
                event.synchronize()
        self._ready[i] = []
        while self._in_flight and self._in_flight[0][0].query():  # copies done: their grads can go
            self._release_oldest()
        for extra in self._extra.pop(i, []):
            self.host[i].add_(extra)

    def events(self, buckets: list[int]) -> list:
        """What a step of ``buckets`` waits for before it reads their host grads."""
        return [e for i in buckets for e in self._ready[i]]

    def end_step(self) -> None:
        """This step's grads are done with: copies finished, kept grads dropped (a step that
        never reached its leg)."""
        while self._in_flight:
            self._release_oldest()
        self.kept.clear()
        self._ready.clear()
        self._norms.clear()
        self._extra.clear()

    def close(self) -> None:
        """Copies still landing in the host grads are done before the host grads go back
        ([Note: freeing host memory] in host_memory.py)."""
        self.end_step()
        for grad in self.host.values():
            self.memory.free(grad)
        self.host.clear()
