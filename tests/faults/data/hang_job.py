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
  data           rank 1's data loader sleeps fetching the batches of step 3 (the 5th batch); rank 0 goes
                 on into the Trainer's all-gather of those batches' token count, in the same phase
  normal         no stall; ends cleanly
"""

import os
import sys
import time

import torch
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


class StallInData(torch.utils.data.Dataset):
    """``rows``, but rank 1 sleeps on its ``at``-th row (counting from 1)."""

    def __init__(self, rows, at):
        self.rows, self.at, self.fetched = rows, at, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.fetched += 1
        if dist.get_rank() == 1 and self.fetched == self.at:
            stall(f"fetching row {self.fetched}")
        return self.rows[i]


def main():
    scenario, timeout = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo")
    zt.activate({"zero_optimization": {"stage": 2}, "comm_timeout_s": timeout})
    out = os.environ["HANG_JOB_OUT"]
    save = dict(save_strategy="steps", save_steps=2) if scenario == "checkpoint" else {}
    trainer_cls = StallInSave if scenario == "checkpoint" else Trainer
    callbacks = [StallBetweenSteps()] if scenario == "between_steps" else []
    data = StallInData(lm_rows(32), at=9) if scenario == "data" else lm_rows(32)  # 2 rows a batch
    trainer = trainer_cls(model=llama(), args=args(out, max_steps=4, **save), train_dataset=data,
                          callbacks=callbacks)
    trainer.train()
    print(f"rank {dist.get_rank()}: trained {trainer.state.global_step} steps", flush=True)


if __name__ == "__main__":
    main()
