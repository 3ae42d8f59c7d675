"""Mixture-of-experts models train through the Trainer at stages 2 and 3 exactly like DDP.

transformers 5.x stores each layer's experts as fused 3-D params (``gate_up_proj``/``down_proj``
of shape [experts, ...]): the units are the decoder layers (``_no_split_modules``), nothing is
registered by hand. An expert that receives no tokens on a rank still leaves a (zero) slice in
its layer's gradient, so every rank reduces the same buckets. The data are rows of two runs of
one token (a a a a b b b b), whose positions share few hidden states, so a batch reaches few
experts: experts get no tokens on one rank while the other rank routes tokens to them. That it
happened is checked from the routers' own outputs, not assumed. The router load-balancing loss
(``output_router_logits``) is on and checked to be part of the loss the Trainer minimises.

Clipping is off (``max_grad_norm=0``; ``grad_norm`` is still logged and compared). With it on, the
clip coefficient is the one number hf_zero computes in another summation order than DDP (squared
norms of shards, summed over ranks), and AdamW turns its last-bit differences into relative
differences of up to ~8e-6 on expert weights of experts that saw one or two tokens (measured; with
SGD they stay ~1e-7). Without clipping the params here come out bit-identical to DDP's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Trainer

import hf_zero.trainer as zt
from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer import tiny
from tests.trainer.tiny import close, same_training, with_zero

STEPS = 6
EXPERTS = 4
COMMON = dict(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=tiny.SEQ, tie_word_embeddings=False,
              num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)


def _config(kind: str):
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=64, num_local_experts=EXPERTS, **COMMON)
    # Qwen2-MoE: routed experts plus an always-on shared expert behind a sigmoid gate.
    return Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                          num_experts=EXPERTS, decoder_sparse_step=1, **COMMON)


def _model(kind: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager").float()


def _rows(n: int) -> list[dict]:
    """Each row is two runs of one token each (a a a a b b b b): few distinct hidden states per row."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, tiny.VOCAB, (n, 2), generator=g).repeat_interleave(tiny.SEQ // 2, dim=1)
    return [{"input_ids": t, "labels": t.clone()} for t in tokens]


def _train(rank, world, root, kind):
    results = {}
    for stage in (None, 2, 3):

        def run():
            model = _model(kind)
            routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
            assert len(routers) == 2
            experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
            assert len(experts) == 2 and all(e.gate_up_proj.dim() == 3 for e in experts)  # fused experts
            hits = []  # per training forward: per layer, tokens routed to each expert on this rank

            def count(module, args, output):
                if module.training:
                    hits.append(torch.bincount(output[2].flatten(), minlength=EXPERTS).tolist())

            if stage is None:  # the loss the Trainer sees includes the router's load-balancing loss
                batch = _rows(2)
                ids = torch.stack([r["input_ids"] for r in batch])
                with torch.no_grad():
                    plain = model(input_ids=ids, labels=ids, output_router_logits=False)
                    with_aux = model(input_ids=ids, labels=ids)
                assert with_aux.aux_loss is not None and plain.aux_loss is None
                torch.testing.assert_close(with_aux.loss, plain.loss + 0.1 * with_aux.aux_loss)
            for r in routers:
                r.register_forward_hook(count)
            out = tiny.out_dir(root, kind, stage)
            # No clipping: see the module docstring.
            targs = tiny.args(out, max_steps=STEPS, per_device_train_batch_size=2, max_grad_norm=0.0)
            trainer = Trainer(model=model, args=targs, train_dataset=_rows(4 * STEPS * world))
            trainer.train()
            session = zt.session_of(trainer)
            if stage == 3:
                engine = session.engine
                assert engine.units and len(engine.units) == 3  # two decoder layers and the root
                assert all(p.numel() == 0 for p in model.parameters())  # sharded between uses
                with engine.gathered():
                    state = tiny.trainable_state(model)
            else:
                assert (session is None) == (stage is None)
                state = tiny.trainable_state(model)
            return {"history": tiny.history(trainer), "state": state,
                    "hits": [hits[i:i + 2] for i in range(0, len(hits), 2)]}

        results[stage] = with_zero(stage, run)
    return results


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_trains_like_ddp_at_stages_2_and_3(kind, tmp_path):
    ranks = run_on_ranks(_train, 2, str(tmp_path), kind, timeout=240)
    ref = ranks[0][None]

    # Experts really went without tokens on one rank while the other rank used them, in the same
    # step and layer (rows of one token: at most 2 rows x top-2 = 4 experts, mostly fewer).
    hits = [r[None]["hits"] for r in ranks]
    assert len(hits[0]) == len(hits[1]) == STEPS
    uneven = [(step, layer, e) for step in range(STEPS) for layer in range(2) for e in range(EXPERTS)
              if (hits[0][step][layer][e] == 0) != (hits[1][step][layer][e] == 0)]
    assert uneven, hits
    for stage in (2, 3):
        for rank, got in enumerate(ranks):
            what = f"{kind} stage {stage} rank {rank}"
            assert got[stage]["hits"] == ranks[rank][None]["hits"], what  # the same routing as under DDP
            same_training(got[stage]["history"], ref["history"], STEPS, what)
            close(got[stage]["state"], ref["state"], what=f"{what} params", elementwise=False)
    # DDP keeps the ranks' params identical; the final params moved away from the initial ones.
    close(ranks[1][None]["state"], ref["state"], what="ddp ranks agree", elementwise=False)
    init = tiny.trainable_state(_model(kind))
    assert all(not (ref["state"][k] == init[k]).all() for k in init if "experts" in k)
