"""Cost of the hang watchdog's flight recorder (hf_zero/engine/diagnostics/watchdog.py) per collective.

    python bench/watchdog_overhead.py                    # the recorder alone, CPU (and CUDA) tensors
    torchrun --nproc_per_node 2 bench/watchdog_overhead.py   # also start_all_gather + wait, watched or not

Prints microseconds per collective. The recorder alone: ``RECORDER.start`` + ``done`` as
``collectives.py`` calls them while a watchdog runs (on a CUDA tensor ``done`` records an event).
Distributed: a 4 KB all-gather through ``start_all_gather``/``wait``, with the watchdog running
(``watched``) and stopped, alternated, best of several rounds.
"""

import os
import time

import torch
import torch.distributed as dist

from hf_zero.engine import collectives as C
from hf_zero.engine.diagnostics import flight_recorder as FR
from hf_zero.engine.diagnostics import watchdog as W


def best_per_call(fn, n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def recorder_alone(device: str) -> float:
    recorder = FR.FlightRecorder()
    recorder.watched, recorder.device_events = True, device == "cuda"
    tensor = torch.empty(1024, device=device)

    def pair():
        rec = recorder.start("all_gather", "unit 3 (model.layers.2, LlamaDecoderLayer)", tensor)
        rec.work = None
        recorder.done(rec, tensor)
        if rec.event is not None:  # what the watchdog thread does once a second
            recorder.retire()

    us = best_per_call(pair, 10_000)
    if device == "cuda":
        torch.cuda.synchronize()
    return us


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "WORLD_SIZE" not in os.environ or int(os.environ.get("RANK", "0")) == 0:
        for device in devices:
            print(f"recorder start+done, {device} tensor: {recorder_alone(device):.2f} us per collective", flush=True)
    if "WORLD_SIZE" not in os.environ:
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    ctx = C.CommContext()  # starts the watchdog
    world = dist.get_world_size()
    inp = torch.ones(1024, device="cuda" if cuda else "cpu")
    out = torch.empty(1024 * world, device=inp.device)

    def gather():
        C.wait(C.start_all_gather(ctx, out, inp))

    results = {"watched": [], "not watched": []}
    for _ in range(3):
        for name in results:
            if name == "watched":
                W.ensure_running()
            else:
                W.stop()
            dist.barrier()
            us = best_per_call(gather, 2000, rounds=3)
            if cuda:
                torch.cuda.synchronize()
            results[name].append(us)
    if dist.get_rank() == 0:
        for name, values in results.items():
            print(f"start_all_gather + wait, 4 KB, {'nccl' if cuda else 'gloo'}, W={world}, {name}: "
                  f"best {min(values):.2f} us per collective (rounds: {', '.join(f'{v:.2f}' for v in values)})",
                  flush=True)
    W.stop()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
