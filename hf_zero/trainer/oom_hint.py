"""What an out-of-memory error in training can be answered with: the settings of this run that keep
bytes on the accelerator, each with its value and what changing it would move.

[Note: out-of-memory hint] torch's message says how much was asked for and how much was free; it
cannot say which of the run's settings put what on the device. When ``train()`` ends in
``torch.OutOfMemoryError``, each rank that raised it logs one block before the error goes on
unchanged (the same exception, never swallowed or wrapped):

- the device's memory at that moment (allocated, reserved, total) and what the engine holds on it
  (params, grads, optimizer state: the run report's ``held_bytes``);
- each setting of this run that keeps something on the device and the value that would move it,
  only those that apply (a stage-3 run is not told to use stage 3): the ZeRO stage, optimizer and
  parameter offload, ``ratio`` and ``device_share``, gradient checkpointing, checkpoint offload and
  ``device_checkpoints`` (with how many checkpoints the device held when it ran out), tiled MLP and
  loss, the micro batch.

The block is best effort: if gathering a figure fails, that figure is left out, and the original
error is what the caller sees either way. It is for a person reading the log, not for tools.
"""

from __future__ import annotations

import logging

import torch

from hf_zero.byte_units import fmt_bytes

logger = logging.getLogger(__name__)


def lines(config, args, engine, activations) -> list[str]:
    """The hint's lines for a run with this resolved ``config``, ``TrainingArguments`` ``args``, its
    ``engine`` (None at stage 0) and its ``TrainerActivations`` (None without them)."""
    out = []
    device = args.device
    if device.type == "cuda":
        try:
            total = torch.cuda.get_device_properties(device).total_memory
            out.append(f"device memory: {fmt_bytes(torch.cuda.memory_allocated(device))} allocated, "
                       f"{fmt_bytes(torch.cuda.memory_reserved(device))} reserved by torch, of {fmt_bytes(total)}")
        except Exception:  # a broken context after the error: leave the figure out
            pass
    held = None
    if engine is not None:
        try:
            held = engine.held_bytes()
            out.append(f"hf_zero holds on the device: params {fmt_bytes(held['params'])}, grads "
                       f"{fmt_bytes(held['grads'])}, optimizer state and fp32 masters {fmt_bytes(held['optimizer_state'])}")
        except Exception:
            held = None
    out.append("settings that move some of it:")
    zero = config.zero
    if zero.stage < 3:
        what = f" ({fmt_bytes(held['params'])} here)" if held else ""
        out.append(f"  zero_optimization.stage = {zero.stage}: stage 3 also shards the parameters{what}")
    opt = zero.offload_optimizer
    if opt.device == "none":
        what = f" ({fmt_bytes(held['optimizer_state'])} here)" if held else ""
        out.append(f'  zero_optimization.offload_optimizer.device = "none": "cpu" moves the optimizer state and '
                   f"fp32 masters{what} to host memory")
    else:
        if isinstance(opt.ratio, float) and opt.ratio < 1.0:
            out.append(f"  zero_optimization.offload_optimizer.ratio = {opt.ratio}: {1 - opt.ratio:.0%} of the optimizer "
                       "state stays on the device; 1.0 offloads all of it")
        if opt.device_share:
            out.append(f"  zero_optimization.offload_optimizer.device_share = {opt.device_share!r}: two chunks of the "
                       "host step in flight on the device while it steps; 0 keeps the step on the CPU")
    if zero.stage == 3 and zero.offload_param.device == "none":
        out.append('  zero_optimization.offload_param.device = "none": "cpu" keeps the parameter shards in host '
                   "memory (with optimizer offload)")
    checkpointing = config.activation_checkpointing
    if not args.gradient_checkpointing:
        out.append("  --gradient_checkpointing (off): each layer keeps only its input for backward")
    elif not checkpointing.cpu_checkpointing:
        out.append("  activation_checkpointing.cpu_checkpointing = false: true moves each layer's saved input to "
                   "host memory")
    elif checkpointing.device_checkpoints:
        offload = getattr(activations, "offload", None)
        now = f" ({offload.held_now} held when it ran out)" if offload is not None else ""
        out.append(f"  activation_checkpointing.device_checkpoints = {checkpointing.device_checkpoints}{now}: "
                   "fewer keeps fewer checkpoints on the device, the rest go to host memory")
    if config.tiled_mlp is None:
        out.append("  tiled_mlp (not set): computes each MLP in sequence tiles (long sequences)")
    if config.tiled_loss is None:
        out.append("  tiled_loss (not set): computes the loss without the full logits (long sequences, large vocabularies)")
    out.append(f"  --per_device_train_batch_size = {args.per_device_train_batch_size}: fewer rows per step, with "
               "--gradient_accumulation_steps raised to keep the batch")
    return out


def say(session, args) -> None:
    """Log the hint of [Note: out-of-memory hint] for ``session``'s run; never raises."""
    try:
        text = "\n".join(lines(session.config, args, session.engine, session.activations))
    except Exception as error:  # the hint must not hide the error it is about
        logger.debug("hf_zero: no out-of-memory hint (%s)", error)
        return
    logger.error("hf_zero: out of memory during training ([Note: out-of-memory hint] in "
                 "hf_zero/trainer/oom_hint.py).\n%s", text)
