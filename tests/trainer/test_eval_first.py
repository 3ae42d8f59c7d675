"""``trainer.evaluate()`` before ``trainer.train()`` at stages 1, 2 and 3 (W = 2): the same
eval_loss as the plain Trainer, and the training that follows on the same Trainer still matches
DDP step by step, as do the evaluations during and after it (stage 3: on sharded params).

Before ``train()`` hf_zero has built no engine yet (it is built with the optimizer), so the first
evaluate runs on the plain model, and ``train()`` must still wrap and shard it afterwards.
"""

from __future__ import annotations

from transformers import Trainer

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny
from tests.trainer.tiny import close, same_training, with_zero

STEPS = 4


def _eval_first(rank, world, root):
    results = {}
    for stage in (None, 1, 2, 3):

        def run():
            targs = tiny.args(tiny.out_dir(root, stage), max_steps=STEPS, eval_strategy="steps", eval_steps=2)

            def make():
                return Trainer(model=tiny.llama(0), args=targs, train_dataset=tiny.lm_rows(16),
                               eval_dataset=tiny.lm_rows(8, seed=1))

            trainer = make()
            before = trainer.evaluate()
            if stage is None:
                # The plain Trainer at W > 1 must not train after evaluating (accelerate then skips
                # the DDP wrap: see test_trainer_surface.py); its training runs on a twin.
                trainer = make()
            trainer.train()
            after = trainer.evaluate()
            session = zt.session_of(trainer)
            assert (session is not None) == (stage is not None)
            if stage is not None:
                assert session.engine is not None and bool(session.engine.units) == (stage == 3)
            if stage == 3:
                assert all(p.numel() == 0 for p in trainer.model.parameters())  # evaluated sharded
            return {"before": before["eval_loss"], "after": after["eval_loss"],
                    "during": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
                    "history": tiny.history(trainer)}

        results[stage] = with_zero(stage, run)
    return results


def test_evaluate_before_train_matches_plain(tmp_path):
    ranks = run_on_ranks(_eval_first, 2, str(tmp_path), timeout=240)
    ref = ranks[0][None]
    assert len(ref["during"]) == 3 and ref["after"] < ref["before"]
    assert ranks[1][None] == ref  # the plain Trainer's ranks agree
    for stage in (1, 2, 3):
        for rank, got in enumerate(ranks):
            what = f"stage {stage} rank {rank}"
            close(got[stage]["before"], ref["before"], what=f"{what} eval_loss before train")
            same_training(got[stage]["history"], ref["history"], STEPS, what)
            close(got[stage]["during"], ref["during"], what=f"{what} eval_loss in and after train")
            close(got[stage]["after"], ref["after"], what=f"{what} eval_loss after train")
