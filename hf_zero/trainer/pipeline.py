"""Pipeline stages in the Trainer (``pipeline.stages`` > 1): what the seams add.

At ``Trainer.__init__`` every rank builds the (pp, dp) mesh (the (pp, dp, tp) mesh with
``tensor_parallel.autotp_size``: parallel_mesh.py, hf_zero/tensor_parallel/mesh.py) and keeps only its
stage's layers of the model (hf_zero/pipeline), before any optimizer exists, so the optimizer and ZeRO
see this stage's params under their original names; with tp, tensor_parallel.py then splits the stage's
planned layers over its tp group, the pipeline's sends go between the ranks of the same (dp, tp), and
each row below holds per tp rank (a "dp group" is the stage's ranks of one tp rank).

| where | what |
|---|---|
| data | each data loader's batches are dealt over the dp ranks (its accelerate batch sampler told dp and the dp rank): every rank of a pipeline loads the same batches |
| ``training_step`` | the Trainer's batches of one accumulation are kept until its last; then one schedule step runs them ("auto": each batch one micro-batch, padded to one length) or one step per batch (a number: each split into that many); the returned loss is the step's, equal on every stage |
| stage 0 | no DDP: after the schedule, the grads are averaged over the stage's dp ranks in one flat all-reduce |
| stages 1-2 | the ZeroEngine shards over the stage's dp group (``group=``); stage 1 reduces once, at the step |
| clipping, grad norm | the squares of each stage's norm (over its dp group; with tp over dp and tp, replicated params once) summed over the pipeline |
| ``evaluate`` | the loss only, forward through the stages (a batch one micro-batch), gathered from stage 0's ranks only (each pipeline's batch once); predictions refused (not built yet) |
| ``save_model`` | every stage's full params (tp parts gathered first) sent to rank 0, which writes them as ``save_pretrained`` does |
| ``_issue_warnings_after_load`` | a resume's full weights: the other stages' keys are not warned of as unexpected |
| checkpoints, resume | ZeRO 1-2: each stage's engine writes its own params' state, rank 0 the whole model's description ([Note: pipeline parts], hf_zero/checkpoint/pipeline_parts.py); ``save_model`` writes the full weights; resume at any stage count (or none) and dp. With tp the same, each stage's tp parts stored as [Note: tensor-parallel parts] says. ZeRO 0: not built yet, refused by the launch preflight and at Trainer creation (save_strategy: hf_zero/config/stage0_saves.py) and at ``train(resume_from_checkpoint=...)`` |
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from hf_zero.config import stage0_saves
from hf_zero.config.auto import AUTO
from hf_zero.engine.stages import NotAvailableYet
from hf_zero.pipeline.build import build, check as check_model
from hf_zero.pipeline.runner import PipelineRunner
from hf_zero.tensor_parallel.mesh import ParallelMesh
from hf_zero.trainer import parallel_mesh
from hf_zero.trainer import tensor_parallel as TP
from hf_zero.trainer.session import session_of
from hf_zero.trainer.streamed_save import save_whole
from hf_zero.trainer.verify import verify_saved_weights

KEY = "pipeline.stages"


@dataclass
class TrainerPp:
    mesh: ParallelMesh
    runner: PipelineRunner
    micro_batches: object  # AUTO: the accumulation's batches; an int: each batch split so
    pending: list = field(default_factory=list)  # this accumulation's batches, until its last
    others: frozenset = frozenset()  # the whole model's state-dict keys that other stages hold


_BY_TRAINER: "weakref.WeakKeyDictionary[object, TrainerPp]" = weakref.WeakKeyDictionary()


def of(trainer) -> TrainerPp | None:
    return _BY_TRAINER.get(trainer)


def check(trainer, config) -> None:
    """Every rank, at ``Trainer.__init__``, before any process group: the model's reasons, then the config's."""
    pp = config.pipeline
    if pp.enabled and of(trainer) is None:
        check_model(trainer.model, pp.stages, pp.schedule)
        _refuse_not_built(trainer, config)


def setup(trainer, config) -> None:
    """Every rank, at ``Trainer.__init__`` (after ``check``): the mesh, this stage's layers kept (before
    tensor_parallel.py splits them over tp)."""
    pp = config.pipeline
    if not pp.enabled or of(trainer) is not None:
        return
    mesh = parallel_mesh.mesh_for(trainer, config)
    whole = set(trainer.model.state_dict())
    runner = build(trainer.model, stages=pp.stages, schedule=pp.schedule, group=mesh.pp_group,
                   device=trainer.args.device)
    # "auto" (as the file says it; the resolved config holds the accumulation steps): each batch one micro-batch
    session = session_of(trainer)
    loaded = session.loaded.pipeline.micro_batches if session is not None and session.loaded is not None else AUTO
    _BY_TRAINER[trainer] = TrainerPp(mesh, runner, AUTO if loaded is AUTO else pp.micro_batches,
                                     others=frozenset(whole - set(trainer.model.state_dict())))
    # evaluate(): every stage holds each batch's loss; only stage 0's ranks count (the Trainer's own attribute)
    trainer.gather_function = functools.partial(_gather_for_metrics, trainer.accelerator, mesh)


def _refuse_not_built(trainer, config) -> None:
    pp, args = config.pipeline, trainer.args
    micro = pp.micro_batches  # resolved: "auto" is gradient_accumulation_steps
    if pp.schedule == "1F1B" and micro < pp.stages:
        what = "pipeline.micro_batches (\"auto\": gradient_accumulation_steps)"
        raise ValueError(f"pipeline.schedule \"1F1B\" with {KEY} = {pp.stages} needs at least {pp.stages} micro-batches "
                         f"per step, and {what} = {micro} gives {micro}; raise it, or use schedule \"GPipe\"")
    if pp.schedule == "interleaved_1F1B" and micro % pp.stages and micro > pp.stages:
        raise ValueError(f"pipeline.schedule \"interleaved_1F1B\" with {KEY} = {pp.stages}: {micro} micro-batches per "
                         f"step must be at most {pp.stages} or a multiple of it")
    # said now, not after hours of training at the first save; hf-zero launch said it before any rank started
    saves = stage0_saves.refusal(config, str(getattr(args.save_strategy, "value", args.save_strategy)))
    if saves is not None:
        raise NotAvailableYet(saves)
    if any(p.device.type == "meta" for p in trainer.model.parameters()):
        raise NotAvailableYet(f"{KEY} = {pp.stages} with a model loaded sharded (zero3_init_flag): not built yet")


def _gather_for_metrics(accelerator, mesh: ParallelMesh, tensor: torch.Tensor) -> torch.Tensor:
    """accelerate's ``gather_for_metrics`` with each pipeline's batch counted once: the world's tensors
    gathered (rank order: stage 0's ranks first, tp-inner), those of stage 0 and tp rank 0 kept (ranks
    0, tp, ..., (dp - 1) * tp: one per dp rank), the last batch's padding dropped."""
    if not torch.is_tensor(tensor):
        raise NotAvailableYet(f"{KEY}: gathering {type(tensor).__name__} outputs for metrics is not built yet")
    data = accelerator.gather(tensor)
    per_rank = data.reshape(dist.get_world_size(), *tensor.shape)[: mesh.dp * mesh.tp : mesh.tp]
    data = per_rank.reshape(-1, *tensor.shape[1:]) if tensor.dim() else per_rank
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        data = data[: state.remainder]
    return data


def load_result(trainer, result):
    """A resume loads the checkpoint's full weights into this stage's model: the keys the other stages hold
    are no unexpected keys to warn of (the Trainer's ``_issue_warnings_after_load``); any other key still is."""
    state = of(trainer)
    if state is None or not result.unexpected_keys:
        return result
    return result._replace(unexpected_keys=[k for k in result.unexpected_keys if k not in state.others])


class PipelinedModel(nn.Module):
    """What the Trainer trains at ZeRO stage 0 (where DDP would stand): the model, run only through the
    pipeline (``training_step``); the grads are averaged over the stage's dp ranks after each step."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        raise AssertionError("a model split into pipeline stages runs through its schedule (hf_zero/pipeline), "
                             "not a forward call")


def wrap_stage0(trainer, model: nn.Module) -> nn.Module:
    return trainer.accelerator.prepare_model(PipelinedModel(model), device_placement=False, evaluation_mode=True)


def shard_loader(trainer, loader):
    """Deal ``loader``'s batches over the dp ranks only: every rank of a pipeline gets the same ones."""
    state = of(trainer)
    if state is None:
        return loader
    from accelerate.data_loader import BatchSamplerShard

    sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(sampler, "batch_sampler", None)
    sampler = sampler if isinstance(sampler, BatchSamplerShard) else inner
    if not isinstance(sampler, BatchSamplerShard):
        raise NotAvailableYet(f"{KEY} = {state.mesh.pp} with a {type(loader).__name__} whose batches accelerate does "
                              "not deal by a batch sampler (an IterableDataset, dispatch_batches): not built yet; "
                              "use a map-style dataset")
    mesh = state.mesh
    if (sampler.num_processes, sampler.process_index) != (mesh.dp, mesh.dp_rank):
        if (sampler.num_processes, sampler.process_index) != (dist.get_world_size(), dist.get_rank()):
            raise AssertionError(f"the data loader is dealt over {sampler.num_processes} processes as "
                                 f"{sampler.process_index}, not this world's")
        sampler.num_processes, sampler.process_index = mesh.dp, mesh.dp_rank
    return loader


def training_step(trainer, session, inputs) -> torch.Tensor:
    """Keep the batch; at the accumulation's last one run the pipeline over all of them."""
    state = of(trainer)
    state.pending.append(trainer._prepare_inputs(inputs))
    if not trainer.accelerator.sync_gradients:
        return torch.zeros((), device=trainer.args.device)  # its loss comes with the step's last batch
    batches, state.pending = state.pending, []
    for b in batches:
        if "labels" not in b or "input_ids" not in b:
            raise ValueError(f"{KEY}: a training batch needs input_ids and labels (the last stage computes the "
                             f"causal-LM loss), got {sorted(b)}")
    tokens = sum((b["labels"][..., 1:] != -100).sum() for b in batches).to(trainer.args.device)
    mesh = state.mesh
    if mesh.dp > 1:
        dist.all_reduce(tokens, group=mesh.dp_group)
    trainer.model.train()
    engine = session.engine
    with trainer.compute_loss_context_manager():
        if engine is not None:
            engine.set_gradient_sync(False)  # stage 1: one reduction, at the step (finish_grad_sync)
        try:
            if state.micro_batches is AUTO:
                loss = state.runner.train_step(_concat(batches), len(batches), tokens=tokens, dp=mesh.dp)
            else:
                loss = sum(state.runner.train_step(b, state.micro_batches, tokens=tokens, dp=mesh.dp) for b in batches)
        finally:
            if engine is not None:
                engine.set_gradient_sync(True)
    if engine is None and mesh.dp > 1:
        _average_grads(trainer.model, mesh)
    return loss.detach()


def _concat(batches: list[dict]) -> dict:
    """The accumulation's batches as one, each a micro-batch: right-padded to the longest (labels -100,
    attention mask 0; a causal model's real tokens never see padding on their right)."""
    if len(batches) == 1:
        return batches[0]
    length = max(b["input_ids"].shape[1] for b in batches)
    pads = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    out = {}
    for key, value in pads.items():
        if key not in batches[0]:
            continue
        parts = [torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=value) for b in batches]
        out[key] = torch.cat(parts)
    if "attention_mask" not in out and any(b["input_ids"].shape[1] != length for b in batches):
        out["attention_mask"] = torch.cat([torch.nn.functional.pad(torch.ones_like(b["input_ids"]),
                                                                   (0, length - b["input_ids"].shape[1]))
                                           for b in batches])
    return out


def _average_grads(model: nn.Module, mesh: ParallelMesh) -> None:
    """Stage 0: the mean of every grad over this stage's dp ranks, in one flat all-reduce."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=mesh.dp_group)
    flat /= mesh.dp
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def grad_norm(trainer, engine) -> torch.Tensor:
    """The whole model's gradient norm: each stage's (over its dp group, and over tp with tensor parallelism:
    tensor_parallel.grad_norm) squared, summed over the pipeline."""
    if TP.of(trainer) is not None:
        local = TP.grad_norm(trainer, engine)
    elif engine is not None:
        local = engine.grad_norm()
    else:
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        local = get_total_norm(grads) if grads else torch.zeros((), device=trainer.args.device)
    square = local.detach().float().pow(2).to(trainer.args.device)
    dist.all_reduce(square, group=of(trainer).mesh.pp_group)
    return square.sqrt()


def clip(trainer, engine, max_norm: float) -> torch.Tensor:
    total = grad_norm(trainer, engine)
    if engine is not None:
        return engine.clip_grad_norm_(max_norm, total=total)
    clip_grads_with_norm_([p for p in trainer.model.parameters() if p.grad is not None], max_norm, total)
    return total


def prediction_step(trainer, inputs, prediction_loss_only: bool):
    """``evaluate``: the loss through the stages, on every rank; predictions are not built yet."""
    state = of(trainer)
    if not prediction_loss_only:
        raise NotAvailableYet(f"predictions (logits for compute_metrics or predict()) with {KEY} = {state.mesh.pp} are "
                              "not built yet: evaluate without compute_metrics, or with prediction_loss_only=True")
    inputs = trainer._prepare_inputs(inputs)
    if "labels" not in inputs:
        raise ValueError(f"{KEY}: an evaluation batch needs labels (the last stage computes the loss), got "
                         f"{sorted(inputs)}")
    trainer.model.eval()
    with trainer.compute_loss_context_manager():
        loss = state.runner.eval_loss(inputs)
    return loss, None, None


@torch.no_grad()
def save_model(trainer, engine, output_dir: str) -> None:
    """Every stage's full params to rank 0 (from the pipeline of dp rank 0 and tp rank 0, after each stage's
    tp parts are gathered whole: tensor_parallel.whole_tensors), written as ``save_pretrained`` writes them
    and checked tensor by tensor; ``from_pretrained`` loads them without hf_zero."""
    if engine is not None:
        engine.settle()
    mesh = of(trainer).mesh
    if TP.of(trainer) is not None:  # a collective over tp: every rank
        own = dict(TP.whole_tensors(trainer, engine))
    else:
        own = {n: t.detach() for n, t in trainer.model.state_dict().items()}
    full = _gather_stages(own, mesh) if mesh.dp_rank == 0 and mesh.tp_rank == 0 else None
    writer = trainer.args.should_save
    save_whole(trainer, output_dir, full if writer else None, every_rank=True)
    if writer:
        verify_saved_weights(output_dir, full)


def _gather_stages(own: dict[str, torch.Tensor], mesh: ParallelMesh) -> dict[str, torch.Tensor] | None:
    """Over the pipeline of dp rank 0: stage s > 0 sends its tensors' names, shapes and dtypes, then the
    tensors, to stage 0; stage 0 returns them all on the CPU, in stage order (others: None)."""
    group = mesh.pp_group
    meta = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in own.items()]
    metas = [None] * mesh.pp if mesh.pp_rank == 0 else None
    dist.gather_object(meta, metas, group_dst=0, group=group)
    if mesh.pp_rank != 0:
        for name, tensor in own.items():
            dist.send(tensor.contiguous(), group_dst=0, group=group)
        return None
    full = {n: t.to("cpu", copy=True) for n, t in own.items()}
    device = next(iter(own.values())).device if own else torch.device("cpu")
    for stage in range(1, mesh.pp):
        for name, shape, dtype in metas[stage]:
            buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.recv(buffer, group_src=stage, group=group)
            full[name] = buffer.cpu()
    return full
