"""``HostBuffers``: the host memory checkpoint offload copies layer inputs into, bounded and reused.

A checkpoint offload copies one tensor per checkpointed layer per forward to the host and reads it
back in backward, and the next forward needs the same sizes again. Allocating pinned memory each time
(``cudaHostAlloc``) costs more than the copy, and pinned memory is a scarce OS resource, so:

* buffers are kept after use and handed out again for the same byte count (sizes repeat step after
  step: DeepSpeed's constant-size buffers, on the host);
* at most ``slots`` pinned buffers exist (``activation_checkpointing.number_checkpoints``; None: as
  many as one forward holds at once, which the model bounds: its checkpointed layers); a request
  beyond that gets pageable memory of its own, freed after use, and is reported once;
* ``contiguous`` (``contiguous_memory_optimization``): the pinned buffers are ``slots`` equal slices
  of one arena, allocated at the first request with that request's size. When every slot is free
  (the start of a forward) and a larger request comes, the arena is allocated again at the new size.

Without CUDA nothing is pinned (``pin=False``) but every rule above holds, so the bookkeeping runs
the same on CPU (the host tier's tests exercise it there).

Not thread-safe by itself: ``CheckpointOffload`` calls it from the forward (``acquire``) and from the
backward's release of saved tensors (``release``), which autograd never runs at the same time for
one model.
"""

from __future__ import annotations

import warnings

import torch

ALIGN = 512


def _round(nbytes: int) -> int:
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


class HostBuffers:
    """Host byte buffers for checkpoint copies (see the module docstring)."""

    def __init__(self, *, pin: bool, slots: int | None, contiguous: bool) -> None:
        if contiguous and slots is None:
            raise ValueError("HostBuffers(contiguous=True) needs slots (number_checkpoints)")
        self.pin = pin
        self.slots = slots
        self.contiguous = contiguous
        self._free: dict[int, list[torch.Tensor]] = {}  # rounded nbytes -> free pinned buffers
        self._pinned: dict[int, int] = {}  # id of every bounded buffer -> its rounded nbytes
        self._in_use = 0  # bounded buffers handed out and not released
        self._arena: torch.Tensor | None = None
        self._slot_bytes = 0
        self.allocations = 0  # bounded buffers ever allocated (arena slots counted once per arena)
        self.overflows = 0  # requests served from pageable memory beyond the bound
        self._warned = False

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of at least ``nbytes`` bytes, to hand back with ``release``."""
        size = _round(nbytes)
        if self.contiguous:
            buf = self._from_arena(size)
        else:
            free = self._free.get(size)
            buf = free.pop() if free else self._new(size)
        if buf is None:
            return self._overflow(size)
        self._in_use += 1
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back: a bounded one waits for the next request of its size."""
        size = self._pinned.get(id(buf))
        if size is None:
            return  # pageable overflow buffer (or one of an arena since replaced): freed with its last reference
        self._in_use -= 1
        self._free.setdefault(size, []).append(buf)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of bounded (pinned where CUDA is) buffers allocated now."""
        if self._arena is not None:
            return self._arena.numel()
        return sum(self._pinned.values())

    def _new(self, size: int) -> torch.Tensor | None:
        if self.slots is not None and len(self._pinned) >= self.slots:
            if not any(self._free.values()):
                return None
            self._drop_one_free()  # a free buffer of another size makes room for this one
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        self._pinned[id(buf)] = size
        self.allocations += 1
        return buf

    def _drop_one_free(self) -> None:
        size, free = next((s, f) for s, f in self._free.items() if f)
        del self._pinned[id(free.pop())]

    def _from_arena(self, size: int) -> torch.Tensor | None:
        if self._in_use == 0 and (self._arena is None or size > self._slot_bytes):
            self._slot_bytes = max(size, self._slot_bytes)
            self._arena = torch.empty(self.slots * self._slot_bytes, dtype=torch.uint8, pin_memory=self.pin)
            slices = list(self._arena.split(self._slot_bytes))
            self._pinned = {id(s): self._slot_bytes for s in slices}
            self._free = {self._slot_bytes: slices[::-1]}
            self.allocations += self.slots
        free = self._free.get(self._slot_bytes)
        if size > self._slot_bytes or not free:
            return None
        return free.pop()

    def _overflow(self, size: int) -> torch.Tensor:
        self.overflows += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"activation_checkpointing: a forward holds more checkpoints than number_checkpoints = {self.slots} "
                f"pinned host buffers{' (or one larger than an arena slot)' if self.contiguous else ''}; the rest "
                "go to pageable host memory, copied synchronously. Raise number_checkpoints to the number of "
                "checkpointed layers to keep every copy asynchronous.", stacklevel=3)
        return torch.empty(size, dtype=torch.uint8)


__all__ = ["HostBuffers"]
