"""``hf-zero estimate`` against what the GPU benchmark runs measured (bench/results/*.json).

Each hf_zero run of ``bench/run.py`` logs rank 0's ``hf_zero_report.json`` figures (bytes held
at the optimizer step, measured from the tensors) and the run's peak allocated GPU memory. This
prints, as a markdown table for docs/estimate.md, the estimator's numbers for the same model,
stage, world size and precision beside them. CPU only; no GPU needed:

    python bench/estimate_vs_measured.py bench/results/h100_1b1_w1_lazy_grads.json \
        bench/results/h100x2_1b1_w2.json bench/results/h100x2_1b1_w2_s3.json
"""

from __future__ import annotations

import json
import sys

from transformers import LlamaConfig

from hf_zero.estimate import (activation_bytes, activation_shape, count_params, estimate_bytes,
                              gathered_params_bytes, meta_model)

PRESETS = {"1b1": (2048, 22, 5632, 32, 4, 32000), "7b": (4096, 32, 11008, 32, 32, 32000)}  # as bench/job.py
KEYS = [("params", "params_bytes"), ("grads_at_step", "grads_bytes"), ("optimizer_state", "optimizer_state_bytes")]
GIB = 2**30


def rows(path: str) -> list[str]:
    out = []
    for run in json.load(open(path)):
        if not run.get("mode", "").startswith("hfzero") or run.get("status") != "ok":
            continue
        s = run["settings"]
        hidden, layers, inter, heads, kv, vocab = PRESETS[s["preset"]]
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                          max_position_embeddings=max(2048, s["seq_len"]), use_cache=False)
        counts = count_params(meta_model(cfg))
        stage, world = int(run["mode"].split("-s")[1][0]), run["world_size"]
        b = estimate_bytes(counts, stage=stage, world=world, dtype="bf16", model_dtype="bf16", optimizer="adamw")
        logged = {k.removeprefix("hf_zero/"): v for k, v in run["logged"].items() if k.startswith("hf_zero/")}
        job = f"{s['preset']}, stage {stage}, W={world}"
        for key, logged_key in KEYS:
            want, got = b[key], logged[logged_key]
            out.append(f"| {job} | {key} | {want / GIB:.3f} | {got / GIB:.3f} | {100 * (want - got) / got:+.1f}% |")
        gathered = gathered_params_bytes(counts, world=world, dtype="bf16", model_dtype="bf16") if stage == 3 else 0
        act = activation_bytes(activation_shape(cfg), micro_batch=s["micro_batch"], seq_len=s["seq_len"],
                               dtype="bf16", gradient_checkpointing=False)
        peak = b["params"] + gathered + b["peak_grads"] + b["optimizer_state"] + act
        got = run["peak_alloc_gib"] * GIB
        out.append(f"| {job} | peak allocated (states + activations estimate) | {peak / GIB:.3f} | "
                   f"{got / GIB:.3f} | {100 * (peak - got) / got:+.1f}% |")
    return out


def main(paths: list[str]) -> None:
    print("| job | quantity | estimate (GiB) | measured (GiB) | error |")
    print("|---|---|---:|---:|---:|")
    for path in paths:
        for row in rows(path):
            print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
