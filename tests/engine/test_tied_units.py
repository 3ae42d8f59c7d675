"""Stage 3 with a param tied across units ([Note: tied params across units] in unit_plan.py).

BERT's masked-LM decoder weight is its word embedding: the embedding lives in the ``BertEmbeddings``
block (one of BERT's ``_no_split_modules``), the decoder in the root. Planned in the block, the
weight was resharded when the embeddings' forward ended and the decoder read its empty placeholder
(``mat2 must be a matrix``, issue 22). It is the root's now: held from the model's forward to the
end of its backward. Against DDP + the same AdamW every step, on 2 gloo ranks."""

from __future__ import annotations

import copy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import BertConfig, BertForMaskedLM

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.stage3.unit_plan import plan_units
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import batch

STEPS = 3
RTOL = 1e-5


def tiny_bert_mlm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=101, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=50, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg).float()


def test_a_weight_tied_across_units_is_planned_in_the_root():
    model = tiny_bert_mlm()
    embedding = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is embedding  # the tie this test is about
    named = list(model.named_parameters())
    plans = plan_units(model, named, [], 0, None)
    where = {id(p): plan.module for plan in plans for _, p in plan.trainable}
    assert where[id(embedding)] is model
    # the rest of the embeddings block stays its own unit
    assert where[id(model.bert.embeddings.position_embeddings.weight)] is model.bert.embeddings
    assert where[id(model.bert.encoder.layer[0].output.dense.weight)] is model.bert.encoder.layer[0]
    assert sum(len(plan.trainable) for plan in plans) == len(named)  # each param once


def _parity(rank, world):
    ref = tiny_bert_mlm()
    model = copy.deepcopy(ref)
    ddp = DDP(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1)
    wrapped = ZeroModule(model, engine)
    report = []
    for step in range(STEPS):
        inputs = batch(rank, step, 0, ref.config.vocab_size, seq=8)
        loss_ref = ddp(**inputs).loss
        loss_ref.backward()
        loss = wrapped(**inputs).loss
        loss.backward()
        ref_opt.step(); ref_opt.zero_grad()
        opt.step(); wrapped.zero_grad()
        with engine.gathered():
            worst = max(((p - q).norm() / q.norm()).item() for p, q in zip(model.parameters(), ref.parameters()))
            tied = model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        report.append({"loss": loss.item(), "ref": loss_ref.item(), "worst": worst, "tied": tied})
    return {"steps": report, "units": [u.label for u in engine.units]}


def test_tied_across_units_trains_as_ddp():
    for out in run_on_ranks(_parity, 2, timeout=240):
        assert any("BertEmbeddings" in label for label in out["units"]), out["units"]
        for step, s in enumerate(out["steps"]):
            assert abs(s["loss"] - s["ref"]) <= RTOL * abs(s["ref"]), (step, s)
            assert s["worst"] <= RTOL and s["tied"], (step, s)
