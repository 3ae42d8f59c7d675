"""``offload_optimizer.ratio: "auto"``: how much optimizer state stays on the device, chosen once.

[Note: auto ratio] The first optimizer step runs with every bucket offloaded (ratio 1), or, where
the host cannot hold all of it, with the first buckets that it holds while ``host_room.MARGIN``
of its memory stays free (``host_room.auto_start``: the tightest host, every rank alike; the rest
start on the device, which may then run out of memory in that step, with torch's message). Right after
it the engine asks how much device memory was left at that step's peak (``headroom``: the one
source of that number, ``device_room.headroom``; tests replace it), keeps ``MARGIN`` of the device's
memory free for what the first step did not show (allocator fragmentation, a longer batch, an
evaluation), and brings back the optimizer of as many buckets as the rest holds
(``ZeroEngine.place_offload``): the *last* buckets, since ``OptimizerOffload.offloaded`` keeps the
first ones on the host (the first reduced in backward: their host step overlaps the most). All
ranks take the smallest headroom of any rank, so every rank offloads the same buckets (their
per-bucket collectives must match).

    headroom = free now + reserved by torch now - peak reserved by torch     (the step's peak)
    budget   = headroom - MARGIN x device memory
    kept on the device per element = 4 (fp32 master, a copy unless params are fp32)
                                   + 4 x state tensors (AdamW: 8) + 4 (fp32 main grad at the step)

Buckets already on the device from the start stay there, and the count goes on from them.
The chosen ratio is the share of elements still offloaded; at least one bucket stays offloaded
(ratio > 0, as a ratio given by hand), and nothing moves when the budget holds no bucket. A run
with the chosen ratio given by hand places the same buckets (``choose`` checks it against
``OptimizerOffload.offloaded``), so after the first step the two runs are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_zero.engine.offload import device_room
from hf_zero.engine.offload.settings import ratio_of_first

MARGIN = 0.10  # of the device's memory, kept free beyond the first step's peak


@dataclass(frozen=True)
class AutoRatio:
    """What ``choose`` decided (the run report's ``offload_auto`` and the log line)."""

    ratio: float  # share of the optimizer's elements left offloaded
    headroom_bytes: int  # left at the first step's peak (smallest over ranks)
    margin_bytes: int  # kept free of it
    moved_bytes: int  # the device holds this much more from now on
    bytes_per_element: int

    @property
    def left_bytes(self) -> int:
        """Device memory expected free at the peak of later steps."""
        return self.headroom_bytes - self.moved_bytes

    def line(self) -> str:
        from hf_zero.byte_units import fmt_bytes

        if self.headroom_bytes == 0 and self.moved_bytes == 0:
            return (f"hf_zero: offload_optimizer.ratio \"auto\" kept {round(self.ratio, 4)} after the first step: no device "
                    "memory was left at that step's peak (or the device has none to ask about: CPU)")

        return (f"hf_zero: offload_optimizer.ratio \"auto\" chose {self.ratio:.4f} after the first step: "
                f"{fmt_bytes(self.moved_bytes)} of optimizer state ({self.bytes_per_element} bytes per element) "
                f"moved to the device, which had {fmt_bytes(self.headroom_bytes)} free at that step's peak; "
                f"{fmt_bytes(self.left_bytes)} left, {fmt_bytes(self.margin_bytes)} of it the safety margin "
                f"({MARGIN:.0%} of the device's memory)")


def bytes_per_element(state_tensors: int, master_is_copy: bool) -> int:
    """Device bytes per optimizer element brought back from the host (see the Note)."""
    return 4 * master_is_copy + 4 * state_tensors + 4


def choose(shard_sizes: list[int], headroom_bytes: int, device_bytes: int, per_element: int,
           offloaded, offloaded_now: int | None = None) -> AutoRatio:
    """The ratio for buckets of ``shard_sizes`` (bucket order) given the headroom and the device's
    memory; ``offloaded(ratio)`` is ``OptimizerOffload.offloaded`` at that ratio (the split a hand
    ratio makes), which the choice must reproduce. ``offloaded_now``: how many of the first
    buckets the first step offloaded (``host_room.auto_start``; default all)."""
    margin = int(MARGIN * device_bytes)
    budget = max(0, headroom_bytes - margin)
    keep = len(shard_sizes) if offloaded_now is None else offloaded_now  # the first ``keep`` stay offloaded
    moved = 0
    while keep > 1 and (moved + shard_sizes[keep - 1]) * per_element <= budget:
        moved += shard_sizes[keep - 1]
        keep -= 1
    ratio = ratio_of_first(shard_sizes, keep, offloaded)
    return AutoRatio(ratio, headroom_bytes, margin, moved * per_element, per_element)


def say(choice: AutoRatio) -> None:
    """The log line, from the job's rank 0 (every rank chose the same)."""
    import sys

    from hf_zero.first_rank import is_first_rank

    if is_first_rank():
        print(choice.line(), file=sys.stderr, flush=True)


def decide(engine) -> AutoRatio:
    """After the first step: the ratio for ``engine``, from the smallest headroom of its ranks."""
    from hf_zero.engine import collectives as C
    from hf_zero.engine.offload.nvme_swap import state_tensors_per_element

    device = engine.buffers[0].device
    got = device_room.headroom(device)
    mine = torch.tensor(list(got) if got is not None else [0, 0], dtype=torch.int64, device=device)
    if engine.ctx.world_size > 1:
        everyone = torch.empty(2 * engine.ctx.world_size, dtype=torch.int64, device=device)
        C.wait(C.start_all_gather(engine.ctx, everyone, mine, label="offload ratio auto: headroom"))
        mine = everyone.view(-1, 2).min(dim=0).values
    head, total = (int(v) for v in mine.tolist())
    copy = engine.buckets[0].shard().dtype != torch.float32 or engine.offload_param is not None
    per = bytes_per_element(state_tensors_per_element(engine.optimizer), copy)
    sizes = [b.shard_numel for b in engine.buckets]
    return choose(sizes, head, total, per, lambda r: engine.offload.offloaded(sizes, r),
                  offloaded_now=sum(b.offloaded for b in engine.buckets))


def place(engine, ratio: float) -> None:
    """Rebuild ``engine``'s masters, pieces and host step for ``ratio``, carrying the masters'
    values and the optimizer state over: a bucket that changes sides takes them with it (to the
    device in fp32, as a checkpoint load casts them: ``Optimizer.load_state_dict``)."""
    import dataclasses

    from hf_zero.engine import pieces

    if engine.optimizer is None or engine.offload is None:
        raise ValueError("place_offload needs an engine with an optimizer and optimizer offload")
    engine.settle()
    sizes = [b.shard_numel for b in engine.buckets]
    if engine.offload.offloaded(sizes, ratio) == [b.offloaded for b in engine.buckets]:
        engine.offload = dataclasses.replace(engine.offload, ratio=ratio)  # the same buckets: nothing moves
        return
    state = engine.optimizer.state_dict()  # by piece index: the pieces keep their order (rewrite_optimizer)
    masters = [b.master for b in engine.buckets]
    old = engine._host_step
    engine._host_step = None
    if old is not None:
        old.close()  # NVMe: its files go (the state's views of them stay readable until dropped)
    engine.offload = dataclasses.replace(engine.offload, ratio=ratio)
    engine._host_step = pieces.build_masters(engine, replacing=old is not None)
    with torch.no_grad():
        for b, master in zip(engine.buckets, masters):
            if master is not None and b.master is not master:
                b.master.copy_(master)
    engine.optimizer.load_state_dict(state)
