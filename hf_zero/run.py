"""Run an unmodified training script as one rank of an hf_zero job.

    python -m hf_zero.run [--module] SCRIPT_OR_MODULE [SCRIPT ARGS...]

Started once per rank by `hf-zero launch`, torchrun, srun or `accelerate launch`. It
1. removes `--zero_config FILE` (or `--deepspeed FILE`, said in one line by rank 0) from the
   script's arguments and loads the config: a bad config, or one this version cannot run
   (hf_zero/config/unsupported.py, an "auto" precision filled from the script's --fp16/--bf16),
   stops every rank with `hf_zero: <message>` and exit code 2, before any process group exists;
2. maps SLURM_* onto RANK/WORLD_SIZE/LOCAL_RANK/... when srun started it without torchrun
   (`hf_zero.launcher.slurm`); rank 0 warns when tensor-parallel groups would span nodes
   (`hf_zero.launcher.placement`, which `hf-zero launch` refuses before starting);
3. calls `hf_zero.trainer.activate(config)` (only with `--zero_config`); a config this
   version cannot run (NotImplementedError) also stops with `hf_zero: <message>`, exit 2;
4. runs the script as `python SCRIPT ARGS` (or `python -m MODULE ARGS`) would:
   `__name__ == "__main__"`, `sys.argv` without `--zero_config`, and for a file
   `sys.path[0]` its directory;
5. a ConfigError raised by hf_zero inside the script (the config disagrees with the script's
   TrainingArguments, or asks for what this version cannot run once its dtype is known, found when
   its Trainer is created) stops with `hf_zero: <message>` and exit code 2, printed once by rank 0
   for those two (every rank has the same one);
6. if the script raises (or exits non-zero) while hf_zero's watchdog runs, tells the other ranks
   before re-raising, so they print the job's hang report and exit at once instead of waiting
   in a collective (`hf_zero/engine/diagnostics/watchdog.py`);
7. a failure (an exception out of the script, or 1, 3 and 5) is also written, as one line naming
   this rank, to torchrun's `TORCHELASTIC_ERROR_FILE`: torchrun's table shows it, and `hf-zero
   launch` prints the first failing rank's line last (`hf_zero/launcher/error_file.py`).
"""

import os
import runpy
import sys
from collections.abc import Sequence
from typing import NoReturn

from hf_zero.config.errors import ArgumentsMismatch, ConfigError
from hf_zero.config.unsupported import UnsupportedConfig
from hf_zero.launcher import error_file
from hf_zero.launcher.args import check_script
from hf_zero.launcher.placement import spanning_warning
from hf_zero.launcher.slurm import torch_env_from_slurm
from hf_zero.launcher.zero_config_arg import load_zero_config, split_config_flag

USAGE = "usage: python -m hf_zero.run [--module] SCRIPT_OR_MODULE [ARGS...]"


def _fail(message: str) -> NoReturn:
    print(f"hf_zero: {message}", file=sys.stderr)
    error_file.write(f"rank {os.environ.get('RANK', '0')}: {message}")
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_module = argv[:1] == ["--module"]
    if as_module:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        _fail(f"no script to run\n{USAGE}")
    target, script_args = argv[0], argv[1:]
    try:
        flag = split_config_flag(script_args)
        script_args = flag.rest
        if not as_module:
            check_script(target)
        config = load_zero_config(flag.path, script_args) if flag.path is not None else None
        os.environ.update(torch_env_from_slurm(os.environ))
    except ValueError as error:
        _fail(str(error))
    if flag.note is not None and os.environ.get("RANK", "0") == "0":
        print(flag.note, file=sys.stderr)  # one line for the job
    spanning = None if config is None else spanning_warning(config.tensor_parallel.autotp_size, os.environ)
    if spanning is not None and os.environ.get("RANK", "0") == "0":
        print(spanning, file=sys.stderr)
    if config is not None:
        from hf_zero.trainer import activate

        try:
            activate(config)
        except (ValueError, NotImplementedError) as error:  # a feature this version lacks
            _fail(str(error))
    sys.argv = [target, *script_args]
    finished = False
    try:
        if as_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.realpath(target))
            runpy.run_path(target, run_name="__main__")
        finished = True
    except ConfigError as error:  # raised by hf_zero inside the script: the config, not the script, is wrong
        error_file.write(error_file.raised(os.environ.get("RANK", "0"), error))
        _report_to_other_ranks(error)
        if not isinstance(error, (ArgumentsMismatch, UnsupportedConfig)) or os.environ.get("RANK", "0") == "0":
            print(f"hf_zero: {error}", file=sys.stderr)  # the same on every rank: said once
        raise SystemExit(2) from None
    except BaseException as error:
        if isinstance(error, Exception):  # for torchrun's table and hf-zero launch's last line
            error_file.write(error_file.raised(os.environ.get("RANK", "0"), error), timestamp=error_file.stamp_for(error))
        _report_to_other_ranks(error)
        raise
    finally:
        _teardown(finished)


def _report_to_other_ranks(error: BaseException) -> None:
    """Publish "rank r raised ..." for the other ranks' watchdogs (only if one runs here)."""
    watchdog = sys.modules.get("hf_zero.engine.diagnostics.watchdog")  # never imported: no watchdog to tell
    if watchdog is not None:
        try:
            watchdog.report_exception(error)
        except Exception:  # noqa: BLE001 - the script's own exception is what must come out
            pass


def _teardown(finished: bool) -> None:
    """Destroy a process group the script left open while the interpreter is still alive.

    A gloo group left to interpreter exit can abort the process, and one destroyed while a gloo
    worker thread still releases a finished collective's tensors can hang (it waits for the GIL
    that the destroying thread holds). After a clean finish, a barrier lets those threads drain
    first; after an error there is no barrier, since a peer may be gone."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        watchdog = sys.modules.get("hf_zero.engine.diagnostics.watchdog")
        if watchdog is not None:
            watchdog.stop()  # after the barrier: a rank still waiting there can be told to stop
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
