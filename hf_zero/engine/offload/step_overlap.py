"""What lets the host step of optimizer offload overlap the GPU ([Note: step in backward] in
host_step.py), apart from the host step itself:

- ``StepWorker``: the thread that steps chunks, the highest chunk index first;
- ``hyperparameters``: the optimizer's groups as they are when a chunk is handed over;
- ``used_flags``: which params of a bucket got a gradient on some rank, all-reduced as the bucket
  goes down (the step skips the others, as under DDP);
- ``ForwardGates``: what the next forward waits for, block by block ([Note: gate points]), and
  each stage-3 unit before it gathers (``overlap_forward``);
- ``HiddenPieces``: the offloaded pieces kept out of the user's own ``optimizer.step()`` while the
  worker may be stepping them (each has a grad then).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future
from typing import Callable

import torch
from torch import nn

from hf_zero.engine import collectives as C
from hf_zero.engine.stage3.unit_plan import find_blocks


class StepWorker:
    """The thread that steps chunks, the highest chunk index first (``highest_first``; else the
    lowest): the chunks left when backward ends are then stepped in the order the next forward
    uses them (bucket 0 holds the last layers). ``threads``: its intra-op threads (None: as is)."""

    def __init__(self, threads: int | None, highest_first: bool) -> None:
        self.threads, self.highest_first = threads, highest_first
        self._cv = threading.Condition()
        self._queue: dict[int, tuple[Future, Callable, tuple]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="hf_zero-host-step", daemon=True)
        self._thread.start()

    def submit(self, c: int, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._cv:
            self._queue[c] = (future, fn, args)
            self._cv.notify()
        return future

    def _loop(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                future, fn, args = self._queue.pop(max(self._queue) if self.highest_first else min(self._queue))
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # re-raised where the result is asked for
                future.set_exception(error)
            # The loop's frame must not keep the last task (its host step, the tier and, for NVMe,
            # the swap files that go when it is collected) while it waits for the next.
            del future, fn, args

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's param groups as they are now: an LR scheduler may change them (tensors in
    place) before a worker steps with them."""
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in group.items()} for group in optimizer.param_groups]


def used_flags(ctx: C.CommContext, params: list[nn.Parameter], used: set, device: torch.device,
               label: str) -> Callable[[], set]:
    """A callable giving those of ``params`` (one bucket's) that got no gradient on any rank.
    Called when the bucket is reduced, so this rank's ``used`` is final for them; at W > 1 the
    flags are all-reduced now (in bucket order on every rank) and waited for when first asked."""
    flags = torch.tensor([p in used for p in params], dtype=torch.int32, device=device)
    handle = C.start_all_reduce(ctx, flags, label=label)
    done: list[set] = []

    def unused() -> set:
        if not done:
            done.append({p for p, u in zip(params, C.wait(handle).tolist()) if u == 0})
        return done[0]

    return unused


class ForwardGates:
    """``overlap_forward``: before a module runs, the new params of its offloaded buckets are in
    place (forward pre-hooks); before a stage-3 unit gathers, its own (``ParamUnit.before_gather``,
    on the gather stream, so prefetches wait too). Idle while nothing is pending.

    [Note: gate points] One gate per block of the model's ``_no_split_modules`` (a decoder layer:
    it waits for the buckets of every param inside it) and one per module outside the blocks that
    holds params of its own (embeddings, final norm, LM head), not one per module that holds
    params. Under ``torch.compile`` each gate is a graph break (it runs eagerly), so gates at the
    blocks' boundaries leave each block one whole graph, as stage 3's unit hooks do, where gates
    on each Linear and norm broke every layer into pieces (issue 21: 20 breaks a forward for two
    layers). A block waits a little earlier for the params of its later modules: they are in
    the same or neighbouring buckets, stepped in the order the forward uses them."""

    def __init__(self, host_step_of: Callable[[], object]) -> None:
        self._host_step_of = host_step_of  # the engine's current host step (a re-layout makes a new one)
        self._buckets: dict[int, list[int]] = {}  # id(gate module) -> offloaded buckets of the params it covers

    def install(self, model: nn.Module, trainable: set) -> list:
        # Eager under torch.compile (a graph break at each gate): traced, ``pending`` would be a
        # guarded constant and the wait on the worker thread left out ([Note: compiled forward] in units.py).
        gate = torch.compiler.disable(self._pre_forward, reason="hf_zero: waits for the host step of the module's params")
        return [module.register_forward_pre_hook(gate) for module, params in gate_points(model)
                if any(p in trainable for p in params)]

    def lay_out(self, model: nn.Module, buckets: list) -> None:
        """After each layout: which offloaded buckets (``ShardedBucket``) each gate point's params
        are in; a stage-3 unit of an offloaded bucket waits for its step before it is gathered."""
        offloaded_of = {p: b.index for b in buckets if b.offloaded for p in b.params}
        self._buckets = {}
        for module, params in gate_points(model):
            own = sorted({offloaded_of[p] for p in params if p in offloaded_of})
            if own:
                self._buckets[id(module)] = own
        offloaded = {i for own in self._buckets.values() for i in own}
        for b in buckets:
            if b.unit is not None:
                b.unit.before_gather = functools.partial(self.wait_bucket, b.index) if b.index in offloaded else None

    def _pre_forward(self, module: nn.Module, args) -> None:
        host_step = self._host_step_of()
        if host_step is not None and host_step.pending:  # (every forward passes here: cheap when idle)
            for i in self._buckets.get(id(module), ()):
                host_step.wait_chunk_of(i)

    def wait_bucket(self, i: int) -> None:
        host_step = self._host_step_of()
        if host_step is not None and host_step.pending:
            host_step.wait_chunk_of(i)


def gate_points(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """([Note: gate points]) Each block of ``model`` with every param inside it, then each module
    outside the blocks with its own params; modules without params are left out."""
    blocks = [b for b in find_blocks(model) if b is not model]  # a model that is its own block: per module
    inside = {id(m) for b in blocks for m in b.modules()}
    points = [(b, list(b.parameters())) for b in blocks]
    points += [(m, list(m.parameters(recurse=False))) for m in model.modules() if id(m) not in inside]
    return [(m, params) for m, params in points if params]


class HiddenPieces:
    """While the worker may still step offloaded pieces (``overlap_forward``), the user's own
    ``optimizer.step()``, which runs right after the engine's pre-hook, sees only ``keep``."""

    def __init__(self) -> None:
        self._hidden: list[tuple[dict, list]] = []  # (group, its full params list)

    def hide(self, optimizer: torch.optim.Optimizer, keep: list) -> None:
        ids = {id(p) for p in keep}
        self._hidden = [(group, group["params"]) for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in ids]

    def show(self) -> None:
        """Idempotent."""
        for group, params in self._hidden:
            group["params"] = params
        self._hidden = []
