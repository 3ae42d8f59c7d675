"""Sparse attention on a tiny Llama: the model's attention named by the registered function, losses and
grads equal to the same Llama attending through dense SDPA with the layout's boolean mask (padding
included), refusals; and a few Trainer steps with the ``sparse_attention`` block (W=1 at stage 0, W=2 at
stage 3) equal to the same run with that reference attention, and not equal to plain causal attention.

The reference attention (registered here) builds its mask independently: the layout expanded with
``torch.kron``, the causal rule and the padding mask transformers' own ``sdpa`` mask function gives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import hf_zero.trainer as zt
from hf_zero.sparse_attention import flex
from hf_zero.config.sparse_attention import SparseAttentionConfig
from hf_zero.sparse_attention.layouts import make_layout
from hf_zero.testing.multiprocess import run_on_ranks

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BLOCK = {"mode": "fixed", "block": 4, "num_local_blocks": 2, "attention": "unidirectional"}
REFERENCE = "hf_zero_test_reference_sparse"
SEQ = 32
STEPS = 3


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    seq_len = query.shape[2]
    config = SparseAttentionConfig(**BLOCK)
    layout = make_layout(config, 1, -(-seq_len // config.block) * config.block)[0].float()
    mask = torch.kron(layout, torch.ones(config.block, config.block)).bool()[:seq_len, :seq_len]
    mask = (mask & torch.ones(seq_len, seq_len, dtype=torch.bool).tril())[None, None]
    if attention_mask is not None:  # sdpa's mask: [b, 1, q, k] bool, causal and padding
        mask = mask & attention_mask
    empty = ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask | empty, scale=scaling,
                                         enable_gqa=True).masked_fill(empty, 0.0)
    return out.transpose(1, 2).contiguous(), None


def _register_reference() -> None:
    if REFERENCE not in AttentionInterface._global_mapping:
        AttentionInterface.register(REFERENCE, _reference_attention)
        AttentionMaskInterface.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _model(attention: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)  # large weights: attention patterns matter to the loss
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if attention == REFERENCE:
        _register_reference()
        model.set_attn_implementation(REFERENCE)
    return model


def _loss_and_grads(model, ids, mask):
    labels = torch.where(mask.bool(), ids, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_llama_matches_the_dense_masked_reference():
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(2))
    for mask in (torch.ones(2, SEQ, dtype=torch.long),
                 torch.stack([(torch.arange(SEQ) >= 6).long(), (torch.arange(SEQ) < SEQ - 5).long()])):
        sparse = _model()
        name = flex.apply(sparse, SparseAttentionConfig(**BLOCK))
        assert sparse.config._attn_implementation == name and name.startswith(flex.PREFIX)
        got_loss, got = _loss_and_grads(sparse, ids, mask)
        want_loss, want = _loss_and_grads(_model(REFERENCE), ids, mask)
        plain_loss, _ = _loss_and_grads(_model(), ids, mask)
        torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)
        for n, g in want.items():
            torch.testing.assert_close(got[n], g, rtol=0, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
        assert (got_loss - plain_loss).abs() > 1e-3  # the layout is in force: not plain causal attention


def test_dense_mode_is_plain_causal_attention():
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(3))
    mask = torch.stack([(torch.arange(SEQ) >= 3).long(), torch.ones(SEQ, dtype=torch.long)])
    sparse = _model()
    flex.apply(sparse, SparseAttentionConfig(mode="dense", block=8))
    got_loss, got = _loss_and_grads(sparse, ids, mask)
    want_loss, want = _loss_and_grads(_model(), ids, mask)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=0, atol=1e-5)


def test_generation_is_refused_with_the_way_back():
    model = _model()
    flex.apply(model, SparseAttentionConfig(**BLOCK))
    with pytest.raises(NotImplementedError, match="set_attn_implementation"):
        model.generate(torch.randint(0, 64, (1, 8)), max_new_tokens=2, do_sample=False)
    model.set_attn_implementation("sdpa")
    assert model.generate(torch.randint(0, 64, (1, 8)), max_new_tokens=2, do_sample=False).shape == (1, 10)


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 64, (16, SEQ), generator=g)
    return [{"input_ids": r, "labels": r} for r in rows]


def _train(root, stage: int, blocks: dict, attention: str = "sdpa") -> dict:
    zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, **blocks})
    try:
        args = TrainingArguments(output_dir=str(root), use_cpu=True, report_to="none", max_steps=STEPS,
                                 per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", disable_tqdm=True, max_grad_norm=1.0)
        trainer = Trainer(model=_model(attention), args=args, train_dataset=_data())
        name = trainer.model.config._attn_implementation
        trainer.train()
    finally:
        zt.deactivate()
    logs = trainer.state.log_history
    return {"loss": [h["loss"] for h in logs if "loss" in h], "attention": name}


def _three(rank, world, root, stage):
    return (_train(root / f"sparse{rank}", stage, {"sparse_attention": BLOCK}),
            _train(root / f"reference{rank}", stage, {}, REFERENCE),
            _train(root / f"plain{rank}", stage, {}))


def _check(sparse, reference, plain):
    assert sparse["attention"].startswith(flex.PREFIX) and reference["attention"] == REFERENCE
    assert len(sparse["loss"]) == STEPS
    torch.testing.assert_close(sparse["loss"], reference["loss"], rtol=1e-5, atol=0)
    assert max(abs(a - b) for a, b in zip(sparse["loss"], plain["loss"])) > 1e-2  # the layout is in force


def test_trainer_one_rank(tmp_path):
    _check(*_three(0, 1, tmp_path, 0))


def test_trainer_two_ranks_stage3(tmp_path):
    for result in run_on_ranks(_three, 2, tmp_path, 3, timeout=300):
        _check(*result)


@pytest.mark.parametrize("blocks, match", [
    ({"sparse_attention": {**BLOCK, "different_layout_per_head": True}, "tensor_parallel": {"autotp_size": 2}},
     "per-head sparse layouts over a tensor-parallel slice"),
])
def test_refused_before_the_trainer_exists(blocks, match):
    """Rows of hf_zero/config/unsupported.py: refused when hf_zero is turned on, before any model."""
    with pytest.raises(NotImplementedError, match=match):
        zt.activate({"zero_optimization": {"stage": 0}, **blocks})
    zt.deactivate()


def test_a_model_outside_the_attention_interface_is_refused():
    class Plain(torch.nn.Module):
        pass

    with pytest.raises(NotImplementedError, match="does not take its attention from transformers' attention"):
        flex.apply(Plain(), SparseAttentionConfig(**BLOCK))
