"""The Trainer's own numbers under hf_zero, at every stage, on 2 gloo ranks (hf_zero/trainer/param_count.py):
the "Number of trainable parameters" log line and ``total_flos`` equal the plain Trainer's, also at stage 3
where every sharded param is a 0-element placeholder (a frozen param in a unit included)."""

from __future__ import annotations

import logging
import re

from hf_zero.testing.multiprocess import run_on_ranks

from . import tiny


def _numbers(rank, world, out):
    import transformers
    from transformers import Trainer

    transformers.logging.set_verbosity_info()
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("transformers.trainer").addHandler(Keep())
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


def test_trainer_numbers_at_every_stage(tmp_path):
    for got in run_on_ranks(_numbers, 2, str(tmp_path), timeout=300):
        _check(got)


def _check(got):
    plain = got[None]
    assert plain["logged"] == plain["trainable"] and plain["total_flos"] > 0
    assert got[3]["placeholders"] > 0  # stage 3 really holds placeholders, which read 0 without the count
    for stage in (1, 2, 3):
        assert got[stage]["logged"] == got[stage]["trainable"] == plain["trainable"], (stage, got)
        assert got[stage]["total_flos"] == plain["total_flos"], (stage, got)
