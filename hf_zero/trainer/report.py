"""The run report: ``OUTPUT_DIR/hf_zero_report.json`` at the end of every run under the plugin.

Figures are measured, never derived from a formula: bytes are summed over the tensors each rank
holds at the optimizer step (params, gradients, optimizer state incl. fp32 master shards), peak
memory is CUDA's allocator peak on GPU and the process's peak RSS on CPU, tokens are counted at
the model's forward, collectives are counted as the engine issues them. Rank 0 writes the file
with every rank's figures; the same figures of rank 0 also go into the Trainer's log history.
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

REPORT_NAME = "hf_zero_report.json"


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


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    return {"kind": "host_peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class ReportCallback(TrainerCallback):
    def __init__(self, session) -> None:
        self.session = session
        self._hook = None
        self._tokens = 0
        self._steps = 0
        self._start = 0.0
        self._held: dict[str, int] = {}
        self._collectives: dict[str, int] = {}

    def _count_tokens(self, module, args, kwargs):
        if module.training:
            ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
            if ids is not None:
                self._tokens += ids.numel()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        engine = self.session.engine
        if engine is not None:
            engine.ctx.take_counts()
        self._start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.session.engine is not None:
            self.session.engine.reset_peak()  # peak_grads: the peak of the last step

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
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

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
        elapsed = time.perf_counter() - self._start
        cfg = self.session.config
        mine = {
            "rank": args.process_index,
            "bytes": self._held,
            "peak_memory": _peak_memory(args.device),
            "tokens": self._tokens,
            "tokens_per_s": self._tokens / elapsed if elapsed > 0 else None,
            "steps": self._steps,
            "collectives_per_step": (
                {k: v / self._steps for k, v in sorted(self._collectives.items())}
                if self.session.engine is not None and self._steps
                else None  # stage 0: DDP's own all-reduces, not counted by hf_zero
            ),
        }
        ranks = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        report = {
            "stage": cfg.zero.stage,
            "world_size": args.world_size,
            "precision": cfg.precision.dtype,
            "train_seconds": elapsed,
            "tokens_per_s_total": sum(r["tokens"] for r in ranks) / elapsed if elapsed > 0 else None,
            "ranks": ranks,
        }
        self.session.figures = report
        if args.process_index == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, REPORT_NAME), "w") as f:
                json.dump(report, f, indent=2)
        trainer = self.session.trainer
        if trainer is not None:
            flat = {f"hf_zero/{k}_bytes": v for k, v in self._held.items()}
            flat["hf_zero/tokens_per_s"] = report["tokens_per_s_total"]
            flat["hf_zero/peak_memory_bytes"] = mine["peak_memory"]["bytes"]
            trainer.log(flat)
