"""Loading a model sharded from the start: no rank ever holds all of it (ZeRO-3 "zero.Init").

``from_pretrained(path)`` builds the model on the meta device (parameters only: buffers such as
rotary frequencies are computed as usual), lays it out in stage-3 units as the engine would for
a loaded model, and fills each unit's local shard with this rank's slices of the safetensors
files (sources.py, engine/materialize.py). ``from_config(config)`` does the same with random
init. The model comes back with its ZeroEngine (no optimizer yet): forward, ``generate`` and
``evaluate`` gather units as under training, and the Trainer's ``create_optimizer`` hands its
optimizer to this engine (``seams.create_optimizer``).

Peak host memory per rank: its shards (model bytes / W), plus one unit's reads in flight (onto a
GPU: a few pinned pieces, parallel_reads.py), plus params kept whole (the persistent unit's small
ones), plus the interpreter; with converted params (fused experts) one group of them whole, and
with ``.bin`` files the pages of the current file a rank copied from (stored_tensors.py).

The sharding settings (stage 3, buckets, prefetch, persistence threshold, offload, precision)
are fixed at load, from the ``zero_config`` given or the one hf_zero runs with (``hf_zero.run``,
``hf_zero.trainer.activate``). A precision of "auto" keeps the model's dtype at load. If the
Trainer's resolved config differs (a bf16 run of a model loaded in fp32), ``engine_for`` lays the
model out again for it, with a warning naming the settings.

PEFT on a model loaded this way (``get_peft_model``, ``PeftModel.from_pretrained``): the wrapper
evaluates and generates through the load's engine; the Trainer's ``create_optimizer`` lays the
wrapper out anew from the load's shards (``engine_for``, relayout.py), as it would lay out a
wrapper of a model loaded whole. Checkpoints whose keys transformers renames or converts (legacy
names, fused MoE experts) load with transformers' own conversions (key_plan.py); ``.bin``
checkpoints and cached hub snapshots too (checkpoint_files.py). Not yet: quantized loads.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import weakref

import torch
from torch import nn

from hf_zero.engine import ZeroEngine
from hf_zero.first_rank import is_first_rank
from hf_zero.engine.options import engine_options
from hf_zero.engine.stages import NotAvailableYet
from hf_zero.init.relayout import relayout
from hf_zero.init.checkpoint_files import NotServed, checkpoint_directory, find_files
from hf_zero.init.checkpoint_source import CheckpointSource
from hf_zero.init.sources import InitSource, fill_whole

# ZeroEngine option (and attribute) -> the config setting it comes from (what ``differences`` names).
_SETTINGS = {"param_dtype": "the training dtype (bf16 / fp16 / fp32)",
             "offload": "zero_optimization.offload_optimizer",
             "offload_param": "zero_optimization.offload_param",
             "prefetch_numel": "zero_optimization.stage3_prefetch_bucket_size",
             "max_live_numel": "zero_optimization.stage3_max_live_parameters",
             "persistence_threshold": "zero_optimization.stage3_param_persistence_threshold"}
_ENGINES: "weakref.WeakValueDictionary[int, ZeroEngine]" = weakref.WeakValueDictionary()


def from_pretrained(path: str, *, zero_config=None, dtype=None, model_class=None, device=None, config=None,
                    attn_implementation: str | None = None, subfolder: str = "", revision: str | None = None,
                    cache_dir=None, local_files_only: bool = False, use_safetensors: bool | None = None,
                    **config_kwargs):
    """``model_class.from_pretrained(path)`` (default ``AutoModelForCausalLM``), sharded at stage 3 as it loads.

    ``path``: a local checkpoint directory, or a hub id whose snapshot is in the local Hugging Face
    cache with the hub offline (checkpoint_files.py; ``subfolder``, ``revision``, ``cache_dir``,
    ``local_files_only`` and ``use_safetensors`` as transformers reads them); safetensors or
    ``.bin`` weights, keys converted as transformers converts them (key_plan.py).
    ``dtype``: a torch dtype, or None / "auto" for the checkpoint config's own (as transformers);
    ``device``: where the shards go (default: this rank's GPU, else the CPU); ``config``: a
    transformers config to use instead of the directory's (``config_kwargs`` update the latter).
    ``NotServed`` (a ValueError) says why a checkpoint cannot be loaded this way."""
    from transformers import AutoConfig

    directory = checkpoint_directory(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                     local_files_only=local_files_only)
    files = find_files(directory, use_safetensors)
    hf_config = config if config is not None else AutoConfig.from_pretrained(directory, **config_kwargs)
    model = _meta_model(hf_config, dtype, model_class, attn_implementation)

    def source(dev):
        found = CheckpointSource(files, model, dev)
        found.check_covers(model)  # before any shard is made: MissingParams
        model._weight_conversions = found.plan.used  # as transformers keeps them, to revert on save
        return found

    _shard(model, zero_config, device, source)
    _load_generation_config(model, directory)
    model.config._name_or_path = os.fspath(path)
    model.name_or_path = os.fspath(path)
    model.eval()  # as from_pretrained returns it
    return model


def from_config(hf_config, *, zero_config=None, dtype=None, model_class=None, device=None, seed: int | None = None):
    """``model_class.from_config(hf_config)`` with random init, sharded at stage 3 as it is built.

    Every rank gets the same model for a given ``seed`` (default: drawn from torch's RNG on rank 0,
    so ``set_seed`` before the call makes it reproducible), at any world size."""
    model = _meta_model(hf_config, dtype, model_class)
    seed = _common_seed(seed)
    _shard(model, zero_config, device, lambda dev: InitSource(model, dev, seed))
    return model


def engine_of(model: nn.Module) -> ZeroEngine | None:
    """The engine a model got when it was loaded sharded, or None."""
    engine = _ENGINES.get(id(model))
    return engine if engine is not None and engine.model is model and not engine.closed else None


def engine_for(model: nn.Module, options: dict) -> ZeroEngine | None:
    """The engine the Trainer takes for ``model`` (``options``: its resolved config's), or None to
    build one. A model sharded as it loaded brings its engine. A new engine is laid out from the
    load's shards (relayout.py) if the model was wrapped since (PEFT's ``get_peft_model``,
    ``PeftModel.from_pretrained``), if its trainable params are no longer the ones the load laid
    out (transformers' ``add_adapter``, params frozen), or if the Trainer's settings differ from the
    load's (a bf16 run of a model loaded in fp32; said once, with what differs). Stage 3 only."""
    owner = next((m for m in model.modules() if engine_of(m) is not None), None)
    if owner is None:
        return None
    if options["stage"] != 3:
        raise ValueError(f"the model was loaded sharded for ZeRO stage 3 (hf_zero.init), but the Trainer runs "
                         f"zero_optimization.stage = {options['stage']}: use stage 3, or set "
                         "zero_optimization.zero3_init_flag false (or load it with transformers' from_pretrained)")
    loaded = engine_of(owner)
    differ = differences(loaded, options)
    if owner is model and not differ and _laid_out_trainable(loaded) == {p for p in model.parameters() if p.requires_grad}:
        return loaded
    if differ and is_first_rank():
        warnings.warn("the model was sharded at load (hf_zero.init) with other settings than the Trainer's resolved "
                      "zero config: " + "; ".join(differ) + ". hf_zero lays it out again for the Trainer's settings "
                      "from the loaded shards (both held until then); load with the training dtype (e.g. "
                      "dtype=torch.bfloat16 for a bf16 run) and the same zero_config to skip this", UserWarning,
                      stacklevel=3)
    del _ENGINES[id(owner)]
    engine = relayout(model, loaded, options)
    _ENGINES[id(model)] = engine
    return engine


def _laid_out_trainable(engine: ZeroEngine) -> set:
    return {p for unit in engine.units for part in unit.parts if part.trainable for p in part.params}


def differences(engine: ZeroEngine, options: dict) -> list[str]:
    """The sharding settings in which ``options`` (a Trainer's) differ from those ``engine`` was loaded with."""
    loaded_dtypes = {p.dtype for p in _laid_out_trainable(engine)}
    model_dtype = next(iter(loaded_dtypes)) if len(loaded_dtypes) == 1 else None
    differ = []
    for key, setting in _SETTINGS.items():
        at_load, now = getattr(engine, key), options[key]  # the engine keeps each option as it was given
        if key == "param_dtype":
            at_load, now = at_load or model_dtype, now or model_dtype
        if at_load != now:
            differ.append(f"{setting}: {at_load} at load, {now} in the Trainer's config")
    return differ


# ---- steps ------------------------------------------------------------------------------------


def _meta_model(hf_config, dtype, model_class, attn_implementation: str | None = None) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    if dtype in (None, "auto"):
        dtype = getattr(hf_config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, None or 'auto'; got {dtype!r}")
    # AutoModel* classes build with from_config, a concrete model class (the from_pretrained seam) with _from_config.
    build = getattr(model_class, "from_config", None) or model_class._from_config
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):  # params on meta; buffers computed on the CPU
        model = build(hf_config, dtype=dtype, **extra)
    model.tie_weights()  # init_empty_weights re-creates each param as it is set, which unties them
    _check_ties(model)
    return model


def _check_ties(model: nn.Module) -> None:
    """Every tie transformers declares for ``model`` (``all_tied_weights_keys``: target -> source,
    those its config turns on) holds on the meta model: one Parameter, so the engine plans it once
    ([Note: tied params across units] in unit_plan.py). A tie left undone (a model whose
    ``tie_weights`` does not tie on meta) would load two params where transformers has one:
    ``NotServed`` before any shard is made, so the plugin loads it whole."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            tied = model.get_parameter(target) is model.get_parameter(source)
        except AttributeError:
            tied = False
        if not tied:
            raise NotServed(f"{type(model).__name__} ties {target} to {source}, but its tie_weights() left "
                            "them two params when built on the meta device")


def _shard(model: nn.Module, zero_config, device, make_source) -> ZeroEngine:
    config = _zero_config(zero_config, model)
    _init_distributed()
    device = torch.device(device) if device is not None else _default_device()
    source = make_source(device)
    from hf_zero.config.auto import is_auto

    options = engine_options(config, param_dtype="model" if is_auto(config.precision.dtype) else None)
    try:
        engine = ZeroEngine(model, None, source=source, **options)
        fill_whole(model, source)
    finally:
        source.close()  # its files, reader threads and pinned buffers
    _ENGINES[id(model)] = engine
    if engine.ctx.world_size > 1:
        from hf_zero.trainer.generation import sync_generate

        sync_generate(model)
    return engine


def _zero_config(zero_config, model: nn.Module):
    from hf_zero.config import load_config
    from hf_zero.config.resolve import resolve_zero_sizes
    from hf_zero.config.unsupported import refuse
    from hf_zero.trainer.session import active_config

    config = load_config(zero_config) if zero_config is not None else active_config()
    if config is not None:
        refuse(config)  # what this version cannot run (hf_zero/config/unsupported.py), before any param loads
    if config is None:
        raise ValueError("hf_zero.init needs a zero config: pass zero_config=..., or run under hf_zero.run / "
                         "hf-zero launch, or call hf_zero.trainer.activate(...) first")
    if config.zero.stage != 3:
        raise ValueError(f"hf_zero.init shards params as they load, which is ZeRO stage 3; the config "
                         f"{config.source or ''} has zero_optimization.stage = {config.zero.stage}")
    if config.tensor_parallel.autotp_size > 1:  # zero3_init_flag false, hf_zero.init called by the script itself
        raise NotAvailableYet(f"hf_zero.init with tensor_parallel.autotp_size = {config.tensor_parallel.autotp_size} "
                              f"in {config.source or 'the zero config'}: a model loaded sharded cannot be split for "
                              "tensor parallelism (not built yet); load it whole with transformers' from_pretrained, "
                              "and the Trainer splits it, then shards it")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return dataclasses.replace(config, zero=resolve_zero_sizes(config.zero, hidden))


def _init_distributed() -> None:
    """Join the job's process group now (torchrun / hf_zero.run set the env), as the Trainer would later."""
    import torch.distributed as dist

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _common_seed(seed: int | None) -> int:
    import torch.distributed as dist

    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def _load_generation_config(model: nn.Module, path: str) -> None:
    if not os.path.isfile(os.path.join(path, "generation_config.json")) or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(path)
