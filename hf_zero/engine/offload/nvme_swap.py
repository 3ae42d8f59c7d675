"""``NvmeTier``: offloaded fp32 masters and optimizer state in swap files, streamed chunk by chunk.

The host step (host_step.py) steps offloaded buckets in chunks. With this tier a chunk's masters
and per-element optimizer state (AdamW: ``exp_avg``, ``exp_avg_sq``) are on disk between steps
(nvme_files.py) and pass through one of ``buffer_count`` chunk-sized host buffers (*slots*,
pinned when CUDA is there) around its step; chunk c uses slot c mod n. With n = 3:

    slot 0:  [read c0][step c0][write c0]                  [read c3][step c3] ...
    slot 1:           [read c1][step c1][write c1]                  [read c4] ...
    slot 2:                    [read c2][step c2][write c2]
    CPU:              [step c0][step c1][step c2][step c3] ...

while chunk c is stepped, chunk c+1 (up to c + n - 2) is read and chunk c-1 written. A read
waits for the write of its slot's previous chunk, and (CUDA) for that chunk's upload from the
slot. Host memory is n slots of (4 + s x state tensors) bytes x the largest chunk, whatever the
model size, s the bytes of a state value: 4, or 2 with ``state_dtype`` "bf16" ([Note: bf16 swap
files]). Per step each offloaded element moves 4 + s x state tensors bytes each way (AdamW: 12
read and 12 written, bf16 state 8 and 8); the first chunk's read and the last chunk's write are
not hidden. The transfers bypass the page cache (O_DIRECT) where the file system allows, the slots
being page-aligned for it; where it does not, a warning says so once and they go through the page
cache ([Note: direct I/O] in nvme_files.py).

[Note: where the pieces point] The optimizer's pieces of offloaded buckets and their state
tensors are, outside the host step, views of the swap files' shared mmaps (``SwapFile.view``):
``optimizer.state``, checkpoints (save reads them, load writes the masters in place) and the
engine's ``masters`` keep working, as file pages the kernel can drop. ``fetch`` points a chunk's
pieces (``piece.data``) and state at its slot; ``release`` copies in any state tensor the
optimizer made or replaced (the first step creates them; a resume loads them into memory), starts
the write, and points them back at the files. ``finish`` waits for the writes: the files, and so
the views, are current again. Lifecycle of a chunk: ``ChunkState``.

[Note: bf16 swap files] With ``state_dtype`` "bf16" ([Note: bf16 host state] in state_dtype.py)
the state files and the state kinds of the slots hold bf16, the master file and slots fp32; the
views of the state files are bf16 tensors, so checkpoints save bf16 state as the host tier's
does. The step is the host tier's: ``fetch`` points the state at the slot's bf16 regions and
``LowPrecisionState`` steps them in sub-steps through its fp32 scratch, writing the rounded
moments straight into the slot. State that arrives in fp32 (loaded from a checkpoint into memory)
is rounded (``copy_``: to nearest, ties to even, as ``round_stored``) as ``fetch`` copies it into
the slot, so results are bit for bit those of device "cpu" with bf16 state. (A piece without a
grad at that step has its loaded state rounded there too; the host tier rounds it at its first
step: the same bits by then.) Every file has the same layout in elements; a chunk's span is
padded to a whole number of ``BLOCK_BYTES`` in the narrowest dtype (``block_numel``), so each
chunk starts and ends on a block boundary in every file: bf16 files are half the size of the fp32
one, and the host moves 8 bytes per AdamW element each way instead of 12.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future

import torch

from hf_zero.engine.offload import nvme_files
from hf_zero.engine.offload.nvme_files import BLOCK_BYTES, SwapDir
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.state_dtype import STATE_DTYPES
from hf_zero.engine.stages import NotAvailableYet

ALIGN = 16  # elements: each bucket starts at a multiple inside its chunk (64 bytes of fp32, 32 of bf16)


class ChunkState(enum.Enum):
    ON_DISK = "on disk"  # the files hold it (a write may still be in flight in WRITING)
    READING = "reading"  # into its slot
    RESIDENT = "resident"  # in its slot; pieces and state point there (between fetch and release)
    WRITING = "writing"  # from its slot back to the files


def block_numel(*dtypes: torch.dtype) -> int:
    """Elements of a ``BLOCK_BYTES`` block in the narrowest of ``dtypes``: chunks start and are padded
    to a multiple, so every file of those dtypes moves whole blocks ([Note: bf16 swap files])."""
    return BLOCK_BYTES // min(d.itemsize for d in dtypes)


def bytes_per_element(optimizer, state_dtype: str = "fp32") -> int:
    """Bytes of fp32 master and per-element optimizer state per offloaded element, with the state in
    ``state_dtype`` (AdamW: 12, bf16 state 8): the swap files' size, the slots' and the host's share."""
    return 4 + STATE_DTYPES[state_dtype].itemsize * state_tensors_per_element(optimizer)


def state_tensors_per_element(optimizer) -> int:
    """How many per-element state tensors ``optimizer`` will keep (for the free-space check):
    Adam(W) 2 (3 with amsgrad), SGD 1 with momentum else 0; 2 for anything else (or no optimizer yet)."""
    if optimizer is None:
        return 2
    name, groups = type(optimizer).__name__, optimizer.param_groups
    if name in ("Adam", "AdamW"):
        return 2 + any(g.get("amsgrad") for g in groups)
    if name == "SGD":
        return int(any(g.get("momentum") for g in groups))
    return 2


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Slot:
    """One chunk-sized host buffer per kind ("master", state keys), and which chunk holds it."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.chunk: int | None = None
        self.read_kinds: set[str] = set()  # kinds the current chunk's read brought in
        self.uploaded = None  # CUDA event: the last upload from this slot is done (None: nothing pending)


class NvmeTier:
    """The NVMe ``tiers.StateTier`` for one layout's offloaded buckets: fp32 masters, per-element
    optimizer state in ``offload.state_dtype`` (fp32 or bf16, [Note: bf16 swap files])."""

    on_disk = True

    def __init__(self, offload: OptimizerOffload, chunks: list[list[int]], shard_sizes: list[int],
                 memory: HostMemory, ctx, optimizer) -> None:
        self.chunks, self.memory = chunks, memory
        self.state_dtype = STATE_DTYPES[offload.state_dtype]  # of the state files ([Note: bf16 swap files])
        block = block_numel(torch.float32, self.state_dtype)
        # Layout, the same in every file: chunk c at [start[c], start[c] + span[c]), bucket i at offset[i].
        self.start, self.span, self.offset, self.numel = [], [], {}, {}
        end = 0
        for chunk in chunks:
            rel = 0
            for i in chunk:
                self.offset[i], self.numel[i] = end + rel, shard_sizes[i]
                rel += _round_up(shard_sizes[i], ALIGN)
            self.start.append(end)
            self.span.append(_round_up(max(rel, 1), block))
            end += self.span[-1]
        self.file_numel = end
        self.slot_numel = max(self.span, default=0)
        tensors, dtype = state_tensors_per_element(optimizer), offload.state_dtype
        needed = bytes_per_element(optimizer, dtype) * self.file_numel
        named = "" if dtype == "fp32" else f"{dtype} "
        nvme_files.check_directory(offload.nvme_path, needed, 1 + tensors, ctx,
                                   what=f"optimizer swap files (fp32 masters and {tensors} {named}optimizer state "
                                        "tensors per element)",
                                   less="offload less (offload_optimizer.ratio) or keep more in host memory "
                                        "(offload_optimizer.host_share)")
        direct = nvme_files.use_direct_io(offload.nvme_path)  # [Note: direct I/O] in nvme_files.py
        self.dir = SwapDir(offload.nvme_path, ctx.rank if ctx is not None else 0, direct=direct)
        self._file("master")
        n = offload.buffer_count
        self.slots = [_Slot() for _ in range(n)]
        self.ahead = max(n - 2, 1) if n > 1 else 0  # chunks read ahead of the one being stepped
        self.states = [ChunkState.ON_DISK] * len(chunks)
        self._io: dict[int, list[Future]] = {}
        self._optimizer, self._pieces_of = None, {}
        self._piece_at: dict[int, int] = {}  # id(piece) -> its element offset in the files (side table)

    # ---- masters --------------------------------------------------------------------------------

    def master(self, i: int, shard: torch.Tensor) -> torch.Tensor:
        """Bucket ``i``'s master: a view of the master file, initialised from ``shard``."""
        view = self.dir.files["master"].view[self.offset[i] : self.offset[i] + self.numel[i]]
        view.copy_(shard)
        return view

    # ---- the step -------------------------------------------------------------------------------

    def begin(self, optimizer: torch.optim.Optimizer, pieces_of: dict[int, list]) -> None:
        self._optimizer, self._pieces_of = optimizer, pieces_of
        master_file = self.dir.files["master"].view
        for chunk in self.chunks:
            for i in chunk:
                for piece in pieces_of.get(i, []):
                    if id(piece) not in self._piece_at:
                        if piece.untyped_storage().data_ptr() != master_file.untyped_storage().data_ptr():
                            raise AssertionError("an offloaded piece does not view the master swap file")
                        self._piece_at[id(piece)] = piece.storage_offset()
        if self.chunks:
            self._start_read(0)

    def fetch(self, c: int, masters: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Chunk ``c`` in its slot (reads of the next chunks started); its pieces and state point there."""
        for j in range(c, min(c + 1 + self.ahead, len(self.chunks))):
            if self.states[j] is ChunkState.ON_DISK:
                self._start_read(j)
        self._expect(c, ChunkState.READING)
        _wait(self._io.pop(c))
        self.states[c] = ChunkState.RESIDENT
        slot = self._slot(c)
        for piece, at in self._chunk_pieces(c):
            n = piece.numel()
            piece.data = slot.buffers["master"][at : at + n]
            state = self._optimizer.state.get(piece)
            for key, t in (state or {}).items():
                if not self._per_element(key, t, piece):
                    continue
                region = self._region(slot, key)[at : at + n]
                if self._is_file_view(key, t):
                    if key not in slot.read_kinds:
                        raise AssertionError(f"optimizer state {key!r} was not read with its chunk")
                else:
                    region.copy_(t)  # made outside the step (loaded from a checkpoint): it is the newest
                state[key] = region
        return {i: self._in_slot(slot, i, c) for i in self.chunks[c]}

    def release(self, c: int, uploaded) -> None:
        """Chunk ``c`` was stepped (and its upload queued, ``uploaded`` its CUDA event or None):
        start writing it back, and point its pieces and state at the files again."""
        self._expect(c, ChunkState.RESIDENT)
        slot = self._slot(c)
        for piece, at in self._chunk_pieces(c):
            n, file_at = piece.numel(), self._piece_at[id(piece)]
            for key, t in (self._optimizer.state.get(piece) or {}).items():
                if not self._per_element(key, t, piece):
                    continue
                region = self._region(slot, key)[at : at + n]
                if t.data_ptr() != region.data_ptr():
                    region.copy_(t)  # created (first step) or replaced by the optimizer
                self._optimizer.state[piece][key] = self._file(key).view[file_at : file_at + n]
            piece.data = self.dir.files["master"].view[file_at : file_at + n]
        span = slice(0, self.span[c])
        self._io[c] = [f for kind in self.dir.files
                       for f in self.dir.write(kind, self._region(slot, kind)[span], self.start[c])]
        slot.uploaded = uploaded
        self.states[c] = ChunkState.WRITING

    def finish(self) -> None:
        """Every write of this step done: the files (and the views of them) are current."""
        for c, futures in list(self._io.items()):
            _wait(futures)
            del self._io[c]
            if self.states[c] is ChunkState.RESIDENT:
                raise AssertionError(f"chunk {c} was fetched but never released")
            self.states[c] = ChunkState.ON_DISK

    # ---- slots ------------------------------------------------------------------------------------

    def _slot(self, c: int) -> _Slot:
        return self.slots[c % len(self.slots)]

    def _start_read(self, c: int) -> None:
        self._expect(c, ChunkState.ON_DISK)
        slot = self._slot(c)
        previous = slot.chunk
        if previous is not None and previous != c:
            if self.states[previous] is ChunkState.RESIDENT or self.states[previous] is ChunkState.READING:
                raise AssertionError(f"slot of chunk {previous} reused while it is {self.states[previous].value}")
            _wait(self._io.pop(previous, []))
            self.states[previous] = ChunkState.ON_DISK
        if slot.uploaded is not None:
            slot.uploaded.synchronize()  # the device has copied the previous chunk's masters out of it
            slot.uploaded = None
        span = slice(0, self.span[c])
        for kind in self.dir.files:
            self._region(slot, kind)
        self._io[c] = [f for kind in self.dir.files
                       for f in self.dir.read(kind, slot.buffers[kind][span], self.start[c])]
        slot.chunk, slot.read_kinds = c, set(self.dir.files)
        self.states[c] = ChunkState.READING

    def _in_slot(self, slot: _Slot, i: int, c: int) -> torch.Tensor:
        at = self.offset[i] - self.start[c]
        return slot.buffers["master"][at : at + self.numel[i]]

    def _dtype(self, kind: str) -> torch.dtype:
        return torch.float32 if kind == "master" else self.state_dtype

    def _file(self, kind: str):
        return self.dir.file(kind, self.file_numel, self._dtype(kind))

    def _region(self, slot: _Slot, kind: str) -> torch.Tensor:
        if kind not in slot.buffers:  # O_DIRECT's rule: page-aligned
            slot.buffers[kind] = nvme_files.page_aligned(self.memory, self.slot_numel, self._dtype(kind))
        return slot.buffers[kind]

    def _chunk_pieces(self, c: int):
        """(piece, its element offset inside the chunk) for every piece of chunk ``c``."""
        for i in self.chunks[c]:
            for piece in self._pieces_of.get(i, []):
                yield piece, self._piece_at[id(piece)] - self.start[c]

    def _per_element(self, key: str, t, piece) -> bool:
        if not (torch.is_tensor(t) and t.dim() > 0 and t.numel() == piece.numel()):
            return False  # scalars (Adam's step) and anything else stay where the optimizer keeps them
        # bf16 files also take fp32 state (loaded, or fresh): rounded into the slot ([Note: bf16 swap files])
        if t.dtype not in (torch.float32, self.state_dtype):
            kept = "float32" if self.state_dtype == torch.float32 else "float32 and bfloat16"
            raise NotAvailableYet(f"optimizer state {key!r} is {t.dtype}: the NVMe tier of optimizer offload swaps "
                                  f"{kept} state only; use offload_optimizer.device 'cpu'")
        return True

    def _is_file_view(self, key: str, t: torch.Tensor) -> bool:
        file = self.dir.files.get(key)
        return file is not None and t.untyped_storage().data_ptr() == file.view.untyped_storage().data_ptr()

    def _expect(self, c: int, state: ChunkState) -> None:
        if self.states[c] is not state:
            raise AssertionError(f"chunk {c} is {self.states[c].value}, expected {state.value}")

    # ---- accounting and teardown --------------------------------------------------------------------

    def on_disk_of(self, i: int) -> bool:
        return True

    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for s in self.slots for b in s.buffers.values())

    def disk_bytes(self) -> int:
        return self.dir.disk_bytes()

    def close(self) -> None:
        """Wait for the transfers in flight, then delete this rank's swap files and directory."""
        try:
            self.finish()
        finally:
            self.dir.remove()


def _wait(futures: list[Future]) -> None:
    for f in futures:
        f.result()
