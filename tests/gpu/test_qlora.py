"""QLoRA under hf_zero on one GPU: a bitsandbytes NF4 base with LoRA adapters, through the Trainer
at stages 1, 2 and 3 (W = 1, bf16), against the same run without hf_zero.

A tiny Llama built from a config is saved and loaded back 4-bit (``BitsAndBytesConfig``, NF4,
bf16 compute), prepared by ``peft.prepare_model_for_kbit_training`` (norms and embeddings to
fp32, gradient checkpointing on) and given LoRA adapters on every linear layer. Each run trains
``STEPS`` steps on one repeated batch, then saves the adapter. Checked per stage:

- the loss is finite, falls below step 0's, and follows the plain run's ([Note: QLoRA tolerance]);
- every 4-bit weight is still the same ``Params4bit`` object with its bytes and ``quant_state``,
  outside every stage-3 unit ([Note: quantized frozen params] in hf_zero/engine/stage3/unit_plan.py);
- ``adapter_model.safetensors`` holds, tensor for tensor and bit for bit, the adapter weights
  the model has after the run (and hf_zero's own ``verify_saved_adapter`` ran inside save_model).

[Note: QLoRA tolerance] Both runs start from the same bytes: the same saved base quantized the
same way, the same LoRA init (seeded), the same batch, bf16 autocast. The plain run keeps the
LoRA params in fp32 and autocast rounds them to bf16 at each matmul; hf_zero keeps bf16 params
equal to bf16(its fp32 master) and steps the master with the same AdamW. So while the masters
equal the plain params, the bf16 weights every matmul sees are the same, the bf16 gradients are
the same, and both land in fp32 (autocast's cast backward / hf_zero's fp32 main grad) the same.
Step 0's loss is therefore held to one bf16 rounding, u = 2^-8 relative (a kernel may choose
another algorithm for a param that is a view into hf_zero's flat buffer). Later, the clipping
norm sums the same fp32 squares in another order (a few fp32 ulps in the clip factor), which can
flip the bf16 rounding of a LoRA weight here and there; each flip moves a logit by at most u of
one term, so the loss stays within a few u. We allow 4u = 2^-6 relative per step: a broken
machinery (an update lost or applied to the wrong place, a stale bf16 param) moves the loss by
the size of the updates themselves, visible over ``STEPS`` steps at this learning rate (the
loss falls by well over 4u in the same steps).

Run the test logic on CPU (bitsandbytes has a CPU backend) with ``HF_ZERO_QLORA_DEVICE=cpu``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = os.environ.get("HF_ZERO_QLORA_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"HF_ZERO_QLORA_DEVICE={DEVICE!r}: expected 'cuda' or 'cpu'")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs CUDA (HF_ZERO_QLORA_DEVICE=cpu runs the logic on CPU)", allow_module_level=True)
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    Trainer,
    TrainingArguments,
)

import hf_zero.trainer as zt  # noqa: E402

pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

STEPS, SEQ, VOCAB, LR = 10, 32, 128, 1e-2
U = 2.0**-8  # bf16 unit roundoff
LOSS_RTOL = 4 * U  # [Note: QLoRA tolerance]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    path = str(tmp_path_factory.mktemp("base"))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _qlora_model(base_dir: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0 if DEVICE == "cuda" else "cpu"},
                                                 attn_implementation="eager")
    model = prepare_model_for_kbit_training(model)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def _batch() -> list[dict]:
    """Four counting rows: with batch size 4, every step trains on this one batch."""
    starts = torch.tensor([[3], [40], [77], [101]])
    ids = (starts + torch.arange(SEQ)) % VOCAB
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def _four_bit(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}


def _train(base_dir: str, out: str, stage: int | None) -> dict:
    from peft import get_peft_model_state_dict

    model = _qlora_model(base_dir)
    four_bit = _four_bit(model)
    before = {n: (p.detach().clone(), p.quant_state) for n, p in four_bit.items()}
    args = TrainingArguments(output_dir=out, bf16=True, use_cpu=DEVICE == "cpu", max_steps=STEPS,
                             per_device_train_batch_size=4, learning_rate=LR, lr_scheduler_type="constant",
                             logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    if stage is not None:
        zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}})
    try:
        trainer = Trainer(model=model, args=args, train_dataset=_batch())
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))  # hf_zero checks the adapter file here
        engine = zt.session_of(trainer).engine if stage is not None else None
    finally:
        zt.deactivate()
    in_units = {id(p) for u in engine.units for p in u.params()} if engine is not None else set()
    with engine.gathered() if engine is not None else torch.no_grad():
        own = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    now = _four_bit(model)
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "own": own,
        "saved": load_file(os.path.join(out, "final", "adapter_model.safetensors")),
        "four_bit": len(now),
        "four_bit_kept": all(now.get(n) is four_bit[n] and now[n].quant_state is qs and torch.equal(now[n].detach(), w)
                             for n, (w, qs) in before.items()),
        "four_bit_in_units": sum(id(p) in in_units for p in now.values()),
        "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
    }


@pytest.fixture(scope="module")
def plain(base_dir, tmp_path_factory):
    return _train(base_dir, str(tmp_path_factory.mktemp("plain")), None)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_qlora_trains_and_saves_its_adapter(stage, base_dir, plain, tmp_path):
    ours = _train(base_dir, str(tmp_path), stage)
    for run in (plain, ours):
        losses = run["losses"]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
        assert max(losses[-3:]) < losses[0] - 10 * LOSS_RTOL * losses[0], losses  # it learns the batch
        # 2 layers x 7 linear layers, all 4-bit, untouched
        assert run["four_bit"] == 14 and run["four_bit_kept"] and run["four_bit_in_units"] == 0, run
        assert sorted(run["saved"]) == sorted(run["own"]) and len(run["own"]) == 2 * 7 * 2
        for name, want in run["own"].items():
            got = run["saved"][name]
            assert got.dtype == want.dtype and torch.equal(got, want), name
    assert plain["trainable_dtypes"] == ["torch.float32"] and ours["trainable_dtypes"] == ["torch.bfloat16"]
    assert abs(ours["losses"][0] - plain["losses"][0]) <= U * plain["losses"][0], (ours["losses"], plain["losses"])
    for a, b in zip(ours["losses"], plain["losses"]):
        assert abs(a - b) <= LOSS_RTOL * b, (stage, ours["losses"], plain["losses"])
