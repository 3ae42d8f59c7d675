"""The ZeroEngine keyword arguments for a resolved config: the one place they are mapped.

Two callers build engines from a config, the Trainer seam (``create_optimizer``) and the sharded
load (hf_zero/init), and both must agree setting by setting: a model sharded as it loaded is
handed to the Trainer, which checks the options match. The mapping lives with the engine it
feeds, below both callers, so neither imports the other for it. It reads the config by
attribute only and imports nothing from hf_zero.config.
"""

from __future__ import annotations

import torch

from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.config.unsupported import refuse

# A bf16 run keeps trainable params in bf16 and the fp32 master shard in the engine (as DeepSpeed
# does); fp32 keeps them as the model has them.
_PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def engine_options(config, param_dtype=None) -> dict:
    """The ZeroEngine keyword arguments for a resolved config (the one place they are mapped).
    ``param_dtype`` "model": keep the model's own dtype (a load before the precision is known)."""
    return dict(
        stage=config.zero.stage,
        bucket_numel=int(config.zero.reduce_bucket_size),  # >= 1: the config checks it
        param_dtype=None if param_dtype == "model" else _PARAM_DTYPES[config.precision.dtype],
        offload=_optimizer_offload(config),
        offload_param=_param_offload(config),  # stage 3 only (the config refuses it below)
        prefetch_numel=int(config.zero.prefetch_bucket_size),  # stage 3 only, like the next two
        max_live_numel=int(config.zero.max_live_parameters),
        persistence_threshold=int(config.zero.param_persistence_threshold),
    )


def _optimizer_offload(config) -> OptimizerOffload | None:
    spec = config.zero.offload_optimizer
    if spec.device == "none":
        return None
    refuse(config)  # the one table (config/unsupported.py): fp16 with optimizer offload is a row of it
    ratio = spec.ratio if isinstance(spec.ratio, float) else "auto"  # [Note: auto ratio] (auto_ratio.py)
    if spec.device == "nvme":  # chunks of buffer_size elements, buffer_count of them in host memory
        host_share = spec.host_share if isinstance(spec.host_share, float) else "auto"  # [Note: host share]
        return OptimizerOffload(device="nvme", pin_memory=spec.pin_memory, ratio=ratio,
                                chunk_numel=spec.buffer_size, nvme_path=spec.nvme_path,
                                buffer_count=spec.buffer_count, state_dtype=spec.state_dtype,
                                host_share=host_share)
    leg = spec.device_share if isinstance(spec.device_share, float) else "auto"  # [Note: leg share]
    return OptimizerOffload(device=spec.device, pin_memory=spec.pin_memory, ratio=ratio,
                            state_dtype=spec.state_dtype, device_share=leg)  # [Note: device leg]


def _param_offload(config) -> ParamOffload | None:
    """Stage 3 parameter offload ("cpu" or "nvme"); the config has checked the stage, that the
    optimizer is offloaded too, and that "nvme" has its nvme_path."""
    spec = config.zero.offload_param
    return None if spec.device == "none" else ParamOffload(device=spec.device, pin_memory=spec.pin_memory,
                                                           nvme_path=spec.nvme_path)
