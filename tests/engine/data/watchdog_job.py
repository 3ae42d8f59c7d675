"""One rank of a small stage-3 job for tests/engine/test_watchdog.py (run under `python -m hf_zero.run`).

    python -m hf_zero.run watchdog_job.py SCENARIO COMM_TIMEOUT_S

RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the environment (gloo; with
WATCHDOG_JOB_CUDA=1, NCCL with one GPU per rank). Scenarios:
  normal  a few training steps on every rank; ends cleanly
  skip    rank 1's forward skips block 1 (so it never gathers unit 1), then rank 1 stays busy
          outside hf_zero collectives; rank 0 waits in the gather of unit 0
  raise   one step on every rank, then rank 1 raises ValueError while rank 0 gathers for the next
  labels  no engine: labelled all-reduces, rank 1 skips "flags of step 2"
"""

import atexit
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

from hf_zero.engine import ZeroEngine, ZeroModule, collectives as C
from hf_zero.engine.diagnostics import watchdog


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    _no_split_modules = ["Block"]  # stage 3: one unit per block, the head is the root unit

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 1)

    def forward(self, x, skip=None):
        for i, block in enumerate(self.blocks):
            if i != skip:
                x = block(x)
        return self.head(x).pow(2).mean()


def busy(seconds):
    """Work outside hf_zero collectives (what a rank that went astray might be doing)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)


def main():
    scenario, timeout = sys.argv[1], float(sys.argv[2])
    watchdog.configure(timeout)
    cuda = os.environ.get("WATCHDOG_JOB_CUDA") == "1"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    atexit.register(lambda: print("watchdog threads at exit:",
                                  sum(t.name == "hf_zero-watchdog" for t in threading.enumerate()), flush=True))
    if scenario == "labels":
        ctx = C.CommContext()
        print(f"rank {rank}: diverging at {time.time()}", flush=True)
        for step in range(4):
            if rank == 1 and step == 2:
                continue
            C.wait(C.start_all_reduce(ctx, torch.ones(4, device=device), label=f"flags of step {step}"))
        busy(120)
        return
    torch.manual_seed(0)
    model = Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1)
    wrapped = ZeroModule(model, engine)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank)).to(device)
    if scenario == "skip":
        print(f"rank {rank}: diverging at {time.time()}", flush=True)
        with torch.no_grad():
            wrapped(x, skip=1 if rank == 1 else None)
        busy(120)
        return
    steps = 3 if scenario == "normal" else 1
    for _ in range(steps):
        wrapped(x).backward()
        opt.step()
        wrapped.zero_grad()
    print(f"rank {rank}: watchdog running: {watchdog.running() is not None}", flush=True)
    if cuda:
        torch.cuda.synchronize()
        time.sleep(max(1.0, timeout / 2))  # a poll or two: completed collectives are retired
        print(f"rank {rank}: pending after the steps: {len(watchdog.RECORDER.pending)}", flush=True)
    if scenario == "raise":
        print(f"rank {rank}: diverging at {time.time()}", flush=True)
        if rank == 1:
            raise ValueError("boom on purpose")
        wrapped(x).backward()  # rank 1 never joins these gathers
        busy(120)
    dist.barrier()


if __name__ == "__main__":
    main()
