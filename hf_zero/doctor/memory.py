"""Memory checks: per-rank GPU bytes against free GPU memory, per-node host bytes against
MemAvailable, and pinned host bytes of CPU offload against MemAvailable and ``ulimit -l``.

Each check takes the model (``sizing.ModelInfo``), the run (``sizing.RunSpec``) and the measured
budget as arguments; ``runner`` measures them (``probes``).
"""

from __future__ import annotations

from collections.abc import Callable

from hf_zero.byte_units import fmt_bytes
from hf_zero.doctor.result import CheckResult, failed, passed, skipped, warned
from hf_zero.doctor.sizing import ModelInfo, RunSpec, first_step, host_load_bytes, rank_bytes, variant

MODEL = "model"
GPU_MEMORY = "gpu memory"
HOST_MEMORY = "host memory"
PINNED = "pinned memory"
HEADROOM = 0.9
"""Use at most this fraction of a budget: the CUDA context, NCCL buffers and fragmentation take the rest."""
PINNED_SHARE = 0.5
"""Pinned pages cannot be swapped or reclaimed: pinning more than this share of MemAvailable starves the host."""
MAX_WORLD = 4096

Need = Callable[[RunSpec, int], int]


TP_FIX = ("a tensor_parallel.autotp_size that divides the model's head counts, its split layers' widths and the "
          "world size, or a model whose tp_plan hf_zero can split; pipeline.stages at most the decoder layers, on "
          "a Llama-like decoder with untied embeddings (docs/parallelism.md)")


def check_model(path: str | None, model: ModelInfo | None, error: str | None, *, tp_error: bool = False) -> CheckResult:
    """The ``--model`` config could be read and counted (on the meta device), and split by the config's
    tensor_parallel.autotp_size (``tp_error``: ``error`` says why it cannot be)."""
    if path is None:
        return skipped(MODEL, "no --model given: memory is not sized")
    if error is not None and tp_error:
        return failed(MODEL, error, TP_FIX)
    if error is not None:
        return failed(MODEL, error, "give --model a config.json, a model directory holding one, or a "
                                    "hub id whose config.json is in the local Hugging Face cache (never downloaded)")
    if model is None:
        raise AssertionError("check_model needs the counted model when there is no error")
    return passed(MODEL, model.describe())


def offload_availability() -> dict[str, bool]:
    """Which offload settings this version runs, asked of ``engine.stages.check_supported``."""
    from hf_zero.engine.stages import check_supported

    def works(optimizer: str, param: str) -> bool:
        try:
            check_supported(3, optimizer, param)
        except (NotImplementedError, ValueError):
            return False
        return True

    return {"offload_optimizer cpu": works("cpu", "none"), "offload_optimizer nvme": works("nvme", "none"),
            "offload_param cpu": works("none", "cpu"), "offload_param nvme": works("none", "nvme")}


def offload_note(spec: RunSpec, need: Need, world: int) -> str:
    """The offload part of a fix: what exists, with its per-rank need; or that it is not built."""
    built = offload_availability()
    if not any(built.values()):
        return "offload (CPU/NVMe) is not implemented yet in hf_zero"
    if built["offload_optimizer cpu"] and spec.offload_optimizer == "none":
        stage = max(spec.stage, 1)
        n = need(variant(spec, stage=stage, offload_optimizer="cpu", offload_ratio=1.0), world)
        missing = [k for k, ok in built.items() if not ok]
        return (f'zero_optimization.offload_optimizer.device "cpu" at stage {stage} ({fmt_bytes(n)} per rank)'
                + (f" ({', '.join(missing)}: not implemented yet in hf_zero)" if missing else ""))
    missing = [k for k, ok in built.items() if not ok]
    return f"{', '.join(missing)}: not implemented yet in hf_zero" if missing else "more offload"


def fit_suggestions(model: ModelInfo, spec: RunSpec, world: int, budget: float, need: Need, *,
                    offload: bool = True) -> str:
    """Concrete ways to fit ``budget`` per rank: a higher stage, more ranks, gradient checkpointing,
    a smaller micro batch, offload (unless ``offload`` is False: CPU ranks gain nothing from it);
    each with its per-rank need."""
    tried = []
    for stage in range(spec.stage + 1, 4):
        n = need(variant(spec, stage=stage), world)
        if n <= budget:
            tried.append(f"zero_optimization.stage {stage} ({fmt_bytes(n)} per rank)")
            break
    stage = spec.stage if spec.stage >= 1 else 3
    w = world * 2
    while w <= MAX_WORLD:
        n = need(variant(spec, stage=stage), w)
        if n <= budget:
            tried.append(f"{w} ranks in total at stage {stage} ({fmt_bytes(n)} per rank)")
            break
        w *= 2
    if model.shape is not None and spec.seq_len is not None:
        if not spec.gradient_checkpointing:
            n = need(variant(spec, gradient_checkpointing=True), world)
            tried.append(f"gradient checkpointing (--gradient_checkpointing; {fmt_bytes(n)} per rank)")
        if spec.micro_batch > 1:
            n = need(variant(spec, micro_batch=1), world)
            tried.append(f"micro batch 1 ({fmt_bytes(n)} per rank)")
    if offload:
        tried.append(offload_note(spec, need, world))
    if not tried:
        return f"nothing tried fits {fmt_bytes(budget)} per rank: use a smaller model or a larger machine"
    return f"to fit {fmt_bytes(budget)} per rank, try: " + "; or ".join(tried)


def _run_text(spec: RunSpec, world: int, dtype: str) -> str:
    acts = "" if spec.seq_len is not None else "; activations not counted (pass --seq_len)"
    if spec.seq_len is not None and spec.pp > 1 and spec.pp_schedule == "interleaved_1F1B":
        acts = "; activations not counted (interleaved_1F1B's in-flight micro-batches are not modelled yet)"
    elif spec.pp > 1:
        acts += "; the heaviest pipeline stage's ranks"
    axes = f" ({spec.axes_text}, dp {spec.axes(world).dp})" if spec.axes_text else ""
    return f"stage {spec.stage}, W = {world}{axes}, {dtype}{'' if spec.dtype else ' (dtype auto: the larger of bf16/fp32)'}{acts}"


def check_gpu_memory(model: ModelInfo | None, spec: RunSpec, world: int, free: list[int] | None) -> CheckResult:
    """Per-rank device bytes against the smallest free memory of the GPUs the ranks use."""
    if model is None:
        return skipped(GPU_MEMORY, "no model to size (--model)")
    if free is None or not free:
        return skipped(GPU_MEMORY, "no CUDA device: nothing to compare (CPU ranks count against host memory)")
    need = rank_bytes(model, spec, world)
    budget = min(free)
    gpu = free.index(budget)
    detail = (f"needs {fmt_bytes(need.device_total)} per rank ({need.breakdown()}; "
              f"{_run_text(spec, world, need.dtype)}); GPU {gpu} has {fmt_bytes(budget)} free")
    if spec.offload_auto and spec.stage >= 1 and spec.offload_optimizer != "none":
        detail += "; " + auto_ratio_text(model, spec, world, need, budget)
    if need.device_total > budget:
        return failed(GPU_MEMORY, detail, fit_suggestions(
            model, spec, world, HEADROOM * budget, lambda s, w: rank_bytes(model, s, w).device_total))
    if need.device_total > HEADROOM * budget:
        return warned(GPU_MEMORY, detail + f" (over {HEADROOM:.0%})",
                      "little headroom for the CUDA context, NCCL buffers and fragmentation; "
                      + fit_suggestions(model, spec, world, HEADROOM * budget,
                                        lambda s, w: rank_bytes(model, s, w).device_total))
    return passed(GPU_MEMORY, detail)


def auto_ratio_text(model: ModelInfo, spec: RunSpec, world: int, need, free: int) -> str:
    """How offload_optimizer.ratio "auto" starts the first step (``need`` sizes it so) and what it would
    choose after it on a GPU with ``free`` bytes free ([Note: auto ratio] in engine/offload/auto_ratio.py)."""
    from hf_zero.estimate_auto import auto_offload_ratio

    counts, world = model.counts.per_rank(spec.axes(world))  # world: the ranks ZeRO shards over (offload: no pp)
    start = first_step(model, spec, world, need.dtype, counts)
    choice = auto_offload_ratio(counts, stage=spec.stage, world=world, dtype=need.dtype, optimizer=spec.optimizer,
                                headroom_bytes=free - need.device_total, device_bytes=free, model_dtype=model.dtype,
                                reduce_bucket_size=spec.reduce_bucket_size, offloaded_now=start.offloaded)
    more = "more " if start.offloaded < start.buckets else ""
    return (start_text(start, spec) + f"; it would choose {choice.ratio:.4f} after the first step "
            f"({fmt_bytes(choice.moved_bytes)} {more}of optimizer state back on the GPU, {fmt_bytes(choice.left_bytes)} "
            "left; estimated: the run re-chooses from the free memory it measures at that step's peak)")


def start_text(start, spec: RunSpec) -> str:
    """How the first step of ratio "auto" starts (``sizing.first_step``), as the checks size it."""
    if spec.offload_optimizer != "cpu":
        return (f'offload_optimizer.ratio "auto": the first step starts with everything offloaded '
                f'(device "{spec.offload_optimizer}")')
    return 'offload_optimizer.ratio "auto": the first step ' + start.text("available after the ranks' model copies")


def host_need_per_rank(model: ModelInfo, spec: RunSpec, world: int, *, cuda: bool) -> int:
    """Host bytes one rank needs: with CUDA the model copy it loads plus its CPU-offloaded state;
    without CUDA everything it trains with."""
    b = rank_bytes(model, spec, world)
    offloaded = b.offloaded.get("cpu", 0)
    if cuda:
        return host_load_bytes(model) + offloaded
    return b.device_total + offloaded


def check_host_memory(model: ModelInfo | None, spec: RunSpec, world: int, ranks_here: int,
                      available: int | None, *, cuda: bool) -> CheckResult:
    """Bytes the ranks of this node need on the host against MemAvailable."""
    if model is None:
        return skipped(HOST_MEMORY, "no model to size (--model)")
    if available is None:
        return skipped(HOST_MEMORY, "MemAvailable unknown (no /proc/meminfo)")
    per_rank = host_need_per_rank(model, spec, world, cuda=cuda)
    need = ranks_here * per_rank
    what = ("each loads the model on the host before sharding" if cuda
            else "no CUDA: each keeps its training state in host memory; "
                 + _run_text(spec, world, rank_bytes(model, spec, world).dtype))
    detail = (f"{ranks_here} rank(s) x {fmt_bytes(per_rank)} = {fmt_bytes(need)} ({what}); "
              f"MemAvailable {fmt_bytes(available)}")
    if spec.offload_auto and spec.stage >= 1 and spec.offload_optimizer == "cpu":
        detail += "; " + start_text(first_step(model, spec, world, rank_bytes(model, spec, world).dtype), spec)
    if need <= HEADROOM * available:
        return passed(HOST_MEMORY, detail)
    if cuda:
        fix = ("fewer ranks per node (more nodes), a model saved in bf16 (it loads in its saved dtype), "
               "less CPU offload, or free host memory")
    else:
        fix = fit_suggestions(model, spec, world, HEADROOM * available / ranks_here,
                              lambda s, w: host_need_per_rank(model, s, w, cuda=False), offload=False)
    if need > available:
        return failed(HOST_MEMORY, detail, fix)
    return warned(HOST_MEMORY, detail + f" (over {HEADROOM:.0%})", fix)


def check_pinned_memory(model: ModelInfo | None, spec: RunSpec | None, world: int, ranks_here: int,
                        available: int | None, memlock: int | None, *, cuda: bool) -> CheckResult:
    """Pinned host bytes of CPU offload on this node against MemAvailable (FAIL above it, WARN above
    half of it) and against ``ulimit -l`` (WARN: RDMA and some drivers need pinned pages within it)."""
    if spec is None or "cpu" not in (spec.offload_optimizer, spec.offload_param):
        return skipped(PINNED, "no offload to cpu in the config")
    pins = [k for k, dev, pin in (("offload_optimizer", spec.offload_optimizer, spec.pin_optimizer),
                                  ("offload_param", spec.offload_param, spec.pin_param)) if dev == "cpu" and pin]
    if not pins:
        return passed(PINNED, "pin_memory is false: offloaded state is not pinned")
    if not cuda:
        return passed(PINNED, "no CUDA: host buffers are not pinned")
    limit = "unlimited" if memlock is None else fmt_bytes(memlock)
    if model is None:
        if memlock is not None:
            return warned(PINNED, f"{', '.join(pins)}.pin_memory is true and ulimit -l is {limit}; "
                                  "pass --model to size the pinned bytes",
                          "raise the memlock limit (ulimit -l unlimited, or memlock in /etc/security/limits.conf)")
        return skipped(PINNED, "pass --model to size the pinned bytes (ulimit -l unlimited)")
    per_rank = rank_bytes(model, spec, world).pinned
    need = ranks_here * per_rank
    detail = f"{ranks_here} rank(s) x {fmt_bytes(per_rank)} = {fmt_bytes(need)} pinned; ulimit -l {limit}"
    if available is not None:
        detail += f", MemAvailable {fmt_bytes(available)}"
    fix = "set pin_memory false, offload less (offload_optimizer.ratio < 1 at stage 3), or use more nodes"
    if available is not None and need > available:
        return failed(PINNED, detail, fix)
    if available is not None and need > PINNED_SHARE * available:
        return warned(PINNED, detail + f" (over {PINNED_SHARE:.0%} of MemAvailable: pinned pages cannot be swapped)",
                      fix)
    if memlock is not None and need > memlock:
        return warned(PINNED, detail + " (more than ulimit -l)",
                      "raise the memlock limit (ulimit -l unlimited, or memlock in /etc/security/limits.conf; "
                      "in containers --ulimit memlock=-1)")
    return passed(PINNED, detail)
