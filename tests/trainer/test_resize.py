"""``resize_token_embeddings`` before the Trainer is built, at stages 1, 2 and 3, with tied and
untied embeddings: training matches the plain Trainer (DDP), the new vocabulary rows train, and
``save_model`` writes weights that plain ``from_pretrained`` (no hf_zero) loads with the new
vocabulary size and the same logits as the trained in-memory model (gathered at stage 3).

The resize replaces the embedding (and, untied, the LM head) modules and params after the model
was built: hf_zero must shard the new params, keep a tied LM head tied to the new embedding, and
save the full new shapes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny
from tests.trainer.tiny import close, same_training, with_zero

STEPS = 3
NEW_VOCAB = tiny.VOCAB + 8  # 8 added tokens
PROBE = torch.tensor([[1, 5, 64, 70, 71, 9, 66, 2]])  # old and new token ids


def _model(tied: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=tiny.SEQ,
                      tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    model.resize_token_embeddings(NEW_VOCAB)  # new rows: mean-resized, from the seeded generator
    return model


def _rows(n: int) -> list[dict]:
    """Counting rows over the new vocabulary, so the added tokens appear as inputs and labels."""
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, NEW_VOCAB, (n, 1), generator=g) + torch.arange(tiny.SEQ)) % NEW_VOCAB
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def _train(rank, world, root, tied):
    results = {}
    for stage in (None, 1, 2, 3):

        def run():
            model = _model(tied)
            assert model.get_input_embeddings().weight.shape[0] == NEW_VOCAB
            assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
            new_rows = model.get_input_embeddings().weight[tiny.VOCAB:].detach().clone()
            out = tiny.out_dir(root, tied, stage)
            trainer = Trainer(model=model, args=tiny.args(out, max_steps=STEPS), train_dataset=_rows(16))
            trainer.train()
            trainer.save_model()
            assert (zt.session_of(trainer) is not None) == (stage is not None)
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=PROBE).logits  # stage 3: gathered by the forward hooks
            if stage == 3:
                assert all(p.numel() == 0 for p in model.parameters())  # sharded again after the forward
                with zt.session_of(trainer).engine.gathered():
                    embed = model.get_input_embeddings().weight.detach().clone()
            else:
                embed = model.get_input_embeddings().weight.detach().clone()
            assert embed.shape == (NEW_VOCAB, 16)
            assert not torch.equal(embed[tiny.VOCAB:], new_rows)  # the added rows trained
            still_tied = model.lm_head.weight is model.get_input_embeddings().weight
            return {"history": tiny.history(trainer), "logits": logits.numpy(), "embed": embed.numpy(),
                    "out": out, "tied": still_tied}

        results[stage] = with_zero(stage, run)
    return results


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resized_embeddings_train_save_and_reload(tied, tmp_path):
    ranks = run_on_ranks(_train, 2, str(tmp_path), tied, timeout=240)
    ref = ranks[0][None]
    assert ref["logits"].shape == (1, PROBE.shape[1], NEW_VOCAB)
    for stage in (1, 2, 3):
        for rank, got in enumerate(ranks):
            what = f"tied={tied} stage {stage} rank {rank}"
            assert got[stage]["tied"] == tied, what
            same_training(got[stage]["history"], ref["history"], STEPS, what)
            close(got[stage]["embed"], ref["embed"], what=f"{what} embeddings", elementwise=False)
            close(got[stage]["logits"], ref["logits"], what=f"{what} logits", elementwise=False)
        got = ranks[0][stage]
        # Plain transformers reloads what rank 0 wrote: the new vocabulary, the same logits.
        assert os.path.exists(os.path.join(got["out"], "model.safetensors"))
        reloaded = AutoModelForCausalLM.from_pretrained(got["out"]).eval()
        assert reloaded.config.vocab_size == NEW_VOCAB
        assert reloaded.get_input_embeddings().weight.shape == (NEW_VOCAB, 16)
        assert reloaded.lm_head.weight.shape == (NEW_VOCAB, 16)
        assert (reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()) == tied
        np.testing.assert_array_equal(reloaded.get_input_embeddings().weight.detach().numpy(), got["embed"])
        with torch.no_grad():
            logits = reloaded(input_ids=PROBE).logits.numpy()
        close(logits, got["logits"], what=f"tied={tied} stage {stage} reloaded logits", elementwise=False)
