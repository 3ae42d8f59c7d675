"""Loading a large safetensors checkpoint sharded (hf_zero) beside transformers' own load and
DeepSpeed's ``zero.Init`` load through the Trainer, on the same files: wall time, peak host RSS
and peak GPU memory per process, with the page cache state each load started from.

    python bench/lazy_load.py --out DIR --name NAME [--preset 3b|7b|tiny] [--drop_caches]
        [--rows plain,hf_zero,hf_zero_drain,trainer_hf_zero,deepspeed] [--gpu_ranks 1] [--cpu_ranks 4]
        [--read_threads 4 --piece_mb 32] [--device cuda|cpu]

1. writes a random-init Llama checkpoint (bf16, built on the device) with ``save_pretrained`` in
   shards of at most ``--max_shard_mb`` (5 GB, as checkpoints on the hub are cut);
2. each row in a fresh process (so peaks do not mix), each running one forward on fixed ids whose
   logits are compared with row ``plain``'s:

   - ``plain``: transformers' ``from_pretrained(dir, device_map=DEVICE)``;
   - ``hf_zero``: ``hf_zero.init.from_pretrained`` at W = 1 on DEVICE (``--read_threads``,
     ``--piece_mb``: its reader settings, parallel_reads.py); ``hf_zero_drain``: the same with
     each unit's reads finished before the next unit's are asked for (``OVERLAP_UNITS`` False: as
     before the reads overlapped across units);
   - ``trainer_hf_zero``: bench/lazy_load_script.py under ``torchrun -m hf_zero.run`` with
     bench/configs/hfzero_s3.json: the script's own ``from_pretrained`` loads sharded
     (``zero3_init_flag``), as a user's Trainer script would; at each W of ``--gpu_ranks``;
   - ``deepspeed``: the same script under ``torchrun`` with ``--deepspeed`` bench/configs/ds_z3.json
     (``TrainingArguments(deepspeed=...)`` before ``from_pretrained``: transformers loads under
     ``zero.Init``); at each W of ``--gpu_ranks``; needs DeepSpeed importable and CUDA;
3. ``--cpu_ranks W``: the sharded load on W gloo ranks on the CPU (each rank's shard in host
   memory), per-rank peak RSS against the bound model bytes / W + largest tensor + 1 GiB.

Page cache: the checkpoint was just written, so without ``--drop_caches`` every load reads it
from the page cache. ``--drop_caches`` empties it before each row (bench/page_cache.py: as root
``echo 3 > /proc/sys/vm/drop_caches``, else each file's pages with ``posix_fadvise``;
``--drop_caches files`` always the latter), so every load reads the disk. Each row records the
share of the checkpoint's pages in the cache right before it started (``cached_before``).

Peak RSS is the process's VmHWM, the baseline its VmRSS after the imports; the page cache is not
part of any process's RSS (pages a process maps and touches are). Writes NAME.json and NAME.md to
``--out`` after every row, so a run cut short keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from lazy_load_script import gpu_peaks, logits_sample, sync, vm
import page_cache

ZERO3 = {"zero_optimization": {"stage": 3}}
HERE = os.path.dirname(os.path.abspath(__file__))
# hidden, layers, intermediate, heads, kv heads, vocab
PRESETS = {"3b": (3072, 26, 8192, 24, 8, 32000), "7b": (4096, 32, 11008, 32, 32, 32000), "tiny": (64, 2, 128, 4, 2, 512)}
ROWS = ("plain", "hf_zero", "hf_zero_drain", "trainer_hf_zero", "deepspeed")
ONE_PROCESS = ("plain", "hf_zero", "hf_zero_drain")  # rows loaded by a child of this script, W = 1
LABELS = {"plain": "transformers from_pretrained (device_map {device})", "hf_zero": "hf_zero.init.from_pretrained ({device})",
          "hf_zero_drain": "hf_zero.init.from_pretrained, reads drained at every unit ({device})",
          "trainer_hf_zero": "script's from_pretrained under hf_zero.run, stage 3 ({device})",
          "deepspeed": "script's from_pretrained under DeepSpeed ZeRO-3 zero.Init via TrainingArguments ({device})"}


def write(path: str, shape: tuple, device: str, max_shard_mb: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, inter, heads, kv, vocab = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    t = time.perf_counter()
    model.save_pretrained(path, max_shard_size=int(max_shard_mb * 10**6))
    save_s = time.perf_counter() - t
    params = list(model.parameters())
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    return {"model_bytes": sum(p.numel() * p.element_size() for p in params),
            "largest_tensor_bytes": max(p.numel() * p.element_size() for p in params),
            "params": sum(p.numel() for p in params), "save_s": save_s, "files": files,
            "file_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in files)}


def load(path: str, how: str, device: str, read_threads: int, piece_mb: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_zero.init as zi
    import accelerate  # noqa: F401  (both paths import it; counted in the baseline)
    from hf_zero.init import parallel_reads

    parallel_reads.READ_THREADS, parallel_reads.PIECE_BYTES = read_threads, piece_mb << 20  # hf_zero's reads
    parallel_reads.OVERLAP_UNITS = how != "hf_zero_drain"
    base = vm("VmRSS")
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    if how == "plain":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    else:
        model = zi.from_pretrained(path, zero_config=ZERO3, dtype=torch.bfloat16, device=device)
    sync(device)
    seconds = time.perf_counter() - t
    return {"how": how, "load_s": seconds, "read_threads": read_threads, "piece_mb": piece_mb, "base_rss": base,
            "peak_rss": vm("VmHWM"), **gpu_peaks(device), "world_size": 1,
            "param_dtype": str(next(model.parameters()).dtype), **logits_sample(model, device)}


def cpu_rank(rank: int, world: int, path: str) -> dict:
    import torch

    import hf_zero.init as zi
    import accelerate  # noqa: F401

    base = vm("VmRSS")
    t = time.perf_counter()
    model = zi.from_pretrained(path, zero_config=ZERO3, dtype=torch.bfloat16, device="cpu")
    seconds = time.perf_counter() - t
    return {"rank": rank, "load_s": seconds, "base_rss": base, "peak_rss": vm("VmHWM"),
            "held": zi.engine_of(model).held_bytes()["params"]}


def trainer_command(row: str, world: int, opts, result: str) -> list[str]:
    """The torchrun command line of a row through the Trainer script (bench/lazy_load_script.py)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    script = [os.path.join(HERE, "lazy_load_script.py"), "--ckpt", opts.ckpt, "--result", result, "--device", opts.device]
    if row == "trainer_hf_zero":
        return run + ["-m", "hf_zero.run"] + script + ["--zero_config", opts.hf_zero_config]
    return run + script + ["--deepspeed", opts.deepspeed_config]


def why_not_deepspeed(device: str) -> str | None:
    import importlib.util

    if device != "cuda":
        return "DeepSpeed's zero.Init load is measured on CUDA only"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not importable (install the .whl/ wheels, see bench/README.md)"
    return None


def run_child(cmd: list[str], timeout: float) -> tuple[str | None, str]:
    """(None, stdout) or (why it failed, its output's tail)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return f"timed out after {timeout:.0f} s", str(e.stderr or "")[-3000:]
    if done.returncode != 0:
        return f"exit {done.returncode}", (done.stdout + done.stderr)[-3000:]
    return None, done.stdout


def measure(row: str, world: int, opts, files: list[str]) -> dict:
    """One row in fresh processes, after emptying the page cache if asked; what it measured or why not."""
    cache = page_cache.drop(files, whole_cache=opts.drop_caches == "all") if opts.drop_caches else None
    head = {"row": row, "world_size": world, "cache_drop": cache, "cached_before": page_cache.resident_fraction(files)}
    if row == "deepspeed" and why_not_deepspeed(opts.device):
        return {**head, "not_run": why_not_deepspeed(opts.device)}
    t = time.perf_counter()
    if row in ONE_PROCESS:
        cmd = [sys.executable, __file__, "--step", f"load:{row}"] + sys.argv[1:]
        failed, out = run_child(cmd, opts.timeout_s)
        ranks = [] if failed else [json.loads(out.strip().splitlines()[-1])]
    else:
        results = tempfile.mkdtemp(prefix="lazy_load_")
        failed, out = run_child(trainer_command(row, world, opts, os.path.join(results, "rank{rank}.json")), opts.timeout_s)
        ranks = [] if failed else [json.load(open(f)) for f in sorted(glob.glob(os.path.join(results, "rank*.json")))]
    if failed:
        return {**head, "failed": failed, "output_tail": out}
    worst = max(ranks, key=lambda r: r["load_s"])
    return {**head, **worst, "process_s": time.perf_counter() - t, "ranks": ranks if world > 1 else None,
            "peak_rss_max": max(r["peak_rss"] for r in ranks)}


def compare(record: dict) -> None:
    """Each row's logits sample against row ``plain``'s: equal (exactly), or the largest difference."""
    plain = next((r for r in record["rows"] if r["row"] == "plain" and "logits_head" in r), None)
    for r in record["rows"]:
        if plain is None or "logits_head" not in r or r is plain:
            continue
        diff = max(abs(a - b) for a, b in zip(r["logits_head"], plain["logits_head"]))
        r["logits_vs_plain"] = "equal" if diff == 0 else f"max |diff| {diff:.3g} ({r.get('param_dtype')})"


def table(record: dict, opts) -> str:
    gib, ck = 2**30, record["checkpoint"]
    fmt = lambda v, scale=gib: "" if v is None else f"{v / scale:.2f}"  # noqa: E731
    lines = [f"# Loading a {ck['params'] / 1e9:.2f} B-param bf16 checkpoint ({ck['file_bytes'] / gib:.2f} GiB in "
             f"{len(ck['files'])} safetensors files, largest tensor {ck['largest_tensor_bytes'] / gib:.3f} GiB), "
             f"{record['device']}", "",
             f"Written in {ck['save_s']:.1f} s. Page cache: " + ("emptied before each row (--drop_caches)" if opts.drop_caches
                                                               else "as the write left it (hot)") + ".", "",
             "| load | W | cached before | wall s | setup s | peak RSS GiB | RSS added GiB | GPU peak alloc GiB "
             "| GPU peak reserved GiB | logits vs plain |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in record["rows"]:
        label = LABELS[r["row"]].format(device=opts.device)
        if "load_s" not in r:
            lines.append(f"| {label} | {r['world_size']} | {r['cached_before']:.0%} | not run: "
                         f"{r.get('not_run') or r.get('failed')} | | | | | | |")
            continue
        setup = f"{r['setup_s']:.1f}" if "setup_s" in r else ""
        lines.append(f"| {label} | {r['world_size']} | {r['cached_before']:.0%} | {r['load_s']:.1f} | {setup} "
                     f"| {fmt(r['peak_rss_max'])} | {fmt(r['peak_rss'] - r['base_rss'])} | {fmt(r['gpu_peak_allocated'])} "
                     f"| {fmt(r['gpu_peak_reserved'])} | {r.get('logits_vs_plain', '')} |")
    if record.get("cpu_ranks"):
        lines += ["", f"Sharded load on {opts.cpu_ranks} CPU gloo ranks (cached before: {record['cpu_cached_before']:.0%}):",
                  "", "| rank | wall s | peak RSS GiB | RSS added GiB | bound GiB |", "|---|---:|---:|---:|---:|"]
        for r in record["cpu_ranks"]:
            lines.append(f"| {r['rank']} | {r['load_s']:.1f} | {fmt(r['peak_rss'])} | {fmt(r['peak_rss'] - r['base_rss'])} "
                         f"| {fmt(record['bound_cpu'])} |")
    drops = {(r["cache_drop"] or {}).get("how") for r in record["rows"]} - {None}
    if drops:
        lines += ["", "Page cache emptied with: " + ", ".join(sorted(drops)) + "."]
    return "\n".join(lines) + "\n"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="lazy_load")
    p.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "hf_zero_lazy_ckpt"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--max_shard_mb", type=float, default=5000, help="save_pretrained's max_shard_size, MB")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--gpu_ranks", default="1", help="the W (comma-separated) of the rows through the Trainer")
    p.add_argument("--cpu_ranks", type=int, default=4)
    p.add_argument("--drop_caches", nargs="?", const="all", choices=["all", "files"], default=None,
                   help="empty the page cache before each row: 'all' (default; as root) or 'files' (fadvise)")
    p.add_argument("--hf_zero_config", default=os.path.join(HERE, "configs", "hfzero_s3.json"))
    p.add_argument("--deepspeed_config", default=os.path.join(HERE, "configs", "ds_z3.json"))
    p.add_argument("--timeout_s", type=float, default=600.0, help="per row")
    p.add_argument("--read_threads", type=int, default=4, help="hf_zero's reader threads per rank (parallel_reads.py)")
    p.add_argument("--piece_mb", type=int, default=32, help="hf_zero's largest read, MiB (parallel_reads.py)")
    p.add_argument("--commit", default=None)
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    bad = sorted(set(opts.rows.split(",")) - set(ROWS))
    if bad:
        p.error(f"--rows: {', '.join(bad)} not among {', '.join(ROWS)}")
    return opts


def main() -> None:
    opts = parse()
    if opts.step:  # a child process: one measurement, JSON on the last line
        kind, _, arg = opts.step.partition(":")
        out = write(opts.ckpt, PRESETS[opts.preset], opts.device, opts.max_shard_mb) if kind == "write" \
            else load(opts.ckpt, arg, opts.device, opts.read_threads, opts.piece_mb)
        print(json.dumps(out))
        return

    import torch
    import transformers

    failed, out = run_child([sys.executable, __file__, "--step", "write:"] + sys.argv[1:], opts.timeout_s)
    if failed:
        raise RuntimeError(f"writing the checkpoint failed ({failed}):\n{out}")
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "commit": opts.commit,
              "preset": opts.preset, "shape": PRESETS[opts.preset],
              "device": torch.cuda.get_device_name(0) if opts.device == "cuda" else "CPU", "host_cores": os.cpu_count(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "checkpoint": json.loads(out.strip().splitlines()[-1]), "drop_caches": opts.drop_caches, "rows": []}
    files = [os.path.join(opts.ckpt, f) for f in record["checkpoint"]["files"]]
    os.makedirs(opts.out, exist_ok=True)

    def save() -> None:
        compare(record)
        with open(os.path.join(opts.out, opts.name + ".json"), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(opts.out, opts.name + ".md"), "w") as f:
            f.write(table(record, opts))

    rows = opts.rows.split(",")
    for row in (r for r in ROWS if r in rows and r != "deepspeed"):
        for world in [1] if row in ONE_PROCESS else [int(w) for w in opts.gpu_ranks.split(",")]:
            record["rows"].append(measure(row, world, opts, files))
            save()
    if opts.cpu_ranks:
        from hf_zero.testing.multiprocess import run_on_ranks

        ck = record["checkpoint"]
        if opts.drop_caches:
            page_cache.drop(files, whole_cache=opts.drop_caches == "all")
        record["cpu_cached_before"] = page_cache.resident_fraction(files)
        record["cpu_ranks"] = run_on_ranks(cpu_rank, opts.cpu_ranks, opts.ckpt, timeout=opts.timeout_s)
        record["bound_cpu"] = ck["model_bytes"] / opts.cpu_ranks + ck["largest_tensor_bytes"] + 2**30
        save()
    if "deepspeed" in rows:  # last: the slowest to start (DeepSpeed's import, zero.Init)
        for world in [int(w) for w in opts.gpu_ranks.split(",")]:
            record["rows"].append(measure("deepspeed", world, opts, files))
            save()
    save()
    print(table(record, opts))


if __name__ == "__main__":
    main()
