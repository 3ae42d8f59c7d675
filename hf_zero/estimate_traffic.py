"""Communication per optimizer step, per rank, split by link: ``hf-zero estimate --traffic``.

A paper model: the bytes each collective and pipeline send of one optimizer step puts on a rank's
links, from the model's exact per-rank element counts (``ParamCounts.per_rank``: the tp split and the
pipeline stage, [Note: per-rank shares] in estimate_parallel.py), the engine's padded buffers
(``bucket_layout``) and the activation shape. Nothing is measured; latency, overlap with compute and
protocol overheads are left out, so the times it gives are lower bounds.

[Note: traffic per step]
Placement. W = nodes x G ranks; rank r runs on node r // G (``hf-zero launch``: node_rank x G + local
rank) and sits on the (pp, dp, tp) mesh stage-outer, tp-inner (hf_zero/tensor_parallel/mesh.py):
stage r // (dp tp), dp rank (r // tp) % dp, tp rank r % tp. tp must divide G, so a tp group is always
inside one node; a dp group or a pipeline may span nodes.

Ring collectives over a group of n ranks, B the bytes of the whole buffer (each rank's full tensor for
an all-reduce, the gathered tensor for an all-gather, the unscattered one for a reduce-scatter): every
rank sends (and receives) (n - 1) / n x B for an all-gather or a reduce-scatter, 2 (n - 1) / n x B for
an all-reduce. The link: a group inside one node sends it all over NVLink. A group spanning k nodes
(n / k ranks on each) is a ring whose members on a node are neighbours: k of its n hops cross nodes.
NCCL runs one ring per channel and spreads the channels' node crossings over the node's NICs (one per
GPU), so each rank sends k / n of its bytes over its network link and the rest over NVLink. dp 16 on
2 x 8 GPUs: a reduce-scatter of B bytes costs each rank 15/16 B, 2/16 of it (15/128 B) on the network;
dp 2 on 2 x 8 GPUs with one rank of the group on each node: all of (1/2) B on the network.

What one optimizer step communicates, per rank (M micro-batches of b sequences of s tokens: gradient
accumulation M; under pipeline stages M is also the schedule's micro-batches, ``pipeline.micro_batches``
"auto"; p' the param dtype's bytes, p the model dtype's (stage 0), p_a the activations' (the run's
precision); N the elements of the rank's model, its ZeRO buffers padded as the engine pads them):

| what | group | buffer of one step (B summed over its calls) | when |
|---|---|---|---|
| stage 0: grad all-reduce (DDP) | dp | N p | once, on the last micro-batch (no_sync before) |
| stage 1: grad reduce-scatter | dp | N p' (one call a bucket) | once, on the last micro-batch |
| stage 2: grad reduce-scatter | dp | M N p' | every micro-batch |
| stage 1, 2: param all-gather | dp | N p' | once, after the optimizer step |
| stage 3: param all-gather | dp | M (2 N_blocks + N_root) p' | a block in forward and in backward; the root once |
| stage 3: grad reduce-scatter | dp | M N p' (one call a unit) | every micro-batch |
| tp: activation all-reduce | tp | M L_s c b s h p_a (c below) | every micro-batch |
| pp: send activations | the next stage's rank | M b s h p_a | every micro-batch, stages 0 .. pp - 2 |
| pp: send activation grads | the previous stage's rank | M b s h p_a | every micro-batch, stages 1 .. pp - 1 |

L_s is the decoder layers on the rank's pipeline stage; c = 4 all-reduces a layer: 2 in forward (after
o_proj and down_proj), 2 in backward (into the inputs of q/k/v and gate/up), and c = 6 with gradient
checkpointing (the recomputed forward's 2 again). Stage 3's root unit stays gathered from forward to
backward (gathered once), and stage 3 needs no param all-gather after the step (the updated shard is the
param). A pipeline send is point-to-point: its bytes go over NVLink if the peer is on the same node, else
over the network. Not counted: gradient-norm and loss all-reduces (a few bytes),
``stage3_param_persistence_threshold`` (taken as 0, as the memory table does: every param sharded; at its
default 1e5 the norms, < 0.01% of a 70B model, stay whole: reduced every micro-batch, gathered once after
the step), frozen params, host-device copies of offload, interleaved 1F1B's extra sends, and NCCL's
NVLS/tree algorithms (what they improve on is the ring model above).

Worked example, the tiny Llama of ``tests/tensor_parallel/models.py`` (hidden 64, 2 layers, intermediate
128; [Note: per-rank shares]: a tp 2 rank holds 53,568 elements, every param a multiple of 32, so
nothing is padded), fp32, W = 4 as 2 nodes x 2 GPUs, tp 2 x dp 2, ZeRO stage 2, micro batch 2 x seq 12,
M = 2. Rank 0: tp group {0, 1} on node 0, dp group {0, 2} across both nodes.

* tp all-reduce: 2 layers x 4 x 2 micro-batches = 16 calls of 2 x 12 x 64 x 4 = 6,144 bytes: B = 98,304;
  rank 0 sends 2 x 1/2 x 98,304 = 98,304 bytes, all over NVLink.
* grad reduce-scatter: B = 2 x 53,568 x 4 = 428,544; sends 1/2 of it, 214,272 bytes, all on the network.
* param all-gather after the step: B = 214,272; sends 107,136 bytes on the network.

Per step rank 0 sends 96 KiB over NVLink and 313.88 KiB (321,408 bytes) over the network
(``tests/test_estimate_traffic.py`` holds this count).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from hf_zero.byte_units import fmt_bytes
from hf_zero.config.checks import divisors
from hf_zero import estimate as E
from hf_zero.estimate import DEFAULT_BUCKET, DTYPE_BYTES, STAGES, ActivationShape, ParamCounts, bucket_layout
from hf_zero.estimate_parallel import TP_KEY, Axes
from hf_zero.estimate_pipeline import PP_KEY, layer_counts

NVLINK_GBPS = 450.0
"""GB/s (1e9 bytes) one H100 SXM GPU sends over NVLink, per direction (900 GB/s both ways)."""
NETWORK_GBPS = 50.0
"""GB/s one GPU sends over the network, per direction: 8 x 400 Gb/s InfiniBand NICs per 8-GPU node."""
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's bucket_cap_mb default (the Trainer's ddp_bucket_cap_mb None)

ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, SEND = "all-gather", "reduce-scatter", "all-reduce", "send"


@dataclasses.dataclass(frozen=True)
class Placement:
    """The W ranks of ``axes`` on nodes of ``gpus_per_node`` GPUs, laid out as [Note: traffic per step] says."""

    axes: Axes
    gpus_per_node: int

    def __post_init__(self) -> None:
        g, world, tp = self.gpus_per_node, self.axes.world, self.axes.tp
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"gpus_per_node = {g!r}: must be a positive integer")
        if world % g:
            raise ValueError(f"gpus_per_node = {g} does not divide the world size {world}: the ranks fill whole nodes "
                             f"(world = nodes x gpus_per_node); allowed here: {divisors(world)}")
        if g % tp:
            raise ValueError(f"{TP_KEY} = {tp} does not divide gpus_per_node = {g}: a tensor-parallel group is kept "
                             f"inside one node (hf-zero launch refuses it too); allowed here: {divisors(g)}")

    @property
    def nodes(self) -> int:
        return self.axes.world // self.gpus_per_node

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pipeline stage, dp rank, tp rank) of ``rank``, as the mesh lays them out."""
        dp, tp = self.axes.dp, self.axes.tp
        return rank // (dp * tp), (rank // tp) % dp, rank % tp

    def tp_group(self, rank: int) -> list[int]:
        start = rank - rank % self.axes.tp
        return list(range(start, start + self.axes.tp))

    def dp_group(self, rank: int) -> list[int]:
        stage, _, t = self.coords(rank)
        dp, tp = self.axes.dp, self.axes.tp
        return [stage * dp * tp + d * tp + t for d in range(dp)]

    def pipeline_peer(self, rank: int, offset: int) -> int:
        """The rank with ``rank``'s (dp, tp) coordinates on the stage ``offset`` away (+1: next, -1: previous)."""
        return rank + offset * self.axes.dp * self.axes.tp


class Flow(NamedTuple):
    """One kind of communication of one rank in one optimizer step."""

    what: str
    where: str
    """The group or peer and where it sits ("dp 16: 2 nodes, 8 a node")."""
    calls: int
    """Collectives (or sends) of this kind per step."""
    payload: int
    """Their buffers' bytes, summed over the calls (B in the Note)."""
    nvlink: int
    """Bytes this rank sends over NVLink (intra-node)."""
    network: int
    """Bytes this rank sends over its network link (inter-node)."""


@dataclasses.dataclass(frozen=True)
class RankTraffic:
    """What one rank sends in one optimizer step (the ring collectives receive as much)."""

    rank: int
    flows: tuple[Flow, ...]

    @property
    def nvlink(self) -> int:
        return sum(f.nvlink for f in self.flows)

    @property
    def network(self) -> int:
        return sum(f.network for f in self.flows)

    def seconds(self, nvlink_gbps: float = NVLINK_GBPS, network_gbps: float = NETWORK_GBPS) -> tuple[float, float]:
        """(NVLink seconds, network seconds) at these per-direction bandwidths (GB/s, 1e9 bytes)."""
        return self.nvlink / (nvlink_gbps * 1e9), self.network / (network_gbps * 1e9)

    def bound(self, nvlink_gbps: float = NVLINK_GBPS, network_gbps: float = NETWORK_GBPS) -> float:
        """A lower bound on the step's communication time: the busier link, both working in parallel."""
        return max(self.seconds(nvlink_gbps, network_gbps))


def ring_bytes(kind: str, buffer: int, n: int) -> int:
    """Bytes each of ``n`` ranks sends in a ring ``kind`` of a ``buffer``-byte tensor (the Note)."""
    if kind in (ALL_GATHER, REDUCE_SCATTER):
        return (n - 1) * buffer // n
    if kind == ALL_REDUCE:
        return 2 * (n - 1) * buffer // n
    raise AssertionError(f"not a ring collective: {kind!r}")


def step_traffic(counts: ParamCounts, shape: ActivationShape | None, placement: Placement, *, stage: int,
                 seq_len: int, micro_batch: int, grad_accum: int, dtype: str = "bf16", model_dtype: str = "fp32",
                 bucket_numel: int = DEFAULT_BUCKET, gradient_checkpointing: bool = False) -> list[RankTraffic]:
    """Every rank's communication in one optimizer step at ZeRO ``stage`` ([Note: traffic per step]).

    ``counts``: the whole model's (``count_params``); ``shape``: ``activation_shape`` of its config (None:
    not a decoder-only model, allowed without tp and pp). ValueError for a layout hf_zero cannot run or a
    model tp or pp cannot split."""
    axes = placement.axes
    _check(stage=stage, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, dtype=dtype,
           model_dtype=model_dtype)
    if axes.pp > 1 and stage == 3:
        raise ValueError(f"ZeRO stage 3 with {PP_KEY} = {axes.pp}: not built yet (the Trainer refuses it too)")
    if shape is None and (axes.tp > 1 or axes.pp > 1):
        raise ValueError("tensor-parallel and pipeline traffic are modelled for decoder-only models; this config "
                         "is not one")
    layers = layer_counts(counts.pp_split, axes.pp) if axes.pp > 1 else [shape.layers if shape else 0]
    p_param = DTYPE_BYTES[dtype] if dtype in ("bf16", "fp16") else DTYPE_BYTES[model_dtype]
    p_model, p_act = DTYPE_BYTES[model_dtype], DTYPE_BYTES[dtype]
    hidden_states = micro_batch * seq_len * (shape.hidden if shape else 0) * p_act  # one micro-batch's (b, s, h)
    per_stage = []  # what each pipeline stage's ranks communicate: (ZeRO collectives, tp all-reduce calls)
    for s in range(axes.pp):
        rank_counts, dp = counts.per_rank(axes, s)
        zero = _zero_collectives(rank_counts, stage=stage, dp=dp, grad_accum=grad_accum, p_param=p_param,
                                 p_model=p_model, bucket_numel=bucket_numel, pipeline=axes.pp > 1)
        per_stage.append((zero, layers[s] * (6 if gradient_checkpointing else 4) * grad_accum))
    ranks = []
    for rank in range(axes.world):
        s = placement.coords(rank)[0]
        zero, tp_calls = per_stage[s]
        flows = [_ring(placement, placement.dp_group(rank), "dp", what, kind, calls, payload)
                 for what, kind, calls, payload in zero if axes.dp > 1]
        if axes.tp > 1:
            flows.append(_ring(placement, placement.tp_group(rank), "tp", "tp activation all-reduce", ALL_REDUCE,
                               tp_calls, tp_calls * hidden_states))
        if s < axes.pp - 1:
            flows.append(_send(placement, rank, +1, "pipeline send: activations", grad_accum, hidden_states))
        if s > 0:
            flows.append(_send(placement, rank, -1, "pipeline send: activation grads", grad_accum, hidden_states))
        ranks.append(RankTraffic(rank=rank, flows=tuple(flows)))
    return ranks


def busiest(ranks: list[RankTraffic], nvlink_gbps: float = NVLINK_GBPS,
            network_gbps: float = NETWORK_GBPS) -> RankTraffic:
    """The rank whose step's communication bound is the longest (the lowest such rank)."""
    return max(ranks, key=lambda r: (r.bound(nvlink_gbps, network_gbps), -r.rank))


def _check(**values) -> None:
    if values["stage"] not in STAGES:
        raise ValueError(f"stage = {values['stage']!r}: allowed {', '.join(map(str, STAGES))}")
    for name in ("dtype", "model_dtype"):
        if values[name] not in DTYPE_BYTES:
            raise ValueError(f"{name} = {values[name]!r}: allowed {', '.join(DTYPE_BYTES)}")
    for name in ("seq_len", "micro_batch", "grad_accum"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} = {v!r}: must be a positive integer")


def _zero_collectives(counts: ParamCounts, *, stage: int, dp: int, grad_accum: int, p_param: int, p_model: int,
                      bucket_numel: int, pipeline: bool) -> list[tuple[str, str, int, int]]:
    """(what, kind, calls, buffer bytes summed over the calls) of ZeRO ``stage`` over ``dp`` ranks in one step:
    the stage rows of the Note's table, in the order they run."""
    m = grad_accum
    if stage == 0:
        grads = counts.trainable * p_model
        calls = 1 if pipeline else max(1, -(-grads // DDP_BUCKET_BYTES))  # the pipeline's one flat all-reduce
        return [("grad all-reduce (DDP, last micro-batch)", ALL_REDUCE, calls, grads)]
    if stage in (1, 2):
        buckets = [padded for padded, _ in bucket_layout(counts.packing_order(), world=dp, bucket_numel=bucket_numel)]
        flat = sum(buckets) * p_param
        reduced = 1 if stage == 1 else m  # stage 1 keeps full grads until the last micro-batch
        when = "last micro-batch" if stage == 1 else "every micro-batch"
        return [(f"grad reduce-scatter ({when})", REDUCE_SCATTER, reduced * len(buckets), reduced * flat),
                ("param all-gather (after the step)", ALL_GATHER, len(buckets), flat)]
    units = [(i == counts.root_index, bucket_layout(list(u), world=dp, bucket_numel=2**62)[0][0] * p_param)
             for i, u in enumerate(counts.units) if sum(u)]
    gathers = [(1 if root else 2, size) for root, size in units]  # the root stays gathered forward to backward
    return [("param all-gather (fwd + bwd, root once)", ALL_GATHER, m * sum(k for k, _ in gathers),
             m * sum(k * size for k, size in gathers)),
            ("grad reduce-scatter (every micro-batch)", REDUCE_SCATTER, m * len(units), m * sum(s for _, s in units))]


def _ring(placement: Placement, group: list[int], axis: str, what: str, kind: str, calls: int, payload: int) -> Flow:
    sent = ring_bytes(kind, payload, len(group))
    nodes = len({placement.node(r) for r in group})
    network = 0 if nodes == 1 else sent * nodes // len(group)  # k of the ring's n hops cross nodes
    where = f"{axis} {len(group)}: 1 node" if nodes == 1 else f"{axis} {len(group)}: {nodes} nodes"
    if nodes > 1 and len(group) % nodes == 0:
        where += f", {len(group) // nodes} a node"
    return Flow(what, where, calls, payload, sent - network, network)


def _send(placement: Placement, rank: int, offset: int, what: str, calls: int, one: int) -> Flow:
    peer = placement.pipeline_peer(rank, offset)
    same = placement.node(peer) == placement.node(rank)
    stage = placement.coords(peer)[0]
    where = f"to rank {peer} (stage {stage}, {'same node' if same else f'node {placement.node(peer)}'})"
    payload = calls * one
    return Flow(what, where, calls, payload, payload if same else 0, 0 if same else payload)


def render(traffic: RankTraffic, placement: Placement, *, nvlink_gbps: float = NVLINK_GBPS,
           network_gbps: float = NETWORK_GBPS) -> str:
    """The table ``hf-zero estimate --traffic`` prints for one rank: one row a flow, the totals, the times."""
    s, d, t = placement.coords(traffic.rank)
    head = ("communication", "group / peer", "calls", "payload", "NVLink", "network")
    rows = [head] + [(f.what, f.where, f"{f.calls:,}", fmt_bytes(f.payload), fmt_bytes(f.nvlink), fmt_bytes(f.network))
                     for f in traffic.flows]
    rows.append(("total sent by this rank", "", "", "", fmt_bytes(traffic.nvlink), fmt_bytes(traffic.network)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"rank {traffic.rank} (node {placement.node(traffic.rank)}; pp stage {s}, dp rank {d}, tp rank {t}), "
             "the busiest rank: bytes it sends per optimizer step"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    nv, net = traffic.seconds(nvlink_gbps, network_gbps)
    lines.append(f"time at {nvlink_gbps:g} GB/s NVLink and {network_gbps:g} GB/s network per GPU, per direction: "
                 f"NVLink {nv:.3f} s, network {net:.3f} s; lower bound {max(nv, net):.3f} s a step "
                 "(links in parallel, no latency, no overlap with compute counted)")
    return "\n".join(lines)


def check_flags(args) -> None:
    """``--traffic``'s own flags, each named with its value and what is allowed."""
    if args.gpus_per_node is not None and args.nodes * args.gpus_per_node != args.world:
        raise ValueError(f"--nodes {args.nodes} x --gpus_per_node {args.gpus_per_node} = "
                         f"{args.nodes * args.gpus_per_node} ranks, not --world {args.world}; allowed --gpus_per_node "
                         f"here: {args.world // args.nodes}")
    gpus = args.gpus_per_node or args.world // args.nodes
    if args.tp >= 1 and gpus % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide --gpus_per_node {gpus}: a tensor-parallel group is kept "
                         f"inside one node (hf-zero launch refuses it too); allowed --tp here: {divisors(gpus)}")
    if args.grad_accum < 1:
        raise ValueError(f"--grad_accum must be a positive integer, got {args.grad_accum}")
    if args.pp > 1 and args.pp_schedule == "1F1B" and args.grad_accum < args.pp:
        raise ValueError(f"--grad_accum {args.grad_accum} with --pp {args.pp}: allowed: >= {args.pp} (under pipeline "
                         "stages the micro-batches a step are the gradient accumulation; 1F1B needs one a stage at least)")
    if args.micro_batches is not None:
        raise ValueError("--micro_batches with --traffic: the traffic model runs one micro-batch per accumulated batch "
                         '(pipeline.micro_batches "auto"); give --grad_accum instead')
    if args.plot is not None:
        raise ValueError("--plot draws the memory table; it does not go with --traffic")
    for name in ("nvlink_bw", "network_bw"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be a positive number of GB/s, got {getattr(args, name)}")


def run(args, axes: Axes, stages, bucket) -> int:
    """``--traffic``: per ZeRO stage, what the busiest rank sends in one optimizer step, by link
    ([Note: traffic per step] in estimate_traffic.py); ``args`` passed ``estimate.checked``."""
    check_flags(args)
    nvlink, network = args.nvlink_bw or NVLINK_GBPS, args.network_bw or NETWORK_GBPS
    placement = Placement(axes, args.gpus_per_node or args.world // args.nodes)
    cfg = E.load_model_config(args.model_config)
    counts = E.count_params(E.meta_model(cfg))
    shape = E.activation_shape(cfg)
    sequences = args.micro_batch * args.grad_accum * axes.dp
    print(f"model: {args.model_config} ({cfg.model_type}); params {counts.total:,} (trainable {counts.trainable:,}, "
          f"frozen {counts.frozen:,}; tied weights counted once)")
    print(f"world {axes.world} ranks = {placement.nodes} node(s) x {placement.gpus_per_node} GPUs; (pp, dp, tp) = "
          f"({axes.pp}, {axes.dp}, {axes.tp}), pp outermost, tp innermost (a tp group inside a node)")
    print(f"micro batch {args.micro_batch} x seq len {args.seq_len}, gradient accumulation {args.grad_accum}: "
          f"{sequences:,} sequences ({sequences * args.seq_len:,} tokens) a step; precision {args.dtype}, model "
          f"loaded in {args.model_dtype}{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    for stage in stages:
        ranks = step_traffic(counts, shape, placement, stage=stage, seq_len=args.seq_len, micro_batch=args.micro_batch,
                             grad_accum=args.grad_accum, dtype=args.dtype, model_dtype=args.model_dtype,
                             bucket_numel=E._bucket_numel(bucket, counts.hidden_size),
                             gradient_checkpointing=args.gradient_checkpointing)
        print(f"\nZeRO stage {stage}, " + render(busiest(ranks, nvlink, network), placement, nvlink_gbps=nvlink,
                                                   network_gbps=network))
    print("\nA paper model, not a measurement: ring collectives, each rank sends (n-1)/n of a buffer for an all-gather "
          "or reduce-scatter, 2(n-1)/n for an all-reduce; a group spanning k nodes sends k/n of it over the network "
          "(docs/parallelism.md, Paper model). Not counted: norm and loss all-reduces, host-device copies (offload), "
          "latency, NVLS/tree algorithms.")
    return 0
