"""The load as a Trainer script does it, one rank (bench/lazy_load.py's rows "through the Trainer").

    torchrun --nproc_per_node 1 -m hf_zero.run bench/lazy_load_script.py --zero_config hfzero_s3.json \\
        --ckpt DIR --result FILE [--device cuda|cpu]
    torchrun --nproc_per_node 1 bench/lazy_load_script.py --deepspeed ds_z3.json --ckpt DIR --result FILE

A user's script parses its ``TrainingArguments`` first and then calls
``AutoModelForCausalLM.from_pretrained(dir)``; so does this one, and it times only the load:

- under ``hf_zero.run`` with a stage-3 zero config, the script's ``from_pretrained`` loads sharded
  (``zero3_init_flag``, on by default at stage 3; hf_zero/init/plugin.py); the record says
  whether it was (``sharded``), since a fallback would load whole with a warning;
- with ``--deepspeed``, the ``TrainingArguments(deepspeed=...)`` made first is what makes
  transformers load under DeepSpeed's ``zero.Init`` (it keeps a weak reference to an
  ``HfTrainerDeepSpeedConfig`` with the Trainer-resolved values), so ``from_pretrained`` builds
  the model partitioned and rank 0 copies the checkpoint into it unit by unit.

Timed: ``TrainingArguments`` (process group, DeepSpeed's import and config) as ``setup_s``, then
``from_pretrained`` to a model ready for training as ``load_s`` (GPU work synchronized). Then one
forward on fixed ids (DeepSpeed's partitioned params gathered whole for it with
``GatheredParameters``) gives the logits sample bench/lazy_load.py compares across rows. Peak host
RSS is this process's VmHWM, the baseline its VmRSS after the imports; GPU peaks are torch's
allocator's during the load. Writes one JSON object to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def vm(key: str) -> int:
    """This process's ``key`` from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def gpu_peaks(device: str) -> dict:
    import torch

    if device != "cuda":
        return {"gpu_peak_allocated": None, "gpu_peak_reserved": None}
    return {"gpu_peak_allocated": torch.cuda.max_memory_allocated(),
            "gpu_peak_reserved": torch.cuda.max_memory_reserved()}


def logits_sample(model, device: str) -> dict:
    """One forward on 256 fixed ids: the logits' sum and first 16 values (rows compare them)."""
    import torch

    ids = (torch.arange(256, device=device).view(1, -1) * 7) % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits.float()
    return {"logits_sum": float(logits.sum()), "logits_head": logits[0, :4, :4].flatten().tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--result", required=True, help="the JSON file to write; {rank} in it becomes this rank's")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed ZeRO-3 config: load under zero.Init")
    opts = p.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, TrainingArguments

    if opts.deepspeed:
        import deepspeed  # noqa: F401  (imported by TrainingArguments anyway; counted in the baseline)
    base = vm("VmRSS")
    t = time.perf_counter()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="lazy_load_script_"), report_to=[],
                             bf16=opts.device == "cuda", use_cpu=opts.device == "cpu", deepspeed=opts.deepspeed)
    setup_s = time.perf_counter() - t
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(opts.device)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(opts.ckpt, dtype=torch.bfloat16)
    sync(opts.device)
    load_s = time.perf_counter() - t
    record = {"how": "deepspeed_zero3" if opts.deepspeed else "hf_zero_trainer", "setup_s": setup_s, "load_s": load_s,
              "base_rss": base, "peak_rss": vm("VmHWM"), **gpu_peaks(opts.device),
              "world_size": int(os.environ.get("WORLD_SIZE", "1")), "device_of_args": str(args.device),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    if opts.deepspeed:
        import deepspeed

        record["versions"]["deepspeed"] = deepspeed.__version__
        record["zero_init"] = all(hasattr(p, "ds_id") for p in model.parameters())  # partitioned by zero.Init
        record["param_dtype"] = str(next(model.parameters()).dtype)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            record.update(logits_sample(model, opts.device))
    else:
        from hf_zero.init import engine_of

        record["sharded"] = engine_of(model) is not None
        record["param_dtype"] = str(next(model.parameters()).dtype)
        record.update(logits_sample(model, opts.device))
    with open(opts.result.replace("{rank}", os.environ.get("RANK", "0")), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
