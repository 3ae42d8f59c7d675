"""Build the real DeepSpeed checkpoints under tests/data/deepspeed_ckpt/ with DeepSpeed itself, on CPU.

Not run by the test suite: run it by hand, in a throwaway venv that has DeepSpeed (hf_zero never
imports DeepSpeed). The committed fixture was made with Python 3.11.7, torch 2.13.0+cpu,
deepspeed 0.19.8 and transformers 5.24.0 (``manifest.json`` records them), in about 3 minutes on
2 CPU cores:

    python3.11 -m venv /tmp/dsvenv
    DS_BUILD_OPS=0 /tmp/dsvenv/bin/pip install torch==2.13.0 deepspeed==0.19.8 transformers safetensors
    DS_ACCELERATOR=cpu /tmp/dsvenv/bin/python tests/data/deepspeed_ckpt/make_fixture.py

(DeepSpeed JIT-builds its small CPU shared-memory comm op with ninja on first use; a C++ compiler
is needed for that, nothing else is compiled.)

For every case below it trains a tiny Llama (the LlamaConfig in ``_model``) for two steps with
``deepspeed.initialize`` (gloo, one process per rank, bf16 params with fp32 masters, two param
groups as the HF Trainer makes them, plain ``torch.optim.SGD`` so the files carry no optimizer
moments and stay small), calls ``engine.save_checkpoint(stage{N}/{case})``, and writes DeepSpeed's
own answer next to the checkpoint as ``reference_fp32.safetensors``:

* for ZeRO checkpoints, what ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
  returns (fp32 masters, buffers cast to fp32, stage 2-3 frozen params, tied aliases);
* for ``bf16_optimizer``, which zero_to_fp32 refuses ("is not a zero checkpoint": the file has
  no ``zero_stage``), ``deepspeed.utils.safe_get_full_fp32_param`` of every trainable param,
  taken from the live engine right after saving.

``manifest.json`` lists the cases. The recovery script DeepSpeed copies into each checkpoint
folder (``zero_to_torch.py``) is deleted.

Cases:

* ``stage{1,2,3}/tied``: tied embeddings, world size 2.
* ``stage{1,2,3}/untied``: untied embeddings, world size 3 (stage 3 then pads every param whose
  size is not a multiple of 3, and at stages 1-2 the last rank's partition is shorter), MLP biases
  of 66 elements, a frozen param, a persistent buffer, and ``parameter_alignment`` on (at stages
  1-2 each param then starts at a multiple of 8 bf16 elements in its flat group, so each
  66-element bias is followed by 6 padding elements).
* ``stage1/bf16_optimizer``: tied, world size 2, ``data_types.grad_accum_dtype: fp32``, which makes
  DeepSpeed use its BF16_Optimizer at stage 1 (files named ``bf16_zero_pp_rank_*``, no
  ``zero_stage``, end padding kept).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 2
FROZEN = "model.layers.0.mlp.up_proj.weight"

CASES = {
    "tied": dict(stages=[1, 2, 3], world_size=2, tie=True, mlp_bias=False, frozen="", config={}),
    "untied": dict(
        stages=[1, 2, 3], world_size=3, tie=False, mlp_bias=True, frozen=FROZEN,
        config={"zero_optimization": {"parameter_alignment": True}},
    ),
    "bf16_optimizer": dict(
        stages=[1], world_size=2, tie=True, mlp_bias=False, frozen="",
        config={"data_types": {"grad_accum_dtype": "fp32"}},
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(out: Path) -> None:
    """Run every (stage, case) as its own group of rank processes, then write manifest.json."""
    manifest = []
    for stage in (1, 2, 3):
        for case, spec in CASES.items():
            if stage not in spec["stages"]:
                continue
            folder = out / f"stage{stage}" / case
            _run_ranks(case, stage, folder, spec["world_size"])
            reference = "safe_get_full_fp32_param" if case == "bf16_optimizer" else "zero_to_fp32"
            entry = {k: v for k, v in spec.items() if k != "stages"}
            manifest.append(dict(path=f"stage{stage}/{case}", stage=stage, tag=f"global_step{STEPS}",
                                 reference=reference, **entry))
    (out / "manifest.json").write_text(json.dumps(dict(versions=_versions(), cases=manifest), indent=2) + "\n")


def _run_ranks(case: str, stage: int, folder: Path, world: int) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", case, "--stage", str(stage), "--out", str(folder)],
                         env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in range(world)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"stage {stage} case {case}: rank exit codes {codes}")


def _versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return dict(python=sys.version.split()[0], torch=torch.__version__, deepspeed=deepspeed.__version__,
                transformers=transformers.__version__)


def _model(tie: bool, mlp_bias: bool, frozen: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=66, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, mlp_bias=mlp_bias,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if frozen:
        model.get_parameter(frozen).requires_grad_(False)
        # a persistent buffer, so the checkpoint's module state dict has one to report
        model.model.register_buffer("marker", torch.arange(5, dtype=torch.float32) / 7)
    return model


def _param_groups(model):
    """Two groups as the HF Trainer builds them: weight decay for matrices, none for biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if "norm" in name or name.endswith("bias") else decay).append(p)
    return [dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)]


def _ds_config(stage: int, extra: dict) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,  # SGD is not on DeepSpeed's list of tested optimizers
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def work(case: str, stage: int, out: Path) -> None:
    """One rank: train STEPS steps, save the checkpoint, and (rank 0) DeepSpeed's fp32 answer."""
    import deepspeed
    import torch
    import torch.distributed as dist

    spec = CASES[case]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = _model(spec["tie"], spec["mlp_bias"], spec["frozen"])
    optimizer = torch.optim.SGD(_param_groups(model), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(stage, spec["config"]))
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (2, 12), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out))
    live = _live_fp32(engine) if case == "bf16_optimizer" else None  # a collective: every rank
    dist.barrier()
    if rank == 0:
        _write_reference(out, live)
    dist.barrier()
    dist.destroy_process_group()


def _live_fp32(engine) -> dict:
    """Every trainable param's full fp32 master, from the live engine (DeepSpeed's public API)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().cpu().clone()
            for name, p in engine.module.named_parameters() if p.requires_grad}


def _write_reference(out: Path, live: dict | None) -> None:
    """DeepSpeed's own consolidation of the checkpoint, saved as safetensors (aliases cloned)."""
    from safetensors.torch import save_file

    if live is None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        live = get_fp32_state_dict_from_zero_checkpoint(str(out))
    tensors = {k: v.detach().clone().contiguous() for k, v in live.items()}
    save_file(tensors, str(out / "reference_fp32.safetensors"))
    for script in out.glob("zero_to_*.py"):  # DeepSpeed's recovery script (zero_to_torch.py in 0.19)
        script.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--worker", choices=sorted(CASES))
    parser.add_argument("--stage", type=int)
    args = parser.parse_args()
    if args.worker:
        work(args.worker, args.stage, args.out)
    else:
        drive(args.out)


if __name__ == "__main__":
    main()
