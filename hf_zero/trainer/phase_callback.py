"""``PhaseCallback``: names what this rank is doing at each point of the Trainer's loop, for the
hang watchdog ([Note: phases] in ``hf_zero/engine/phases.py``).

The Trainer's callback events are the points every rank passes in the same order; each sets a
phase whose label says where the rank is until the next event. The labels between two events
name the work and the Trainer's own collectives in between, so that a report reads as "rank 1
has been in <where it stalled> while rank 0 has been in <where it waits>":

    on_step_begin          "step 3: forward and backward"
    on_substep_end         "step 3: forward and backward (micro-batch 1 done)"
    on_pre_optimizer_step  "step 3: optimizer step"
    on_optimizer_step      "step 3: after the optimizer step (scheduler, zero_grad, on_step_end)"
    on_step_end            "after step 3: logging, evaluation, checkpoint, next batches"
                           (the logged loss's all-gather, the next batches' token count all-gather)
    on_log / on_evaluate / on_save
                           "after step 3: logged; ..." / "evaluated; ..." / "checkpoint saved; ..."
    on_prediction_step     "evaluation after step 3: batch 7 done"

The checkpoint seams (``seams.py``) set finer phases inside the save. hf_zero adds this callback
after the user's, so a user callback that stalls in ``on_step_end`` still shows the phase before it.
"""

from __future__ import annotations

from transformers import TrainerCallback

from hf_zero.engine.phases import set_phase

_NEXT = "next batches"


class PhaseCallback(TrainerCallback):
    def __init__(self) -> None:
        self.micro = 0
        self.eval_batches = 0

    def on_train_begin(self, args, state, control, **kwargs):
        set_phase(f"train from step {state.global_step}: setup and the first batches")

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro = 0
        set_phase(f"step {state.global_step + 1}: forward and backward")

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro += 1
        set_phase(f"step {state.global_step + 1}: forward and backward (micro-batch {self.micro} done)")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        set_phase(f"step {state.global_step + 1}: optimizer step")

    def on_optimizer_step(self, args, state, control, **kwargs):
        set_phase(f"step {state.global_step + 1}: after the optimizer step (scheduler, zero_grad, on_step_end)")

    def on_step_end(self, args, state, control, **kwargs):
        self.eval_batches = 0
        set_phase(f"after step {state.global_step}: logging, evaluation, checkpoint, {_NEXT}")

    def on_log(self, args, state, control, **kwargs):
        set_phase(f"after step {state.global_step}: logged; evaluation, checkpoint, {_NEXT}")

    def on_prediction_step(self, args, state, control, **kwargs):
        self.eval_batches += 1
        set_phase(f"evaluation after step {state.global_step}: batch {self.eval_batches} done")

    def on_evaluate(self, args, state, control, **kwargs):
        self.eval_batches = 0
        set_phase(f"after step {state.global_step}: evaluated; checkpoint, {_NEXT}")

    def on_save(self, args, state, control, **kwargs):
        set_phase(f"after step {state.global_step}: checkpoint saved; {_NEXT}")

    def on_train_end(self, args, state, control, **kwargs):
        set_phase(f"after training ({state.global_step} steps)")
