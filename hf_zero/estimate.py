"""``hf-zero estimate``: bytes per rank of a model under each ZeRO stage, before any run.

The model is built on the meta device from its config (no weights, no download), so parameter
counts are exact: per stage-3 unit (one ``_no_split_modules`` block each, plus the root),
tied weights counted once. The byte arithmetic is in pure functions mirroring the engine:

* ``bucket_layout``      how ``layout.FlatParamBuffer`` pads params and buckets;
* ``estimate_bytes``     params, grads and optimizer state per rank at the optimizer step, the
                         figures ``hf_zero_report.json`` measures (see ``trainer/report.py``);
* ``activation_bytes``   an *estimate* of activation memory for decoder-only transformers.

Vocabulary as in ``hf_zero.engine`` ([Note: vocabulary]): full param, flat buffer, shard, bucket,
fp32 master shard. W is the world size; "param dtype" is bf16/fp16 for such runs, else the
model's dtype. Bytes per trainable element (before padding) at the optimizer step:

| stage | params              | grads at step | optimizer state (AdamW)       |
|-------|---------------------|---------------|-------------------------------|
| 0     | p (model dtype)     | p             | 2p                            |
| 1, 2  | p'                  | 4/W           | 8/W (+ 4/W master if p' != 4) |
| 3     | p'/W                | 4/W           | 8/W (+ 4/W master if p' != 4) |

p: bytes of the model dtype, p': bytes of the param dtype. Frozen params are replicated at p.
Optimizer offload (``--offload cpu|nvme``) moves the fp32 masters, the optimizer state and the
grads at the step off the device: column "host" (cpu), or "nvme" for masters and state with the
grads still in host memory (plus the NVMe tier's chunk buffers, buffer_count x buffer_size x (4 +
s x state tensors) bytes, s = 4, or 2 with bf16 state, not in the table); ``--offload_state_dtype bf16``
(``offload_optimizer.state_dtype``) counts the offloaded state at 2 bytes per value, in host memory or
in the swap files; ``--offload_host_share S`` (``offload_optimizer.host_share``)
keeps S of the masters and state in host memory and the rest on NVMe. Parameter offload (stage 3, ``offload_param`` "cpu")
is not modelled here: it moves the stage-3 "params" column (all but the persistent params) to the
host (``hf-zero doctor`` counts it so).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from hf_zero.byte_units import fmt_bytes as _fmt
from hf_zero.engine.grad_sync import MAX_IN_FLIGHT
from hf_zero.engine.layout import PARAM_ALIGN
from hf_zero.estimate_parallel import Axes, TpSplit, rank_units, tp_split
from hf_zero.estimate_pipeline import PpSplit, in_flight, layer_counts, pp_split

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Optimizer state per element of the local shard, in the state's dtype (fp32 under stages 1-3,
# where the optimizer steps on fp32 master shards): AdamW exp_avg + exp_avg_sq; SGD momentum_buffer.
STATE_TENSORS = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size, hf_zero's default too
STAGES = (0, 1, 2, 3)
OFFLOAD_LINE = ("offload: optimizer offload is modelled with --offload cpu (column host) or --offload nvme "
                "(column nvme: masters and state; host: the grads, plus the chunk buffers of "
                "offload_optimizer.buffer_count x buffer_size); parameter offload (stage 3, offload_param cpu) "
                "has no column: it moves the stage-3 params column to the host")


@dataclass(frozen=True)
class ParamCounts:
    """Exact element counts of one model, as the engine groups them."""

    units: tuple[tuple[int, ...], ...]
    """Trainable param numels per stage-3 unit, in the engine's order: last block first, root last;
    inside a unit in registration order. Stage 1/2 pack the same params, all in one order."""
    root_index: int | None = None
    """Index of the root unit (embeddings, final norm, head) in ``units``; None if it has no params."""
    frozen: int = 0
    """Elements of frozen params: replicated on every rank, in the model dtype."""
    hidden_size: int | None = None
    """The model's hidden size: sizes "auto" buckets (hidden_size ** 2, DeepSpeed's rule)."""
    tp_split: TpSplit | None = None
    """What tensor parallelism splits, per param of ``units`` (estimate_parallel.py); None: not counted."""
    pp_split: PpSplit | None = None
    """Where pipeline stages put each param of ``units`` (estimate_pipeline.py); None: not counted."""

    def per_rank(self, axes: Axes, stage: int = 0) -> tuple[ParamCounts, int]:
        """(what one rank of pipeline ``stage`` holds, the ranks ZeRO shards it over) on ``axes``: [Note:
        per-rank shares] in estimate_parallel.py. ValueError where tp or pp cannot split the model."""
        units, dp = rank_units(self.units, self.tp_split, axes, self.pp_split, stage)
        return replace(self, units=units), dp

    @property
    def trainable(self) -> int:
        return sum(sum(u) for u in self.units)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def root(self) -> int:
        return 0 if self.root_index is None else sum(self.units[self.root_index])

    @property
    def blocks(self) -> list[int]:
        return [sum(u) for i, u in enumerate(self.units) if i != self.root_index]

    def packing_order(self) -> list[int]:
        """Stage 1/2 buffer order before the first backward: registration order, reversed.

        The engine re-packs once by gradient arrival order at W > 1; that moves params between
        buckets but changes only alignment padding (< PARAM_ALIGN elements per param)."""
        blocks = [u for i, u in enumerate(self.units) if i != self.root_index][::-1]  # forward order
        forward = [n for u in blocks for n in u]
        if self.root_index is not None:
            forward = list(self.units[self.root_index]) + forward  # embeddings come first
        return forward[::-1]


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def bucket_layout(numels: list[int], *, world: int, bucket_numel: int) -> list[tuple[int, int]]:
    """(padded size, real elements) per bucket, as ``FlatParamBuffer`` lays out ``numels``.

    Each param starts at a multiple of PARAM_ALIGN; a bucket closes once it holds at least
    ``bucket_numel`` elements and is padded to a multiple of W * PARAM_ALIGN. Example, W = 2,
    PARAM_ALIGN = 32, one bucket of params [10, 40]: 10 at [0, 10), 40 at [32, 72) -> padded to 128;
    each rank's shard is 64 elements, of which 50 in total are real.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    buckets, offset, start, real = [], 0, 0, 0
    for n in numels:
        offset = _round_up(offset, PARAM_ALIGN) + n
        real += n
        if offset - start >= bucket_numel:
            padded = _round_up(max(offset - start, 1), world * PARAM_ALIGN)
            buckets.append((padded, real))
            offset = start = start + padded
            real = 0
    if real or offset > start:
        buckets.append((_round_up(max(offset - start, 1), world * PARAM_ALIGN), real))
    return buckets


def _bucket_numel(reduce_bucket_size: int | str, hidden_size: int | None) -> int:
    if reduce_bucket_size == "auto":
        return hidden_size * hidden_size if hidden_size else DEFAULT_BUCKET
    if isinstance(reduce_bucket_size, bool) or not isinstance(reduce_bucket_size, int) or reduce_bucket_size < 1:
        raise ValueError(f"reduce_bucket_size must be a positive integer or 'auto' (as in a config file), "
                         f"got {reduce_bucket_size!r}")
    return reduce_bucket_size


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def estimate_bytes(
    counts: ParamCounts,
    *,
    stage: int,
    world: int,
    dtype: str,
    optimizer: str,
    model_dtype: str = "fp32",
    reduce_bucket_size: int | str = DEFAULT_BUCKET,
    offload_optimizer: bool = False,
    persistence_threshold: int = 0,
    offload_device: str = "cpu",
    state_dtype: str = "fp32",
    host_share: float = 0.0,
) -> dict[str, int]:
    """Bytes one rank holds at the optimizer step, keyed as ``hf_zero_report.json``'s ``bytes``.

    ``dtype`` is the run's precision; ``model_dtype`` the dtype the model was loaded in (what
    stage 0 trains in, and the param dtype of fp32-precision runs). Per-rank figures of
    sharded quantities are the mean over ranks (padding makes the last rank's real share smaller).

    * params: stage 0-2 the full params (1/2: padded flat buffers); stage 3 the 1/W shards
      (every unit is resharded when backward ends), except params of fewer than
      ``persistence_threshold`` elements, which form one whole group (units.plan_units);
      frozen params replicated (stage 3: sharded too).
    * grads_at_step: stage 0 full grads in the model dtype; 1-3 the fp32 main grad shards.
    * peak_grads: grads_at_step plus the staging tensors (param dtype) that may coexist:
      stage 1 every bucket (it accumulates full gradients), stage 2/3 at most MAX_IN_FLIGHT + 1
      buckets (the reduce-scatters in flight plus the one filling). An upper bound.
    * optimizer_state: state tensors (fp32 under 1-3, on the real elements of the local shard)
      plus fp32 master shards when the param dtype is not fp32.
    * host_offload: with ``offload_optimizer`` (stages 1-3, engine/offload/settings.py), host bytes: the
      fp32 master shards (always a separate copy there), the optimizer state and the host copy
      of the main grad shards; the device then holds no optimizer state, and no main grads at
      the step (they were moved to the host). With ``offload_device`` "nvme" the masters and
      state are in ``nvme_offload`` instead, and ``host_offload`` holds the grads only. Not
      modelled yet: with clipping on, the host step's speculation keeps copies of up to a quarter
      of the offloaded masters and state (engine/offload/speculation.py; the run report counts them).
      ``state_dtype`` "bf16" (with optimizer offload, [Note: bf16 host state]): the offloaded state at
      2 bytes per value instead of 4 (AdamW, "cpu": 12 host bytes per element instead of 16; "nvme": 8
      bytes per element in the swap files instead of 12, [Note: bf16 swap files]).
      ``host_share`` (offload "nvme" only, [Note: host share]): that share of the masters and state
      in ``host_offload``, the rest in ``nvme_offload`` (the engine splits by chunks, so the real
      split is within a chunk of this).
    """
    _check("stage", stage, STAGES)
    _check("dtype", dtype, tuple(DTYPE_BYTES))
    _check("model_dtype", model_dtype, tuple(DTYPE_BYTES))
    _check("optimizer", optimizer, tuple(STATE_TENSORS))
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    p_model = DTYPE_BYTES[model_dtype]
    p = DTYPE_BYTES[dtype] if dtype in ("bf16", "fp16") else p_model
    # Frozen params: replicated at stages 0-2, 1/W shards at stage 3 (units.py; alignment padding
    # and frozen params under the persistence threshold, held whole, are not modelled).
    frozen = counts.frozen * p_model // (world if stage == 3 else 1)
    n = counts.trainable
    if stage == 0:
        if offload_optimizer:
            raise ValueError("optimizer offload needs stage 1, 2 or 3")
        return {"params": counts.total * p_model, "grads_at_step": n * p_model, "peak_grads": n * p_model,
                "optimizer_state": STATE_TENSORS[optimizer] * n * p_model, "host_offload": 0, "nvme_offload": 0}

    buckets, persistent = _buckets(counts, stage=stage, world=world, reduce_bucket_size=reduce_bucket_size,
                                   persistence_threshold=persistence_threshold)
    padded = sum(b for b, _ in buckets)
    shard = padded // world
    whole = sum(b for b, _ in persistent)
    params = (shard + whole - whole // world if stage == 3 else padded) * p + frozen
    main_grads = 4 * shard
    staged = sorted((b for b, _ in buckets), reverse=True)
    if stage >= 2:
        staged = staged[: MAX_IN_FLIGHT + 1]
    alias = world == 1  # one rank: gradients go straight into the fp32 main grad (grad_sync.py, [Note: one rank's grads])
    peak = main_grads if alias else main_grads + sum(staged) * p
    masters = 0 if p == 4 else 4 * shard
    state = 4 * STATE_TENSORS[optimizer] * n / world
    if state_dtype not in ("fp32", "bf16") or (state_dtype == "bf16" and not offload_optimizer):
        raise ValueError(f"state_dtype must be 'fp32', or 'bf16' with optimizer offload; got {state_dtype!r}")
    if state_dtype == "bf16":
        state /= 2
    if isinstance(host_share, bool) or not isinstance(host_share, (int, float)) or not 0.0 <= host_share <= 1.0 \
            or (host_share and not (offload_optimizer and offload_device == "nvme")):
        raise ValueError(f"host_share must be in [0, 1], and above 0 only with optimizer offload to 'nvme'; "
                         f"got {host_share!r}")
    if offload_optimizer and offload_device == "nvme":
        swapped = 4 * shard + round(state)  # fp32 masters and optimizer state
        in_host = round(host_share * swapped)
        return {"params": params, "grads_at_step": 0, "peak_grads": peak, "optimizer_state": 0,
                "host_offload": 4 * shard + in_host, "nvme_offload": swapped - in_host}
    if offload_optimizer:
        return {"params": params, "grads_at_step": 0, "peak_grads": peak, "optimizer_state": 0,
                "host_offload": 4 * shard + round(state) + 4 * shard, "nvme_offload": 0}
    return {"params": params, "grads_at_step": main_grads, "peak_grads": peak,
            "optimizer_state": round(state) + masters, "host_offload": 0, "nvme_offload": 0}


def _buckets(counts: ParamCounts, *, stage: int, world: int, reduce_bucket_size: int | str,
             persistence_threshold: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(every bucket, the stage-3 persistent ones among them), as (padded elements, params), in
    the engine's bucket order."""
    persistent: list[tuple[int, int]] = []
    if stage == 3:
        units = [[k for k in u if k >= persistence_threshold] for u in counts.units]
        small = [k for u in reversed(counts.units) for k in u if k < persistence_threshold]
        buckets = [b for u in units if u for b in bucket_layout(u, world=world, bucket_numel=2**62)]
        persistent = bucket_layout(small, world=world, bucket_numel=2**62) if small else []
        buckets += persistent
    else:
        buckets = bucket_layout(counts.packing_order(), world=world,
                                bucket_numel=_bucket_numel(reduce_bucket_size, counts.hidden_size))
    return buckets, persistent


def gathered_params_bytes(counts: ParamCounts, *, world: int, dtype: str, model_dtype: str = "fp32") -> int:
    """Stage 3 only: the full params gathered on top of the shards at the worst moment.

    The root unit stays gathered from the model's forward to its backward (units.py), and one
    block is gathered at a time around its forward and backward: root + the largest block."""
    if world == 1:
        return 0  # one rank: the shard is the whole unit, nothing is gathered
    p = DTYPE_BYTES[dtype] if dtype in ("bf16", "fp16") else DTYPE_BYTES[model_dtype]
    sizes = [bucket_layout(list(u), world=world, bucket_numel=2**62)[0][0] for u in counts.units]
    root = sizes[counts.root_index] if counts.root_index is not None else 0
    blocks = [s for i, s in enumerate(sizes) if i != counts.root_index]
    return (root + max(blocks, default=0)) * p


@dataclass(frozen=True)
class ActivationShape:
    """What the activation estimate needs of a decoder-only model."""

    layers: int
    hidden: int
    heads: int
    vocab: int


def activation_bytes(shape: ActivationShape, *, micro_batch: int, seq_len: int, dtype: str,
                     gradient_checkpointing: bool, tp: int = 1, logits: bool = True) -> int:
    """An ESTIMATE of activation memory per rank for one micro-batch of a decoder-only model.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
    per layer, 16-bit activations: s*b*h*(34 + 5*a*s/h) bytes. The 5*a*s/h term is the s x s
    attention scores and softmax; fused attention (SDPA flash / memory-efficient, HF's default on
    GPU) does not keep it, so it is left out here. Scaled by bytes/2 for fp32 activations.
    Plus the logits: the head's output and HF's fp32 upcast for the loss, ~ s*b*V*(p + 4) bytes.

    * without checkpointing: L * 34*s*b*h*(p/2) + logits
    * with gradient checkpointing: every layer keeps only its input (L * s*b*h*p), and one
      layer's activations are rebuilt at a time during backward (34*s*b*h*(p/2)) + logits

    With tensor parallelism over ``tp`` ranks (the same paper's Table 2, no sequence parallelism) a
    layer keeps s*b*h*(10 + 24/tp) bytes: the split layers' inner activations shrink by tp, the layer
    norms', the block inputs' and dropout masks' (10) stay whole. The LM head is not split
    (hf_zero/tensor_parallel/plan.py), so the logits stay whole too. ``logits`` False: the layers only
    (a pipeline stage without the LM head, estimate_pipeline.py).
    """
    s, b, h = seq_len, micro_batch, shape.hidden
    p = DTYPE_BYTES[dtype]
    layer = (10 * tp + 24) * s * b * h * p // (2 * tp)
    logits = s * b * shape.vocab * (p + 4) if logits else 0
    if gradient_checkpointing:
        return shape.layers * s * b * h * p + layer + logits
    return shape.layers * layer + logits


def stage_activation_bytes(shape: ActivationShape, *, stage: int, pp: int, layers: int, schedule: str, micro_batches: int,
                           micro_batch: int, seq_len: int, dtype: str, gradient_checkpointing: bool,
                           tp: int = 1) -> int:
    """An ESTIMATE of pipeline stage ``stage``'s activation bytes at their peak: the micro-batches in
    flight there (``in_flight``), each with the stage's ``layers`` decoder layers (``shape``: the whole
    model's) and on the last stage its logits; with checkpointing one layer rebuilt at a time, once
    ([Note: pipeline stage shares] in estimate_pipeline.py)."""

    def act(n: int, checkpointing: bool, logits: bool) -> int:
        return activation_bytes(replace(shape, layers=n), micro_batch=micro_batch, seq_len=seq_len,
                                dtype=dtype, gradient_checkpointing=checkpointing, tp=tp, logits=logits)

    held = in_flight(stage, pp, schedule, micro_batches)
    rebuilt = act(0, True, False) if gradient_checkpointing else 0  # one layer at a time, once
    per_micro_batch = act(layers, gradient_checkpointing, False) - rebuilt
    logits = act(0, False, True) if stage == pp - 1 else 0
    return held * (per_micro_batch + logits) + rebuilt


# ---- model counting -----------------------------------------------------------------------------


def load_model_config(path: str):
    """The transformers config at ``path`` (a config.json, a model directory, or a hub id whose
    config.json is in the local Hugging Face cache: hub_cache.py), never downloaded.

    The shape is checked first (estimate_shape.py); whatever transformers still refuses comes back
    as one ValueError line, not its traceback."""
    from transformers import AutoConfig

    from hf_zero.estimate_shape import check_shape
    from hf_zero.hub_cache import local_model_config

    local = local_model_config(path)
    check_shape(local)
    try:
        return AutoConfig.from_pretrained(local, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - config validators raise their own types (StrictDataclass...)
        raise ValueError(f"MODEL_CONFIG {path!r} could not be read as a transformers config: "
                         f"{_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: " + (lines[-1] if lines else "")


def meta_model(cfg) -> torch.nn.Module:
    """The model of ``cfg`` on the meta device: shapes and module structure, no memory."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = getattr(cfg, "is_encoder_decoder", False)
    auto_classes = [AutoModelForSeq2SeqLM, AutoModel] if seq2seq else [AutoModelForCausalLM, AutoModel]
    errors = []
    for auto in auto_classes:
        try:
            with torch.device("meta"):
                return auto.from_config(cfg)
        except ValueError as error:  # not registered for this auto class
            errors.append(f"{auto.__name__}: {error}")
        except Exception as error:  # noqa: BLE001 - a shape the model code cannot build (one line, not a traceback)
            raise ValueError(f"cannot build a model for config type {cfg.model_type!r}: {_first_line(error)}") from error
    raise ValueError(f"cannot build a model for config type {cfg.model_type!r}: " + "; ".join(errors))


def count_params(model: torch.nn.Module) -> ParamCounts:
    """Exact counts grouped as the engine groups them (``units.group_by_unit``), tied weights once."""
    from hf_zero.engine.stage3.unit_plan import group_by_unit

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # dedups tied params
    modules, groups = group_by_unit(model, named, None)
    root = next((i for i, m in enumerate(modules) if m is model), None)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    names = [[n for n, _ in g] for g in groups]
    return ParamCounts(units=tuple(tuple(p.numel() for _, p in g) for g in groups), root_index=root,
                       frozen=frozen, hidden_size=hidden, tp_split=tp_split(model, names),
                       pp_split=pp_split(model, names))


def activation_shape(cfg) -> ActivationShape | None:
    """Decoder-only configs only; None where the formula does not apply (encoder-decoder)."""
    if getattr(cfg, "is_encoder_decoder", False):
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    fields = [getattr(text, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")]
    if any(not isinstance(v, int) for v in fields):
        return None
    return ActivationShape(*fields)


# ---- the command --------------------------------------------------------------------------------


def _parse_bucket(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"--reduce_bucket_size must be a number of elements or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """The ``estimate`` subcommand: print the table (and write the plot); ValueError for bad input.
    ``--traffic`` is estimate_traffic.run's (cli.py sends it there)."""
    axes, stages, bucket = checked(args)
    return memory(args, axes, stages, bucket)


def checked(args: argparse.Namespace) -> tuple[Axes, tuple[int, ...], int | str]:
    """The flags both tables take, each refused with its value and what is allowed: (axes, ZeRO
    stages to show, reduce bucket size)."""
    for name in ("world", "nodes", "micro_batch", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.world % args.nodes:
        raise ValueError(f"--world {args.world} is not divisible by --nodes {args.nodes}")
    if args.micro_batches is not None and (args.micro_batches < 1 or (args.pp_schedule == "1F1B" and
                                                                      args.micro_batches < args.pp)):
        raise ValueError(f"--micro_batches {args.micro_batches}: allowed: an integer >= 1, and >= --pp {args.pp} "
                         "with --pp_schedule 1F1B (one micro-batch per stage at least, as the Trainer requires)")
    bucket = _parse_bucket(args.reduce_bucket_size)
    offload = args.offload in ("cpu", "nvme")
    share = args.offload_host_share
    if not 0.0 <= share <= 1.0 or (share and args.offload != "nvme"):
        raise ValueError(f"--offload_host_share {share}: allowed: a number in [0, 1], above 0 only with --offload nvme "
                         f"(offload_optimizer.host_share; --offload is {args.offload})")
    host = args.host_memory
    if host is not None and not host > 0:
        raise ValueError(f"--host_memory {host:g}: allowed: a positive number of GiB (a node's host memory)")
    axes = Axes(world=args.world, tp=args.tp, pp=args.pp)
    if axes.tp > 1 and offload:
        raise ValueError(f"--offload {args.offload} with --tp {axes.tp}: optimizer offload with tensor parallelism is "
                         "not built yet (the Trainer refuses it too)")
    stages = STAGES if args.stage == "all" else (int(args.stage),)
    if axes.pp > 1:  # the Trainer's refusals (config/unsupported.py), said first
        if offload or args.stage == "3":
            what = f"--offload {args.offload}" if offload else "--stage 3"
            raise ValueError(f"{what} with --pp {axes.pp}: {'optimizer offload' if offload else 'ZeRO stage 3'} with "
                             "pipeline stages is not built yet (the Trainer refuses it too)")
        stages = tuple(s for s in stages if s != 3)
    return axes, stages, bucket


def memory(args: argparse.Namespace, axes: Axes, stages: tuple[int, ...], bucket, after_table=None) -> int:
    """The memory table (and the plot) for flags ``checked`` passed; with offload, ``after_table(args,
    counts, rows, act, bucket)`` prints below it (the CLI's: ``estimate_auto.print_auto_ratio``, which
    imports this module, so it is passed in rather than imported here)."""
    offload = args.offload in ("cpu", "nvme")
    if args.plot is not None:
        try:
            import matplotlib
        except ImportError:
            raise ValueError("--plot needs the 'matplotlib' package, which is not installed "
                             "(pip install matplotlib)") from None
        matplotlib.use("Agg")
    cfg = load_model_config(args.model_config)
    counts = count_params(meta_model(cfg))
    # what one rank of each pipeline stage holds, the ranks ZeRO shards it over, its activations
    per_stage = [(*counts.per_rank(axes, s), _activations(args, cfg, counts, axes, s)) for s in range(axes.pp)]
    act = per_stage[0][2]
    rows = []
    for stage in stages:
        options = []  # one per pipeline stage: the table shows the heaviest ([Note: pipeline stage shares])
        for pp_stage, (rank, dp, stage_act) in enumerate(per_stage):
            b = estimate_bytes(rank, stage=stage, world=dp, dtype=args.dtype, optimizer=args.optimizer,
                               model_dtype=args.model_dtype, reduce_bucket_size=bucket,
                               offload_optimizer=offload and stage > 0, offload_device=args.offload,
                               state_dtype=args.offload_state_dtype if offload and stage > 0 else "fp32",
                               host_share=args.offload_host_share if offload and stage > 0 else 0.0)
            gathered = gathered_params_bytes(rank, world=dp, dtype=args.dtype,
                                             model_dtype=args.model_dtype) if stage == 3 else 0
            states = b["params"] + gathered + b["peak_grads"] + b["optimizer_state"]
            total = None if stage_act is None else states + stage_act
            options.append((stage, b, gathered, states, total, stage_act, pp_stage))
        rows.append(max(options, key=lambda r: (r[3] if r[4] is None else r[4], -r[6])))
    _print_table(args, cfg, counts, rows, act, per_stage[0][0] if axes.tp > 1 and axes.pp == 1 else None,
                 pipeline=_pipeline_line(args, counts, per_stage) if axes.pp > 1 else None)
    if offload and after_table is not None:
        after_table(args, counts, rows, act, bucket)
    if args.plot is not None:
        _plot(args.plot, rows)
        print(f"plot written to {args.plot}")
    return 0


def _activations(args, cfg, counts: ParamCounts, axes: Axes, pp_stage: int) -> int | None:
    """The activation estimate of one rank of ``pp_stage`` (None: not a decoder-only model)."""
    shape = activation_shape(cfg)
    if shape is None:
        return None
    common = dict(micro_batch=args.micro_batch, seq_len=args.seq_len, dtype=args.dtype,
                  gradient_checkpointing=args.gradient_checkpointing, tp=axes.tp)
    if axes.pp == 1:
        return activation_bytes(shape, **common)
    layers = layer_counts(counts.pp_split, axes.pp)[pp_stage]
    return stage_activation_bytes(shape, stage=pp_stage, pp=axes.pp, layers=layers, schedule=args.pp_schedule,
                                  micro_batches=args.micro_batches or axes.pp, **common)


def _pipeline_line(args, counts: ParamCounts, per_stage) -> str:
    layers = layer_counts(counts.pp_split, args.pp)
    held = "; ".join(f"{s}: {n} layer(s), {rank.total:,} params" for s, (n, (rank, _, _)) in enumerate(zip(layers, per_stage)))
    split = f" (after tensor parallel {args.tp})" if args.tp > 1 else ""
    return (f"pipeline {args.pp} stages ({args.pp_schedule}, {args.micro_batches or args.pp} micro-batches a step; stage 0 "
            f"also holds the embeddings, the last the norm and LM head){split}: {held}; ZeRO shards each over dp = "
            f"{per_stage[0][1]} ranks; each row is its heaviest stage (column pp), per node = that stage x ranks a node")


def _print_table(args, cfg, counts: ParamCounts, rows, act, rank: ParamCounts | None, *,
                 pipeline: str | None = None) -> None:
    blocks = counts.blocks
    print(f"model: {args.model_config} ({cfg.model_type}); params {counts.total:,} "
          f"(trainable {counts.trainable:,}, frozen {counts.frozen:,}; tied weights counted once)")
    print(f"  stage-3 units: {len(blocks)} blocks of {max(blocks, default=0):,} params (largest), "
          f"root {counts.root:,}")
    if rank is not None:
        print(f"tensor parallel {args.tp}: each rank's model holds {rank.total:,} params (the planned layers / "
              f"{args.tp}, the rest whole; blocks of {max(rank.blocks, default=0):,}); ZeRO shards them over "
              f"dp = {args.world // args.tp} ranks")
    if pipeline is not None:
        print(pipeline)
    print(f"world {args.world} ranks on {args.nodes} node(s); precision {args.dtype}, model loaded in "
          f"{args.model_dtype}; optimizer {args.optimizer}; micro batch {args.micro_batch}, seq len {args.seq_len}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    head = ("stage", "params", "+gathered", "grads@step", "peak grads", "optim+master", "states peak",
            "activations*", "total*", "per node*", "host (offload)") + (("nvme (offload)",) if args.offload == "nvme" else ()) \
        + (("pp",) if args.pp > 1 else ())
    table = [head]
    per_node = args.world // args.nodes
    offload = args.offload != "none"
    for stage, b, gathered, states, total, row_act, pp_stage in rows:
        table.append((str(stage), _fmt(b["params"]), _fmt(gathered), _fmt(b["grads_at_step"]), _fmt(b["peak_grads"]),
                      _fmt(b["optimizer_state"]), _fmt(states), _fmt(row_act), _fmt(total),
                      _fmt(None if total is None else total * per_node),
                      _fmt(b["host_offload"]) if offload and stage > 0 else "-")
                     + ((_fmt(b["nvme_offload"]) if stage > 0 else "-",) if args.offload == "nvme" else ())
                     + ((str(pp_stage),) if args.pp > 1 else ()))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("per rank. +gathered: stage-3 full params gathered on top of the shards (root + largest block). "
          "states peak = params + gathered + peak grads + optimizer state.")
    print("* activations are an ESTIMATE (docs/estimate.md), decoder-only formula"
          + ("; not computed for this (encoder-decoder) model" if act is None else ""))
    print(OFFLOAD_LINE)


def _plot(path: str, rows) -> None:
    import matplotlib.pyplot as plt

    parts = [("params", lambda b, g: b["params"] + g), ("peak grads", lambda b, g: b["peak_grads"]),
             ("optimizer state", lambda b, g: b["optimizer_state"]), ("activations (est.)", None)]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"stage {r[0]}" for r in rows]
    bottom = [0.0] * len(rows)
    for name, get in parts:
        vals = [(get(b, g) if get else act or 0) / 2**30 for _, b, g, _, _, act, _ in rows]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [x + v for x, v in zip(bottom, vals)]
    ax.set_ylabel("GiB per rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

