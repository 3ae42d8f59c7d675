"""The run report's measurements, taken at the Trainer's callback events (the file: report_file.py).

Figures are measured, never derived from a formula: bytes are summed over the tensors each rank
holds at the optimizer step (params, gradients, optimizer state incl. fp32 master shards), peak
memory is CUDA's allocator peak on GPU and the process's peak RSS on CPU, tokens are counted at
the model's forward (under pipeline stages, by the pipeline: [Note: pipeline tokens]), collectives
are counted as the engine issues them.

[Note: when the report is written]
``ReportCallback`` sits right after the Trainer's ``DefaultFlowCallback`` (``add_to``), before the
``report_to`` integrations and the user's callbacks:

- ``on_step_end`` / ``on_epoch_end`` where the Trainer is about to log (``control.should_log``, just
  set by ``DefaultFlowCallback``): every rank's figures are gathered, one ``all_gather_object``.
  Every rank passes these points together; the Trainer's gather of the logged loss follows.
- ``on_log`` of a training log (one with ``loss``): this rank's figures go into the ``logs`` dict
  as ``hf_zero/*`` scalars, so every integration (TensorBoard, W&B, ...) receives them (and the
  Trainer's ``log_history`` entry of that log), and rank 0 rewrites the report with every rank's figures
  ([Note: report rewrites]). No collective here: a script may call ``trainer.log`` on one rank.
- ``on_train_end``: a last gather; rank 0 writes the finished report with its summary in human
  units and prints that summary; the end-of-run figures are logged once more.

[Note: report rewrites]
Rank 0 rewrites the file at the first training log and then at a log once ``REWRITE_EVERY_S``
seconds have passed since the last rewrite, and always at the end. With ``--logging_steps 1`` a
rewrite at every log put a JSON dump and a rename (more on a network file system) between the
Trainer's sync on the logged loss and the next forward's first kernel, every step: GPU idle time
(issue 21's profile). A run that dies leaves a report at most ``REWRITE_EVERY_S`` old (its ``step``
says which); every log still carries the figures as ``hf_zero/*`` scalars. Other ranks that read
the file after ``train()`` must wait for rank 0 (a barrier): the finished report is written at
rank 0's ``on_train_end``.

[Note: bytes measured]
Bytes are summed at ``on_pre_optimizer_step`` (gradients are held then), but not at every step:
at the first two steps (the optimizer state appears at the first), the last step, and otherwise
once ``MEASURE_EVERY_S`` seconds have passed since the last measurement. Walking every tensor of
the engine (hundreds of params and their optimizer state) cost milliseconds of host time a step,
between the GPU's kernels at the optimizer step (issue 21's profile, logging every step), and
the bytes of a run do not change from step to step once its first steps are done. A log carries
the bytes of the last measured step.

[Note: pipeline tokens]
Tokens are counted by a forward pre-hook on the model, which a run under pipeline stages never calls:
its schedule runs the stage pieces (hf_zero/pipeline), and torch's schedule also runs the first
piece once more on the first micro-batch when it infers shapes, so a hook on a piece would count
that too. There the pipeline's runner counts the ``input_ids`` of each training batch it takes, on
the first stage's ranks only (later stages take hidden states): each pipeline's batch counts once,
and ``tokens_per_s_total`` is the job's throughput, as without stages.

[Note: tensor-parallel tokens]
Every rank of a tensor-parallel group runs the same batch (hf_zero/tensor_parallel), so only tp rank 0
of each group counts it (with pipeline stages too: the first stage's tp rank 0): each batch counts once
in ``tokens_per_s_total``; the other tp ranks report 0 tokens.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from transformers import DefaultFlowCallback, TrainerCallback

from hf_zero.trainer import parallel_mesh
from hf_zero.trainer import pipeline as PP
from hf_zero.trainer import report_file
from hf_zero.trainer.device_memory import CUDA, MemorySource, device_facts, peak_memory
from hf_zero.trainer.report_file import BYTE_KEYS, REPORT_NAME

__all__ = ["REPORT_NAME", "ReportCallback", "add_to"]
_LOGGED = ("loss", "grad_norm", "learning_rate", "epoch")  # of a training log, kept as the report's last_log
MEASURE_EVERY_S = 5.0  # [Note: bytes measured]
REWRITE_EVERY_S = 10.0  # [Note: report rewrites]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _held_without_engine(model, optimizer) -> dict[str, int]:
    """Stage 0 (the Trainer's DDP): everything is replicated, measured the same way."""
    params = sum(_nbytes(p) for p in model.parameters())
    grads = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = 0
    if optimizer is not None:
        state = sum(_nbytes(v) for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "grads": grads, "peak_grads": grads, "optimizer_state": state, "host_offload": 0,
            "nvme_offload": 0}


def _offload_auto(engine) -> dict | None:
    """The ratio "auto" chose and the device memory it left ([Note: auto ratio]), or None."""
    choice = engine.auto_ratio if engine is not None else None
    if choice is None:
        return None
    return {"ratio": choice.ratio, "headroom_bytes": choice.headroom_bytes, "moved_bytes": choice.moved_bytes,
            "left_bytes": choice.left_bytes, "margin_bytes": choice.margin_bytes}


def _device_leg(engine) -> dict | None:
    """The device leg's share and counters ([Note: device leg]), or None without one."""
    leg = engine.device_leg if engine is not None else None
    if leg is None:
        return None
    return leg.summary()


def _compile_seconds() -> float:
    """Seconds this process has spent compiling (``--torch_compile``): dynamo's tracing and the
    backend's compile of forward and backward graphs, as torch itself totals them; 0 when eager."""
    from torch._dynamo.utils import calculate_time_spent

    return calculate_time_spent().get("total_wall_time", 0.0)


def _gather(mine: dict) -> list[dict]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        return ranks
    return [mine]


def add_to(trainer, callback: "ReportCallback") -> None:
    """Put ``callback`` right after the Trainer's ``DefaultFlowCallback`` ([Note: when the report is
    written]); first if a script removed that one."""
    callbacks = trainer.callback_handler.callbacks
    flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    callbacks.insert(flow[0] + 1 if flow else 0, callback)


class ReportCallback(TrainerCallback):
    def __init__(self, session, memory: MemorySource = CUDA) -> None:
        self.session = session
        self.memory = memory  # where a CUDA device's readings come from (device_memory.py)
        self._hook = None
        self._tokens = 0  # counted by the forward hook
        self._pipeline = None  # under pipeline stages: (its runner, the runner's count at train begin)
        self._counts = True  # False on tp ranks other than 0: [Note: tensor-parallel tokens]
        self._steps = 0
        self._start = 0.0
        self._held: dict[str, int] = dict.fromkeys(BYTE_KEYS, 0)
        self._measured = -float("inf")  # time.monotonic() of the last bytes measured
        self._rewritten = -float("inf")  # time.monotonic() of the last rewrite of the report during training
        self._collectives: dict[str, int] = {}
        self._facts: dict | None = None
        self._ranks: list[dict] = []  # every rank's figures, as last gathered
        self._window = (0.0, 0)  # (time, all ranks' tokens) of the gather before the last one
        self._rate: float | None = None  # all ranks' tokens/s between the last two gathers
        self._last_log: dict = {}
        self._training = False

    def _count_tokens(self, module, args, kwargs):
        if module.training:
            ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
            if ids is not None:
                self._tokens += ids.numel()

    def _seen(self) -> int:
        """``input_ids`` elements of this rank's training forwards since training began."""
        if not self._counts:
            return 0
        if self._pipeline is not None:
            runner, start = self._pipeline
            return runner.trained_tokens - start
        return self._tokens

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start

    def _mine(self, args) -> dict:
        elapsed, tokens = self._elapsed(), self._seen()
        speculation = self.session.engine.speculation if self.session.engine is not None else None
        return {
            "rank": args.process_index,
            **device_facts(args.device, self.memory),
            "bytes": dict(self._held),
            "peak_memory": peak_memory(args.device, self.memory),
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "steps": self._steps,
            "collectives_per_step": (
                {k: v / self._steps for k, v in sorted(self._collectives.items())}
                if self.session.engine is not None and self._steps
                else None  # stage 0: DDP's own all-reduces, not counted by hf_zero
            ),
            # [Note: speculation]: steps whose host step ran before the norm and was redone (None: none ran so)
            "host_steps_redone": speculation.redone_steps if speculation is not None else None,
            # [Note: auto ratio]: what offload_optimizer.ratio "auto" chose (None: no "auto", or not chosen yet)
            "offload_auto": _offload_auto(self.session.engine),
            # [Note: device leg]: offload_optimizer.device_share, and what the device stepped so far
            "device_leg": _device_leg(self.session.engine),
            "compile_seconds": _compile_seconds(),
            "compile_fallbacks": list(self.session.compile_fallbacks),  # [Note: compile failures]
        }

    def _gather_all(self, args) -> None:
        self._ranks = _gather(self._mine(args))
        now, tokens = self._elapsed(), sum(r["tokens"] for r in self._ranks)
        then, before = self._window
        self._rate = (tokens - before) / (now - then) if now > then else None
        self._window = (now, tokens)

    def _document(self, args, state, status: str) -> dict:
        mine = self._mine(args)
        ranks = [mine if r["rank"] == mine["rank"] else r for r in self._ranks] or [mine]
        return report_file.document(self._facts, ranks, status=status, step=state.global_step,
                                    train_seconds=self._elapsed(), last_log=self._last_log)

    def _scalars(self, args) -> dict[str, float]:
        """This rank's figures as the ``hf_zero/*`` scalars of a log."""
        flat = {f"hf_zero/{k}_bytes": v for k, v in self._held.items()}
        flat["hf_zero/peak_memory_bytes"] = peak_memory(args.device, self.memory)["bytes"]
        if self._rate is not None:
            flat["hf_zero/tokens_per_s"] = self._rate
        auto = _offload_auto(self.session.engine)
        if auto is not None:
            flat["hf_zero/offload_ratio"] = auto["ratio"]
        return flat

    # ---- events ---------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Run eagerly under --torch_compile: traced, its count would be a guarded constant, recompiled every step.
        pipeline = PP.of(self.session.trainer) if self.session.trainer is not None else None
        mesh = parallel_mesh.of(self.session.trainer) if self.session.trainer is not None else None
        self._counts = mesh is None or mesh.tp_rank == 0  # [Note: tensor-parallel tokens]
        if pipeline is not None:  # [Note: pipeline tokens]
            self._pipeline = (pipeline.runner, pipeline.runner.trained_tokens)
        else:
            count = torch.compiler.disable(self._count_tokens, reason="hf_zero run report: counts tokens")
            self._hook = model.register_forward_pre_hook(count, with_kwargs=True)
        engine = self.session.engine
        if engine is not None:
            engine.ctx.take_counts()
        self._facts = report_file.run_facts(self.session, args)
        self._rewritten = -float("inf")  # a new train(): its first log rewrites the report
        self._start = time.perf_counter()
        self._training = True

    def on_step_begin(self, args, state, control, **kwargs):
        if self.session.engine is not None:
            self.session.engine.reset_peak()  # peak_grads: the peak of the last step

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step, now = state.global_step + 1, time.monotonic()  # the Trainer counts the step after the optimizer's
        if 2 < step < state.max_steps and now - self._measured < MEASURE_EVERY_S:
            return  # [Note: bytes measured]
        self._measured = now
        engine = self.session.engine
        if engine is not None:
            engine.finish_grad_sync()
            self._held = engine.held_bytes()
        else:
            self._held = _held_without_engine(model, optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        engine = self.session.engine
        if engine is not None:
            for kind, n in engine.ctx.take_counts().items():
                self._collectives[kind] = self._collectives.get(kind, 0) + n
        if control.should_log:
            self._gather_all(args)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log:
            self._gather_all(args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._training or logs is None or "loss" not in logs:
            return
        scalars = self._scalars(args)
        logs.update(scalars)
        history = state.log_history  # the Trainer appended a copy of this log just before on_log
        if history and history[-1].get("step") == state.global_step and history[-1].get("loss") == logs["loss"]:
            history[-1].update(scalars)
        self._last_log = {k: logs[k] for k in _LOGGED if k in logs}
        now = time.monotonic()
        if args.process_index == 0 and now - self._rewritten >= REWRITE_EVERY_S:  # [Note: report rewrites]
            self._rewritten = now
            report_file.write(args.output_dir, self._document(args, state, "training"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
        self._training = False
        self._gather_all(args)
        doc = self._document(args, state, "finished")
        self.session.figures = doc
        if args.process_index == 0:
            path = report_file.write(args.output_dir, doc)
            report_file.print_summary(doc, path or f"not written to {args.output_dir}")
        trainer = self.session.trainer
        if trainer is not None:
            flat = self._scalars(args)
            flat.pop("hf_zero/tokens_per_s", None)
            flat["hf_zero/train_tokens_per_s"] = doc["tokens_per_s_total"]
            trainer.log(flat)
