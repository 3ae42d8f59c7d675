"""The `--zero_config FILE` flag inside a training script's arguments.

The flag belongs to hf_zero, not to the script: `hf-zero launch` reads it to validate the
config before any rank starts, and `hf_zero.run` removes it before the script sees
`sys.argv`, so an unmodified script (argparse, `HfArgumentParser`) never meets it.
Both `--zero_config` and `--zero-config` are recognised, like `HfArgumentParser` does
for its own flags.
"""

from collections.abc import Sequence

FLAG_SPELLINGS = ("--zero_config", "--zero-config")


def pop_zero_config(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Return (config path or None, args without the flag and its value).

    >>> pop_zero_config(["--lr", "1", "--zero_config", "z.json", "--bf16"])
    ('z.json', ['--lr', '1', '--bf16'])
    >>> pop_zero_config(["--zero_config=z.json"])
    ('z.json', [])

    Raises ValueError if the flag has no value or is given more than once.
    """
    path: str | None = None
    given_as = ""
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        flag, sep, value = arg.partition("=")
        if flag not in FLAG_SPELLINGS:
            rest.append(arg)
            index += 1
            continue
        if not sep:
            following = args[index + 1] if index + 1 < len(args) else ""
            if not following or (following.startswith("-") and following != "-"):
                raise ValueError(f"{flag} needs a value: write {flag} FILE (a JSON config file)")
            value = following
            index += 2
        else:
            if not value:
                raise ValueError(f"{flag}= needs a value: write {flag}=FILE (a JSON config file)")
            index += 1
        if path is not None:
            raise ValueError(
                f"{flag} is given twice ({given_as} {path!r} and {flag} {value!r}); keep one"
            )
        path, given_as = value, flag
    return path, rest


def load_zero_config(path: str):
    """Load and validate the config file, and check this version can run it.

    Raises `hf_zero.config.ConfigError` or `NotAvailableYet`, both ValueErrors."""
    from hf_zero.trainer import check

    return check(path)
