"""Running the checks: every one for ``hf-zero doctor``, the cheap ones for ``hf-zero launch``.

| check | doctor | launch (preflight) |
|---|---|---|
| config, world size | yes | world size only (launch loads the config itself) |
| checkpoint saves (ZeRO stage 0 with tp or pipeline stages: config/stage0_saves.py) | the config row WARNs: the script needs --save_strategy no | yes, from the script's --save_strategy |
| optimizer, scheduler (what the config's blocks build) | yes | no (the Trainer prints the same line) |
| versions | yes | yes |
| gpus, master address, master port, launcher env | yes | not with --dry_run (the commands may run elsewhere); ranks started here only |
| model, gpu memory, host memory, pinned memory, nvme | yes | no (they load the model config, measure the disk) |
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hf_zero.doctor import environment, nvme, probes
from hf_zero.doctor.config_checks import check_config, check_saves, check_world_size, load_zero_config
from hf_zero.doctor.optim_checks import check_blocks
from hf_zero.doctor.result import CheckResult, skipped
from hf_zero.doctor.versions import check_versions


@dataclass(frozen=True)
class DoctorInputs:
    """What ``hf-zero doctor`` was asked about (its flags)."""

    zero_config: str | None = None
    model: str | None = None
    nproc: int | None = None
    """Ranks per node; None: the visible CUDA devices, 1 without CUDA (as hf-zero launch)."""
    nnodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    gradient_checkpointing: bool = False
    nvme_test_bytes: int = nvme.TEST_BYTES


def nvme_paths(config: Any) -> dict[str, list[str]]:
    """nvme_path -> the keys naming it, for the offload blocks whose device is "nvme"."""
    paths: dict[str, list[str]] = {}
    if config is None:
        return paths
    for key in ("offload_optimizer", "offload_param"):
        block = getattr(config.zero, key)
        if block.device == "nvme" and block.nvme_path:
            paths.setdefault(block.nvme_path, []).append(f"zero_optimization.{key}.nvme_path")
    return paths


def run_doctor(inputs: DoctorInputs, environ: Mapping[str, str] | None = None) -> list[CheckResult]:
    """Every check, in table order (cheap ones first)."""
    from hf_zero.doctor import memory  # imports the estimator, and with it torch
    from hf_zero.doctor.sizing import auto_host, load_model_info, rank_bytes, spec_from_config, tp_problem, variant

    environ = os.environ if environ is None else environ
    results: list[CheckResult] = []
    device_count = probes.cuda_device_count()
    nproc = inputs.nproc if inputs.nproc is not None else max(device_count, 1)
    world = nproc * inputs.nnodes

    config = None
    if inputs.zero_config is None:
        results.append(check_config(None))
    else:
        config, result = load_zero_config(inputs.zero_config)
        results.append(result)
    results.append(check_world_size(config, world, [nproc] * inputs.nnodes))
    results.extend(check_blocks(config))  # which optimizer and scheduler run, each value's source
    results.extend(check_versions())
    results.append(environment.check_gpus(nproc, device_count))
    results.append(environment.check_master_addr(inputs.master_addr, inputs.nnodes))
    results.append(environment.check_master_port(inputs.master_addr, inputs.master_port, inputs.nnodes))
    expected = world if inputs.nproc is not None else None
    results.append(environment.check_launcher_env(environ, expected_world=expected))

    model, error = None, None
    if inputs.model is not None:
        try:
            model = load_model_info(inputs.model)
        except ValueError as exc:  # the estimator's MODEL_CONFIG messages
            error = str(exc)
        except Exception as exc:  # a config transformers reads but cannot build: report, keep checking
            error = f"cannot build the model of --model {inputs.model!r}: {type(exc).__name__}: {exc}"
    spec = spec_from_config(config, micro_batch=inputs.micro_batch, seq_len=inputs.seq_len,
                            gradient_checkpointing=inputs.gradient_checkpointing)
    tp_error = model is not None and (error := tp_problem(model, spec, world)) is not None
    if tp_error:
        model = None  # tensor_parallel.autotp_size cannot split it: nothing to size
    results.append(memory.check_model(inputs.model, model, error, tp_error=tp_error))
    cuda = probes.cuda_available()
    available = probes.mem_available_bytes()
    total = probes.mem_total_bytes()
    if model is not None and available is not None and total is not None:
        spec = variant(spec, host=auto_host(model, available, total, nproc))  # what ratio "auto" starts from
    free = probes.cuda_free_bytes(nproc) if model is not None else None
    results.append(memory.check_gpu_memory(model, spec, world, free))
    results.append(memory.check_host_memory(model, spec, world, nproc, available, cuda=cuda))
    results.append(memory.check_pinned_memory(model, spec if config is not None else None, world, nproc,
                                              available, probes.memlock_limit_bytes(), cuda=cuda))
    paths = nvme_paths(config)
    if not paths:
        results.append(skipped(nvme.NVME, "no offload to nvme in the config"))
    for path, keys in paths.items():
        needed = None
        if model is not None:
            needed = nproc * rank_bytes(model, spec, world).offloaded.get("nvme", 0)
        named = " and ".join(keys) + f" in {config.source}"
        results.append(nvme.check_nvme(path, named, needed, test_bytes=inputs.nvme_test_bytes))
    return results


def preflight(
    config: Any,
    *,
    world_size: int,
    ranks_here: int | None,
    master_addr: str | None,
    master_port: int,
    nnodes: int,
    launcher: str,
    node_rank: int = 0,
    script_args: Sequence[str] = (),
    machine_checks: bool = True,
    device_count: Callable[[], int] = probes.cuda_device_count,
    environ: Mapping[str, str] | None = None,
) -> list[CheckResult]:
    """The cheap checks ``hf-zero launch`` runs before starting ranks (see the table above).

    ``config``: the config launch already loaded and checked (None without --zero_config), so its
    errors are reported once, by launch. ``ranks_here``: ranks started on this machine (the
    torchrun launcher), None when ssh/srun start them elsewhere; ``node_rank``: theirs. ``machine_checks`` False
    (--dry_run): only what does not depend on where the commands run.
    """
    environ = os.environ if environ is None else environ
    results = []
    if config is not None:
        results.append(check_world_size(config, world_size))
        results.append(check_saves(config, script_args))
    results.extend(check_versions())
    if not machine_checks:
        return results
    if ranks_here is not None:
        results.append(environment.check_gpus(ranks_here, device_count(),
                                              cpu_requested=environment.asks_for_cpu(script_args)))
        results.append(environment.check_master_addr(master_addr, nnodes))
        results.append(environment.check_master_port(master_addr, master_port, nnodes, probe_remote=False,
                                                        node_rank=node_rank))
    results.append(environment.check_launcher_env(environ, launcher=launcher))
    return results
