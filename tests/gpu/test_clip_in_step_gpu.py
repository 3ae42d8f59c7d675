"""[Note: clip in the step] on one GPU: bf16 params, fp32 masters, torch's CUDA fused AdamW reading
the clip coefficient from ``grad_scale``. Against the engine with the clip as its own pass
(a foreach AdamW, which cannot take ``grad_scale``): the same grad norms and, after the steps, the
same masters to rounding, at stages 2 and 3, with clipping firing at every step.

    pytest tests/gpu/test_clip_in_step_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_zero.engine import ZeroEngine, ZeroModule

pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)


def _run(model, fused: bool, stage: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1,
                            **({"fused": True} if fused else {"foreach": True}))
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=100_000, param_dtype=torch.bfloat16)
    wrapped = ZeroModule(model, engine)
    g = torch.Generator(device="cuda").manual_seed(1)
    norms, scaled = [], []
    for _ in range(4):
        ids = torch.randint(0, 256, (2, 64), device="cuda", generator=g)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        norms.append(engine.clip_grad_norm_(0.05).item())
        scaled.append(getattr(opt, "grad_scale", None) is not None)
        opt.step()
        assert getattr(opt, "grad_scale", None) is None
        wrapped.zero_grad()
    masters = torch.cat([m.flatten() for m in engine.masters]).clone()
    engine.close()
    return norms, scaled, masters


@pytest.mark.parametrize("stage", [2, 3])
def test_fused_step_takes_the_clip_on_cuda(stage):
    base = _model()
    norms, scaled, masters = _run(copy.deepcopy(base), True, stage)
    ref_norms, ref_scaled, ref_masters = _run(copy.deepcopy(base), False, stage)
    assert all(scaled) and not any(ref_scaled)
    assert min(ref_norms) > 1.0  # the clip at 0.05 fired at every step
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) <= 1e-3 * b, (norms, ref_norms)
    rel = ((masters - ref_masters).norm() / ref_masters.norm()).item()
    assert rel < 1e-5, rel
