"""The NVMe tiers' own read and write speed against the drive's, measured in the same run.

    python bench/nvme_bandwidth.py --nvme_path /local_nvme [--gib 8] [--json out.json]

Into one directory, in this order, each on a file of ``--gib`` GiB (page cache dropped before
every read that could come from it):

- the drive: ``dd`` with ``oflag=direct`` / ``iflag=direct`` (8 MiB blocks), and ``fio``
  (sequential, direct, libaio, queue depth 8) where it is installed;
- the optimizer tier's I/O (``SwapDir``: O_DIRECT where the file system takes it, requests of
  ``REQUEST_BYTES`` on ``IO_THREADS`` threads, page-aligned pinned chunk buffers): a whole file
  written, then read, chunk by chunk with ``--buffer_count`` chunks in flight, as the host step
  streams them;
- the parameter tier's I/O (``NvmeParamMemory``): ``--shard_mib`` shards written with
  ``write`` (the host step's path; timed to the end of an fsync, so the drive's and not just the
  page cache's), then read in order through ``stage`` with the next one read ahead (the units'
  uploads, nvme_staging.py).

Prints one line per figure (GB/s, 1e9 bytes) and the tier's figures as a share of the drive's.
GPU-free: with CUDA the buffers are pinned, as in training. Leaves nothing in the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time

import torch

from hf_zero.engine.offload import nvme_files
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.offload.nvme_files import SwapDir
from hf_zero.engine.offload.nvme_params import NvmeParamMemory

GIB = 1 << 30


def drop_cache(path: str) -> None:
    """Write back and drop ``path``'s pages from the page cache (reads then come from the drive)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def dd(path: str, nbytes: int) -> dict[str, float]:
    """The drive through ``dd`` with O_DIRECT: write then read ``nbytes`` in 8 MiB blocks."""
    count = nbytes // (8 << 20)
    out = {}
    for name, args in (("write", ["if=/dev/zero", f"of={path}", "oflag=direct", "conv=fsync"]),
                       ("read", [f"if={path}", "of=/dev/null", "iflag=direct"])):
        start = time.perf_counter()
        done = subprocess.run(["dd", "bs=8M", f"count={count}", *args], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
        moved, took = (int(match[1]), float(match[2])) if match else (count * (8 << 20), seconds)
        out[name] = moved / took / 1e9
    os.remove(path)
    return out


def fio(path: str, nbytes: int) -> dict[str, float] | None:
    if shutil.which("fio") is None:
        return None
    out = {}
    for name in ("write", "read"):
        done = subprocess.run(["fio", "--name=hf_zero", f"--filename={path}", f"--rw={name}", "--bs=8M",
                               f"--size={nbytes}", "--direct=1", "--ioengine=libaio", "--iodepth=8",
                               "--numjobs=1", "--output-format=json"], capture_output=True, text=True, check=True)
        job = json.loads(done.stdout)["jobs"][0][name]
        out[name] = job["bw_bytes"] / 1e9
    os.remove(path)
    return out


def optimizer_tier(path: str, nbytes: int, chunk_bytes: int, buffer_count: int) -> dict[str, float]:
    """``SwapDir`` as ``NvmeTier`` drives it: a chunk's requests on the pool, ``buffer_count`` chunks
    in flight, the buffers page-aligned (and pinned with CUDA)."""
    direct = nvme_files.use_direct_io(path)
    swap = SwapDir(path, rank=0, direct=direct)
    memory = HostMemory(pin=True)
    chunk = chunk_bytes // 4
    buffers = [nvme_files.page_aligned(memory, chunk) for _ in range(buffer_count)]
    for b in buffers:
        b.fill_(1.0)
    chunks = nbytes // chunk_bytes
    swap.file("master", chunks * chunk)
    out = {"direct": float(direct)}
    try:
        for name in ("write", "read"):
            if name == "read" and not direct:
                drop_cache(swap.files["master"].path)
            move = swap.write if name == "write" else swap.read
            in_flight: list[list] = []
            start = time.perf_counter()
            for c in range(chunks):
                if len(in_flight) == buffer_count:
                    for f in in_flight.pop(0):
                        f.result()
                in_flight.append(move("master", buffers[c % buffer_count], c * chunk))
            for futures in in_flight:
                for f in futures:
                    f.result()
            if name == "write":
                os.fsync(swap.files["master"].fd)
            out[name] = chunks * chunk_bytes / (time.perf_counter() - start) / 1e9
    finally:
        swap.remove()
        memory.close()
    return out


def param_tier(path: str, nbytes: int, shard_bytes: int) -> dict[str, float]:
    """``NvmeParamMemory``: shards written with ``write``, read through ``stage`` one ahead."""
    count = max(nbytes // shard_bytes, 2)
    memory = NvmeParamMemory(path, count * shard_bytes + (1 << 20) * count, None, pin=True)
    try:
        shards = [memory.empty(shard_bytes // 2, torch.bfloat16) for _ in range(count)]
        source = torch.ones(shard_bytes // 2, dtype=torch.float32)  # fp32 masters, cast as the host step does
        start = time.perf_counter()
        for shard in shards:
            memory.write(shard, source)
        for file in memory.dir.files.values():
            os.fsync(file.fd)
        out = {"write": count * shard_bytes / (time.perf_counter() - start) / 1e9}
        for file in memory.dir.files.values():
            drop_cache(file.path)
        device = torch.device("cpu")
        start = time.perf_counter()
        for i, shard in enumerate(shards):
            staged = memory.stage(shard)
            if i + 1 < count:
                memory.read_ahead(shards[i + 1])
            memory.done_with(staged, device)
        out["read"] = count * shard_bytes / (time.perf_counter() - start) / 1e9
        out["read_ahead_hits"] = memory.staging.hits
    finally:
        memory.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme_path", required=True)
    p.add_argument("--gib", type=float, default=8.0, help="file size per measurement")
    p.add_argument("--chunk_mib", type=int, default=256, help="optimizer tier: chunk buffer size (buffer_size x 4)")
    p.add_argument("--buffer_count", type=int, default=4)
    p.add_argument("--shard_mib", type=int, default=64, help="parameter tier: one unit's shard")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    nbytes = int(args.gib * GIB) // (args.chunk_mib << 20) * (args.chunk_mib << 20)
    if nbytes == 0:
        raise SystemExit(f"--gib {args.gib} is less than one chunk of --chunk_mib {args.chunk_mib}")
    probe = os.path.join(args.nvme_path, "hf_zero-bench.dat")
    results = {"bytes": nbytes, "disk_dd": dd(probe, nbytes), "disk_fio": fio(probe, nbytes),
               "optimizer_tier": optimizer_tier(args.nvme_path, nbytes, args.chunk_mib << 20, args.buffer_count),
               "param_tier": param_tier(args.nvme_path, nbytes, args.shard_mib << 20)}
    print(f"{nbytes / GIB:.2f} GiB per file in {args.nvme_path}; cuda {torch.cuda.is_available()}")
    drive = results["disk_fio"] or results["disk_dd"]
    for name in ("disk_dd", "disk_fio", "optimizer_tier", "param_tier"):
        figures = results[name]
        if figures is None:
            print(f"{name:15s} (fio not installed)")
            continue
        share = "  ".join(f"{k} {figures[k] / drive[k]:.0%} of the drive" for k in ("write", "read"))
        extra = ""
        if name == "optimizer_tier":
            extra = "  (O_DIRECT)" if figures["direct"] else "  (page cache: O_DIRECT refused)"
        if name == "param_tier":
            extra = f"  ({figures['read_ahead_hits']} read-aheads used)"
        print(f"{name:15s} write {figures['write']:6.2f} GB/s  read {figures['read']:6.2f} GB/s  {share}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
