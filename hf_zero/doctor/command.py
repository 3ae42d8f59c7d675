"""The ``hf-zero doctor`` subcommand: its flags and its handler.

Exit codes: 0 when no check failed (WARN and SKIP included), 1 when one did, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import sys

from hf_zero.doctor.runner import DoctorInputs


def add_doctor_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``doctor`` to ``subparsers``; the handler is ``main``."""
    parser = subparsers.add_parser(
        "doctor",
        help="preflight checks (config, memory, NVMe, launcher environment, versions) in seconds",
        description="Check a job before it starts: the config file, train_batch_size against the world size, "
                    "per-rank GPU and host memory of --model, pinned memory and the NVMe path of offload, "
                    "ranks against GPUs, the rendezvous address and port, and package versions. Prints one "
                    "row per check; exits 1 if any check FAILs. See docs/troubleshooting.md#doctor.",
        allow_abbrev=False,
    )
    parser.add_argument("--zero_config", "--zero-config", metavar="FILE", help="the JSON file given to --zero_config")
    parser.add_argument("--model", metavar="CONFIG_OR_DIR",
                        help="a config.json, a model directory or a hub id in the local Hugging Face cache: "
                             "size the run's memory (never downloaded)")
    parser.add_argument("--nproc", "--nproc_per_node", "--num_gpus", type=int, metavar="N", dest="nproc",
                        help="ranks per node (default: the visible CUDA devices, 1 without CUDA)")
    parser.add_argument("--nnodes", "--num_nodes", type=int, default=1, metavar="M", dest="nnodes",
                        help="nodes (default 1); W = N * M")
    parser.add_argument("--master_addr", metavar="ADDR", help="rank 0's address (default 127.0.0.1 on one node)")
    parser.add_argument("--master_port", type=int, metavar="PORT",
                        help="rank 0's port: free to bind on the master, reachable from other nodes")
    parser.add_argument("--micro_batch", type=int, metavar="B",
                        help="per-rank micro batch for the activation estimate (default: the config's "
                             "train_micro_batch_size_per_gpu, else 1)")
    parser.add_argument("--seq_len", type=int, metavar="L",
                        help="tokens per sample; without it activations are not counted")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="size activations with gradient checkpointing")
    parser.set_defaults(handler=main)
    return parser


def inputs_from_args(args: argparse.Namespace) -> DoctorInputs:
    """Validate the flags (ValueError naming the flag and value) into DoctorInputs."""
    for flag in ("nproc", "nnodes", "micro_batch", "seq_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {value}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise ValueError(f"--master_port must be in 1..65535, got {args.master_port}")
    return DoctorInputs(
        zero_config=args.zero_config, model=args.model, nproc=args.nproc, nnodes=args.nnodes,
        master_addr=args.master_addr, master_port=args.master_port, micro_batch=args.micro_batch,
        seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
    )


def main(args: argparse.Namespace) -> int:
    """Print the table; 1 if a check failed, 0 otherwise, 2 (``hf_zero: <message>``) for bad flags."""
    try:
        inputs = inputs_from_args(args)
    except ValueError as error:
        print(f"hf_zero: {error}", file=sys.stderr)
        return 2
    from hf_zero.doctor.render import render_table
    from hf_zero.doctor.runner import run_doctor

    results = run_doctor(inputs)
    print(render_table(results))
    return 1 if any(r.failed for r in results) else 0
