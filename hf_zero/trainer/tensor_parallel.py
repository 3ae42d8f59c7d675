"""Tensor parallelism in the Trainer (``tensor_parallel.autotp_size`` > 1): what the seams add.

At ``Trainer.__init__`` every rank builds the (dp, tp) mesh (with pipeline stages the one (pp, dp, tp) mesh,
parallel_mesh.py) and splits the model (hf_zero/tensor_parallel) before any optimizer exists; with
pipeline stages it splits the layers its stage kept (pipeline.py runs first). The rest follows from the mesh:

| where | what | with pipeline stages (pipeline.py) |
|---|---|---|
| data | accelerate's data loaders read the mesh (its ``"dp_shard"``/``"tp"`` names): rank r gets dp rank r // tp's batches, the same on every rank of a tp group, train and eval alike | dealt by pipeline.shard_loader: dp rank d the d-th share, every rank of a pipeline and of a tp group the same |
| stage 0 | DDP over the dp group only (the global world would average different tp parts) | no DDP: the grads averaged over the dp group after each schedule step |
| stages 1-3 | the ZeroEngine shards over the dp group (``group=``) | stages 1-2: the same, the dp group of the stage and tp rank |
| clipping, grad norm | over dp and tp, replicated params once (tensor_parallel/norm.py) | each stage's so, squared, summed over the pipeline |
| ``save_model`` | the consolidated save: tp parts gathered into the full weights (``whole_tensors``), written by rank 0 as ``save_pretrained`` does | each stage's gathered so, then every stage's to rank 0 |
| checkpoints, resume | stages 1-3: each tp rank's parts stored at their place in the full tensors ([Note: tensor-parallel parts] in hf_zero/checkpoint/sharded.py), the model weights full (``save_model``): resume at any (dp, tp); stage 0 refused as not built yet (save_strategy: by the launch preflight and at Trainer creation, hf_zero/config/stage0_saves.py) | stages 1-2: each stage's engine writes its tp parts so, rank 0 the whole model's description ([Note: pipeline parts]); resume at any (pp, dp, tp); stage 0 refused likewise |

The state lives in a side table keyed by the Trainer, as ``ZeroSession`` does.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
from torch import nn

from hf_zero.config import stage0_saves
from hf_zero.engine import collectives as C
from hf_zero.tensor_parallel import ParallelMesh, TpLayout, check_tp_size, gather_split, split_model
from hf_zero.tensor_parallel.mesh import DP_DIM, TP_DIM
from hf_zero.engine.stages import NotAvailableYet
from hf_zero.tensor_parallel.norm import engine_parts, global_norm, module_parts
from hf_zero.trainer import parallel_mesh
from hf_zero.trainer.streamed_save import save_whole
from hf_zero.trainer.verify import verify_saved_weights

KEY = "tensor_parallel.autotp_size"


class TrainerTp(NamedTuple):
    mesh: ParallelMesh
    layout: TpLayout
    tp_comm: C.CommContext


_BY_TRAINER: "weakref.WeakKeyDictionary[object, TrainerTp]" = weakref.WeakKeyDictionary()


def of(trainer) -> TrainerTp | None:
    return _BY_TRAINER.get(trainer)


def check(trainer, config) -> None:
    """Every rank, at ``Trainer.__init__``, before any process group: what tp cannot run here is refused."""
    tp = config.tensor_parallel.autotp_size
    if tp > 1 and of(trainer) is None:
        check_tp_size(tp, trainer.args.world_size, key=KEY)
        _refuse_not_built(trainer, config, tp)


def setup(trainer, config) -> None:
    """Every rank, at ``Trainer.__init__`` (after ``check``, and after pipeline.py kept this stage's layers):
    the mesh, the split of the planned layers, the data pointed at the mesh."""
    tp = config.tensor_parallel.autotp_size
    if of(trainer) is not None:
        return
    if tp == 1:
        _forget_data_mesh(trainer.accelerator.state)  # an earlier tp Trainer's, in this process
        return
    mesh = parallel_mesh.mesh_for(trainer, config)
    layout = split_model(trainer.model, mesh.tp_group)
    if mesh.pp == 1:
        # accelerate's prepare_data_loader reads this mesh (its only reader while no parallelism_config
        # is set): every rank of a tp group gets the same batches, dp rank d the d-th of dp shares.
        trainer.accelerator.state.device_mesh = mesh.device_mesh
    else:  # with pipeline stages accelerate's formula would count stages as dp ranks: pipeline.shard_loader deals
        _forget_data_mesh(trainer.accelerator.state)
    _BY_TRAINER[trainer] = TrainerTp(mesh, layout, C.CommContext(mesh.tp_group))


def _forget_data_mesh(state) -> None:
    """accelerate keeps one state per process: a mesh set for an earlier tp Trainer would shard this
    Trainer's data as tp. (A plain Trainer, without hf_zero, created after a tp one in the same process
    still sees it: one process trains one such job.)"""
    mesh = getattr(state, "device_mesh", None)
    if mesh is not None and tuple(mesh.mesh_dim_names or ()) == (DP_DIM, TP_DIM) and not state.parallelism_config:
        state.device_mesh = None


def wrap_stage0(trainer, model: nn.Module) -> nn.Module:
    """Stage 0: DDP over the dp group; autocast and compile as accelerate applies them, no DDP of its own."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(model, process_group=of(trainer).mesh.dp_group)
    return trainer.accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)


def grad_norm(trainer, engine) -> torch.Tensor:
    """The whole model's gradient norm over dp and tp (split parts summed, replicated params once)."""
    state = of(trainer)
    split = set(state.layout.split_dims)
    if engine is None:  # stage 0: DDP averaged whole grads over dp
        return global_norm(module_parts(trainer.model, split), tp=state.tp_comm, dp=None, device=trainer.args.device)
    return global_norm(engine_parts(engine, split), tp=state.tp_comm, dp=engine.ctx, device=trainer.args.device)


def clip(trainer, engine, max_norm: float) -> torch.Tensor:
    total = grad_norm(trainer, engine)
    if engine is not None:
        return engine.clip_grad_norm_(max_norm, total=total)
    grads = [p for p in trainer.model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total


def whole_tensors(trainer, engine):
    """Every rank (a collective over tp, at stage 3 inside the engine's gather): each (name, tensor) of the
    model's state dict, a split param's tp parts gathered into the whole tensor (on the param's device)."""
    state = of(trainer)
    gathered = engine.gathered() if engine is not None and engine.strategy.shard_params else contextlib.nullcontext()
    with gathered:
        for name, tensor in trainer.model.state_dict().items():
            dim = state.layout.split_dims.get(name)
            yield name, (gather_split(tensor, dim, state.mesh.tp_group) if dim is not None else tensor.detach())


@torch.no_grad()
def save_model(trainer, engine, output_dir: str) -> None:
    """The consolidated save: every rank gathers each split param's tp parts (``whole_tensors``), rank 0
    writes the whole model as ``save_pretrained`` does (staged, swapped in once whole) and checks every
    written tensor; ``from_pretrained`` loads it. (With pipeline stages: pipeline.save_model.)"""
    if engine is not None:
        engine.settle()
    writer = trainer.args.should_save
    full = {n: t.to("cpu", copy=True) for n, t in whole_tensors(trainer, engine) if writer}
    save_whole(trainer, output_dir, full if writer else None, every_rank=True)
    if writer:
        verify_saved_weights(output_dir, full)


def _refuse_not_built(trainer, config, tp: int) -> None:
    # said now, not after hours of training at the first save; hf-zero launch said it before any rank started
    saves = stage0_saves.refusal(config, str(getattr(trainer.args.save_strategy, "value", trainer.args.save_strategy)))
    if saves is not None:
        raise NotAvailableYet(saves)
    # tp with sequence parallelism, with offload, or at stage 3 with zero3_init_flag: rows of the one table
    # (config/unsupported.py), refused before any rank starts and again by resolve_config, before this.
    if any(p.device.type == "meta" for p in trainer.model.parameters()):  # loaded by hf_zero.init under another config
        raise NotAvailableYet(f"{KEY} = {tp} with a model loaded sharded (hf_zero.init, or zero3_init_flag under "
                              "another config): not built yet; load the model whole (transformers' from_pretrained "
                              "with zero_optimization.zero3_init_flag false) so it is split at Trainer creation")
