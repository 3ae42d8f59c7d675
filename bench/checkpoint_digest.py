"""What the checkpoint digests cost (issue 15, [Note: checkpoint digests] in
hf_zero/checkpoint/digests.py): one engine's sharded save timed under each
``HF_ZERO_CHECKPOINT_DIGEST`` mode, and the verification a resume runs (``sharded.check_files``),
with the page cache dropped first where the machine allows it (else it says so).

One process, no process group (W = 1): the 1.1 B Llama of bench/run.py's preset in bf16 on the
GPU, stage 2, fused AdamW after one step, so the sharded state is the fp32 masters and both Adam
moments (12 bytes per parameter). Modes alternate over ``--repeats`` rounds. One JSON record to
``--out``:

    python3 bench/checkpoint_digest.py --dir /tmp/ckpt --out "$OUT/digest_cost.json"

On a machine without a GPU: ``--device cpu --preset cpu`` (28 M parameters in fp32, a 0.34 GB
sharded state). Each row also splits the ``full`` digest's cost of the files written: reading
them back (page cache) and hashing them (``reread_s``, ``hash_s``: a write-time hash would save
only the first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from hf_zero.checkpoint import digests, sharded
from hf_zero.engine import ZeroEngine, ZeroModule

PRESETS = {"cpu": (512, 4, 1408, 8, 4, 16000), "small": (1024, 8, 2816, 16, 4, 32000),
           "1b1": (2048, 22, 5632, 32, 4, 32000)}


def _drop_page_cache() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)


def _reread_and_hash(path: str) -> tuple[float, float]:
    """Seconds to read every file of ``path`` back, and to sha256 the bytes read (in memory)."""
    reread = hashed = 0.0
    for name in sorted(os.listdir(path)):
        start = time.perf_counter()
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        reread += time.perf_counter() - start
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hashed += time.perf_counter() - start
    return reread, hashed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True, help="scratch folder for the checkpoints (removed after)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="1b1", choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args()
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    h, layers, inter, heads, kv, vocab = PRESETS[args.preset]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab)
    model = LlamaForCausalLM(cfg).to(args.device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=h * h, param_dtype=dtype)
    ids = torch.randint(0, vocab, (1, 512 if gpu else 64), device=args.device)
    ZeroModule(model, engine)(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    if gpu:
        torch.cuda.synchronize()

    rows = []
    for round_ in range(args.repeats):
        for mode in ("off", "fast", "full"):
            os.environ[digests.MODE_ENV] = mode
            folder = os.path.join(args.dir, f"{mode}-{round_}")
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            path = sharded.save(engine, folder, run_id="bench", step=1)
            save_s = time.perf_counter() - start
            size = _dir_bytes(path)
            reread_s, hash_s = _reread_and_hash(path)  # while the files are still in the page cache
            dropped = _drop_page_cache()
            start = time.perf_counter()
            sharded.check_files(path, world_size=1)
            check_s = time.perf_counter() - start
            rows.append({"mode": mode, "round": round_, "save_s": round(save_s, 3), "check_s": round(check_s, 3),
                         "bytes": size, "page_cache_dropped": dropped, "reread_s": round(reread_s, 3),
                         "hash_s": round(hash_s, 3)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    record = {
        "command": "python3 bench/checkpoint_digest.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)", "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "preset": args.preset,
        "params": sum(p.numel() for p in model.parameters()), "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
