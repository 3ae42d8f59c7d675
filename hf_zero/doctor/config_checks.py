"""Checks of the ``--zero_config`` file: it loads as hf_zero would, and its batch size fits W.

``check_train_batch_size`` is also what ``hf-zero check-config --world_size N`` runs.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from hf_zero.config import stage0_saves
from hf_zero.doctor.result import CheckResult, failed, passed, skipped, warned
from hf_zero.launcher.placement import check_tp_placement
from hf_zero.launcher.zero_config_arg import script_save_strategy

CONFIG = "config"
WORLD_SIZE = "world size"
SAVES = "checkpoint saves"
CONFIG_FIX = ("fix the key/value the message names (docs/troubleshooting.md lists every config message); "
              "`hf-zero check-config FILE` prints the same message")
NOT_BUILT_FIX = "change that setting to a value the message allows"
SAVES_FIX = ("pass --save_strategy no to the script (trainer.save_model() still writes the full weights), or use "
             "the ZeRO stage the message names; a script that sets save_strategy in its own code: hf-zero launch "
             "--skip_doctor")


def check_train_batch_size(config: Any, world_size: int) -> None:
    """DeepSpeed's invariant train_batch_size = micro batch * accumulation steps * world size,
    checked for the factors the file fixes ("auto" ones are filled at training time).

    With ``sequence_parallel_size`` P > 1 the P ranks of a group share a batch: P must divide the
    world size, and the product counts world size / P ranks; likewise ``tensor_parallel.autotp_size`` and ``pipeline.stages``.

    Raises ValueError naming the file, the keys and their values."""
    sp = config.sequence_parallel_size
    name = "world_size"
    if isinstance(sp, int) and not isinstance(sp, bool) and sp > 1:
        if world_size % sp:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(f"sequence_parallel_size = {sp} in {config.source} does not divide the world size "
                             f"{world_size}; allowed: {divisors}")
        name, world_size = "world_size / sequence_parallel_size", world_size // sp
    tp = config.tensor_parallel.autotp_size  # the ranks of a tensor-parallel group share a batch too
    if tp > 1:
        if world_size % tp:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(f"tensor_parallel.autotp_size = {tp} in {config.source} does not divide {name} "
                             f"{world_size}; allowed: {divisors}")
        name, world_size = f"{name} / tensor_parallel.autotp_size", world_size // tp
    pp = config.pipeline.stages  # and the ranks of a pipeline (one per stage)
    if pp > 1:
        if world_size % pp:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(f"pipeline.stages = {pp} in {config.source} does not divide {name} {world_size}; "
                             f"allowed: {divisors}")
        name, world_size = f"{name} / pipeline.stages", world_size // pp
    batch = config.train_batch_size
    if not isinstance(batch, int) or isinstance(batch, bool):
        return
    factors = {
        "train_micro_batch_size_per_gpu": config.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
    }
    fixed = {k: v for k, v in factors.items() if isinstance(v, int) and not isinstance(v, bool)}
    product = world_size
    for value in fixed.values():
        product *= value
    terms = " * ".join([f"{k} ({v})" for k, v in fixed.items()] + [f"{name} ({world_size})"])
    if len(fixed) == len(factors) and batch != product:
        raise ValueError(f"train_batch_size = {batch} in {config.source} but {terms} = {product}; "
                         'make them equal or set train_batch_size to "auto"')
    if batch % product:
        raise ValueError(f"train_batch_size = {batch} in {config.source} is not divisible by {terms} "
                         f'= {product}; set it to "auto" or a multiple of {product}')


def load_zero_config(path: str) -> tuple[Any, CheckResult]:
    """Load ``path`` as hf_zero would: (the config or None, the ``config`` check's result).

    The config comes back even when this version cannot run it (offload not built, say), so the
    pinned-memory and NVMe checks can still look at what it asks for. Warnings the loader emits
    (keys accepted but not applied) become a WARN instead of being printed."""
    from hf_zero.config import ConfigError, load_config
    from hf_zero.config.unsupported import conditional_note
    from hf_zero.trainer import check

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = load_config(path)
        except ConfigError as error:
            return None, failed(CONFIG, str(error), CONFIG_FIX)
    try:
        check(config)  # what `hf-zero launch` and every rank run: features this version has
    except NotImplementedError as error:
        return config, failed(CONFIG, str(error), NOT_BUILT_FIX)
    except ValueError as error:
        return config, failed(CONFIG, str(error), CONFIG_FIX)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    saves = stage0_saves.needs_no_saves(config)  # the script's --save_strategy decides; it is not seen here
    if saves is not None:
        messages.insert(0, saves)
    note = conditional_note(config)  # an "auto" precision that some Trainer dtype makes unrunnable
    if note is not None:
        return config, warned(CONFIG, "; ".join([note, *messages]),
                              "give the script the other precision flag (the message names what runs), or "
                              "write the dtype in the file; `hf-zero launch` refuses the run before any rank "
                              "starts when the script's flags select it")
    if saves is not None:
        return config, warned(CONFIG, "; ".join(messages), SAVES_FIX)
    if messages:
        return config, warned(CONFIG, "; ".join(messages),
                              "remove those keys or set them to their no-warning values "
                              "(docs/configuration.md#accepted-but-not-applied); the run goes on")
    return config, passed(CONFIG, describe(config))


def describe(config: Any) -> str:
    """``zero3.json: stage 3, dtype "auto", optimizer AdamW``."""
    optimizer = config.optimizer.type if config.optimizer is not None else "the Trainer's"
    offload = [f"{key} {getattr(config.zero, key).device}" for key in ("offload_optimizer", "offload_param")
               if getattr(config.zero, key).device != "none"]
    text = f"{config.source}: stage {config.zero.stage}, dtype {config.precision.dtype}, optimizer {optimizer}"
    return text + (f", {', '.join(offload)}" if offload else "")


def check_config(path: str | None) -> CheckResult:
    """The ``config`` check alone (see ``load_zero_config``); SKIP without a file."""
    if path is None:
        return skipped(CONFIG, "no --zero_config given")
    return load_zero_config(path)[1]


def check_saves(config: Any, script_args: Sequence[str]) -> CheckResult:
    """The launch preflight's: a ZeRO stage-0 config with tp or pipeline stages against the script's
    ``--save_strategy`` (TrainingArguments' default "steps" when it passes none), refused with the
    message its Trainer would raise (hf_zero/config/stage0_saves.py)."""
    given = script_save_strategy(script_args)
    strategy = stage0_saves.DEFAULT_SAVE_STRATEGY if given is None else given
    source = (f"--save_strategy {given} among the script's arguments" if given is not None else
              "no --save_strategy among the script's arguments: TrainingArguments' default")
    message = stage0_saves.refusal(config, strategy)
    if message is None:
        return passed(SAVES, f"save_strategy {strategy!r} ({source})")
    return failed(SAVES, f"{message} ({source})", SAVES_FIX)


def check_world_size(config: Any, world_size: int, nodes: Sequence[int] = ()) -> CheckResult:
    """train_batch_size against ``world_size`` ranks, as ``check-config --world_size`` does; with the
    processes per node (``nodes``), tensor_parallel.autotp_size's groups inside a node, as ``hf-zero
    launch`` refuses otherwise ([Note: rank order] in hf_zero/launcher/placement.py)."""
    if config is None:
        return skipped(WORLD_SIZE, "no config loaded")
    try:
        check_train_batch_size(config, world_size)
    except ValueError as error:
        return failed(WORLD_SIZE, str(error),
                      f'set train_batch_size to "auto", or to train_micro_batch_size_per_gpu * '
                      f"gradient_accumulation_steps * {world_size}, or change the number of ranks")
    try:
        check_tp_placement(config.tensor_parallel.autotp_size, nodes, source=config.source)
    except ValueError as error:
        return failed(WORLD_SIZE, str(error), "run a multiple of tensor_parallel.autotp_size processes on every "
                                              "node (--nproc), or an autotp_size the message allows")
    batch = config.train_batch_size
    if not isinstance(batch, int) or isinstance(batch, bool):
        return passed(WORLD_SIZE, f'W = {world_size}; train_batch_size is {batch if batch is not None else "unset"} '
                                  "(filled from TrainingArguments)")
    return passed(WORLD_SIZE, f"W = {world_size}; train_batch_size = {batch} fits")
