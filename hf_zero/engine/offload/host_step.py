"""The optimizer step of offloaded buckets, pipelined with the copies that feed it.

With optimizer offload (``offload.py``) the fp32 masters and optimizer state of some buckets live
in host memory and their step runs on the CPU. Done naively the step is serial: copy every grad
down, step everything, copy every param up. Here:

- each offloaded bucket's main grad is copied down (``Streams.d2h``) as soon as its reduction
  lands, while backward goes on, its norm taken on the device first, with a bounded number of
  grads waiting for their copies (``GradsDown`` in grads_down.py);
- clipping needs the global norm, known only after backward: the device buckets are scaled
  there, and the host grads as the host step reads them (fused Adam(W) takes the scale as
  ``grad_scale``, other optimizers get one multiply per bucket);
- at the optimizer step the offloaded buckets are stepped in *chunks* (consecutive buckets of at
  least ``OptimizerOffload.chunk_numel`` elements), each chunk's fp32 masters uploaded
  (``Streams.h2d``) into a device fp32 scratch and cast to the param dtype there while the CPU
  steps the next chunk:

    backward:    [grads b0][grads b1] ...                 [grads bN]
    d2h stream:     [b0]      [b1]     ...                   [bN]
    CPU:                                                        [step c0][step c1][step c2]
    h2d stream:                                                          [params c0][params c1][c2]

so a step costs about the host optimizer's own time plus one chunk's upload. The compute stream
waits for the uploads (``wait_uploads``) before anything reads the params.

[Note: step in backward] Without clipping nothing waits for the global norm, so a chunk can be
stepped as soon as its grads are on the host (``early``, ZeroEngine.set_step_in_backward): a
worker thread (step_overlap.StepWorker) steps the chunks while backward goes on, and the optimizer
step only waits for it, or with ``defer`` (``overlap_forward``) not even that: the worker steps
the chunks left when backward ends in the order the next forward uses them, and each module (each
stage-3 unit, before it gathers) waits for its own (``wait_chunk_of``); ``settle`` waits for all:

    backward:    [grads b0][grads b1] ...      [grads bN]
    d2h stream:     [b0]      [b1]     ...        [bN]
    CPU worker:         [step c0]     [step c1] ...    [step cK]
    h2d stream:                 [params c0]    [params c1]    [cK]

A bucket's grads are all in once it is reduced, so backward reads none of its params again and
its update may land at once. Which params got no gradient on any rank (the optimizer leaves them
alone, as under DDP) is known per bucket: its flags are all-reduced with its download at W > 1
(``unused``). With clipping the chunks stepped before the global norm is known are validated
against it, and redone or undone from a copy when needed ([Note: speculation] in speculation.py,
``_step_validated``); without a speculation policy clipping after an early step is refused
(ZeroEngine.clip_grad_norm_).

[Note: settle mid-step] A step in backward spans from its first chunk handed over (``ready``)
to the optimizer step (``run``: every chunk handed? then the verdict, which redoes speculated
chunks and hands the held ones over from ``_handed``, waiting on ``_pending``) or, without one, to
``end_step``. ``settle`` is called in that window too: by whatever reads the params between
backward and ``optimizer.step()`` (``ZeroEngine.gathered``, ``full_state_dict``, a Trainer
callback's ``on_pre_optimizer_step``). Ending the step there (its bookkeeping cleared, the tier
finished) made the optimizer step find no chunk handed over, an AssertionError. So while
``_mid_step`` ``settle`` only waits for the chunks handed so far and their uploads, and keeps
everything the optimizer step needs: the step then ends bit for bit as without the call (the tier's
``finish`` and the device leg's timing wait for its end too). What is read meanwhile is the
unfinished step: the chunks stepped in backward (under clipping at scale 1, maybe redone yet), the
others as before it. What cannot go on mid-step is refused: ``gathered(modifier_rank=...)`` (its
edits would land on masters some of which the step already read) and a new ``set_step_in_backward``.

With parameter offload (stage 3, [Note: host shards] in units.py) a bucket's param shard lives on
the host: its updated masters are cast into it on the CPU right after its chunk's step, and
nothing goes up now; the unit's next use uploads the shard.

Where the masters and optimizer state live between steps is the offload tier's business
(``tiers.StateTier``): ``fetch`` before a chunk's step and ``release`` after it. Host memory does
nothing there; the NVMe tier (``nvme_swap.py``) reads the chunk from its files into a chunk buffer
ahead of the step and writes it back behind it.

Each chunk is stepped by the user's own optimizer class on a *view* of the optimizer
(``_chunk_view``): the same ``state`` dict and hyperparameters, param groups narrowed to the
chunk's pieces, no hooks. Optimizer state therefore stays keyed by the same pieces (checkpoints
and ``trainer.optimizer`` see nothing different), and any per-element optimizer works.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future
from typing import Callable

import torch
from torch.profiler import record_function

from hf_zero.engine.offload.device_leg import DeviceLeg
from hf_zero.engine.offload.grads_down import GradsDown
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.diagnostics.labels import labelled
from hf_zero.engine.offload.nvme_swap import bytes_per_element
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import Action, Speculation, SpeculationPolicy
from hf_zero.engine.offload.state_dtype import STATE_DTYPES, LowPrecisionState
from hf_zero.engine.offload.step_overlap import StepWorker, hyperparameters
from hf_zero.engine.streams import Streams
from hf_zero.engine.offload.tiers import state_tier

UPLOAD_NUMEL = 1 << 23  # fp32 elements per piece of an upload's cast on the device (32 MiB of scratch)


class HostStep:
    """The pipelined host step of one layout's offloaded buckets (indices into the grad buckets).

    Per step: ``download`` each offloaded bucket's main grad as its reduction lands (during
    backward, so the copies hide behind it and the device main grad is freed at once), its norm
    taken on the device first; ``norm`` for clipping; ``scale`` set by the clip; ``run`` at the
    optimizer step; ``end_step`` after it."""

    def __init__(self, offloaded: list[bool], shard_sizes: list[int], device: torch.device,
                 host_memory: HostMemory, streams: Streams, chunk_numel: int, *,
                 offload: OptimizerOffload | None = None, ctx=None, optimizer=None, check_room: bool = True) -> None:
        self.device, self.streams, self.memory = device, streams, host_memory
        self.chunks: list[list[int]] = []
        current, size = [], 0
        for i, (off, n) in enumerate(zip(offloaded, shard_sizes)):
            if not off:
                continue
            current.append(i)
            size += n
            if size >= chunk_numel:
                self.chunks.append(current)
                current, size = [], 0
        if current:
            self.chunks.append(current)
        self.tier = state_tier(offload, self.chunks, shard_sizes, host_memory, ctx, optimizer, check_room)
        # [Note: bf16 host state] (state_dtype.py): None keeps the optimizer's own fp32 state.
        self._state_dtype = offload.state_dtype if offload is not None else "fp32"
        dtype = STATE_DTYPES[self._state_dtype]
        self.low_precision = LowPrecisionState(dtype) if dtype != torch.float32 else None
        # The grads down (grads_down.py), at most one chunk of fp32 grads waiting for its copies.
        self.grads = GradsDown(device, streams, host_memory, max_in_flight_bytes=4 * chunk_numel)
        self.scale: torch.Tensor | None = None  # the clip coefficient of this step, if any
        self._uploads: list = []
        self._scratch: torch.Tensor | None = None  # device fp32, for the upload casts (_scratch_for)
        # What the step reads and writes, from the engine (``bind``): per bucket its pieces
        # (piece, range in the bucket's shard, full param), its param shard, and a before-write wait.
        self.masters: list[torch.Tensor] = []
        self._pieces: dict[int, list] = {}
        self._shard_of: Callable[[int], torch.Tensor] | None = None
        self._write_shard: Callable[[int, torch.Tensor], None] | None = None  # ShardedBucket.write_shard
        self._settle_params: Callable[[int], None] = lambda i: None
        # [Note: step in backward]: chunks stepped by a worker as their grads land.
        self.early = False
        self.defer = False  # early, and the next forward waits for each chunk it needs (run)
        self._worker: StepWorker | None = None
        self._unused: dict[int, Callable[[], set]] = {}  # bucket -> its params without a gradient anywhere
        self._next_chunk = 0  # chunks handed to the worker this step
        # Chunks of this step went to the worker and neither ``run`` nor ``end_step`` has come:
        # ``settle`` then only waits for them ([Note: settle mid-step]).
        self._mid_step = False
        self._pending: dict[int, Future] = {}  # chunk -> its step on the worker, until settled
        self._upload_events: dict[int, object] = {}  # chunk -> the event after its upload (worker-written)
        self._chunk_of = {i: c for c, chunk in enumerate(self.chunks) for i in chunk}
        self._optimizer: torch.optim.Optimizer | None = None
        # [Note: speculation] (speculation.py): early with clipping on; each chunk's (groups, skip,
        # events) as it was handed over, for a step after the verdict.
        self.speculation: Speculation | None = None
        self._handed: dict[int, tuple] = {}
        self._chunk_numel = [sum(shard_sizes[i] for i in chunk) for chunk in self.chunks]
        # [Note: device leg] (device_leg.py): a share of the chunks that wait for the norm, stepped on the device
        # (OptimizerOffload allows it only with device "cpu" and fp32 state: host memory, no low precision).
        share = offload.device_share if offload is not None else 0.0
        self.leg = DeviceLeg(share, self._chunk_numel, device, streams.leg, host_memory) if share else None
        # [Note: kept leg grads] (device_leg.py): this step's chunks whose grads stay on the device
        # for the leg (None: not planned yet this step; the grads themselves wait in ``grads.kept``).
        self._keep: set[int] | None = None

    def master(self, i: int, shard: torch.Tensor) -> torch.Tensor:
        """Bucket ``i``'s fp32 master, initialised from ``shard``, where the tier keeps it."""
        return self.tier.master(i, shard)

    def bind(self, optimizer: torch.optim.Optimizer, buckets: list) -> None:
        """What the step works on: the engine's ``ShardedBucket``s (sharded_bucket.py): per bucket
        its master, its pieces, its param shard (written with the new params) and the wait before
        the CPU writes a host shard (parameter offload)."""
        self._optimizer = optimizer
        self.masters = [b.master for b in buckets]
        self._pieces = {b.index: [(p.piece, p.local, p.param) for p in b.pieces] for b in buckets}
        self._shard_of = lambda i: buckets[i].shard()
        self._write_shard = lambda i, source: buckets[i].write_shard(source)
        self._settle_params = lambda i: buckets[i].settle_shard()
        if self.leg is not None and any(b.unit is not None and b.unit.host is not None
                                        and not isinstance(b.unit.host, HostMemory) for b in buckets):
            raise ValueError("offload_optimizer.device_share needs the param shards on the device or in host "
                             "memory: it does not combine with offload_param device \"nvme\" ([Note: device leg] "
                             "in device_leg.py)")

    def overlap(self, early: bool, defer: bool, speculation: SpeculationPolicy | None) -> None:
        """[Note: step in backward]: ``early``, ``defer``; with ``speculation`` (clipping on) the
        chunks stepped before the global norm is known are validated against it ([Note:
        speculation]). Only chunks in host memory speculate, here decided once per chunk: those
        none of whose buckets the tier keeps on disk (all of the host tier's, none of the NVMe
        tier's, a split's first ``count``); the others wait for the norm and are stepped after it,
        in chunk order (the worker's order whenever the tier is ``on_disk``)."""
        if self._mid_step:  # [Note: settle mid-step]: the chunks handed over would go unvalidated
            raise RuntimeError(
                "set_step_in_backward() between backward and optimizer.step(): chunks of this step were "
                "already stepped during backward under the current setting; change it after the step")
        self.early, self.defer = early, early and defer
        self.speculation = None
        if early and speculation is not None:
            speculable = [not any(self.tier.on_disk_of(i) for i in chunk) for chunk in self.chunks]
            per_element = bytes_per_element(self._optimizer, self._state_dtype)
            self.speculation = Speculation(speculation, self._chunk_numel, per_element, speculable)

    # ---- grads down (grads_down.py) ----------------------------------------------------------

    @property
    def host_grads(self) -> dict[int, torch.Tensor]:
        """Bucket index -> its fp32 host grad shard."""
        return self.grads.host

    @property
    def accumulating(self) -> bool:
        """A bucket was downloaded twice in one step: later parts stay on the device until the step."""
        return self.grads.accumulating

    def downloaded(self, i: int) -> bool:
        return self.grads.downloaded(i)

    def download(self, i: int, grad: torch.Tensor) -> None:
        """Bucket ``i``'s reduced main grad, as its reduction lands: copied to the host (the caller
        then drops ``grad``), or kept on the device for the leg ([Note: kept leg grads])."""
        first = not self.grads.downloaded(i)
        if not first and self.early:
            raise RuntimeError(
                f"bucket {i} got gradients again after its optimizer step ran in backward "
                "(ZeroEngine.set_step_in_backward): gradients were accumulated without telling the engine "
                "which backward ends the accumulation (set_boundary_source, or ZeroModule.no_sync)")
        self.grads.download(i, grad, keep=self._keeps(i))  # (a second part is never kept)

    def _keeps(self, i: int) -> bool:
        """[Note: kept leg grads]: whether bucket ``i``'s grad stays on the device this step for the
        leg. Planned at the step's first download: only for a step that waits for the verdict."""
        if self.leg is None:
            return False
        if self._keep is None:
            waits = not self.early or (self.speculation is not None and not self.speculation.policy.speculate_now())
            self._keep = set(self.leg.keep(list(range(len(self.chunks))), self._stated)) if waits else set()
        return self._chunk_of.get(i) in self._keep

    def _fetch_chunk(self, c: int, events: list) -> None:
        """Chunk ``c``'s kept grads down after all (the CPU steps it), their copies' events added to
        ``events`` ([Note: kept leg grads])."""
        for i in self.chunks[c]:
            if i in self.grads.kept:
                events += self.grads.fetch(i)

    def norm(self, i: int) -> torch.Tensor:
        """Bucket ``i``'s grad norm (a 0-d tensor on the device), as ``get_total_norm`` gives it."""
        return self.grads.norm(i)

    # ---- the step ------------------------------------------------------------------------------

    def ready(self, i: int, unused: Callable[[], set]) -> None:
        """[Note: step in backward]: bucket ``i``'s grads went down at the end of an accumulation;
        ``unused()`` gives its params that got no gradient on any rank. Hands every chunk whose
        buckets are all down to the worker (with the hyperparameters of now: this step's)."""
        self._unused[i] = unused
        while self._next_chunk < len(self.chunks):
            c = self._next_chunk
            if not all(j in self._unused for j in self.chunks[c]):
                return
            if c == 0:
                self.tier.begin(self._optimizer, self._pieces_of())
                self._mid_step = True
            if self._worker is None:
                # The GPU's feeder thread keeps a core of its own.
                threads = max(1, (os.cpu_count() or 2) - 1) if self.streams.h2d is not None else None
                self._worker = StepWorker(threads, highest_first=not self.tier.on_disk)
            events = self.grads.events(self.chunks[c])
            skip = {j: self._unused[j] for j in self.chunks[c]}
            if self.speculation is not None:  # [Note: speculation]
                self._handed[c] = (hyperparameters(self._optimizer), lambda j, skip=skip: skip[j](), events)
                state = self._optimizer.state
                stateless = not any(state.get(piece) for j in self.chunks[c] for piece, _, _ in self._pieces.get(j, []))
                if self.speculation.hand_over(c, stateless):
                    self._fetch_chunk(c, events)  # (kept for the leg, but it speculates after all)
                    self._pending[c] = self._worker.submit(c, self._step_validated, c, *self._handed[c])
                self._next_chunk += 1
                continue
            self._fetch_chunk(c, events)
            view = _chunk_view(self._optimizer)
            self._pending[c] = self._worker.submit(c, self._step_chunk, c, view, hyperparameters(self._optimizer),
                                                   lambda j, skip=skip: skip[j](), events)
            self._next_chunk += 1

    @property
    def pending(self) -> bool:
        """Chunks handed to the worker and not settled yet."""
        return bool(self._pending)

    def wait_chunk_of(self, i: int) -> None:
        """Bucket ``i``'s new params are where they live, and the current stream waits for their
        upload ([Note: step in backward], with ``defer``: the next forward asks, unit by unit)."""
        c = self._chunk_of.get(i)
        future = self._pending.get(c)
        if future is None:
            return
        future.result()
        event = self._upload_events.get(c)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @property
    def mid_step(self) -> bool:
        """Chunks of this step were stepped in backward and its optimizer step has not come
        ([Note: settle mid-step])."""
        return self._mid_step

    def settle(self) -> None:
        """Every chunk handed to the worker is stepped, its writes back in the tier, and the current
        stream waits for every upload. Idempotent. Between backward and the optimizer step only the
        waits: the step goes on ([Note: settle mid-step])."""
        if self._mid_step:
            self._wait_handed()
            return
        decided = self.speculation is not None and self.speculation.decided  # (held chunks may be all)
        if not self._pending and not decided:
            return
        with record_function("hf_zero::settle_host_step"):
            try:
                for c in sorted(self._pending):
                    self._pending[c].result()  # the worker's errors surface here
            finally:
                self._pending, self._next_chunk = {}, 0
                self._upload_events, self._handed = {}, {}
                if self.leg is not None:
                    self.leg.settle()  # the device leg's masters and state are back on the host
                self.tier.finish()
                if self.speculation is not None:
                    self.speculation.end_step()
            self.wait_uploads()

    def _wait_handed(self) -> None:
        """[Note: settle mid-step] The chunks handed to the worker so far are stepped and the current
        stream waits for their uploads; what the optimizer step needs of them is kept."""
        with record_function("hf_zero::settle_host_step"):
            for c in sorted(self._pending):
                self._pending[c].result()  # (done futures: _validate asks a redone chunk's again)
            self.wait_uploads()

    @labelled("hf_zero::host_step")
    def run(self, optimizer: torch.optim.Optimizer, device_pieces: list, unused: set) -> None:
        """Step ``device_pieces`` (queued on the device), then each offloaded chunk on the host as
        its grads land, uploading its masters into the param shards; pieces of params in ``unused``
        (no gradient on any rank) get none. Early (a worker stepped the chunks during backward):
        waits for the worker, or with ``defer`` leaves it running (the next forward waits for each
        chunk as it needs it, ``wait_chunk_of``; anything else calls ``settle`` first)."""
        if not self.early:  # (early: the worker has been queueing uploads since backward)
            self._uploads = []
        scale = None if self.scale is None else float(self.scale)
        if device_pieces:
            view_dev = _chunk_view(optimizer)  # without grad_scale: these grads were clipped already
            _step_on(view_dev, hyperparameters(optimizer), device_pieces)
        if self.early:
            self._mid_step = False  # the step has come: settle ends it from here on
            if self._next_chunk != len(self.chunks):
                raise AssertionError(f"{self._next_chunk} of {len(self.chunks)} chunks were handed to the step worker")
            if self.speculation is not None:
                self._validate(scale)
            if not self.defer:
                self.settle()
            return
        clip = scale
        view, scale = _clip_view(optimizer, scale)
        self.tier.begin(optimizer, self._pieces_of())
        try:
            groups = hyperparameters(optimizer)
            leg = self.leg.choose(list(range(len(self.chunks))), self._stated, self._kept_chunks()) if self.leg else []
            if self.leg is not None:
                after = self._leg_start(leg)
            if leg:  # [Note: device leg]: queued first, so the device steps them while the CPU steps the rest
                for c in leg:
                    for i in self.chunks[c]:
                        self.grads.settle(i, keep=True)
                    self._step_leg(c, groups, lambda i: unused, [], after, clip, validated=False, kept=self._take_kept(c))
            for c, chunk in enumerate(self.chunks):
                if c in leg:
                    continue
                for i in chunk:
                    self.grads.settle(i)
                    if scale is not None:
                        self.grads.host[i].mul_(scale)
                self._step_chunk(c, view, groups, lambda i: unused, [])
                if self.leg is not None:
                    self.leg.cpu_done(self._chunk_numel[c])
            if self.leg is not None:
                self.leg.settle()
        finally:
            self.tier.finish()
        view.param_groups = []

    def _validate(self, scale: float | None) -> None:
        """[Note: speculation]: the global norm is known (``scale``, the clip coefficient, or None):
        chunks stepped at scale 1 are stepped again if clipping was needed, and chunks that waited
        for the norm go to the worker now."""
        redo, held = self.speculation.validate(scale)
        for c in redo:
            self._pending[c].result()  # its speculative step is done: the worker has let go of c
        leg = set(self.leg.choose(held, self._stated, self._kept_chunks())) if self.leg is not None else set()
        after = self._leg_start(leg) if self.leg is not None else None
        for c in redo + held:  # [Note: kept leg grads]: the CPU steps these, so their grads come down now
            if c not in leg:
                self._fetch_chunk(c, self._handed[c][2])
        # Highest first, as the worker takes them: the leg's chunks (the highest) are queued on the
        # device before the CPU takes its first chunk.
        for c in sorted(redo + held, reverse=True):
            if c in leg:  # [Note: device leg]: the worker only queues its work on the device
                self._pending[c] = self._worker.submit(c, self._step_leg, c, *self._handed[c], after, None, True,
                                                       self._take_kept(c))
            elif self.leg is not None:
                self._pending[c] = self._worker.submit(c, self._step_timed, c, *self._handed[c])
            else:
                self._pending[c] = self._worker.submit(c, self._step_validated, c, *self._handed[c])

    def _leg_start(self, leg) -> object:
        """The verdict of a waiting step with a device leg: the event its streams wait for (None
        without CUDA or without leg chunks; timed for "auto"), from which both legs are timed."""
        after = None
        if leg and self.streams.h2d is not None:
            self.leg.prepare([piece for c in leg for i in self.chunks[c] for piece, _, _ in self._pieces.get(i, [])],
                             self._optimizer.state)
            stream = torch.cuda.current_stream(self.device)
            after = _record(stream, timing=self.leg.auto is not None)
        self.leg.begin(after)
        return after

    def _kept_chunks(self) -> set[int]:
        return {self._chunk_of[i] for i in self.grads.kept}

    def _take_kept(self, c: int) -> dict[int, torch.Tensor]:
        """Chunk ``c``'s kept grads, handed to its leg step ([Note: kept leg grads])."""
        return self.grads.take(self.chunks[c])

    def _step_timed(self, c: int, *handed) -> None:
        """``_step_validated`` after the verdict, timed for the device leg's "auto" share."""
        if self._step_validated(c, *handed):
            self.leg.cpu_done(self._chunk_numel[c])

    def _stated(self, c: int) -> bool:
        """Every piece of chunk ``c`` has optimizer state (a first step creates it on the host)."""
        state = self._optimizer.state
        return all(state.get(piece) for i in self.chunks[c] for piece, _, _ in self._pieces.get(i, []))

    def _step_leg(self, c: int, groups: list[dict], skip: Callable[[int], set], events: list, after,
                  scale: float | None = None, validated: bool = True, kept: dict | None = None) -> None:
        """Chunk ``c`` stepped on the device ([Note: device leg]): on the worker after the verdict
        (``validated``: its scale from the speculation), or from ``run``, with ``scale``. ``kept``:
        its buckets' grads still on the device ([Note: kept leg grads]), taken on the main thread."""
        kept = kept or {}
        for event in events:
            if event is not None:
                event.synchronize()
        if validated:
            action, scale = self.speculation.start(c)
            if action is Action.NOTHING:
                return
        chunk = self.chunks[c]
        resident = self.tier.fetch(c, self.masters)
        items = []
        for i in chunk:
            unused = skip(i)
            items += [(piece, i, local) for piece, local, param in self._pieces.get(i, []) if param not in unused]
        scale = None if scale is None or scale == 1.0 else scale
        grads = {i: self.grads.host[i] for i in chunk if i in self.grads.host} | kept
        written = self.leg.step(_chunk_view(self._optimizer), groups, items, {i: resident[i] for i in chunk},
                                grads, {i: self._shard_of(i) for i in chunk}, scale,
                                _scales_grads_itself(self._optimizer), after, self._settle_params, frozenset(kept))
        if written is not None:
            self._uploads.append(written)
            self._upload_events[c] = written
        self.tier.release(c, written)

    def _step_validated(self, c: int, groups: list[dict], skip: Callable[[int], set], events: list) -> bool:
        """On the worker, chunk ``c`` under speculation ([Note: speculation]): before the verdict
        keep a copy and step at scale 1; after it step with its scale (a speculated chunk from its
        copy, when clipping was needed), or nothing when the step was skipped (returns False)."""
        for event in events:
            if event is not None:
                event.synchronize()
        action, scale = self.speculation.start(c)
        if action is Action.NOTHING:
            return False
        view, scale = _clip_view(self._optimizer, scale)
        if scale is not None:
            for i in self.chunks[c]:
                self.grads.host[i].mul_(scale)  # as run() does without speculation
        snapshots, state = self.speculation.snapshots, self._optimizer.state
        before = {Action.SPECULATE: lambda pieces: snapshots.keep(c, pieces, state),
                  Action.REDO: lambda pieces: snapshots.restore(c, state)}.get(action)
        self._step_chunk(c, view, groups, skip, [], before)
        return True

    def _restore(self, c: int) -> None:
        """Chunk ``c``'s masters and state back from its copy, and its params from them (a skipped
        step after speculation)."""
        resident = self.tier.fetch(c, self.masters)
        self.speculation.snapshots.restore(c, self._optimizer.state)
        for i in self.chunks[c]:
            self._settle_params(i)
        self.tier.release(c, self._upload(c, self.chunks[c], resident, self.streams.h2d))

    @labelled("hf_zero::host_step_chunk")
    def _step_chunk(self, c: int, view: torch.optim.Optimizer, groups: list[dict], skip: Callable[[int], set],
                    events: list, before: Callable[[list], None] | None = None) -> None:
        """Chunk ``c``: wait for its downloads (``events``), step its pieces (``groups``: the
        hyperparameters to use) with their host grads, those of params in ``skip(i)`` without, and
        queue the upload of its masters (or write the host shards). ``before(pieces)``: called with
        the pieces that get a grad, right before their step ([Note: speculation])."""
        chunk = self.chunks[c]
        for event in events:
            if event is not None:
                event.synchronize()
        resident = self.tier.fetch(c, self.masters)  # this chunk's masters and state in host memory
        pieces = []
        for i in chunk:
            unused = skip(i)
            for piece, local, param in self._pieces.get(i, []):
                piece.grad = None if param in unused else self.grads.host[i][local.start : local.end]
                pieces.append(piece)
        if before is not None:
            before([p for p in pieces if p.grad is not None])
        if self.low_precision is not None:  # [Note: bf16 host state]
            self.low_precision.step(view, groups, pieces)
        else:
            _step_on(view, groups, pieces)
        for piece in pieces:
            piece.grad = None
        for i in chunk:
            self._settle_params(i)
        self.tier.release(c, self._upload(c, chunk, resident, self.streams.h2d))

    def _pieces_of(self) -> dict[int, list]:
        return {i: [p for p, _, _ in ps] for i, ps in self._pieces.items()}

    def end_step(self) -> None:
        """After the optimizer step (or instead of it): this step's grads are done with. With
        ``defer`` the worker may still be stepping; it has what it needs (``ready``). Under
        speculation a step that never came undoes the chunks stepped before it."""
        self._mid_step = False  # over, with or without its optimizer step: settle ends it
        if self.speculation is not None and self.speculation.open:  # no optimizer step: skipped
            restore = self.speculation.skip()
            for c in restore:
                self._pending[c].result()
            for c in restore:
                self._restore(c)
            self.settle()
        if self._pending and not self.defer:
            self.settle()  # early chunks of a step the optimizer never took: no worker runs on
        self.grads.end_step()
        self._keep = None
        self._unused.clear()
        self.scale = None

    @labelled("hf_zero::upload")
    def _upload(self, c: int, chunk: list[int], masters: dict[int, torch.Tensor], h2d):
        """Queue chunk ``c``'s masters up into ``shards``; returns the event after the copies (None
        when there is nothing to wait for: no CUDA, or every shard on the host, where the copies
        are done on return)."""
        # Parameter offload: host shards are written here, on the CPU (the cast to the param dtype
        # too); without CUDA every shard is copied so.
        shards = {i: self._shard_of(i) for i in chunk}
        on_host = [i for i in chunk if h2d is None or shards[i].device.type == "cpu"]
        for i in on_host:
            self._write_shard(i, masters[i])  # NVMe param shards: a file write (nvme_params.py)
        up = [i for i in chunk if i not in on_host]
        if not up:
            return None
        with torch.cuda.stream(h2d):
            for i in up:
                master, shard = masters[i], shards[i]
                if shard.dtype == torch.float32:
                    shard.copy_(master, non_blocking=True)
                    continue
                # fp32 over PCIe, cast on the device, in pieces through one small scratch tensor:
                # the h2d stream orders its reuse, and the device holds 32 MiB for it, not a chunk.
                scratch = self._scratch_for()
                for start in range(0, master.numel(), UPLOAD_NUMEL):
                    end = min(start + UPLOAD_NUMEL, master.numel())
                    part = scratch[: end - start]
                    part.copy_(master[start:end], non_blocking=True)
                    shard[start:end].copy_(part)
        event = _record(h2d)
        self._uploads.append(event)
        self._upload_events[c] = event
        return event

    def _scratch_for(self) -> torch.Tensor:
        """The device fp32 scratch of the upload casts (``UPLOAD_NUMEL`` elements), made once."""
        if self._scratch is None:
            self._scratch = torch.empty(UPLOAD_NUMEL, dtype=torch.float32, device=self.device)
        return self._scratch

    def wait_uploads(self) -> None:
        """The compute stream waits for every upload of this step (no host synchronisation)."""
        if self._uploads:
            current = torch.cuda.current_stream(self.device)
            for event in self._uploads:
                current.wait_event(event)
        self._uploads = []

    def host_bytes(self) -> int:
        """Host grads, the tier's chunk buffers and the copies of speculation."""
        copies = self.speculation.snapshots.nbytes() if self.speculation is not None else 0
        return sum(g.numel() * g.element_size() for g in self.grads.host.values()) + self.tier.resident_bytes() + copies

    def close(self) -> None:
        self._mid_step = False  # (a step left open: its writes done before the tier closes)
        try:
            self.settle()
        finally:
            if self._worker is not None:
                self._worker.close()
                self._worker = None
            self.tier.close()
            self.grads.close()


def _clip_view(optimizer: torch.optim.Optimizer, scale: float | None) -> tuple[torch.optim.Optimizer, float | None]:
    """A chunk view of ``optimizer`` that applies the clip coefficient ``scale``, and the factor
    left for the caller to multiply the host grads by (None: nothing to do)."""
    view = _chunk_view(optimizer)
    if scale is None or scale == 1.0:
        return view, None
    if _scales_grads_itself(optimizer):
        # Adam(W) fused: the kernel divides each grad by grad_scale as it reads it, so
        # clipping costs no extra pass over the host grads (GradScaler's protocol). A coefficient
        # of 0 (an infinite norm) divides by inf, as clip_in_step's torch.reciprocal does.
        view.grad_scale = torch.tensor(1.0 / scale if scale != 0.0 else float("inf"), dtype=torch.float32)
        return view, None
    return view, scale


def _scales_grads_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step honours ``grad_scale`` (torch's fused Adam and AdamW)."""
    return (type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
            and all(group.get("fused") for group in optimizer.param_groups))


def _step_on(view: torch.optim.Optimizer, groups: list[dict], pieces: list) -> None:
    """One step of ``view`` over ``pieces`` only, with the hyperparameters of ``groups``
    (``hyperparameters``: the optimizer's groups as they were when the step was asked for)."""
    wanted = {id(p) for p in pieces}
    view.param_groups = [{**group, "params": [p for p in group["params"] if id(p) in wanted]} for group in groups]
    view.step()


def _chunk_view(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The user's optimizer without its hooks or instance patches, sharing its ``state``.

    ``step`` wrappers that LR schedulers and accelerate put on the instance are dropped so that
    the chunk steps do not count as the user's optimizer steps; param groups are set per chunk."""
    view = object.__new__(type(optimizer))
    view.__dict__.update(optimizer.__dict__)
    view.__dict__.pop("step", None)
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        if name in view.__dict__:
            setattr(view, name, collections.OrderedDict())
    return view


def _record(stream, timing: bool = False):
    if stream is None:
        return None
    event = torch.cuda.Event(enable_timing=timing)
    event.record(stream)
    return event
