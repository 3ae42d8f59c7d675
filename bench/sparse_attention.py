"""Attention forward + backward time: a sparse_attention layout as a FlexAttention block mask vs dense
causal SDPA (issue 19's target: fixed layout, block 64, at 32K tokens, >= 2x the speed of dense SDPA).

    python bench/sparse_attention.py                                   # fixed, block 64, 16K/32K/64K
    python bench/sparse_attention.py --seqs 32768 --reference tile128 autotuned
    python bench/sparse_attention.py --seqs 32768 --mode bigbird --num-random-blocks 1
    python bench/sparse_attention.py --json $OUT/sparse_attention.json

One attention call of a Llama-7B layer's shape (32 query heads, 32 KV heads, head dim 128, bf16, batch 1),
both ways, on the same inputs. The main row is hf_zero's default path, what the registered attention
function runs: the block mask the function builds (``SparseAttention.block_mask``: the tile
``kernels.tile_for`` picks, 64 tokens for block 64) through ``kernels.attend`` (compiled ``flex_attention``
with the tile's kernel options, [Note: tiles and kernel options]). Against it
``F.scaled_dot_product_attention(is_causal=True)`` (flash backend on an H100/H200; its time is measured
again for each row, as a check of the noise). ``--reference`` adds rows: ``tile128``, 128-token tiles with
torch's own kernel configs (hf_zero's default before 64-token tiles: with block 64 a 128-token tile
column holding one 64-token global block is computed whole, density about 0.5 of the causal triangle
against 0.26); ``autotuned``, 64-token tiles compiled with max-autotune and no kernel options (the
kernel configs hf_zero fixes were its picks; compiling takes about a minute per length). Each is timed
with CUDA events as forward + backward of ``out.sum()``, median of ``--iters`` after ``--warmup`` (the
first calls compile; dynamo's caches are reset before each row, so no row meets its recompile limit).
Prints per row: both times, the speed-up, the block mask's density (the share of the causal triangle's
tiles it computes), achieved TFLOP/s counting only the computed tiles for flex and the causal half for
SDPA, the first call's seconds (compile, and autotuning where any: the count of ops inductor timed
candidates for) and the kernel options used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from hf_zero.config.sparse_attention import SparseAttentionConfig
from hf_zero.sparse_attention import flex, kernels
from hf_zero.sparse_attention.layouts import make_layout, num_blocks

REFERENCES = ("tile128", "autotuned")


def timed(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` (forward + backward)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_AUTOTUNED: dict = {}


def _autotuned():
    """FlexAttention compiled with max-autotune and no kernel options: inductor times every candidate
    config that divides the tile (the ``autotuned`` reference row)."""
    if "flex" not in _AUTOTUNED:
        from torch.nn.attention.flex_attention import flex_attention

        _AUTOTUNED["flex"] = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    return _AUTOTUNED["flex"]


def run(seq_len: int, config: SparseAttentionConfig, args, row: str) -> dict:
    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, seq_len, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(1, kv_heads, seq_len, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            .requires_grad_() for _ in range(2))
    layout_heads = heads if config.different_layout_per_head else 1
    gqa = kv_heads != heads
    if row == "hf_zero":
        mask = flex.SparseAttention(config).block_mask(q, v, True, None)
        options = kernels.kernel_options(mask.BLOCK_SIZE[0], kernels.row_bytes(q, v))

        def attend():
            return kernels.attend(q, k, v, mask, enable_gqa=gqa)
    else:
        layout = make_layout(config, layout_heads, num_blocks(config, seq_len) * config.block).bool().cuda()
        mask = flex.block_mask(layout, config.block, seq_len, causal=True, tile=128 if row == "tile128" else 64)
        options = None

        def attend():
            if row == "tile128":  # 128-token tiles: kernels.attend runs torch's own configs
                return kernels.attend(q, k, v, mask, enable_gqa=gqa)
            return _autotuned()(q, k, v, block_mask=mask, enable_gqa=gqa)

    def sparse():
        attend().sum().backward()

    def dense():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).sum().backward()

    counters.clear()
    start = time.perf_counter()
    sparse()  # the first call compiles (and, for the autotuned row, autotunes)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    autotuned = counters["inductor"]["select_algorithm_autotune"]
    sparse_ms, dense_ms = timed(sparse, args.warmup, args.iters), timed(dense, args.warmup, args.iters)
    tiles = -(-seq_len // mask.BLOCK_SIZE[0])
    computed = (mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()).item() * heads / layout_heads
    causal_tiles = tiles * (tiles + 1) / 2 * heads
    t = mask.BLOCK_SIZE[0]
    flops_per_tile = 4 * t * t * dim * 3.5  # fwd 2 matmuls + bwd 5 matmuls = 3.5x the forward's 4*t*t*d
    dense_flops = 4 * seq_len * seq_len / 2 * dim * heads * 3.5
    return {"seq_len": seq_len, "row": row, "mode": config.mode, "block": config.block, "tile": t,
            "kernel_options": options, "first_call_s": compile_s, "autotuned_ops": autotuned,
            "sparse_ms": sparse_ms, "dense_sdpa_ms": dense_ms, "speedup": dense_ms / sparse_ms,
            "density_of_causal": computed / causal_tiles,
            "sparse_tflops": computed * flops_per_tile / sparse_ms / 1e9, "dense_tflops": dense_flops / dense_ms / 1e9,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--mode", default="fixed")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--num-local-blocks", type=int, default=4)
    parser.add_argument("--num-random-blocks", type=int, default=0)
    parser.add_argument("--attention", default="unidirectional")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reference", nargs="*", default=[], choices=REFERENCES,
                        help="rows beside hf_zero's default path: tile128 (torch's own configs on 128-token "
                             "tiles), autotuned (64-token tiles, max-autotune: about a minute per length)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the records to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/sparse_attention.py needs CUDA (FlexAttention's fused kernels)")
    keys = {"mode": args.mode, "block": args.block, "attention": args.attention}
    if args.mode == "fixed":
        keys["num_local_blocks"] = args.num_local_blocks
    if args.mode in ("bigbird", "variable"):
        keys["num_random_blocks"] = args.num_random_blocks
    config = SparseAttentionConfig(**keys)
    records = []
    for seq_len, row in [(s, r) for s in args.seqs for r in ("hf_zero", *args.reference)]:
        try:
            record = run(seq_len, config, args, row)
        except Exception as err:  # a row the kernel cannot take: say so, go on with the others
            print(f"{seq_len:>6} tokens  {row}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            records.append({"seq_len": seq_len, "row": row, "error": f"{type(err).__name__}: {err}"[:2000]})
            continue
        records.append(record)
        print(f"{seq_len:>6} tokens  {config.mode} block {config.block}  {row:9} (tile {record['tile']}): "
              f"sparse {record['sparse_ms']:8.2f} ms  dense SDPA {record['dense_sdpa_ms']:8.2f} ms  "
              f"speed-up {record['speedup']:5.2f}x  density {record['density_of_causal']:.3f} of causal  "
              f"({record['sparse_tflops']:.0f} / {record['dense_tflops']:.0f} TFLOP/s)  "
              f"first call {record['first_call_s']:.1f} s ({record['autotuned_ops']} ops autotuned)  "
              f"kernel options {record['kernel_options']}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
