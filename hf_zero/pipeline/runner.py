"""``PipelineRunner``: one rank's pieces driven by a torch.distributed.pipelining schedule.

The schedules are torch's (``Schedule1F1B``, ``ScheduleInterleaved1F1B``, ``ScheduleGPipe``): hf_zero
adds only what a Trainer step needs around them.

- The loss is the model's own (``model.loss_function``: the causal-LM cross entropy over shifted
  labels) summed over tokens and divided by ``tokens``, the real (label != -100) tokens of the whole
  step on every data-parallel rank, times ``dp``: each micro-batch's backward then adds its share of
  the one-process gradient, and the data-parallel mean (ZeRO's reduce-scatter, or the stage-0
  all-reduce) makes it exact. So the schedule must not scale gradients again (``scale_grads=False``).
- A stage's recv buffers are shaped on its first step, so each input shape (sequence length,
  micro-batch size, micro-batch count) gets its own stages and schedule, built on first use and kept
  (a few: batches padded to one length reuse one).
- Every rank of a pipeline calls ``step`` with the same batch: stage 0 uses ``input_ids``, the last
  stage the labels, every stage the ``attention_mask`` (a keyword, split into micro-batches alike).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleLoopedBFS)

_KEEP = 8  # schedules kept per runner (one per input shape)


class PipelineRunner:
    """This rank's pieces (``StagePiece``), their indices among ``num_pieces``, and the pipeline group."""

    def __init__(self, pieces, indices: list[int], num_pieces: int, group, device: torch.device, schedule: str,
                 loss_function, vocab_size: int) -> None:
        self.pieces, self.indices, self.num_pieces = pieces, indices, num_pieces
        self.group, self.device, self.schedule_name = group, device, schedule
        self.loss_function, self.vocab_size = loss_function, vocab_size
        self.stages = dist.get_world_size(group)
        self.stage_rank = dist.get_rank(group)
        self.first = 0 in indices
        self.last = num_pieces - 1 in indices
        self._schedules: dict[tuple, object] = {}
        # input_ids elements (padding included) of the training batches this rank's first piece took: the run
        # report's tokens (the model's forward, where the report counts them otherwise, never runs; later stages
        # take hidden states and count none, so each pipeline's batch counts once)
        self.trained_tokens = 0
        self._tokens: torch.Tensor | float = 1.0
        self._factor = 1.0

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(logits, labels, self.vocab_size, num_items_in_batch=self._tokens) * self._factor

    def _eval_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(logits, labels, self.vocab_size)  # the mean over real tokens

    def _schedule(self, key: tuple, micro_batches: int, train: bool):
        schedule = self._schedules.get(key)
        if schedule is not None:
            return schedule
        if len(self._schedules) >= _KEEP:
            self._schedules.clear()
        stages = [PipelineStage(piece, index, self.num_pieces, self.device, group=self.group)
                  for piece, index in zip(self.pieces, self.indices)]
        loss = self._loss if train else self._eval_loss
        if len(stages) > 1:
            kind = ScheduleInterleaved1F1B if train else ScheduleLoopedBFS
            schedule = kind(stages, micro_batches, loss_fn=loss, scale_grads=False)
        else:
            kind = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[self.schedule_name] if train else ScheduleGPipe
            if micro_batches < self.stages:  # an epoch's shorter last accumulation: 1F1B needs one per stage
                kind = ScheduleGPipe
            schedule = kind(stages[0], micro_batches, loss_fn=loss, scale_grads=False)
        self._schedules[key] = schedule
        return schedule

    def _run(self, schedule, batch: dict, train: bool) -> torch.Tensor:
        """One schedule step (or eval) over ``batch``; the summed micro-batch losses on every stage."""
        args = (batch["input_ids"],) if self.first else ()
        kwargs = {"attention_mask": batch["attention_mask"]} if batch.get("attention_mask") is not None else {}
        losses: list[torch.Tensor] = []
        target = batch["labels"] if self.last else None
        run = schedule.step if train else schedule.eval
        run(*args, target=target, losses=losses if self.last else None, return_outputs=False, **kwargs)
        total = torch.stack([x.detach().float() for x in losses]).sum() if self.last else \
            torch.zeros((), device=self.device)
        if self.stages > 1:
            dist.broadcast(total, group_src=self.stages - 1, group=self.group)
        return total

    def train_step(self, batch: dict, micro_batches: int, *, tokens, dp: int) -> torch.Tensor:
        """Forward and backward of ``batch`` split into ``micro_batches``; gradients accumulate in the
        pieces' params. ``tokens``: the real tokens of the whole optimizer step over every dp rank.
        Returns this rank's share of the step's loss (sum of token losses / tokens * dp)."""
        self._tokens, self._factor = tokens, float(dp)
        if self.first:
            self.trained_tokens += batch["input_ids"].numel()
        key = ("train", tuple(batch["input_ids"].shape), batch.get("attention_mask") is not None, micro_batches)
        return self._run(self._schedule(key, micro_batches, train=True), batch, train=True)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The model's loss on ``batch`` (mean over its real tokens), forward only, on every stage."""
        key = ("eval", tuple(batch["input_ids"].shape), batch.get("attention_mask") is not None, 1)
        return self._run(self._schedule(key, 1, train=False), batch, train=False)
