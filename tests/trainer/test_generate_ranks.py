"""``model.generate()`` called by user code after stage-3 training, with ranks that stop at
different decoding steps, completes and gives the unsharded model's tokens (greedy).

At stage 3 every decoding step's forward all-gathers each unit. A rank that stops early (shorter
``max_new_tokens``, or its EOS) would stop joining those gathers, and the other rank waits in one
forever (or, once the early rank moves on, its collectives pair with the wrong ones). Every rank
must run the same number of forwards: transformers' ``synced_gpus=True``, which hf_zero now makes
the default of the trained model's ``generate`` at stage 3, W > 1. The Seq2SeqTrainer path
(``predict_with_generate``) is covered in ``test_stage3_trainer.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer.generation import sync_generate
from tests.trainer import tiny

PROMPTS = [[[3, 4, 5]], [[10, 11, 12, 13, 14]]]  # per rank: another prompt and prompt length
NEW_TOKENS = [2, 6]  # rank 0 stops after 2 tokens, rank 1 after 6


def _generate(rank, world, root):
    zt.activate({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    try:
        model = tiny.llama(0, hidden=32)
        trainer = Trainer(model=model, args=tiny.args(tiny.out_dir(root, rank), max_steps=3),
                          train_dataset=tiny.lm_rows(16))
        trainer.train()
        engine = zt.session_of(trainer).engine
        # The unsharded reference: the same trained weights in a plain model (no hooks, no collectives).
        reference = tiny.llama(1, hidden=32).eval()
        reference.load_state_dict(engine.full_state_dict(to_cpu_on=None))
        model.eval()
        assert all(p.numel() == 0 for p in model.parameters())  # sharded: generate must gather
        prompt = torch.tensor(PROMPTS[rank])
        common = dict(do_sample=False, pad_token_id=0)

        # 1. Ranks stop at different steps through max_new_tokens (and differ in prompt length).
        kw = dict(common, max_new_tokens=NEW_TOKENS[rank])
        by_length = trainer.model.generate(prompt, **kw)
        ref_by_length = reference.generate(prompt, **kw)

        # 2. Through EOS: the same max_new_tokens, but rank 0's EOS is the 2nd token it generates,
        # and rank 1's a token it never generates.
        free = reference.generate(prompt, **common, max_new_tokens=6)[0, prompt.shape[1]:].tolist()
        eos = free[1] if rank == 0 else next(t for t in range(tiny.VOCAB) if t not in free)
        kw = dict(common, max_new_tokens=6, eos_token_id=eos)
        by_eos = trainer.model.generate(prompt, **kw)
        ref_by_eos = reference.generate(prompt, **kw)

        # 3. Through the wrapped model the Trainer trained (attribute reads fall through to the model).
        by_wrapped = trainer.model_wrapped.generate(prompt, **dict(common, max_new_tokens=NEW_TOKENS[rank]))
        assert "generate" in vars(model)  # the instance's synced generate; the class is untouched
        sharded_after = all(p.numel() == 0 for p in model.parameters())
    finally:
        zt.deactivate()
    return {"by_length": by_length.tolist(), "ref_by_length": ref_by_length.tolist(),
            "by_eos": by_eos.tolist(), "ref_by_eos": ref_by_eos.tolist(), "by_wrapped": by_wrapped.tolist(),
            "free": free, "sharded_after": sharded_after}


def test_generate_with_ranks_finishing_at_different_steps(tmp_path):
    # A deadlock fails the test at the timeout instead of hanging it.
    ranks = run_on_ranks(_generate, 2, str(tmp_path), timeout=120)
    for rank, got in enumerate(ranks):
        prompt_len = len(PROMPTS[rank][0])
        assert got["by_length"] == got["ref_by_length"], (rank, got)
        assert len(got["by_length"][0]) == prompt_len + NEW_TOKENS[rank]
        assert got["by_eos"] == got["ref_by_eos"], (rank, got)
        assert got["by_wrapped"] == got["ref_by_length"], (rank, got)
        assert got["sharded_after"]  # generate left the units sharded again
    # Rank 0 really stopped early through its EOS while rank 1 ran all 6 steps.
    eos_steps = [len(got["by_eos"][0]) - len(PROMPTS[rank][0]) for rank, got in enumerate(ranks)]
    assert eos_steps[0] < 6 and eos_steps[1] == 6, eos_steps
    assert ranks[0]["by_eos"][0][-1] == ranks[0]["free"][1]


def test_synced_generate_is_the_default_and_the_caller_can_opt_out():
    """In one process with no process group: the synced default needs one (transformers
    all-reduces "finished" flags every step), an explicit ``synced_gpus=False`` does not."""
    model = tiny.llama(0).eval()
    sync_generate(model)
    sync_generate(model)  # idempotent
    prompt = torch.tensor([[3, 4, 5]])
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="process group"):
        model.generate(prompt, **kw)
    expected = type(model).generate(model, prompt, **kw)
    assert torch.equal(model.generate(prompt, synced_gpus=False, **kw), expected)
    twin = copy.deepcopy(model)  # the copy's generate is bound to the copy, not to the original
    assert twin.generate.__self__ is twin
    assert "generate" not in vars(tiny.llama(0))  # other models keep the class's generate
