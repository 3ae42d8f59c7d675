"""``offload_optimizer.ratio: "auto"`` in the estimator: how its first step starts on the host
(``auto_start``, [Note: auto start sizing]) and what it would choose after it (``auto_offload_ratio``),
for ``hf-zero estimate`` (``print_auto_ratio``) and ``hf-zero doctor`` (doctor/sizing.py). Each
calls the engine's own rule (engine/offload/host_room.py, auto_ratio.py) on the estimator's
buckets, so the numbers are the engine's, not a second formula.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hf_zero.byte_units import fmt_bytes as _fmt
from hf_zero.estimate import DEFAULT_BUCKET, DTYPE_BYTES, STATE_TENSORS, ParamCounts, _buckets, _check

if TYPE_CHECKING:
    from hf_zero.engine.offload.host_room import HostReading


def auto_offload_ratio(counts: ParamCounts, *, stage: int, world: int, dtype: str, optimizer: str,
                       headroom_bytes: int, device_bytes: int, model_dtype: str = "fp32",
                       reduce_bucket_size: int | str = DEFAULT_BUCKET, persistence_threshold: int = 0,
                       offloaded_now: int | None = None):
    """What ``offload_optimizer.ratio: "auto"`` would choose ([Note: auto ratio] in
    engine/offload/auto_ratio.py) on a device of ``device_bytes`` that has ``headroom_bytes`` left at
    the first step's peak, the first ``offloaded_now`` buckets offloaded then (``AutoStart.offloaded``;
    default all): an ``AutoRatio``."""
    from hf_zero.engine.offload import auto_ratio
    from hf_zero.engine.offload.settings import OptimizerOffload

    _check("optimizer", optimizer, tuple(STATE_TENSORS))
    buckets, _ = _buckets(counts, stage=stage, world=world, reduce_bucket_size=reduce_bucket_size,
                          persistence_threshold=persistence_threshold)
    sizes = [b // world for b, _ in buckets]
    p = DTYPE_BYTES[dtype] if dtype in ("bf16", "fp16") else DTYPE_BYTES[model_dtype]
    per = auto_ratio.bytes_per_element(STATE_TENSORS[optimizer], master_is_copy=p != 4)
    return auto_ratio.choose(sizes, max(0, headroom_bytes), device_bytes, per,
                             lambda r: OptimizerOffload("cpu", ratio=r).offloaded(sizes), offloaded_now=offloaded_now)


@dataclass(frozen=True)
class AutoStart:
    """How ``offload_optimizer.ratio: "auto"`` starts the first step, per rank ([Note: auto start sizing])."""

    ratio: float  # share of the optimizer's elements offloaded (the first buckets)
    offloaded: int  # buckets offloaded
    buckets: int
    host_bytes: int  # their host part (``host_room.HostNeed``: fp32 grads, masters and state)
    gpu_bytes: int  # fp32 masters (a copy unless params are fp32) and optimizer state of the rest, on the GPU
    host: HostReading | None = None  # the host it was sized for; None: unknown, everything offloaded
    fits: bool = True  # the host part leaves ``host_room.MARGIN`` of the host free
    masters: bool = True  # the GPU's part holds fp32 masters (a copy: params not fp32)

    def text(self, available: str = "available") -> str:
        """``starts at ratio ...``: what the first step offloads and what the rest takes on the GPU;
        ``available``: what the host's reading is."""
        from hf_zero.engine.offload.host_room import MARGIN

        if self.host is None:
            return "starts with everything offloaded (host memory unknown)"
        host = f"{_fmt(self.host.per_rank)} a rank of its {_fmt(self.host.available)} {available}"
        if not self.fits:
            refused = (f"the engine refuses the run (more than {_fmt(self.host.per_rank)} a rank), naming what fits"
                       if self.host_bytes > self.host.per_rank else "the engine warns")
            return (f"starts with everything offloaded ({_fmt(self.host_bytes)} of host memory a rank): not even "
                    f"the first bucket's host part leaves {MARGIN:.0%} of the host free ({host}); {refused}")
        if self.offloaded == self.buckets:
            return (f"starts with everything offloaded: {_fmt(self.host_bytes)} of host memory a rank, which leaves "
                    f"at least {MARGIN:.0%} of the host free ({host})")
        return (f"starts at ratio {self.ratio:.4f}: the first {self.offloaded} of {self.buckets} buckets offloaded, as "
                f"many as leave {MARGIN:.0%} of the host free ({_fmt(self.host_bytes)} of host memory a rank; {host}); "
                f"the other {1 - self.ratio:.1%} of the optimizer starts on the GPU ({_fmt(self.gpu_bytes)} a rank "
                f"of {'fp32 masters and ' if self.masters else ''}optimizer state)")


def auto_start(counts: ParamCounts, *, stage: int, world: int, dtype: str, optimizer: str, host,
               model_dtype: str = "fp32", reduce_bucket_size: int | str = DEFAULT_BUCKET, state_dtype: str = "fp32",
               persistence_threshold: int = 0) -> AutoStart:
    """The first step of ``offload_optimizer.ratio: "auto"`` with device "cpu" on ``host`` (a
    ``host_room.HostReading``: MemAvailable, MemTotal and the ranks sharing it; None: unknown).

    [Note: auto start sizing] The engine's rule itself (``host_room.auto_start``, [Note: auto ratio]
    in engine/offload/auto_ratio.py) on the estimator's buckets: the first buckets whose host part
    (4 bytes of fp32 grad, 4 of fp32 master and the state, 4 or with bf16 state 2 a value, an
    element; ``nvme_swap.bytes_per_element``) leaves ``host_room.MARGIN`` of the host free a rank
    are offloaded, the rest start on the GPU with their fp32 masters and state. ``hf-zero
    estimate`` and ``hf-zero doctor`` size the first step so; after it the engine re-chooses from
    the GPU memory it measured free at that step's peak (``auto_offload_ratio`` sizes that from
    the estimated peak). Device "nvme" starts with everything offloaded (not sized here)."""
    from hf_zero.engine.offload import host_room
    from hf_zero.engine.offload.settings import OptimizerOffload

    _check("optimizer", optimizer, tuple(STATE_TENSORS))
    buckets, _ = _buckets(counts, stage=stage, world=world, reduce_bucket_size=reduce_bucket_size,
                          persistence_threshold=persistence_threshold)
    sizes = [b // world for b, _ in buckets]
    per_element = 4 + DTYPE_BYTES[state_dtype] * STATE_TENSORS[optimizer]  # nvme_swap.bytes_per_element

    def split(r: float) -> list[bool]:
        return OptimizerOffload("cpu", ratio=r).offloaded(sizes)

    ratio = host_room.auto_start(sizes, per_element, [host] if host is not None else [], split)
    keep = sum(split(ratio))
    host_bytes = host_room.HostNeed(sum(sizes[:keep]), sum(sizes[:keep]), per_element).nbytes
    p = DTYPE_BYTES[dtype] if dtype in ("bf16", "fp16") else DTYPE_BYTES[model_dtype]
    gpu_bytes = sum(sizes[keep:]) * (4 * (p != 4) + 4 * STATE_TENSORS[optimizer])
    fits = host is None or host_bytes <= host.room
    return AutoStart(ratio, keep, len(sizes), host_bytes, gpu_bytes, host, fits, p != 4)


def print_auto_ratio(args, counts: ParamCounts, rows, act, bucket) -> None:
    """How offload_optimizer.ratio "auto" starts per stage on the host (``auto_start``, device "cpu")
    and, given --device_memory, what it would choose after the first step."""
    from hf_zero.engine.offload import host_room
    from hf_zero.engine.offload.auto_ratio import MARGIN

    host = _host(args) if args.offload == "cpu" else None
    if args.offload == "cpu":
        where = "unknown (no /proc/meminfo; pass --host_memory GIB)" if host is None else (
            f"{_fmt(host.available)} available of {_fmt(host.total)}"
            + (" (--host_memory)" if args.host_memory is not None else " (this machine's, as the engine reads it)")
            + f", shared by {host.ranks} rank(s) a node")
        print(f'offload_optimizer.ratio "auto": the first step offloads the first buckets whose host part leaves '
              f"{host_room.MARGIN:.0%} of the host free, the rest start on the GPU; host memory {where}")
    starts = {}
    for stage, *_ in rows:
        if stage == 0 or args.offload != "cpu":
            continue
        starts[stage] = auto_start(counts, stage=stage, world=args.world, dtype=args.dtype, optimizer=args.optimizer,
                                   host=host, model_dtype=args.model_dtype, reduce_bucket_size=bucket,
                                   state_dtype=args.offload_state_dtype)
        print(f'offload_optimizer.ratio "auto", stage {stage}: the first step {starts[stage].text()}')
    if args.device_memory is None:
        print(f'offload_optimizer.ratio "auto": chosen at run time, after the first step, from the device memory '
              f"free at that step's peak less {MARGIN:.0%} of the device's memory; pass --device_memory GIB to "
              "see what it would pick here")
        return
    device = int(args.device_memory * 2**30)
    for stage, b, gathered, states, total, _, _ in rows:
        if stage == 0:
            continue
        start = starts.get(stage)
        on_gpu = start.gpu_bytes if start is not None else 0
        peak = (total if total is not None else states) + on_gpu
        choice = auto_offload_ratio(counts, stage=stage, world=args.world, dtype=args.dtype, optimizer=args.optimizer,
                                    headroom_bytes=device - peak, device_bytes=device, model_dtype=args.model_dtype,
                                    reduce_bucket_size=bucket,
                                    offloaded_now=start.offloaded if start is not None else None)
        print(f'offload_optimizer.ratio "auto", stage {stage}, {args.device_memory:g} GiB device: ratio '
              f"{choice.ratio:.4f} ({_fmt(choice.moved_bytes)} {'more ' if on_gpu else ''}of optimizer state "
              f"{'brought to' if on_gpu else 'kept on'} the device; first step's "
              f"peak {_fmt(peak)}{f', {_fmt(on_gpu)} of it the optimizer started on the GPU' if on_gpu else ''}"
              f"{'' if act is not None else ', activations not counted'}; "
              f"{_fmt(choice.left_bytes)} left, {_fmt(choice.margin_bytes)} of it the margin; the run re-chooses "
              "from the free memory it measures at its first step's peak)")


def _host(args) -> HostReading | None:
    """The host the first step of ratio "auto" is sized for: --host_memory GIB (available and total),
    else this machine's memory as the engine reads it (``host_room.readings``), shared by a node's ranks."""
    from hf_zero.engine.offload import host_room

    ranks = args.world // args.nodes
    if args.host_memory is not None:
        size = int(args.host_memory * 2**30)
        return host_room.HostReading(size, size, ranks)
    got = host_room.readings(None)
    return replace(got[0], ranks=ranks) if got else None
