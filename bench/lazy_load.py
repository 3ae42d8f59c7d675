"""Loading a large safetensors checkpoint sharded (``hf_zero.init.from_pretrained``) beside plain
``from_pretrained``: wall time and peak host RSS per process, on the device.

    python bench/lazy_load.py --out DIR --name NAME [--hidden 3072 --layers 26 ...] [--cpu_ranks 4]
        [--read_threads 4 --piece_mb 32]

1. writes a random-init Llama checkpoint (bf16, built on the GPU) with ``save_pretrained``;
2. in a fresh process each (so peaks do not mix): plain ``from_pretrained(..., device_map="cuda")``,
   then ``hf_zero.init.from_pretrained`` at W = 1 on the GPU; both run the same forward and the
   logits are compared;
3. ``--cpu_ranks W``: the sharded load on W gloo ranks on the CPU (each rank's shard in host
   memory), per-rank peak RSS against the bound model bytes / W + largest tensor + 1 GiB.

Peak RSS is the process's VmHWM (high-water mark since it started), the baseline its VmRSS after
the imports. The page cache (the checkpoint was just written) is not part of any process's RSS.
Writes NAME.json (and NAME.md) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ZERO3 = {"zero_optimization": {"stage": 3}}


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def write(path: str, hidden: int, layers: int, inter: int, heads: int, kv: int, vocab: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    t = time.perf_counter()
    model.save_pretrained(path)
    params = list(model.parameters())
    return {"model_bytes": sum(p.numel() * p.element_size() for p in params),
            "largest_tensor_bytes": max(p.numel() * p.element_size() for p in params),
            "params": sum(p.numel() for p in params), "save_s": time.perf_counter() - t,
            "files": sorted(os.listdir(path))}


def load(path: str, how: str, read_threads: int, piece_mb: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_zero.init as zi
    import accelerate  # noqa: F401  (both paths import it; counted in the baseline)
    from hf_zero.init import parallel_reads

    parallel_reads.READ_THREADS, parallel_reads.PIECE_BYTES = read_threads, piece_mb << 20  # hf_zero's reads

    base = status("VmRSS")
    torch.cuda.synchronize()
    t = time.perf_counter()
    if how == "plain":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    else:
        model = zi.from_pretrained(path, zero_config=ZERO3, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    ids = (torch.arange(256, device="cuda").view(1, -1) * 7) % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits.float()
    return {"how": how, "load_s": seconds, "read_threads": read_threads, "piece_mb": piece_mb, "base_rss": base, "peak_rss": status("VmHWM"),
            "gpu_allocated": torch.cuda.memory_allocated(), "logits_sum": float(logits.sum()),
            "logits_head": logits[0, :4, :4].flatten().tolist()}


def cpu_rank(rank: int, world: int, path: str) -> dict:
    import torch

    import hf_zero.init as zi
    import accelerate  # noqa: F401

    base = status("VmRSS")
    t = time.perf_counter()
    model = zi.from_pretrained(path, zero_config=ZERO3, dtype=torch.bfloat16, device="cpu")
    seconds = time.perf_counter() - t
    return {"rank": rank, "load_s": seconds, "base_rss": base, "peak_rss": status("VmHWM"),
            "held": zi.engine_of(model).held_bytes()["params"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="lazy_load")
    p.add_argument("--ckpt", default="/tmp/hf_zero_lazy_ckpt")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--cpu_ranks", type=int, default=4)
    p.add_argument("--read_threads", type=int, default=4, help="hf_zero's reader threads per rank (parallel_reads.py)")
    p.add_argument("--piece_mb", type=int, default=32, help="hf_zero's largest read, MiB (parallel_reads.py)")
    p.add_argument("--commit", default=None)
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.step:  # a child process: one measurement, JSON on the last line
        kind, _, arg = opts.step.partition(":")
        out = write(opts.ckpt, opts.hidden, opts.layers, opts.intermediate, opts.heads, opts.kv_heads, opts.vocab) \
            if kind == "write" else load(opts.ckpt, arg, opts.read_threads, opts.piece_mb)
        print(json.dumps(out))
        return

    def child(step: str) -> dict:
        cmd = [sys.executable, __file__, "--step", step] + sys.argv[1:]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{step} failed:\n{run.stderr[-4000:]}")
        return json.loads(run.stdout.strip().splitlines()[-1])

    import torch
    import transformers

    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "commit": opts.commit,
              "device": torch.cuda.get_device_name(0), "host_cores": os.cpu_count(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "checkpoint": child("write:")}
    model_bytes, largest = record["checkpoint"]["model_bytes"], record["checkpoint"]["largest_tensor_bytes"]
    record["plain"], record["hf_zero_w1"] = child("load:plain"), child("load:hf_zero")
    record["logits_equal"] = record["plain"]["logits_head"] == record["hf_zero_w1"]["logits_head"]
    record["bound_w1"] = model_bytes + largest + 2**30
    if opts.cpu_ranks:
        from hf_zero.testing.multiprocess import run_on_ranks

        w = opts.cpu_ranks
        record["cpu_ranks"] = run_on_ranks(cpu_rank, w, opts.ckpt, timeout=900)
        record["bound_cpu"] = model_bytes / w + largest + 2**30
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, opts.name + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    gib = 2**30
    lines = [f"# Sharded load of a {record['checkpoint']['params'] / 1e9:.2f} B-param bf16 checkpoint "
             f"({model_bytes / gib:.2f} GiB, largest tensor {largest / gib:.3f} GiB), {record['device']}", "",
             "| load | W | wall s | peak RSS GiB | RSS added GiB | bound GiB |", "|---|---|---:|---:|---:|---:|"]
    for key, label in (("plain", "transformers from_pretrained (device_map cuda)"),
                       ("hf_zero_w1", "hf_zero.init.from_pretrained (cuda)")):
        r = record[key]
        bound = f"{record['bound_w1'] / gib:.2f}" if key == "hf_zero_w1" else ""
        lines.append(f"| {label} | 1 | {r['load_s']:.1f} | {r['peak_rss'] / gib:.2f} | "
                     f"{(r['peak_rss'] - r['base_rss']) / gib:.2f} | {bound} |")
    for r in record.get("cpu_ranks", []):
        lines.append(f"| hf_zero.init.from_pretrained (cpu, gloo) rank {r['rank']} | {opts.cpu_ranks} | {r['load_s']:.1f} "
                     f"| {r['peak_rss'] / gib:.2f} | {(r['peak_rss'] - r['base_rss']) / gib:.2f} | "
                     f"{record['bound_cpu'] / gib:.2f} |")
    lines += ["", f"Logits of one forward equal (plain vs hf_zero, first 16): {record['logits_equal']}"]
    with open(os.path.join(opts.out, opts.name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
