"""Splitting a model's planned Linear layers over the tp group, Megatron-style, as plain local tensors.

[Note: f and g]
A column-parallel layer (``colwise``) keeps rows ``[r*o/tp, (r+1)*o/tp)`` of the weight (and bias):
from the whole input it computes this rank's slice of the output features. A row-parallel layer
(``rowwise``) keeps the matching columns of its weight: from that slice of its input it computes a
partial sum of the whole output, which the tp ranks add up. A decoder block is colwise q/k/v (whole
heads per rank), attention on the local heads, rowwise o_proj; colwise gate/up, rowwise down. Two
autograd functions carry the communication (Megatron's f and g)::

    f (enters a colwise layer):  forward identity   backward all-reduce over tp  (each rank's input
                                                                                  grad is partial)
    g (leaves a rowwise layer):  forward all-reduce  backward identity            (each rank needs
                                                                                  the whole grad)

Everything outside the split layers (embeddings, norms, the LM head) is replicated: every rank of a
tp group computes it on the same batch, so its gradient is the same on every tp rank and needs no
tp communication; only the global gradient norm must count it once (norm.py).

[Note: why not DTensor]
transformers applies ``tp_plan`` by turning params into ``DTensor``s and replacing each module's
forward (``transformers.distributed.tensor_parallel``). hf_zero's ZeRO engine packs params into
flat buffers whose ``.data`` views it swaps, shards and all-gathers over its own process group; a
DTensor param cannot be a view into such a buffer, and each of its ops would dispatch through the
DTensor layer. Plain local tensors are ordinary params to the engine: each tp rank simply has a
different (smaller) model, and ZeRO shards it over the dp group (mesh.py). The plan's vocabulary is
transformers' (plan.py), so a model's own plan is read as it is written.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hf_zero.engine import collectives as C
from hf_zero.tensor_parallel.plan import model_plan, resolve

# Attention attributes some models read to reshape (Llama reads -1 heads from the shapes); each
# rank's attention runs on heads / tp of them.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")


class _CopyToTp(torch.autograd.Function):
    """f: identity forward, all-reduce of the input grad over tp in backward ([Note: f and g])."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        return C.wait(C.start_all_reduce(ctx.comm, grad, label="tp f backward")), None


class _ReduceFromTp(torch.autograd.Function):
    """g: all-reduce over tp in forward, identity backward ([Note: f and g])."""

    @staticmethod
    def forward(ctx, x, comm):
        out = x.contiguous().clone()
        return C.wait(C.start_all_reduce(comm, out, label="tp g forward"))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LoadsWhole:
    """A state dict may hold this layer whole (the full weights ``save_model`` wrote, which a resume
    or ``load_best_model_at_end`` loads through ``load_state_dict``): a whole tensor is cut to this
    rank's part as it loads, in place in that dict; a part of this rank's shape loads as it is."""

    split_dims: dict[str, int]  # param name -> the dim it is split on

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, dim in self.split_dims.items():
            key, mine = prefix + name, getattr(self, name)
            whole = state_dict.get(key)
            if torch.is_tensor(whole) and whole.dim() == mine.dim() and whole.shape[dim] == mine.shape[dim] * self.comm.world_size:
                state_dict[key] = whole.chunk(self.comm.world_size, dim)[self.comm.rank]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ColumnParallelLinear(_LoadsWhole, nn.Linear):
    """This rank's rows of a Linear: whole input in, a slice of the output features out."""

    def __init__(self, full: nn.Linear, comm: C.CommContext) -> None:
        super().__init__(full.in_features, full.out_features // comm.world_size, bias=full.bias is not None,
                         device="meta", dtype=full.weight.dtype)
        self.comm = comm
        self.split_dims = {"weight": 0, "bias": 0} if full.bias is not None else {"weight": 0}
        self.weight = _shard(full.weight, 0, comm)
        if full.bias is not None:
            self.bias = _shard(full.bias, 0, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTp.apply(x, self.comm), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, colwise tp rank {self.comm.rank} of {self.comm.world_size}"


class RowParallelLinear(_LoadsWhole, nn.Linear):
    """This rank's columns of a Linear: a slice of the input in, the whole output out (summed by g)."""

    def __init__(self, full: nn.Linear, comm: C.CommContext) -> None:
        super().__init__(full.in_features // comm.world_size, full.out_features, bias=full.bias is not None,
                         device="meta", dtype=full.weight.dtype)
        self.comm = comm
        self.split_dims = {"weight": 1}
        self.weight = _shard(full.weight, 1, comm)
        if full.bias is not None:  # whole on every rank, added once after the sum
            self.bias = nn.Parameter(full.bias.detach().clone(), requires_grad=full.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ReduceFromTp.apply(F.linear(x, self.weight), self.comm)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rowwise tp rank {self.comm.rank} of {self.comm.world_size}"


class TpLayout(NamedTuple):
    """What ``split_model`` did: each split param's name and the dim it is split on (0 rows, 1
    columns), for the global norm, gathering grads and (not built yet) the consolidated save."""

    tp: int
    rank: int
    split_dims: dict[str, int]


def split_model(model: nn.Module, tp_group, plan: dict[str, str] | None = None) -> TpLayout:
    """Replace every planned Linear of ``model`` by this rank's part (in place; the same names, so state
    dict keys are unchanged) and divide the attention head counts by tp. Call on every rank of the
    tp group, with the same full weights on each (a model built from the same seed or checkpoint)."""
    comm = C.CommContext(tp_group)
    tp = comm.world_size
    _check_heads(model, tp)
    layers = resolve(model, plan if plan is not None else model_plan(model))
    split_dims: dict[str, int] = {}
    parents: dict[int, nn.Module] = {}  # modules holding a colwise layer: an attention's head counts
    for layer in layers:
        parent_name, _, child = layer.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        full = getattr(parent, child)
        dim = 0 if layer.style == "colwise" else 1
        size = full.weight.shape[dim]
        if size % tp:
            raise ValueError(f"tensor_parallel.autotp_size = {tp}: {layer.name} has {size} "
                             f"{'out' if dim == 0 else 'in'}_features, not divisible by {tp}")
        cls = ColumnParallelLinear if layer.style == "colwise" else RowParallelLinear
        setattr(parent, child, cls(full, comm))
        split_dims[f"{layer.name}.weight"] = dim
        if full.bias is not None and dim == 0:
            split_dims[f"{layer.name}.bias"] = 0
        if layer.style == "colwise":
            parents[id(parent)] = parent
    for parent in parents.values():
        _divide_heads(parent, tp)
    return TpLayout(tp=tp, rank=comm.rank, split_dims=split_dims)


def split_params(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Every split param of ``model``: name -> (split dim, this rank's tp rank, tp size); empty
    without tensor parallelism. What the sharded checkpoint reads ([Note: tensor-parallel parts])."""
    return {f"{m}.{name}": (dim, module.comm.rank, module.comm.world_size)
            for m, module in model.named_modules() if isinstance(module, _LoadsWhole)
            for name, dim in module.split_dims.items()}


def whole_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each trainable param's shape, a split one's counted whole (what checkpoints and saves hold)."""
    split = split_params(model)
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            shape = list(p.shape)
            if name in split:
                shape[split[name][0]] *= split[name][2]
            out[name] = tuple(shape)
    return out


def gather_split(tensor: torch.Tensor, dim: int, tp_group) -> torch.Tensor:
    """The whole tensor from every tp rank's part along ``dim`` (a collective over the tp group)."""
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(tp_group))]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=tp_group)
    return torch.cat(parts, dim)


def _shard(full: nn.Parameter, dim: int, comm: C.CommContext) -> nn.Parameter:
    part = full.detach().chunk(comm.world_size, dim)[comm.rank].clone()
    return nn.Parameter(part, requires_grad=full.requires_grad)


def _check_heads(model: nn.Module, tp: int) -> None:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, key, None)
        if isinstance(heads, int) and heads % tp:
            raise ValueError(f"tensor_parallel.autotp_size = {tp}: the model's {key} = {heads} is not divisible "
                             f"by {tp}; each tp rank must hold whole heads (allowed: a divisor of {heads} "
                             "that divides the world size)")


def _divide_heads(attention: nn.Module, tp: int) -> None:
    """An attention module's head counts, as each rank's part of it sees them."""
    for attr in _HEAD_ATTRS:
        heads = attention.__dict__.get(attr)
        if isinstance(heads, int) and not isinstance(heads, bool):
            if heads % tp:
                raise ValueError(f"tensor_parallel.autotp_size = {tp}: {type(attention).__name__}.{attr} = {heads} "
                                 f"is not divisible by {tp}")
            attention.__dict__[attr] = heads // tp
