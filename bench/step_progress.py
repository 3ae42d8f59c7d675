"""A Trainer callback that appends one JSON line per optimizer step, flushed at once (rank 0).

`job.py --progress_out FILE`: a line at train begin and at every step end with the wall-clock
time (`time.time()`, so the driver can subtract its own start), the step's seconds, the training-time
peak of allocated GPU memory so far and the host RSS peak. A driver that kills a long job after
its first steps (`bench/long_seq.py`, on a time limit) still has what those steps measured.
"""

import json
import resource
import time

import torch
from transformers import TrainerCallback

GIB = 1024**3


class StepProgress(TrainerCallback):
    def __init__(self, path: str, step_seconds, cuda: bool):
        self.path, self.step_seconds, self.cuda = path, step_seconds, cuda

    def _write(self, state, **fields) -> None:
        if not state.is_world_process_zero:
            return
        line = {
            "wall": time.time(),
            **fields,
            # the job's timer resets the peak at train begin: this is the training-time peak
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if self.cuda else None,
            "host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(state, event="train_begin")

    def on_step_end(self, args, state, control, **kwargs):
        self._write(state, event="step", step=state.global_step, step_s=self.step_seconds()[-1])
