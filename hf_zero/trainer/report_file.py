"""What ``OUTPUT_DIR/hf_zero_report.json`` holds, how it is written, and its summary in human units.

The file is one JSON object (fields in docs/getting-started.md, "What a run writes"):

- ``status`` ("training" while the run goes on, "finished" after ``train()``), ``step``;
- ``stage``, ``world_size``, ``precision``, ``train_seconds``, ``tokens_per_s_total``;
- ``summary`` (finished only): the figures below in human units, as rank 0 prints them;
- ``last_log``: the Trainer's last training log (loss, learning rate, grad norm, epoch);
- ``ranks``: each rank's measured figures and its device (report.py measures them, device_memory.py
  reads the device);
- ``config_source`` and ``config``: the resolved config (no "auto" left) in hf_zero's own schema;
- ``versions``: hf_zero, Python, torch (its CUDA, NCCL), transformers, accelerate.

It is rewritten whole at logging steps (when: [Note: report rewrites] in report.py), beside the
old one and renamed over it ([Note: write beside, then swap], hf_zero/checkpoint/atomic.py), so a
run that dies leaves the report of its last rewrite, never a half-written one.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from hf_zero.byte_units import fmt_bytes
from hf_zero.checkpoint.atomic import Swap
from hf_zero.trainer.device_memory import PEAK_KINDS

REPORT_NAME = "hf_zero_report.json"
BYTE_KEYS = ("params", "grads", "peak_grads", "optimizer_state", "host_offload", "nvme_offload")


def run_facts(session, args) -> dict:
    """What stays the same for the whole run: stage, world size, precision, config, versions."""
    from hf_zero.config import config_to_dict
    from hf_zero.doctor.env_report import run_versions

    cfg = session.config
    return {"stage": cfg.zero.stage, "world_size": args.world_size, "precision": cfg.precision.dtype,
            "config_source": cfg.source, "config": config_to_dict(cfg), "versions": run_versions()}


def document(facts: dict, ranks: list[dict], *, status: str, step: int, train_seconds: float,
             last_log: dict) -> dict:
    """The report as written: ``facts`` (``run_facts``) around the measured ``ranks``."""
    tokens = sum(r["tokens"] for r in ranks)
    doc = {"status": status, "step": step, "stage": facts["stage"], "world_size": facts["world_size"],
           "precision": facts["precision"], "train_seconds": train_seconds,
           "tokens_per_s_total": tokens / train_seconds if train_seconds > 0 else None}
    if status == "finished":
        doc["summary"] = summary(doc, ranks)
    doc.update(last_log=last_log, ranks=ranks, config_source=facts["config_source"], config=facts["config"],
               versions=facts["versions"])
    return doc


def summary(doc: dict, ranks: list[dict]) -> dict[str, str]:
    """The figures in human units: per-rank bytes and peak memory as the largest over the ranks."""
    rate = doc["tokens_per_s_total"]
    out = {"run": f"ZeRO stage {doc['stage']}, {doc['world_size']} rank(s), {doc['precision']}, "
                  f"{max(r['steps'] for r in ranks)} steps in {doc['train_seconds']:.1f} s",
           "throughput": "n/a" if rate is None else f"{rate:,.0f} tok/s (all ranks)"}
    for key in BYTE_KEYS:
        out[key] = fmt_bytes(max(r["bytes"].get(key, 0) for r in ranks))
    peak = max(ranks, key=lambda r: r["peak_memory"]["bytes"])["peak_memory"]
    out["peak_memory"] = f"{fmt_bytes(peak['bytes'])} ({PEAK_KINDS.get(peak['kind'], peak['kind'])})"
    return out


def summary_text(doc: dict, path: str) -> str:
    """The summary as rank 0 prints it at the end of training."""
    s = doc["summary"]
    fallbacks = max((len(r.get("compile_fallbacks", ())) for r in doc["ranks"]), default=0)
    eager = (f" torch ran {fallbacks} code object(s) eagerly that it could not compile (TORCHDYNAMO_SUPPRESS_ERRORS=1; "
             "ranks[].compile_fallbacks).") if fallbacks else ""
    return (f"hf_zero: {s['run']}, {s['throughput']}. Largest rank at the optimizer step: params {s['params']}, "
            f"grads {s['grads']} (peak {s['peak_grads']}), optimizer state {s['optimizer_state']}, host offload "
            f"{s['host_offload']}, NVMe offload {s['nvme_offload']}; peak memory {s['peak_memory']}.{eager} Report: {path}")


_FAILED: set[str] = set()


def write(output_dir: str, doc: dict) -> str | None:
    """Write ``doc`` to ``output_dir/hf_zero_report.json`` beside the old one and rename it over;
    returns the path. A write that fails (a full disk) warns once and leaves the last report:
    the report must never stop a training run."""
    path = os.path.join(output_dir, REPORT_NAME)
    try:
        os.makedirs(output_dir, exist_ok=True)
        with Swap(output_dir) as swap:
            with open(swap.temp(REPORT_NAME), "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
            swap.commit()
    except OSError as error:
        if path not in _FAILED:
            _FAILED.add(path)
            warnings.warn(f"hf_zero: cannot write the run report {path} ({error}); training goes on, the report "
                          "stays at its last written step", UserWarning, stacklevel=2)
        return None
    return path


def print_summary(doc: dict, path: str) -> None:
    print(summary_text(doc, path), file=sys.stderr, flush=True)
