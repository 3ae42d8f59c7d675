"""The Trainer's own numbers under hf_zero, on 2 gloo ranks, in one rank start:

* at every stage (hf_zero/trainer/param_count.py): the "Number of trainable parameters" log line and
  ``total_flos`` equal the plain Trainer's, also at stage 3 where every sharded param is a 0-element
  placeholder (a frozen param in a unit included);
* under sequence parallelism (SP 2) and tensor parallelism (tp 2) at W 2 (the ``get_total_train_batch_size``
  seam): the log's "Total train batch size" and ``train_samples_per_second`` count the one data-parallel
  rank, micro batch 2 * accumulation 2 * 1 = 4 (transformers alone counts W ranks: 8)."""

from __future__ import annotations

import logging
import re

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks

from . import tiny

lines: list[str] = []  # the Trainer's log lines of the current run, in the rank process


class _Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())


def _numbers(out):
    from transformers import Trainer

    got = {}
    for stage in (None, 1, 2, 3):
        model = tiny.llama()
        model.model.norm.weight.requires_grad_(False)  # a frozen param, sharded in its unit at stage 3
        true = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "embedding": model.model.embed_tokens.weight.numel()}
        lines.clear()

        def train():
            trainer = Trainer(model=model, args=tiny.args(tiny.out_dir(out, stage), max_steps=2,
                                                          log_level_replica="info"),  # rank 1 logs it too
                              train_dataset=tiny.lm_rows(8))
            trainer.train()
            return trainer

        trainer = tiny.with_zero(stage, train)
        [logged] = [int(m.group(1).replace(",", "")) for m in
                    (re.search(r"Number of trainable parameters = ([\d,]+)", line) for line in lines) if m]
        placeholders = sum(p.numel() == 0 for p in model.parameters())
        got[stage] = {"logged": logged, "total_flos": trainer.state.total_flos, "placeholders": placeholders, **true}
    return got


def _batch_sizes(out):
    from transformers import Trainer

    from tests.sequence_parallel.models import tiny_llama as sp_llama
    from tests.tensor_parallel.models import tiny_llama as tp_llama

    got = {}
    for name, parallel, model in (("sp", {"sequence_parallel_size": 2}, sp_llama("sdpa")),
                                  ("tp", {"tensor_parallel": {"autotp_size": 2}}, tp_llama())):
        lines.clear()
        zt.activate({"zero_optimization": {"stage": 2}, **parallel})
        try:
            args = tiny.args(tiny.out_dir(out, name), max_steps=2, gradient_accumulation_steps=2,
                             log_level_replica="info")
            trainer = Trainer(model=model, args=args, train_dataset=tiny.lm_rows(16))
            metrics = trainer.train().metrics
        finally:
            zt.deactivate()
        [logged] = [int(m.group(1).replace(",", "")) for m in (re.search(
            r"Total train batch size \(w. parallel, distributed & accumulation\) = ([\d,]+)", line) for line in lines) if m]
        # samples/s over steps/s (same runtime, each rounded to 3 decimals): samples per optimizer step
        got[name] = {"logged": logged, "samples_per_step": metrics["train_samples_per_second"]
                     / metrics["train_steps_per_second"]}
    return got


def _job(rank, world, out):
    import transformers

    transformers.logging.set_verbosity_info()
    logging.getLogger("transformers.trainer").addHandler(_Keep())
    return _numbers(out), _batch_sizes(out)


def test_trainer_numbers(tmp_path):
    for numbers, batch_sizes in run_on_ranks(_job, 2, str(tmp_path), timeout=300):
        _check(numbers)
        for name, got in batch_sizes.items():
            # 2 per device * 2 accumulation * (W 2 / 2 ranks per SP or tp group)
            assert got["logged"] == 4, (name, got)
            assert abs(got["samples_per_step"] - 4) < 0.05, (name, got)


def _check(got):
    plain = got[None]
    assert plain["logged"] == plain["trainable"] and plain["total_flos"] > 0
    assert got[3]["placeholders"] > 0  # stage 3 really holds placeholders, which read 0 without the count
    for stage in (1, 2, 3):
        assert got[stage]["logged"] == got[stage]["trainable"] == plain["trainable"], (stage, got)
        assert got[stage]["total_flos"] == plain["total_flos"], (stage, got)
