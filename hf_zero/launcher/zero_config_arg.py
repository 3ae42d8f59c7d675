"""The zero config flag inside a training script's arguments: `--zero_config FILE` or `--deepspeed FILE`.

The flag belongs to hf_zero, not to the script: `hf-zero launch` reads it to validate the
config before any rank starts, and `hf_zero.run` removes it before the script sees
`sys.argv`, so an unmodified script (argparse, `HfArgumentParser`) never meets it.
Both `--zero_config` and `--zero-config` are recognised, like `HfArgumentParser` does
for its own flags.

`--deepspeed FILE` (TrainingArguments.deepspeed, the flag existing DeepSpeed launch commands
carry) is taken as the zero config too, and said so in one line: the Trainer never sees it, so
DeepSpeed and hf_zero never both shard the model. Given with `--zero_config` it must name the
same file. The script's `--fp16` / `--bf16` fill an "auto" precision for the check of what this
version runs ([Note: "auto" precision] in hf_zero/config/unsupported.py), and its `--save_strategy`
the launch preflight's check of checkpoint saves (hf_zero/config/stage0_saves.py).
"""

import os
from collections.abc import Sequence
from typing import NamedTuple

FLAG_SPELLINGS = ("--zero_config", "--zero-config")
DEEPSPEED_FLAG = "--deepspeed"
SAVE_STRATEGY_SPELLINGS = ("--save_strategy", "--save-strategy")  # TrainingArguments.save_strategy
_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # HfArgumentParser's


class ConfigFlag(NamedTuple):
    """The zero config named in a script's arguments, and those arguments without it."""

    path: str | None
    rest: list[str]
    from_deepspeed: bool
    """True when only `--deepspeed FILE` named it (`note` says so)."""

    @property
    def note(self) -> str | None:
        if not self.from_deepspeed:
            return None
        return (f"hf_zero: --deepspeed {self.path} is taken as the zero config: hf_zero shards with it, "
                "and the script's Trainer does not see --deepspeed (DeepSpeed is not used)")


def _take(args: Sequence[str], spellings: Sequence[str], hint: str) -> tuple[str | None, str, list[str]]:
    """(value or None, the spelling it was given as, args without the flag and its value)."""
    path: str | None = None
    given_as = ""
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        flag, sep, value = arg.partition("=")
        if flag not in spellings:
            rest.append(arg)
            index += 1
            continue
        if not sep:
            following = args[index + 1] if index + 1 < len(args) else ""
            if not following or (following.startswith("-") and following != "-"):
                raise ValueError(f"{flag} needs a value: write {flag} FILE ({hint})")
            value = following
            index += 2
        else:
            if not value:
                raise ValueError(f"{flag}= needs a value: write {flag}=FILE ({hint})")
            index += 1
        if path is not None:
            raise ValueError(
                f"{flag} is given twice ({given_as} {path!r} and {flag} {value!r}); keep one"
            )
        path, given_as = value, flag
    return path, given_as, rest


def split_config_flag(args: Sequence[str]) -> ConfigFlag:
    """The zero config of `--zero_config FILE` or `--deepspeed FILE`, and the args without both.

    >>> split_config_flag(["--lr", "1", "--zero_config", "z.json", "--bf16"])
    ConfigFlag(path='z.json', rest=['--lr', '1', '--bf16'], from_deepspeed=False)
    >>> split_config_flag(["--deepspeed", "ds.json", "--bf16"])
    ConfigFlag(path='ds.json', rest=['--bf16'], from_deepspeed=True)

    Raises ValueError for a flag without a value, one given twice, or the two naming different files.
    """
    path, given_as, rest = _take(args, FLAG_SPELLINGS, "a JSON config file")
    deepspeed, _, rest = _take(rest, (DEEPSPEED_FLAG,), "a DeepSpeed JSON config, which hf_zero takes as its "
                                                        "zero config; a script that calls deepspeed.initialize "
                                                        "itself cannot run under hf_zero")
    if deepspeed is None:
        return ConfigFlag(path, rest, False)
    if path is None:
        return ConfigFlag(deepspeed, rest, True)
    if os.path.realpath(path) != os.path.realpath(deepspeed):
        raise ValueError(f"{given_as} {path!r} and --deepspeed {deepspeed!r} name different files; hf_zero takes "
                         "--deepspeed FILE as its zero config, so keep one of them")
    return ConfigFlag(path, rest, False)  # the same file twice: taken once, nothing to say


def script_dtype(args: Sequence[str]) -> str | None:
    """"fp16" or "bf16" when the script's arguments turn exactly one of `--fp16`/`--bf16` on, else None
    (neither, both, or set in the script's code: only its Trainer knows)."""
    on = set()
    for index, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if flag not in ("--fp16", "--bf16"):
            continue
        if not sep:
            following = args[index + 1] if index + 1 < len(args) else ""
            value = following if following.lower() in _TRUE + _FALSE else "true"
        if value.lower() in _TRUE:
            on.add(flag[2:])
        elif value.lower() in _FALSE:
            on.discard(flag[2:])
    return on.pop() if len(on) == 1 else None


def script_save_strategy(args: Sequence[str]) -> str | None:
    """The script's `--save_strategy VALUE` (`--save-strategy`, `=VALUE`; the last one, as argparse takes it),
    or None when not given: its Trainer then saves by TrainingArguments' default unless its code sets one."""
    value = None
    for index, arg in enumerate(args):
        flag, sep, given = arg.partition("=")
        if flag in SAVE_STRATEGY_SPELLINGS:
            value = given if sep else (args[index + 1] if index + 1 < len(args) else None)
    return value


def load_zero_config(path: str, script_args: Sequence[str] = ()):
    """Load and validate the config file, and check this version can run it (with an "auto" precision
    filled from the script's `--fp16`/`--bf16`, where it has one). Returns the config as loaded.

    Raises `hf_zero.config.ConfigError` (`UnsupportedConfig` is one), a ValueError."""
    from hf_zero.config.unsupported import refuse, with_dtype
    from hf_zero.trainer import check

    config = check(path)
    refuse(with_dtype(config, script_dtype(script_args)))
    return config


def auto_precision_note(config, script_args: Sequence[str]) -> str | None:
    """One `hf_zero: note:` line when the config's "auto" precision decides a refusal and the script's
    arguments do not say which dtype it gets (its code may set one), else None."""
    from hf_zero.config.unsupported import conditional_note

    if script_dtype(script_args) is not None:
        return None
    note = conditional_note(config)
    return None if note is None else "hf_zero: note: " + note.replace("\n", "\nhf_zero: note: ")
