"""One rank of a 2-rank Trainer job that stalls on purpose, for tests/faults/test_hangs.py.

    python -m hf_zero.run hang_job.py SCENARIO COMM_TIMEOUT_S

Stage 2, a tiny Llama, gloo CPU ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the
environment), 4 steps, logging every step. Rank 1 sleeps ``HANG_JOB_STALL_S`` seconds at the point
the scenario names: the stall is this script's, hf_zero knows nothing of it. Just before it sleeps
rank 1 prints "stalling at <time.time()>". Scenarios:
  between_steps  rank 1 sleeps in a callback's on_step_end after step 2; rank 0 goes on into the
                 Trainer's own all-gather of the loss it logs (no hf_zero collective is pending)
  checkpoint     checkpoint-2 is saved; rank 1 sleeps inside the save, before it writes its part of
                 the sharded optimizer state; rank 0 writes its part and waits at the save's barrier
  normal         no stall; ends cleanly
"""

import os
import sys
import time

import torch.distributed as dist
from transformers import Trainer, TrainerCallback

import hf_zero.trainer as zt
from tests.trainer.tiny import args, llama, lm_rows


def stall(what: str) -> None:
    print(f"rank 1: stalling at {time.time()} ({what})", flush=True)
    time.sleep(float(os.environ.get("HANG_JOB_STALL_S", "120")))


class StallBetweenSteps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if dist.get_rank() == 1 and state.global_step == 2:
            stall("on_step_end of step 2")


class StallInSave(Trainer):
    def _save_optimizer_and_scheduler(self, output_dir):
        if dist.get_rank() == 1:
            stall(f"saving {os.path.basename(output_dir)}")
        return super()._save_optimizer_and_scheduler(output_dir)


def main():
    scenario, timeout = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo")
    zt.activate({"zero_optimization": {"stage": 2}, "comm_timeout_s": timeout})
    out = os.environ["HANG_JOB_OUT"]
    save = dict(save_strategy="steps", save_steps=2) if scenario == "checkpoint" else {}
    trainer_cls = StallInSave if scenario == "checkpoint" else Trainer
    callbacks = [StallBetweenSteps()] if scenario == "between_steps" else []
    trainer = trainer_cls(model=llama(), args=args(out, max_steps=4, **save), train_dataset=lm_rows(32),
                          callbacks=callbacks)
    trainer.train()
    print(f"rank {dist.get_rank()}: trained {trainer.state.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
