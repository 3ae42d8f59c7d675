"""GPU twins of ``tests/engine/test_parity.py``: ZeRO-1/2/3 vs DDP under NCCL, one GPU per rank.

For stages 1, 2, 3 at W = 2 and 4, the engine trains a copy of a tiny Llama (odd sizes, a frozen
weight, a param forward never uses) next to a DDP reference with the same fused ``AdamW``, on the
same per-rank batches, and every step compares losses, reduced gradients, the clipping norm and
the fp32 masters. All cases of one W run in one spawn of W ranks (start-up dominates), and each
(stage, precision) is reported as its own test. Measured errors are written as JSON to the path in
``HF_ZERO_PARITY_REPORT`` when it is set, so tolerances can be checked against what a run saw.

[Note: fp32 tolerance] fp32 params, fp32 NCCL sums, TF32 off: the engine's reduce-scatter and
DDP's all-reduce add the same W terms, perhaps in another order, so each reduced gradient differs
by at most 2 (W - 1) 2^-24 of the sum of magnitudes (~1e-6 at W = 4); losses, norms and params
are held to ``FP32_RTOL`` = 1e-5 relative, as on CPU.

[Note: bf16 tolerance] The engine's bf16 recipe is: bf16 params (``param_dtype=bfloat16``),
forward and backward under bf16 autocast, bf16 gradients pre-divided by W and reduce-scattered in
bf16, an fp32 main grad, an fp32 master the optimizer steps, and params = bf16(master) after the
step. Against a plain fp32 DDP model that recipe differs by bf16 rounding everywhere and any
tolerance would be loose, so the reference runs the same recipe: a bf16 copy of the model in DDP
(DDP also pre-divides and all-reduces bf16 buckets), fp32 masters stepped by the same optimizer,
params = bf16(master). What is left is the order in which NCCL adds the W bf16 terms of each
gradient element (all-reduce vs reduce-scatter), and the order of fp32 sums in the norm.

bf16 keeps 8 significant bits (7 stored + the implicit one), so one rounding has relative error
at most u = 2^-8. NCCL adds bf16 terms one hop at a time, rounding after each add, so a sum of W
terms x_r is off from the exact sum by at most (W - 1) u sum_r |x_r|, and two different orders
differ by at most twice that. Hence, with A = sum_r |g_r| / W (each rank's local gradient g_r,
measured in the test with an extra ``no_sync`` backward) and G the reference's reduced gradient,

    ||G_engine - G_reference|| <= 2 (W - 1) u ||A||  +  u ||G||                            (1)

at step 0, where both sides hold identical params. The second term allows one bf16 rounding of
each local gradient in case a kernel picks another algorithm for the engine's flat-buffer views;
for W = 2 the first term is zero (a + b = b + a exactly), so W = 2 should be bitwise equal.
Every step, the norms obey the triangle inequality | ||G_e|| - ||G_r|| | <= ||G_e - G_r||, so the
engine's clipping norm is checked against the gradient difference actually measured:

    | norm_engine - norm_reference | <= ||G_engine - G_reference|| + 1e-6 norm_reference       (2)

Later steps start from params that differ by these roundings, so there is no tight bound on
the trajectory. AdamW moves each master by about lr per step whatever the gradient's scale, so a
fault of the machinery (a stale bf16 param, a master piece at the wrong place, a lost update)
makes the masters drift apart by O(lr) per step, while reduction order alone perturbs each
update by about the relative gradient difference (a few u). With drift = rms(master_e -
master_r) / (lr * steps), the test asserts drift <= 1/8, losses within u relative (a one-ulp
change of bf16 logits), and, exactly, that every engine param equals bf16(its fp32 master).

Run on CPU (gloo, bf16 autocast on CPU) to debug the test logic itself:

    HF_ZERO_PARITY_DEVICE=cpu HF_ZERO_PARITY_WORLDS=2 python -m pytest -q tests/gpu
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama

DEVICE = os.environ.get("HF_ZERO_PARITY_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"HF_ZERO_PARITY_DEVICE={DEVICE!r}: expected 'cuda' or 'cpu'")
BACKEND = {"cuda": "nccl", "cpu": "gloo"}[DEVICE]
WORLDS = [int(w) for w in os.environ.get("HF_ZERO_PARITY_WORLDS", "2,4").split(",")]
STAGES = [1, 2, 3]
PRECISIONS = ["fp32", "bf16"]

# The `gpu` mark (skipped without CUDA, see conftest.py) unless the CPU debug mode is asked for.
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

STEPS = 8
LR = 1e-3
GRAD_ACCUM = {"fp32": 2, "bf16": 1}  # bf16: one micro-step, so no extra bf16 accumulation rounding
BUCKET_NUMEL = 2000  # several buckets per stage-1/2 buffer
U_BF16 = 2.0**-8
FP32_RTOL = 1e-5
BF16_MAX_DRIFT = 1 / 8


def _optimizer(named: list[tuple[str, nn.Parameter]], device: str) -> torch.optim.Optimizer:
    decay = [p for n, p in named if p.dim() > 1 or n == "unused_bias"]
    no_decay = [p for n, p in named if not (p.dim() > 1 or n == "unused_bias")]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=LR, **fast)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class _Partial:
    """Per-rank sums over this rank's shard elements; the parent adds them over ranks."""

    def __init__(self):
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)


def _case(rank: int, world: int, device: str, stage: int, precision: str) -> list[dict]:
    """One (stage, precision) run on this rank; per step, partial sums and per-rank values."""
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    bf16 = precision == "bf16"
    base = add_frozen_and_unused(tiny_llama(0)).to(dev)
    ref, model = copy.deepcopy(base), copy.deepcopy(base)
    if bf16:
        for _, p in _trainable(ref):
            p.data = p.data.to(torch.bfloat16)  # as the engine casts the trainable params
    ddp = DDP(ref, device_ids=[rank] if device == "cuda" else None, find_unused_parameters=True)
    if bf16:
        masters = {n: nn.Parameter(p.detach().float().clone()) for n, p in _trainable(ref)}
        ref_opt = _optimizer(list(masters.items()), device)
    else:
        masters = dict(_trainable(ref))  # fp32: the params are their own masters
        ref_opt = _optimizer(_trainable(ref), device)
    ref_params = dict(_trainable(ref))
    opt = _optimizer(_trainable(model), device)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=BUCKET_NUMEL,
                        param_dtype=torch.bfloat16 if bf16 else None)
    wrapped = ZeroModule(model, engine)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    accum = GRAD_ACCUM[precision]
    vocab = base.config.vocab_size
    out = []
    for step in range(STEPS):
        part = _Partial()
        losses = []
        local_abs = None
        for micro in range(accum):
            inputs = {k: v.to(dev) for k, v in batch(rank, step, micro, vocab).items()}
            last = micro == accum - 1
            if bf16 and step == 0:
                # A = sum_r |g_r| / W for bound (1): this rank's own gradient, without reduction.
                with ddp.no_sync(), autocast():
                    ddp(**inputs).loss.backward()
                local_abs = {n: (p.grad.float().abs() / world) for n, p in ref_params.items() if p.grad is not None}
                for t in local_abs.values():
                    dist.all_reduce(t)
                ref.zero_grad(set_to_none=True)
            with ddp.no_sync() if not last else contextlib.nullcontext(), autocast():
                loss_ref = ddp(**inputs).loss / accum
            loss_ref.backward()
            with wrapped.no_sync() if not last else contextlib.nullcontext(), autocast():
                loss = wrapped(**inputs).loss / accum
            loss.backward()
            losses.append((loss.item(), loss_ref.item()))

        # Reduced gradients, compared on this rank's shard of every param (before clipping).
        engine.finish_grad_sync()
        grads_ref = {n: None if p.grad is None else p.grad.detach().float().flatten() for n, p in ref_params.items()}
        none_mismatch = 0
        for s in engine.shard_map():
            if s.local is None:
                continue
            g_ref = grads_ref[s.name]
            g_eng = None if s.piece is None or s.piece.grad is None else s.piece.grad.detach().float()
            if (g_ref is None) != (g_eng is None):
                none_mismatch += 1
                continue
            if g_ref is None:
                continue
            r = g_ref[s.local.start : s.local.end]
            part.add("grad_diff2", (g_eng - r).pow(2).sum())
            part.add("grad_ref2", r.pow(2).sum())
            if local_abs is not None:
                part.add("abs_sum2", local_abs[s.name].flatten()[s.local.start : s.local.end].pow(2).sum())

        if bf16:
            for n, p in ref_params.items():
                masters[n].grad = None if p.grad is None else p.grad.detach().float()
        norm_ref = torch.nn.utils.clip_grad_norm_([m for m in masters.values() if m.grad is not None], 1.0)
        norm = engine.clip_grad_norm_(1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        if bf16:
            with torch.no_grad():
                for n, p in ref_params.items():
                    p.copy_(masters[n])  # params = bf16(master), as the engine does
        opt.step()
        wrapped.zero_grad()

        # fp32 masters after the step, on this rank's shard of every param.
        bf16_mismatch = 0
        with engine.gathered():
            full = {n: p.detach() for n, p in model.named_parameters()}
            for s in engine.shard_map():
                if s.master is None:
                    continue
                m_ref = masters[s.name].detach().flatten()[s.local.start : s.local.end]
                part.add(f"m_diff2:{s.name}", (s.master - m_ref).pow(2).sum())
                part.add(f"m_ref2:{s.name}", m_ref.pow(2).sum())
                part.add("m_count", s.master.numel())
                if bf16:  # the engine's bf16 param is exactly the rounding of its master
                    p_local = full[s.name].flatten()[s.local.start : s.local.end]
                    bf16_mismatch += int((p_local != s.master.to(torch.bfloat16)).sum())
            # Full params, same on every rank: how many elements differ from the reference.
            p_diff = sum(int((full[n] != p.detach().to(full[n].dtype)).sum()) for n, p in ref_params.items())
            p_numel = sum(p.numel() for p in ref_params.values())
        out.append({
            "sums": part.sums,
            "losses": losses,
            "norm": norm.item(),
            "norm_ref": norm_ref.item(),
            "none_mismatch": none_mismatch,
            "bf16_param_vs_master_mismatch": bf16_mismatch,
            "param_elements_differing": p_diff / p_numel,
        })
    engine.close()
    return out


def _all_cases(rank: int, world: int, device: str) -> dict:
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cases: true fp32 matmuls
        torch.backends.cudnn.allow_tf32 = False
    return {f"{precision}-s{stage}": _case(rank, world, device, stage, precision)
            for stage in STAGES for precision in PRECISIONS}


_RESULTS: dict[int, object] = {}
_REPORT: dict[str, dict] = {}


def _results(world: int) -> dict:
    """Every case of one world size, from one spawn (cached; a failure is cached too)."""
    if world not in _RESULTS:
        try:
            _RESULTS[world] = run_on_ranks(_all_cases, world, DEVICE, timeout=300, backend=BACKEND)
        except RankFailure as e:
            _RESULTS[world] = e
    result = _RESULTS[world]
    if isinstance(result, Exception):
        raise result
    return result


def _combine(per_rank: list[list[dict]]) -> list[dict]:
    """Per step: the ranks' partial sums added, per-rank values kept."""
    steps = []
    for step_parts in zip(*per_rank):
        sums: dict[str, float] = {}
        for part in step_parts:
            for k, v in part["sums"].items():
                sums[k] = sums.get(k, 0.0) + v
        steps.append({"sums": sums, "ranks": step_parts})
    return steps


def _rel(diff2: float, ref2: float) -> float:
    return math.sqrt(diff2) / max(math.sqrt(ref2), 1e-30)


def _measure(world: int, stage: int, precision: str) -> list[dict]:
    per_rank = [r[f"{precision}-s{stage}"] for r in _results(world)]
    rows = []
    for step, s in enumerate(_combine(per_rank)):
        sums, r0 = s["sums"], s["ranks"][0]
        names = [k.split(":", 1)[1] for k in sums if k.startswith("m_diff2:")]
        per_param = {n: _rel(sums[f"m_diff2:{n}"], sums[f"m_ref2:{n}"]) for n in names}
        m_diff2 = sum(sums[f"m_diff2:{n}"] for n in names)
        rows.append({
            "step": step,
            "loss_rel": max(abs(a - b) / abs(b) for r in s["ranks"] for a, b in r["losses"]),
            "grad_diff": math.sqrt(sums.get("grad_diff2", 0.0)),
            "grad_ref": math.sqrt(sums.get("grad_ref2", 0.0)),
            "abs_sum": math.sqrt(sums["abs_sum2"]) if "abs_sum2" in sums else None,
            "norm": r0["norm"],
            "norm_ref": r0["norm_ref"],
            "norms_agree_over_ranks": len({r["norm"] for r in s["ranks"]}) == 1,
            "master_rel": _rel(m_diff2, sum(sums[f"m_ref2:{n}"] for n in names)),
            "master_rel_worst_param": max(per_param.values()),
            "master_rms_diff": math.sqrt(m_diff2 / sums["m_count"]),
            "none_mismatch": sum(r["none_mismatch"] for r in s["ranks"]),
            "bf16_param_vs_master_mismatch": sum(r["bf16_param_vs_master_mismatch"] for r in s["ranks"]),
            "param_elements_differing": r0["param_elements_differing"],
        })
    _REPORT[f"w{world}-s{stage}-{precision}"] = {"device": DEVICE, "rows": rows}
    path = os.environ.get("HF_ZERO_PARITY_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_REPORT, f, indent=1)
    return rows


def _skip_if_too_few_gpus(world: int) -> None:
    if DEVICE == "cuda" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs for W = {world}; {torch.cuda.device_count()} visible")


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s}")
def test_fp32_parity(world, stage):
    """fp32: losses, reduced grads, norms and masters within 1e-5 of DDP; see [Note: fp32 tolerance]."""
    _skip_if_too_few_gpus(world)
    rows = _measure(world, stage, "fp32")
    for r in rows:
        where = f"step {r['step']}: {r}"
        assert r["none_mismatch"] == 0, where
        assert r["norms_agree_over_ranks"], where
        assert r["loss_rel"] <= FP32_RTOL, where
        assert r["grad_diff"] <= FP32_RTOL * r["grad_ref"], where
        assert abs(r["norm"] - r["norm_ref"]) <= FP32_RTOL * r["norm_ref"], where
        assert r["master_rel"] <= FP32_RTOL, where
        assert r["master_rel_worst_param"] <= 10 * FP32_RTOL, where


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s}")
def test_bf16_parity(world, stage):
    """bf16 params + fp32 masters vs DDP running the same recipe; bounds (1), (2) and the drift
    limit are derived in [Note: bf16 tolerance]."""
    _skip_if_too_few_gpus(world)
    rows = _measure(world, stage, "bf16")
    first = rows[0]
    bound1 = 2 * (world - 1) * U_BF16 * first["abs_sum"] + U_BF16 * first["grad_ref"]
    assert first["grad_diff"] <= bound1, f"bound (1): {first['grad_diff']} > {bound1}; {first}"
    for r in rows:
        where = f"step {r['step']}: {r}"
        assert r["none_mismatch"] == 0, where
        assert r["norms_agree_over_ranks"], where
        assert r["bf16_param_vs_master_mismatch"] == 0, where
        assert abs(r["norm"] - r["norm_ref"]) <= r["grad_diff"] + 1e-6 * r["norm_ref"], f"bound (2), {where}"
        assert r["loss_rel"] <= U_BF16, where
        drift = r["master_rms_diff"] / (LR * (r["step"] + 1))
        assert drift <= BF16_MAX_DRIFT, f"drift {drift}, {where}"
