"""The Trainer seams hf_zero uses: the one place where the integration touches ``transformers``.

``install()`` wraps these ``transformers.Trainer`` methods (so every subclass, Seq2SeqTrainer and
SFT-style trainers included, inherits them), and ``PreTrainedModel.from_pretrained``. Each wrapper calls the original and only adds
behaviour for a Trainer that has a ``ZeroSession``; a Trainer created while hf_zero is not
active behaves exactly as before.

| method              | what hf_zero adds                                                       |
|---------------------|-------------------------------------------------------------------------|
| ``__init__``        | refuses a Trainer set up for DeepSpeed or FSDP too (other_sharding.py); resolves the config against TrainingArguments, adds the report callback and, for CPU checkpointing or tiled compute, ``TrainerActivations`` (hf_zero/activations), starts the hang watchdog (``comm_timeout_s``); sequence parallelism: takes over a ``parallelism_config`` sp_size, builds the SP groups and turns on Ulysses attention (hf_zero/sequence_parallel/training.py); ``sparse_attention``: the model's attention set to the layout's (hf_zero/sparse_attention/training.py) |
| ``create_optimizer``| the config's ``optimizer`` block, if any, builds the optimizer (config_blocks.py); fp16, every stage: the loss scaler is DeepSpeed's (loss_scaling.py); stage >= 1: builds the ZeroEngine around the optimizer just created, after any live engine of an earlier Trainer over the same model has let go of it (earlier_engine.py, [Note: a second Trainer]; or gives it to the engine of a model sharded as it loaded, or to one laid out anew from its shards for a PEFT wrapper of it, hf_zero/init); stage 3, W > 1: the model's ``generate`` defaults to ``synced_gpus=True`` (generation.py) |
| ``create_scheduler``| the config's ``scheduler`` block, if any: DeepSpeed's schedule (config_blocks.py, ds_schedulers.py) |
| ``compute_loss``    | ``tiled_loss``: a training forward with labels computes the model's loss in tiles, without full logits (hf_zero/activations/tiled_loss.py); sequence parallelism: the loss over the SP group (sequence_parallel/loss.py) |
| ``get_train_dataloader`` | sequence parallelism: one batch per SP group, each rank's slice of its sequences (sequence_parallel/batch_split.py) |
| ``_wrap_model``     | stage >= 1: trains a ``ZeroModule`` where DDP would stand               |
| ``_clip_grad_norm`` | stage >= 1: global norm over the gradient shards, then clip             |
| ``_get_grad_norm``  | stage >= 1: the same norm when clipping is off                          |
| ``save_model``      | stage 3: every rank gathers unit by unit; rank 0 streams full weights to HF's files (streamed_save.py); stages 1-2: the Trainer's own save, into a hidden folder swapped in once whole; stages >= 1: rank 0 checks every written tensor against the model |
| ``_save_optimizer_and_scheduler`` | stage >= 1: every rank writes its part of the sharded state (checkpoint.py) |
| ``_save_checkpoint``| stage >= 1: first removes the folder's earlier completion marker (barrier); after every rank's part, rank 0 rewrites ``training_args.bin`` from the user's args (the Trainer wrote it with the limit held at None) and seals the save (run id, step, world size, stage), and only then deletes old ones (``save_total_limit``, hf_zero's own rotation: checkpoint.py [Note: rotation]) |
| ``_issue_warnings_after_load`` | pipeline stages: a resume's unexpected keys leave out the other stages' (trainer/pipeline.py) |
| ``_load_best_model``| stage >= 1: loads into gathered params, then back into shards and masters |
| ``get_total_train_batch_size`` | sequence or tensor parallelism: micro batch * accumulation * the data-parallel ranks (world size / (sp * tp)), so the log's "Total train batch size", its sample count and ``train_samples_per_second`` count each SP or tp group's batch once |
| ``floating_point_ops`` | stage >= 1: transformers' 6 * tokens * non-embedding params, counted in full (param_count.py), so ``total_flos`` is right at stage 3 |
| ``train``           | ``--torch_compile``: a model torch cannot compile fails with hf_zero's ``CompileFailed`` (model, stage, backend, cause), fallbacks torch was told to take are recorded (compile_watch.py); stage >= 1: the log's "Number of trainable parameters" counts full params (param_count.py); draws the run id; ``resume_from_checkpoint=True`` takes the newest one with a valid completion marker; a checkpoint of another model, with a missing file or (unless ``HF_ZERO_FORCE_RESUME=1``) without a valid marker is refused first; on return the host step of optimizer offload is settled |
| ``evaluation_loop`` | ``--torch_compile``: a standalone ``evaluate()`` or ``predict()`` that cannot compile the model fails with the same ``CompileFailed`` as ``train`` (compile_watch.py) |
| ``_load_optimizer_and_scheduler`` | stage >= 1: every rank reads its part of the sharded state, written at any world size and stage |
| ``Seq2SeqTrainer.prediction_step`` | stage 3, W > 1: ``synced_gpus=True`` for generate, as for DeepSpeed ZeRO-3 |
| ``PreTrainedModel.from_pretrained`` | stage 3 with ``zero3_init_flag``: a local safetensors checkpoint loads sharded (hf_zero/init/plugin.py); any other load is transformers' own |
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
import weakref

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer

from hf_zero.activations import TrainerActivations
from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.phases import set_phase
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.engine.options import engine_options
from hf_zero.init import sharded_load
from hf_zero.checkpoint import digests
from hf_zero.config import stage0_saves
from hf_zero.engine.stages import NotAvailableYet
from hf_zero.trainer import checkpoint, compile_watch, config_blocks, earlier_engine, oom_hint
from hf_zero.trainer.generation import sync_generate
from hf_zero.trainer.streamed_save import save_stage3, save_whole
from hf_zero.trainer.verify import verify_saved_adapter, verify_saved_weights
from hf_zero.trainer import session as S
from hf_zero.trainer.loss_scaling import DeepSpeedScaling, sharded_grad_scaler
from hf_zero.trainer.other_sharding import refuse as refuse_other_sharding
from hf_zero.trainer import param_count, parallel_mesh
from hf_zero.trainer import pipeline as PP
from hf_zero.trainer import tensor_parallel as TP
from hf_zero.trainer.seam_check import original_of
from hf_zero.sequence_parallel import training as SP
from hf_zero.sparse_attention import training as sparse_attention

_ORIGINALS: dict[str, object] = {}


def _seam(fn, cls=Trainer):
    """Mark ``fn`` as the wrapper of the ``cls`` method of the same name."""
    _SEAMS[f"{cls.__name__}.{fn.__name__}"] = (cls, fn)
    return fn


_SEAMS: dict[str, tuple[type, object]] = {}


def _original(name: str, cls=Trainer):
    return _ORIGINALS[f"{cls.__name__}.{name}"]


@_seam
def __init__(self, *args, **kwargs):
    config = S.active_config()
    if config is not None:  # DeepSpeed or FSDP asked for beside hf_zero: refused before transformers sets it up
        refuse_other_sharding(kwargs.get("args", args[1] if len(args) > 1 else None), os.environ, config.source)
        # parallelism_config sp_size > 1: hf_zero's sequence parallelism, the Trainer gets no parallelism_config
        sp_size = SP.take_trainer_size(kwargs.get("args", args[1] if len(args) > 1 else None))
    _original("__init__")(self, *args, **kwargs)
    if config is None or S.session_of(self) is not None:
        return
    refuse_other_sharding(self.args, os.environ, config.source, deepspeed_plugin=self.is_deepspeed_enabled,
                          fsdp_plugin=self.is_fsdp_enabled)  # what accelerate actually set up
    from hf_zero.config import resolve_config
    from hf_zero.trainer.phase_callback import PhaseCallback
    from hf_zero.trainer.report import ReportCallback, add_to as add_report

    model_config = getattr(self.model, "config", None)
    resolved = resolve_config(
        config,
        self.args,
        world_size=self.args.world_size,
        hidden_size=getattr(model_config, "hidden_size", None),
        sequence_parallel_size=sp_size,
    )
    config_blocks.check_trainer(self, resolved)  # a block and Trainer(optimizers=...) for the same thing
    session = S.ZeroSession(config=resolved, trainer_ref=weakref.ref(self), loaded=config)
    S.attach(self, session)
    PP.check(self, resolved)  # pipeline.stages > 1 and tensor_parallel.autotp_size > 1: what they cannot run,
    TP.check(self, resolved)  # refused before any process group
    PP.setup(self, resolved)  # pipeline.stages > 1: the (pp, dp, tp) mesh, this stage's layers kept, ...
    TP.setup(self, resolved)  # ... autotp_size > 1: then its planned layers split over tp, before any optimizer
    sparse_attention.setup(self, resolved)  # sparse_attention block: the model's attention by its layout
    if resolved.sequence_parallel_size > 1:  # Ulysses: the SP groups, the model's attention (sequence_parallel/)
        session.sequence_parallel = SP.setup(self, resolved.sequence_parallel_size)
    activations = TrainerActivations(resolved, self.args, self.model)  # refuses what it cannot do, before any step
    if activations.active:
        session.activations = activations
        self.add_callback(activations)  # on_train_begin: CPU checkpointing, tiled MLP and loss put in place
    add_report(self, ReportCallback(session))  # before the report_to integrations: they get its hf_zero/* scalars
    self.add_callback(PhaseCallback())  # what this rank is doing, for the hang watchdog
    from hf_zero.engine.diagnostics import watchdog  # hang reports, every stage: a rank that raises stops the others

    watchdog.configure(resolved.comm_timeout_s)
    watchdog.ensure_running()
    digests.configure(resolved.checkpoint_digest)  # what this rank's checkpoint saves record of their files


@_seam
def create_optimizer(self, model=None):
    session = S.session_of(self)
    if session is not None and session.config.optimizer is not None and self.optimizer is None:
        # Every stage: the block's optimizer on the full params; the engine below rewrites it into pieces.
        self.optimizer = config_blocks.build_optimizer(self, session, self.model if model is None else model)
    optimizer = _original("create_optimizer")(self, model)
    if session is not None and session.config.precision.dtype == "fp16" and self.accelerator.scaler is not None \
            and not isinstance(self.accelerator.scaler, DeepSpeedScaling):
        # Where accelerate scales fp16 losses (not on CPU), every stage: the file's fp16 keys as DeepSpeed
        # reads them, and every rank agrees on overflow (loss_scaling.py). Set before accelerate wraps
        # the optimizer, which captures the scaler it has then.
        self.accelerator.scaler = sharded_grad_scaler(session.config.precision, self.args.device)
    if session is not None and session.stage >= 1 and session.engine is None:
        options = {**engine_options(session.config), **parallel_mesh.engine_group(self)}
        # An earlier Trainer's engine over this model lets go of it ([Note: a second Trainer]).
        earlier = earlier_engine.holding(self.model)
        prebuilt = earlier_engine.take_over(self.model, earlier, options) if earlier is not None else None
        # A model sharded as it loaded, or a wrapper (PEFT) of one: its engine (hf_zero/init).
        prebuilt = prebuilt or sharded_load.engine_for(self.model, options)
        if prebuilt is not None:
            prebuilt.attach_optimizer(self.optimizer)
            session.engine = prebuilt
        else:
            session.engine = ZeroEngine(self.model, self.optimizer, **options)
        earlier_engine.remember(session.engine)
        # accelerate skips no_sync() on one rank, so the engine asks the Trainer's own flag which
        # micro-step ends an accumulation (offloaded grads go to the host only then).
        accelerator = self.accelerator
        session.engine.set_boundary_source(lambda: accelerator.sync_gradients)
        # Offloaded buckets are stepped on the host as their grads land, during backward (host_step.py,
        # [Note: step in backward]); with clipping (max_grad_norm > 0) speculatively, redone when the
        # norm says so ([Note: speculation]). The next forward then waits for each bucket's new params
        # as it needs them; the seams below that read params or optimizer state settle the host step first.
        clipping = bool(self.args.max_grad_norm and self.args.max_grad_norm > 0)
        session.engine.set_step_in_backward(True, overlap_forward=True,
                                            speculation=SpeculationPolicy() if clipping else None)
        if session.engine.strategy.shard_params and self.args.world_size > 1:
            sync_generate(self.model)  # every rank decodes as many steps (and gathers) as the longest
    return optimizer


@_seam
def create_scheduler(self, num_training_steps, optimizer=None):
    session = S.session_of(self)
    if session is not None and session.config.scheduler is not None and self.lr_scheduler is None:
        self.lr_scheduler = config_blocks.build_scheduler(self, session, num_training_steps,
                                                          self.optimizer if optimizer is None else optimizer)
        self._created_lr_scheduler = True  # as the Trainer's own: a later train() builds it afresh
    return _original("create_scheduler")(self, num_training_steps, optimizer)


@_seam
def _wrap_model(self, model, training=True, dataloader=None):
    session = S.session_of(self)
    if session is not None and session.engine is None and training and PP.of(self) is not None:
        return PP.wrap_stage0(self, model)  # stage 0 with pipeline stages (and tp): grads averaged after each step
    if session is not None and session.engine is None and training and TP.of(self) is not None:
        return TP.wrap_stage0(self, model)  # stage 0 under tensor parallelism: DDP over the dp group only
    if session is None or session.engine is None or not training:
        return _original("_wrap_model")(self, model, training, dataloader)
    if isinstance(model, ZeroModule):
        return model
    wrapped = ZeroModule(model, session.engine)
    # Autocast and compilation as accelerate would apply them, without its DDP wrapping.
    return self.accelerator.prepare_model(wrapped, device_placement=False, evaluation_mode=True)


@_seam
def get_train_dataloader(self):
    loader = PP.shard_loader(self, _original("get_train_dataloader")(self))  # pipeline: dealt over dp ranks
    session = S.session_of(self)
    if session is not None and session.sequence_parallel is not None:
        loader = SP.split_loader(loader, session.sequence_parallel)  # one batch per SP group, this rank's slice
    return loader


@_seam
def get_eval_dataloader(self, eval_dataset=None):
    return PP.shard_loader(self, _original("get_eval_dataloader")(self, eval_dataset))  # pipeline: over dp ranks


@_seam
def training_step(self, model, inputs, num_items_in_batch=None):
    session = S.session_of(self)
    if session is not None and PP.of(self) is not None:  # the accumulation's batches through the pipeline
        return PP.training_step(self, session, inputs)
    return _original("training_step")(self, model, inputs, num_items_in_batch)


@_seam
def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    session = S.session_of(self)
    if session is not None and session.sequence_parallel is not None:  # a split batch: the loss over the SP group
        return SP.compute_loss(self, _compute_loss, session.sequence_parallel, model, inputs, return_outputs,
                               num_items_in_batch)
    return _compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
    session = S.session_of(self)
    if session is None or session.activations is None:
        return _original("compute_loss")(self, model, inputs, return_outputs, num_items_in_batch)
    with session.activations.loss_context(self, model, inputs, return_outputs):  # tiled_loss: no full logits
        return _original("compute_loss")(self, model, inputs, return_outputs, num_items_in_batch)


@_seam
def _clip_grad_norm(self, model):
    session = S.session_of(self)
    if session is not None and PP.of(self) is not None:  # every stage: the norm over dp (and tp) and the pipeline
        if session.engine is not None:
            session.engine.finish_grad_sync()
        return PP.clip(self, session.engine, self.args.max_grad_norm)
    if session is not None and TP.of(self) is not None:  # every stage: the norm over dp and tp
        if session.engine is not None:
            session.engine.finish_grad_sync()
        self.accelerator.unscale_gradients()
        return TP.clip(self, session.engine, self.args.max_grad_norm)
    if session is None or session.engine is None:
        return _original("_clip_grad_norm")(self, model)
    session.engine.finish_grad_sync()  # the optimizer's pieces see their gradients ...
    self.accelerator.unscale_gradients()  # ... so an fp16 run's scaler can unscale them
    return session.engine.clip_grad_norm_(self.args.max_grad_norm)


@_seam
def _get_grad_norm(self, model, grad_norm=None):
    session = S.session_of(self)
    if session is not None and PP.of(self) is not None and grad_norm is None:
        grad_norm = PP.grad_norm(self, session.engine)
    if session is not None and TP.of(self) is not None and grad_norm is None:
        self.accelerator.unscale_gradients()
        grad_norm = TP.grad_norm(self, session.engine)
    if session is not None and session.engine is not None and grad_norm is None:
        session.engine.finish_grad_sync()
        self.accelerator.unscale_gradients()
        grad_norm = session.engine.grad_norm()
    return _original("_get_grad_norm")(self, model, grad_norm)


@_seam
def save_model(self, output_dir=None, _internal_call=False):
    session = S.session_of(self)
    if TP.of(self) is not None or PP.of(self) is not None:  # every stage: full weights gathered to rank 0
        save = PP.save_model if PP.of(self) is not None else TP.save_model
        save(self, session.engine, output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        return
    if session is None or session.engine is None:
        return _original("save_model")(self, output_dir, _internal_call)
    session.engine.settle()  # [Note: step in backward]: the last step's params are all in place
    output_dir = output_dir if output_dir is not None else self.args.output_dir
    if not session.engine.strategy.shard_params:  # stages 1-2: full params on every rank, the Trainer's own save, swapped in
        save_whole(self, output_dir, every_rank=False)
        state_dict = self.model.state_dict() if self.args.should_save else None
    else:  # stage 3: streamed unit by unit, or gathered where it cannot be (a collective: every rank calls)
        state_dict = save_stage3(self, session.engine, output_dir)
    if self.args.should_save:
        if _is_peft(self.model):
            verify_saved_adapter(output_dir, self.model, state_dict)
        else:
            verify_saved_weights(output_dir, state_dict)
    if self.args.push_to_hub and not _internal_call:
        self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


@_seam
def _load_best_model(self):
    session = S.session_of(self)
    if session is None or session.engine is None:
        return _original("_load_best_model")(self)
    # Every rank loads the best checkpoint's full weights into the gathered params; rank 0's values
    # then go back into every rank's shards and fp32 master shards.
    with torch.no_grad(), session.engine.gathered(modifier_rank=0):
        _original("_load_best_model")(self)


@_seam
def _issue_warnings_after_load(self, load_result):
    # pipeline stages: a resume loads the whole model's weights into each stage, the others' keys are expected
    return _original("_issue_warnings_after_load")(self, PP.load_result(self, load_result))


@_seam
def _save_optimizer_and_scheduler(self, output_dir):
    session = S.session_of(self)
    if session is None or session.engine is None:
        return _original("_save_optimizer_and_scheduler")(self, output_dir)
    set_phase(f"checkpoint save {os.path.basename(output_dir)}: sharded optimizer state, then RNG and trainer state")
    # every rank its own shard (settled: _save_checkpoint), its manifest naming this run and step
    checkpoint.save(session.engine, output_dir, run_id=session.run_id, step=self.state.global_step)
    if self.args.should_save:
        torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, checkpoint.SCHEDULER_NAME))


def _refuse_stage0_checkpoint(trainer, what: str) -> None:
    """Tensor parallelism or pipeline stages at ZeRO stage 0, or the two together at any stage: checkpoints not
    built yet (config/stage0_saves.py)."""
    session = S.session_of(trainer)
    message = None if session is None else stage0_saves.checkpoint_refusal(session.config, what)
    if message is not None:
        raise NotAvailableYet(message)


@_seam
def _save_checkpoint(self, model, trial):
    session = S.session_of(self)
    _refuse_stage0_checkpoint(self, "a checkpoint save")
    if session is None or session.engine is None:
        return _original("_save_checkpoint")(self, model, trial)
    # [Note: rotation] (checkpoint.py): no rotation of the Trainer's, wherever it happens in its
    # save, deletes anything before the new checkpoint is sealed; hf_zero rotates after that.
    session.engine.settle()
    set_phase(f"checkpoint save checkpoint-{self.state.global_step}")  # [Note: phases]
    run_dir = self._get_output_dir(trial=trial)
    folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
    if self.args.should_save:  # [Note: completion marker]: an earlier save's marker goes first
        checkpoint.invalidate(folder)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank writes before the marker is gone
    if session.run_id is None:  # a save outside train()
        session.run_id = digests.draw_run_id()
    limit = self.args.save_total_limit
    self.args.save_total_limit = None
    try:
        _original("_save_checkpoint")(self, model, trial)
    finally:
        self.args.save_total_limit = limit
    set_phase(f"checkpoint save checkpoint-{self.state.global_step}: barrier (every rank's part written)")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has written its part
    if self.args.should_save:
        checkpoint.record_training_args(folder, self.args)  # written above with save_total_limit None
        checkpoint.mark_complete(folder, run_id=session.run_id, global_step=self.state.global_step,
                                 world_size=self.args.world_size, stage=session.stage)
        # [Note: rotation]: old checkpoints go only now, by hf_zero (the Trainer's limit was None above)
        checkpoint.rotate(run_dir, limit, current=folder, best=self.state.best_model_checkpoint)


@_seam
def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
    session = S.session_of(self)
    if resume_from_checkpoint:
        _refuse_stage0_checkpoint(self, "resume_from_checkpoint")
    if session is not None and session.stage >= 1 and resume_from_checkpoint is True:
        resume_from_checkpoint = checkpoint.newest_complete(self.args.output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint=True: no complete hf_zero checkpoint (checkpoint-N with a valid "
                f"{checkpoint.COMPLETE_NAME}) in {self.args.output_dir}"
            )
    if session is not None and session.stage >= 1 and isinstance(resume_from_checkpoint, str):
        # Refuse a checkpoint of another model, or with a missing or cut-short file, or whose save
        # was not sealed ([Note: completion marker]), before any work.
        checkpoint.check(resume_from_checkpoint, checkpoint.trainable_shapes(self.model, session.engine,
                                                                             pipeline=PP.of(self) is not None))
        checkpoint.require_complete(resume_from_checkpoint)
    if session is not None and session.stage >= 1:
        session.run_id = digests.draw_run_id()  # every rank calls train(): one id for this run
    counts = param_count.counting(session) if session is not None and session.stage >= 1 else nullcontext()
    try:
        # counts: the log's "Number of trainable parameters" counts full params (param_count.py); watching:
        # --torch_compile's failure said clearly, or its eager fallbacks recorded (compile_watch.py)
        with counts, compile_watch.watching(self, session):
            return _original("train")(self, resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                      ignore_keys_for_eval=ignore_keys_for_eval)
    except torch.OutOfMemoryError:
        if session is not None:
            oom_hint.say(session, self.args)  # which settings hold what on the device ([Note: out-of-memory hint])
        raise
    finally:
        if session is not None and session.engine is not None:
            session.engine.settle()  # the params are the trained ones when train() returns


@_seam
def get_total_train_batch_size(self, args):
    session = S.session_of(self)
    if session is None or session.model_parallel_size == 1:
        return _original("get_total_train_batch_size")(self, args)
    # transformers divides the world by the sp/tp sizes it set up itself, and hf_zero's are none of them
    return self._train_batch_size * args.gradient_accumulation_steps * (args.world_size // session.model_parallel_size)


@_seam
def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
    # --torch_compile: a standalone evaluate() or predict() compiles the model at its first forward here
    # (compile_watch.py; inside train() the train seam's watch is the one that answers)
    with compile_watch.watching(self, S.session_of(self)):
        return _original("evaluation_loop")(self, dataloader, description, prediction_loss_only, ignore_keys,
                                            metric_key_prefix)


@_seam
def floating_point_ops(self, inputs):
    session = S.session_of(self)
    main_input = getattr(self.model, "main_input_name", "input_ids")
    if session is None or session.engine is None or main_input not in inputs or not hasattr(self.model,
                                                                                          "num_parameters"):
        return _original("floating_point_ops")(self, inputs)
    # transformers' 6 * tokens * non-embedding params, with full counts (stage 3 params are placeholders)
    return 6 * inputs[main_input].numel() * param_count.num_parameters(self.model, session.engine,
                                                                        exclude_embeddings=True)


@_seam
def _load_optimizer_and_scheduler(self, checkpoint):  # transformers' name: callers may pass it by keyword
    return _load_sharded_state(self, checkpoint)


def _load_sharded_state(self, checkpoint_dir):
    session = S.session_of(self)
    if session is None or session.engine is None or checkpoint_dir is None:
        return _original("_load_optimizer_and_scheduler")(self, checkpoint_dir)
    session.engine.settle()
    checkpoint.load(session.engine, checkpoint_dir)
    scheduler = os.path.join(checkpoint_dir, checkpoint.SCHEDULER_NAME)
    if os.path.isfile(scheduler):
        self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))


@_seam
def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
    if PP.of(self) is not None:  # the loss through the pipeline stages
        return PP.prediction_step(self, inputs, prediction_loss_only)
    return _original("prediction_step")(self, model, inputs, prediction_loss_only, ignore_keys)


def _seq2seq_prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
    session = S.session_of(self)
    if session is not None and session.engine is not None and session.engine.strategy.shard_params and self.args.world_size > 1:
        # Every rank must run the same number of decoding steps, or their gathers fall out of step.
        if not gen_kwargs and hasattr(self, "_gen_kwargs"):
            gen_kwargs = self._gen_kwargs.copy()  # what prediction_step itself would use
        gen_kwargs.setdefault("synced_gpus", True)
    return _original("prediction_step", Seq2SeqTrainer)(
        self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
    )


_seq2seq_prediction_step.__name__ = "prediction_step"
_seam(_seq2seq_prediction_step, Seq2SeqTrainer)


def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
    # zero3_init_flag: a local safetensors checkpoint loads sharded (hf_zero/init/plugin.py), else as ever.
    from hf_zero.init.plugin import sharded_or_none

    model = sharded_or_none(cls, pretrained_model_name_or_path, model_args, kwargs)
    if model is not None:
        return model
    return _original("from_pretrained", PreTrainedModel).__func__(cls, pretrained_model_name_or_path,
                                                                  *model_args, **kwargs)


_seam(from_pretrained, PreTrainedModel)


def _is_peft(model) -> bool:
    # PEFT saves adapter weights under its own names (verify_saved_adapter maps them).
    return type(model).__module__.startswith("peft.")


def install() -> None:
    """Wrap the methods above; idempotent."""
    # Every method found first (along the MRO: a mixin's too), so a missing one installs nothing.
    found = {key: original_of(cls, wrapper) for key, (cls, wrapper) in _SEAMS.items() if key not in _ORIGINALS}
    for key, original in found.items():
        cls, wrapper = _SEAMS[key]
        _ORIGINALS[key] = original
        if isinstance(original, classmethod):  # from_pretrained
            setattr(cls, wrapper.__name__, classmethod(functools.wraps(original.__func__)(wrapper)))
        else:
            setattr(cls, wrapper.__name__, functools.wraps(original)(wrapper))


def uninstall() -> None:
    """Put the original methods back."""
    for key, original in _ORIGINALS.items():
        cls, wrapper = _SEAMS[key]
        setattr(cls, wrapper.__name__, original)
    _ORIGINALS.clear()
