"""A LoRA fine-tune on a quantized frozen base (QLoRA-style), through the Trainer on CPU gloo ranks.

bitsandbytes is not needed: the tiny Llama's q_proj and v_proj are ``StandIn4bitLinear``s, whose
weight is a Parameter subclass of packed uint8 (two 4-bit codes a byte, shape (numel / 2, 1)) with
its scales in a ``quant_state`` attribute, as ``bitsandbytes.nn.Params4bit`` is; each up_proj is an
``StandInInt8Linear``, whose weight is a plain ``nn.Parameter`` of int8 codes (``Int8Params``'
dtype, without the subclass). LoRA adapts q_proj and v_proj on top of the 4-bit stand-ins.

At stage 3 those params stay whole on every rank, outside every unit ([Note: quantized frozen
params] in unit_plan.py), while the float frozen params (k_proj, o_proj, ...) are still sharded;
at stage 2 no frozen param is touched. Every run saves its adapter (checked by hf_zero's
verify_saved_adapter inside save_model) and must equal the plain Trainer's (DDP) adapter.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer

from hf_zero.engine.stage3.units import UnitState
from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer import session_of
from tests.trainer import tiny
from tests.trainer.tiny import with_zero

STEPS = 3


class StandInParams4bit(nn.Parameter):
    """What hf_zero sees of ``bitsandbytes.nn.Params4bit``: a Parameter subclass of packed uint8,
    whose meaning (shape, scales) is held on the object."""

    def __new__(cls, data: torch.Tensor, quant_state: dict):
        self = torch.Tensor._make_subclass(cls, data, False)
        self.quant_state = quant_state
        return self


class StandIn4bitLinear(nn.Linear):
    """A frozen linear layer stored as 4-bit codes: w = (code - 7.5) / 7.5 * absmax of its row."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        w = linear.weight.detach()
        absmax = w.abs().amax(dim=1)
        codes = torch.round(w / absmax[:, None] * 7.5 + 7.5).clamp(0, 15).to(torch.uint8).reshape(-1)
        packed = (codes[0::2] << 4) | codes[1::2]
        self.weight = StandInParams4bit(packed.reshape(-1, 1), {"absmax": absmax, "shape": tuple(w.shape)})

    def forward(self, x):
        packed, state = self.weight.reshape(-1), self.weight.quant_state
        codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(state["shape"]).float()
        return nn.functional.linear(x, ((codes - 7.5) / 7.5 * state["absmax"][:, None]).to(x.dtype))


class StandInInt8Linear(nn.Linear):
    """A frozen linear layer stored as int8 codes in a plain Parameter, its row scales a buffer."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1) / 127
        self.weight = nn.Parameter(torch.round(w / scale[:, None]).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return nn.functional.linear(x, (self.weight.float() * self.scale[:, None]).to(x.dtype))


def _model():
    from peft import LoraConfig, get_peft_model

    base = tiny.llama(0)
    for layer in base.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.v_proj = StandIn4bitLinear(attn.q_proj), StandIn4bitLinear(attn.v_proj)
        mlp.up_proj = StandInInt8Linear(mlp.up_proj)
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _quantized(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.dtype in (torch.uint8, torch.int8)}


def _run(rank, world, root):
    out = {}
    for stage in (None, 2, 3):

        def run():
            model = _model()
            quantized = _quantized(model)
            before = {n: p.detach().clone() for n, p in quantized.items()}
            path = tiny.out_dir(root, "qlora", stage)
            trainer = Trainer(model=model, args=tiny.args(path, max_steps=STEPS), train_dataset=tiny.lm_rows(16))
            trainer.train()
            engine = session_of(trainer).engine if stage is not None else None
            in_units = {id(p) for u in engine.units for p in u.params()} if engine is not None else set()
            units_at_rest = [u.state for u in engine.units if not u.persistent] if engine is not None else []
            trainer.save_model(os.path.join(path, "final"))  # checked by hf_zero before it returns
            now = _quantized(model)
            return {
                "path": os.path.join(path, "final"),
                "losses": tiny.history(trainer)["loss"],
                # the same Parameter objects, class, quant_state, values: whole and unchanged
                "same_objects": all(now[n] is p for n, p in quantized.items()),
                "subclass_kept": all(type(p).__name__ == "StandInParams4bit" and "absmax" in p.quant_state
                                     for n, p in now.items() if "_proj.base_layer" in n),
                "unchanged": all(torch.equal(now[n].detach(), before[n]) for n in before),
                "n_quantized": len(now),
                "checksum": sum(int(p.detach().to(torch.int64).sum()) for p in now.values()),
                "quantized_in_units": sum(id(p) in in_units for p in now.values()),
                # stage 3 still shards the float frozen params: empty between steps
                "float_frozen_sharded": sum(p.numel() == 0 for p in model.parameters()
                                            if not p.requires_grad and p.dtype == torch.float32),
                "all_sharded_at_rest": all(s is UnitState.SHARDED for s in units_at_rest),
            }

        out[stage] = with_zero(stage, run)
    return out


def test_quantized_frozen_params_stay_whole_and_lora_trains(tmp_path):
    results = run_on_ranks(_run, 2, str(tmp_path), timeout=300)
    for rank, out in enumerate(results):
        for stage, r in out.items():
            what = f"rank {rank} stage {stage}"
            # 2 layers x (q, v: 4-bit; up: int8)
            assert r["n_quantized"] == 6 and r["same_objects"] and r["subclass_kept"], (what, r)
            assert r["unchanged"] and r["quantized_in_units"] == 0, (what, r)
            assert r["checksum"] == results[0][None]["checksum"], what  # the same on every rank
            tiny.close(r["losses"], out[None]["losses"], what=f"{what} loss")
        assert out[3]["float_frozen_sharded"] >= 2 * 4 and out[3]["all_sharded_at_rest"]  # k, o, gate, down per layer
        assert out[2]["float_frozen_sharded"] == 0  # stages 1-2 leave frozen params as they are
    paths = results[0]
    plain = load_file(os.path.join(paths[None]["path"], "adapter_model.safetensors"))
    assert len(plain) == 2 * 2 * 2 and all("lora_" in n for n in plain)  # layers x (q, v) x (A, B)
    assert any(t.abs().max() > 0 for n, t in plain.items() if "lora_B" in n)  # it trained (B starts at 0)
    for stage in (2, 3):
        ours = load_file(os.path.join(paths[stage]["path"], "adapter_model.safetensors"))
        assert sorted(ours) == sorted(plain), stage
        for name in plain:
            torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=1e-7, msg=f"stage {stage} {name}")


def test_which_frozen_params_stay_whole():
    """The rule alone: only plain ``nn.Parameter``s of a float dtype of 2 bytes or more are sharded."""
    from hf_zero.engine.stage3.unit_plan import kept_whole, plan_units

    class FloatSubclass(nn.Parameter):
        pass

    def frozen(t):
        return nn.Parameter(t, requires_grad=False)

    cases = {
        "fp32": (frozen(torch.zeros(4)), False),
        "bf16": (frozen(torch.zeros(4, dtype=torch.bfloat16)), False),
        "uint8": (frozen(torch.zeros(4, dtype=torch.uint8)), True),
        "int8": (frozen(torch.zeros(4, dtype=torch.int8)), True),
        "bool": (frozen(torch.zeros(4, dtype=torch.bool)), True),
        "fp8": (frozen(torch.zeros(4, dtype=torch.float8_e4m3fn)), True),
        "fp32 subclass": (FloatSubclass(torch.zeros(4), requires_grad=False), True),
        "4-bit stand-in": (StandInParams4bit(torch.zeros(4, 1, dtype=torch.uint8), {}), True),
    }
    assert {k: kept_whole(p) for k, (p, _) in cases.items()} == {k: whole for k, (_, whole) in cases.items()}
    model = _model()
    frozen_params = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    planned = {n for plan in plan_units(model, trainable, frozen_params, 0, None) for n, _ in plan.frozen}
    assert planned == {n for n, p in frozen_params if p.dtype == torch.float32}
