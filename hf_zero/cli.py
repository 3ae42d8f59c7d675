"""The `hf-zero` command: one subcommand per job, each a thin handler.

    hf-zero launch [FLAGS] SCRIPT [ARGS...]        start a job (see docs/launcher.md)
    hf-zero check-config FILE [--world_size N] [--fp16|--bf16]  validate a config file, print it as JSON
    hf-zero estimate MODEL_CONFIG [--world N] ...  per-rank memory per ZeRO stage (docs/estimate.md)
    hf-zero consolidate CHECKPOINT OUTPUT [--dtype] a sharded checkpoint (hf_zero's or DeepSpeed's) to HF safetensors
    hf-zero doctor [--zero_config F] [--model M] ... preflight checks in seconds (docs/troubleshooting.md#doctor)
    hf-zero env [CONFIG]                           versions, GPUs and a config as Markdown for a bug report
    hf-zero convert-accelerate YAML [-o F]         an accelerate config (deepspeed/fsdp section) to a zero config
    hf-zero --version

A handler takes the parsed `argparse.Namespace` and returns the exit code.
"""

import argparse
import json
import sys
from collections.abc import Sequence

from hf_zero import __version__
from hf_zero.accelerate_config.command import add_convert_parser
from hf_zero.doctor.command import add_doctor_parser
from hf_zero.doctor.config_checks import check_train_batch_size as _check_world_size
from hf_zero.doctor.env_report import add_env_parser
from hf_zero.launcher import launch
from hf_zero.launcher.args import add_launch_parser, split_launch_argv


def check_config(args: argparse.Namespace) -> int:
    """Print the loaded config as JSON, or `hf_zero: <message>` and exit code 2."""
    from hf_zero.config import config_to_dict
    from hf_zero.config.stage0_saves import needs_no_saves
    from hf_zero.launcher.zero_config_arg import auto_precision_note, load_zero_config

    # The launcher's check: the file, then what this version can run (its "auto" precision filled
    # from --fp16/--bf16 as from the script's own flags).
    trainer_flags = ["--fp16"] * args.fp16 + ["--bf16"] * args.bf16
    try:
        if args.world_size is not None and args.world_size < 1:
            raise ValueError(f"--world_size must be a positive integer, got {args.world_size}")
        if args.fp16 and args.bf16:
            raise ValueError("--fp16 and --bf16 are both given; the Trainer trains in one of them, keep one")
        config = load_zero_config(args.file, trainer_flags)
        if args.world_size is not None:
            _check_world_size(config, args.world_size)
    except ValueError as error:
        print(f"hf_zero: {error}", file=sys.stderr)
        return 2
    saves = needs_no_saves(config)  # the script's --save_strategy decides, unseen here
    for note in (auto_precision_note(config, trainer_flags), None if saves is None else f"hf_zero: note: {saves}"):
        if note is not None:
            print(note, file=sys.stderr)
    print(json.dumps(config_to_dict(config), indent=2))
    return 0


def estimate(args: argparse.Namespace) -> int:
    """Print the per-stage memory table, or `hf_zero: <message>` and exit code 2."""
    from hf_zero import estimate_traffic
    from hf_zero.estimate import checked, memory
    from hf_zero.estimate_auto import print_auto_ratio

    try:
        axes, stages, bucket = checked(args)
        if args.traffic:
            return estimate_traffic.run(args, axes, stages, bucket)
        return memory(args, axes, stages, bucket, after_table=print_auto_ratio)
    except ValueError as error:
        print(f"hf_zero: {error}", file=sys.stderr)
        return 2


def consolidate(args: argparse.Namespace) -> int:
    """Write the consolidated safetensors and list the files, or `hf_zero: <message>` and exit 2."""
    from hf_zero.checkpoint.atomic import DiskFullError
    from hf_zero.checkpoint.consolidate import consolidate as run
    from hf_zero.checkpoint.consolidate import parse_size

    try:
        parse_size(args.max_shard_size)  # before the checkpoint is opened: a bad size is the first error
        written = run(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (ValueError, DiskFullError) as error:  # DiskFullError: the earlier output is left as it was
        print(f"hf_zero: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-zero",
        description="ZeRO sharding and offload for transformers.Trainer",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"hf-zero {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_launch_parser(subcommands).set_defaults(handler=launch.main)
    check = subcommands.add_parser(
        "check-config",
        help="validate a --zero_config file and print it as JSON",
        description="Load FILE as hf_zero would and print the resulting config as JSON.",
        allow_abbrev=False,
    )
    check.add_argument("file", metavar="FILE", help="the JSON file given to --zero_config")
    check.add_argument("--world_size", "--world-size", type=int, metavar="N",
                       help="also check train_batch_size against a job of N ranks")
    for dtype in ("fp16", "bf16"):
        check.add_argument(f"--{dtype}", action="store_true",
                           help=f'the Trainer trains in {dtype} (TrainingArguments.{dtype}): fills an "auto" '
                                "precision, so what this version cannot run with it is refused too")
    check.set_defaults(handler=check_config)
    est = subcommands.add_parser(
        "estimate",
        help="estimate per-rank memory of a model under ZeRO stages 0-3",
        description="Per-rank bytes of params, gradients, optimizer state (incl. fp32 master shards) and an "
                    "activation estimate, from a model config built on the meta device (docs/estimate.md).",
        allow_abbrev=False,
    )
    est.add_argument("model_config", metavar="MODEL_CONFIG",
                     help="a config.json, a model directory, or a hub id whose config.json is in the local "
                          "Hugging Face cache (never downloaded)")
    est.add_argument("--world", type=int, default=8, metavar="N", help="total number of ranks (default 8)")
    est.add_argument("--tp", type=int, default=1, metavar="T",
                     help="tensor_parallel.autotp_size: ranks splitting each planned layer; ZeRO shards over "
                          "world / T ranks (default 1)")
    est.add_argument("--pp", type=int, default=1, metavar="P",
                     help="pipeline.stages: each stage holds a run of decoder layers (the first also the "
                          "embeddings, the last the norm and LM head); ZeRO shards over world / (T * P) ranks; "
                          "each row shows the heaviest stage (default 1)")
    est.add_argument("--pp_schedule", default="1F1B", choices=["1F1B", "GPipe"],
                     help="with --pp: pipeline.schedule, which sets the micro-batches in flight (default 1F1B)")
    est.add_argument("--micro_batches", type=int, default=None, metavar="M",
                     help="with --pp: micro-batches per step (pipeline.micro_batches; default P, the fewest 1F1B "
                          "takes)")
    est.add_argument("--nodes", type=int, default=1, metavar="M",
                     help="nodes the N ranks are spread over; adds a per-node total (default 1)")
    est.add_argument("--stage", default="all", choices=["0", "1", "2", "3", "all"], help="default: all")
    est.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="run precision (default bf16)")
    est.add_argument("--model_dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                     help="dtype the model is loaded in; stage 0 trains in it (default fp32)")
    est.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "sgd_momentum"], help="default: adamw")
    est.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"],
                     help="optimizer offload: cpu moves fp32 masters, optimizer state and the grads at the step "
                          "to the host (column 'host'); nvme puts masters and state in files (column 'nvme'), "
                          "the grads on the host (default none)")
    est.add_argument("--offload_state_dtype", default="fp32", choices=["fp32", "bf16"],
                     help="with --offload cpu or nvme: the offloaded optimizer state's dtype, in host memory or "
                          "the swap files (offload_optimizer.state_dtype; bf16 changes numerics) (default fp32)")
    est.add_argument("--offload_host_share", type=float, default=0.0, metavar="S",
                     help="with --offload nvme: the share of masters and optimizer state kept in host memory "
                          "instead of the swap files (offload_optimizer.host_share, in [0, 1]) (default 0)")
    est.add_argument("--device_memory", type=float, default=None, metavar="GIB",
                     help='with --offload: the accelerator\'s memory in GiB, to show what offload_optimizer.ratio '
                          '"auto" would choose (default: not shown)')
    est.add_argument("--host_memory", type=float, default=None, metavar="GIB",
                     help='with --offload cpu: a node\'s host memory in GiB, shared by its ranks, to size the first '
                          'step of offload_optimizer.ratio "auto" (the buckets the host holds with 10%% of it free '
                          "are offloaded, the rest start on the GPU) (default: this machine's memory)")
    est.add_argument("--reduce_bucket_size", default="500000000", metavar="ELEMENTS|auto",
                     help="stage 1/2 gradient bucket in elements; auto = hidden_size**2 (default 5e8)")
    est.add_argument("--micro_batch", type=int, default=1, metavar="B", help="per-rank micro batch (default 1)")
    est.add_argument("--seq_len", type=int, default=2048, metavar="L", help="tokens per sample (default 2048)")
    est.add_argument("--gradient_checkpointing", action="store_true", help="activation estimate with checkpointing (with --traffic: tp's all-reduces of the recomputed forward)")
    est.add_argument("--plot", metavar="FILE.png", help="also write a stacked bar chart (needs matplotlib)")
    est.add_argument("--traffic", action="store_true",
                     help="instead of memory: the bytes the busiest rank sends per optimizer step, over NVLink and "
                          "over the network, and their time at --nvlink_bw / --network_bw (a paper model; "
                          "docs/parallelism.md)")
    est.add_argument("--gpus_per_node", type=int, default=None, metavar="G",
                     help="with --traffic: GPUs a node; --nodes x G must be --world and --tp must divide G "
                          "(default world / nodes)")
    est.add_argument("--grad_accum", type=int, default=1, metavar="M",
                     help="with --traffic: gradient accumulation steps, micro-batches a step (with --pp the "
                          "pipeline's micro-batches too) (default 1)")
    est.add_argument("--nvlink_bw", type=float, default=None, metavar="GB/S",
                     help="with --traffic: NVLink GB/s a GPU sends, per direction (default 450, H100 SXM)")
    est.add_argument("--network_bw", type=float, default=None, metavar="GB/S",
                     help="with --traffic: network GB/s a GPU sends, per direction (default 50: 8 x 400 Gb/s a node)")
    est.set_defaults(handler=estimate)
    con = subcommands.add_parser(
        "consolidate",
        help="turn a sharded checkpoint (hf_zero's or DeepSpeed's ZeRO 1-3) into HF safetensors",
        description="Stream a sharded checkpoint into model.safetensors (or numbered shards with an index "
                    "above --max_shard_size) that plain from_pretrained loads. Reads hf_zero checkpoints "
                    "(checkpoint-N with hf_zero_sharded/) and DeepSpeed ZeRO 1-3 checkpoints (the folder with "
                    "`latest`, or global_stepN/). No GPU and no process group needed; peak memory is about the "
                    "largest tensor.",
        allow_abbrev=False,
    )
    con.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    con.add_argument("output", metavar="OUTPUT_DIR")
    con.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                     help="dtype of the written floating-point tensors (default: the model config's dtype, else "
                          "the run's param dtype; DeepSpeed: fp32)")
    con.add_argument("--max_shard_size", default="5GB", metavar="SIZE",
                     help="largest output file before the model is split into numbered shards (default 5GB)")
    con.set_defaults(handler=consolidate)
    add_doctor_parser(subcommands)
    add_env_parser(subcommands)
    add_convert_parser(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["launch"]:
        # SCRIPT ARGS are cut off before argparse, which would drop a `--` in them.
        launcher_argv, script_args = split_launch_argv(argv[1:])
        args = parser.parse_args(["launch", *launcher_argv])
        args.script_args = script_args
    else:
        args = parser.parse_args(argv)
    return args.handler(args)
