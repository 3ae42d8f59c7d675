"""``hf-zero env``: the versions, devices and config of this machine as Markdown for a bug report
(what ``ds_report`` and ``accelerate env`` print for their tools).

Nothing here checks anything (``hf-zero doctor`` does): each value is read as it is, and a value
that cannot be read says why instead of failing the command. The version ranges hf-zero declares
come from its installed metadata (``versions.declared_requirements``), never copied here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from hf_zero.byte_units import fmt_bytes
from hf_zero.doctor.versions import declared_requirements, installed_version

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "huggingface_hub", "datasets", "peft",
            "bitsandbytes", "deepspeed")
"""Rows of the package table after hf_zero itself: what hf_zero runs on, then what often sits
beside it (deepspeed: installed too, it is what the Trainer picks up when a script asks for it)."""
ENV_PREFIXES = ("HF_ZERO_", "NCCL_", "TORCH_DISTRIBUTED_", "TORCH_NCCL_")
ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
             "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME")


@dataclass(frozen=True)
class Gpu:
    """One CUDA device as torch sees it."""

    name: str
    memory_bytes: int
    capability: tuple[int, int]


@dataclass(frozen=True)
class EnvReport:
    """Everything ``hf-zero env`` prints; ``render`` turns it into Markdown."""

    hf_zero: str
    python: str
    platform: str
    packages: tuple[tuple[str, str | None, str | None], ...]
    """(package, installed version or None, the range hf-zero declares or None)."""
    cuda: str
    nccl: str
    gpus: tuple[Gpu, ...]
    environment: tuple[tuple[str, str], ...]
    config_path: str | None = None
    config_json: str | None = None
    """The config as hf_zero loaded it (``config_to_dict``), or None when it could not be loaded."""
    config_error: str | None = None


def _torch_facts() -> tuple[str, str, tuple[Gpu, ...]]:
    """(CUDA, NCCL, GPUs) as the installed torch reports them."""
    try:
        import torch
    except ImportError as error:
        return f"unknown (torch does not import: {error})", "unknown", ()
    if torch.version.cuda is None:
        return "none (CPU build of torch)", "none", ()
    available = torch.cuda.is_available()
    cuda = f"{torch.version.cuda} (torch's build)" + ("" if available else "; no device usable: "
                                                      "check nvidia-smi and CUDA_VISIBLE_DEVICES")
    nccl = "not available"
    if torch.distributed.is_available() and torch.distributed.is_nccl_available():
        nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
    gpus = ()
    if available:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        gpus = tuple(Gpu(p.name, p.total_memory, (p.major, p.minor)) for p in props)
    return cuda, nccl, gpus


def _environment(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    names = sorted(n for n in environ if n in ENV_NAMES or n.startswith(ENV_PREFIXES))
    return tuple((n, environ[n]) for n in names)


def _load_config(path: str) -> tuple[str | None, str | None]:
    """(the loaded config as JSON, None) or (None, the error in one line)."""
    from hf_zero.config import config_to_dict, load_config

    try:
        return json.dumps(config_to_dict(load_config(path)), indent=2), None
    except ValueError as error:
        return None, str(error)


RUN_PACKAGES = ("torch", "transformers", "accelerate")
"""What the run report names beside hf_zero and Python (trainer/report_file.py)."""


def run_versions() -> dict[str, str | None]:
    """hf_zero's, Python's, torch's (with its CUDA and NCCL), transformers' and accelerate's versions,
    each as ``collect`` reads it (None: not installed): the run report's ``versions``."""
    from hf_zero import __version__

    cuda, nccl, _ = _torch_facts()
    return {"hf_zero": __version__, "python": platform.python_version(),
            **{name: installed_version(name) for name in RUN_PACKAGES}, "cuda": cuda, "nccl": nccl}


def collect(config_path: str | None = None, environ: Mapping[str, str] | None = None) -> EnvReport:
    """Read this machine's versions and devices, and ``config_path`` if given."""
    from hf_zero import __version__

    declared = declared_requirements() or {}
    packages = tuple((name, installed_version(name), declared.get(name.lower().replace("_", "-")))
                     for name in PACKAGES)
    cuda, nccl, gpus = _torch_facts()
    config_json = config_error = None
    if config_path is not None:
        config_json, config_error = _load_config(config_path)
    return EnvReport(
        hf_zero=__version__,
        python=f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        platform=platform.platform(),
        packages=packages,
        cuda=cuda,
        nccl=nccl,
        gpus=gpus,
        environment=_environment(os.environ if environ is None else environ),
        config_path=config_path,
        config_json=config_json,
        config_error=config_error,
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(report: EnvReport) -> str:
    """The report as Markdown: one table of versions, one of GPUs, the variables, the config."""
    lines = ["### hf_zero environment", "", "| | |", "|---|---|",
             f"| hf_zero | {report.hf_zero} |",
             f"| Python | {_cell(report.python)} |",
             f"| platform | {_cell(report.platform)} |",
             f"| CUDA | {report.cuda} |",
             f"| NCCL | {report.nccl} |"]
    for name, version, wanted in report.packages:
        shown = version if version is not None else "not installed"
        if wanted:
            shown += f" (hf-zero needs {wanted})"
        lines.append(f"| {name} | {_cell(shown)} |")
    lines += ["", f"GPUs: {len(report.gpus)}"]
    if report.gpus:
        lines += ["", "| index | name | memory | compute capability |", "|---:|---|---:|---|"]
        lines += [f"| {i} | {_cell(g.name)} | {fmt_bytes(g.memory_bytes)} | {g.capability[0]}.{g.capability[1]} |"
                  for i, g in enumerate(report.gpus)]
    lines += ["", "Environment variables: " + (", ".join(f"`{n}={v}`" for n, v in report.environment)
                                               if report.environment else "none of hf_zero's, NCCL's or the "
                                               "launcher's set")]
    if report.config_path is not None:
        lines += ["", f"Config `{report.config_path}`"]
        if report.config_json is not None:
            lines += ["(as hf_zero loaded it):", "", "```json", report.config_json, "```"]
        else:
            lines += [f"could not be loaded: {report.config_error}"]
    return "\n".join(lines)


def add_env_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``env`` to ``subparsers``; the handler is ``main``."""
    parser = subparsers.add_parser(
        "env",
        help="print versions, CUDA/NCCL, GPUs and a config as Markdown for a bug report",
        description="Print hf_zero's, Python's, torch's (CUDA, NCCL), transformers' and accelerate's versions, "
                    "the GPUs, the relevant environment variables and, if given, the config as hf_zero loads "
                    "it: Markdown to paste into a bug report.",
        allow_abbrev=False,
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="a --zero_config file to include")
    parser.add_argument("--zero_config", metavar="CONFIG", help="the same, spelled as doctor and launch take it")
    parser.set_defaults(handler=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Print the report; 0 (a config that does not load is part of the report), 2 for two configs."""
    if args.config is not None and args.zero_config is not None:
        print(f"hf_zero: env takes one config; got {args.config} and --zero_config {args.zero_config}",
              file=sys.stderr)
        return 2
    print(render(collect(args.zero_config if args.config is None else args.config)))
    return 0

