"""The job of ``tests/launcher/test_two_nodes.py``: a tiny Llama through the Trainer, run by
``hf-zero launch --zero_config`` as two "nodes" on one machine, counting every collective by its group.

Each rank writes OUT_DIR/rank<R>.json: its node (torchrun's GROUP_RANK), its tp and dp groups as the
mesh built them, the logged losses and grad norms, and every collective ``train()`` issued as
(op, the group's global ranks, calls, bytes of the largest tensor of each call, summed).

The census is a ``TorchDispatchMode``, torch's own hook on every op that reaches the dispatcher: an
eager ``torch.distributed`` collective dispatches a ``c10d.*`` op whose arguments hold its process
group, so every collective of the step is seen (hf_zero's, the Trainer's, accelerate's), in forward
and in backward. Test code only: hf_zero itself wraps nothing of torch.
"""

import argparse
import json
import os
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer

from tests.tensor_parallel.models import VOCAB, tiny_llama
from tests.trainer.tiny import args as training_args
from tests.trainer.tiny import history

STEPS = 3
MAX_NORM = 0.5  # below this job's grad norms (about 2): clipping acts
BATCH = 2  # per dp rank


def rows(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (n, 12), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def job_args(out: str, batch: int, device: str = "cpu"):
    """The job's TrainingArguments; ``device`` "cuda": one GPU per rank (NCCL), fp32 with TF32 off."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return training_args(out, max_steps=STEPS, max_grad_norm=MAX_NORM, per_device_train_batch_size=batch,
                         train_sampling_strategy="sequential", learning_rate=1e-3, use_cpu=device == "cpu")


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


class CollectiveCensus(TorchDispatchMode):
    """Counts ``c10d.*`` ops by (op, the global ranks of their process group)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            values = [*args, *kwargs.values()]
            group = next(v for v in values if isinstance(v, torch.ScriptObject))
            key = (func.__name__.split(".")[0], tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(group))))
            self.calls[key] += 1
            self.bytes[key] += max((t.numel() * t.element_size() for t in _tensors(values)), default=0)
        return func(*args, **kwargs)


def main() -> None:
    from hf_zero.trainer import tensor_parallel as TP  # the mesh the Trainer built, to report its groups

    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    cli = parser.parse_args()
    out = cli.out_dir
    trainer = Trainer(model=tiny_llama(), args=job_args(os.path.join(out, "trainer"), BATCH, cli.device),
                      train_dataset=rows())
    with CollectiveCensus() as census:
        trainer.train()
    mesh = TP.of(trainer).mesh
    rank = dist.get_rank()
    record = {
        "rank": rank,
        "node": int(os.environ["GROUP_RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "tp_group": dist.get_process_group_ranks(mesh.tp_group),
        "dp_group": dist.get_process_group_ranks(mesh.dp_group),
        "history": history(trainer),
        "collectives": [[op, list(ranks), n, census.bytes[op, ranks]] for (op, ranks), n in sorted(census.calls.items())],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
