"""The ``hf-zero convert-accelerate ACCELERATE_YAML [-o zero.json]`` subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_convert_parser(subcommands) -> argparse.ArgumentParser:
    parser = subcommands.add_parser(
        "convert-accelerate",
        help="turn an accelerate config file (deepspeed_config or fsdp_config) into a zero config",
        description="Convert the YAML `accelerate config` writes, with a deepspeed_config section (inline keys or a "
                    "deepspeed_config_file) or an fsdp_config section, into a zero config (DeepSpeed JSON) for "
                    "--zero_config. Every key is reported as mapped, not needed (and what replaces it), or refused "
                    "with the reason; nothing is written when one is refused (docs/from-fsdp-accelerate.md).",
        allow_abbrev=False,
    )
    parser.add_argument("file", metavar="ACCELERATE_YAML", help="the accelerate config file")
    parser.add_argument("-o", "--output", metavar="ZERO_JSON",
                        help="where to write the zero config (default: print it)")
    parser.add_argument("--force", action="store_true", help="overwrite ZERO_JSON if it exists")
    parser.set_defaults(handler=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Write (or print) the zero config and report every key on stderr; `hf_zero: <message>`, exit 2, if refused."""
    from hf_zero.accelerate_config import convert_file

    try:
        if args.output is not None and os.path.lexists(args.output) and not args.force:
            raise ValueError(f"{args.output} exists; pass --force to overwrite it")
        conversion = convert_file(args.file)
    except ValueError as error:  # AccelerateConfigError, ConfigError (and UnsupportedConfig)
        print(f"hf_zero: {error}", file=sys.stderr)
        return 2
    text = json.dumps(conversion.config, indent=2) + "\n"
    target = args.output or "ZERO_JSON"
    print(f"hf_zero: {args.file} -> {args.output or 'stdout'}", file=sys.stderr)
    for note in conversion.notes:
        print(note.line(), file=sys.stderr)
    launch = " ".join(["hf-zero launch", *conversion.launch_flags, "SCRIPT", "--zero_config", target,
                       *conversion.script_flags, "..."])
    print(f"hf_zero: run it with: {launch}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    return 0
