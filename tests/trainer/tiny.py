"""Tiny models, data and Trainer plumbing for the Trainer-surface tests (no download, CPU, fp32).

Every scenario runs the same code with and without hf_zero: ``with_zero(stage, fn)`` activates
hf_zero for ``fn`` (``stage=None``: the plain Trainer, i.e. the Trainer's own DDP at W > 1) and
always deactivates it again, so a failing scenario never leaks an active config into the next one.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainingArguments,
)

import hf_zero.trainer as zt

RTOL = 1e-5
VOCAB = 64
SEQ = 8


def llama(seed: int = 0, *, hidden: int = 16, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def offload_job() -> tuple[torch.nn.Module, list[dict]]:
    """The offload and resume tests' job: a 2-layer Llama (hidden 32, seed 0) and 48 rows of 12
    random tokens (seed 3)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (48, 12), generator=g)]
    return model, data


def t5(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                   decoder_start_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).float()


def lm_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable rows: each counts up from a random start, modulo the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + torch.arange(SEQ)) % VOCAB
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def s2s_rows(n: int, seed: int = 0, target_len: int = 4) -> list[dict]:
    """Source: a counting row; target: the next ``target_len`` numbers."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, VOCAB, (n, 1), generator=g)
    src = (starts + torch.arange(SEQ)) % VOCAB
    tgt = (starts + SEQ + torch.arange(target_len)) % VOCAB
    return [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": t} for s, t in zip(src, tgt)]


def args(out: str, *, seq2seq: bool = False, **kw) -> TrainingArguments:
    base = dict(output_dir=out, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                logging_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                learning_rate=1e-2, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return (Seq2SeqTrainingArguments if seq2seq else TrainingArguments)(**base)


def with_zero(stage: int | None, fn):
    """Run ``fn()`` with hf_zero at ``stage`` (None: plain Trainer, no hf_zero).

    Persistence threshold 0: every param of these tiny models is below DeepSpeed's default 1e5,
    which would keep them all whole and leave nothing sharded at stage 3."""
    if stage is not None:
        zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}})
    try:
        return fn()
    finally:
        zt.deactivate()


def history(trainer) -> dict[str, list[float]]:
    logs = trainer.state.log_history
    return {"loss": [h["loss"] for h in logs if "loss" in h],
            "grad_norm": [h["grad_norm"] for h in logs if "grad_norm" in h]}


def out_dir(root: str, *parts) -> str:
    path = os.path.join(root, *[str(p) for p in parts])
    os.makedirs(path, exist_ok=True)
    return path


def close(a, b, rtol: float = RTOL, what: str = "", *, elementwise: bool = True) -> None:
    """``a`` equals ``b`` to relative tolerance ``rtol``: numbers, sequences, arrays or dicts of them.

    ``elementwise``: |a - b| <= rtol * |b| for every element (losses, norms, metrics); else the
    largest error against the largest magnitude (tensors with entries near zero, e.g. logits).
    """
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
        for k in a:
            close(a[k], b[k], rtol, f"{what}[{k}]", elementwise=elementwise)
        return
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all(), (what, a, b)
    if elementwise:
        bad = np.abs(a - b) > rtol * np.abs(b)
        assert not bad.any(), (what, a, b)
    else:
        err = np.abs(a - b).max() if a.size else 0.0
        assert err <= rtol * np.abs(b).max(), (what, err, np.abs(b).max())


def same_training(got: dict, ref: dict, steps: int, what: str = "") -> None:
    """Log histories agree step by step, loss and grad_norm, and training really happened."""
    assert len(ref["loss"]) == len(ref["grad_norm"]) == steps, (what, ref)
    assert len(got["loss"]) == len(got["grad_norm"]) == steps, (what, got)
    close(got["loss"], ref["loss"], what=f"{what} loss")
    close(got["grad_norm"], ref["grad_norm"], what=f"{what} grad_norm")
    assert ref["loss"][-1] != ref["loss"][0]


def trainable_state(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
