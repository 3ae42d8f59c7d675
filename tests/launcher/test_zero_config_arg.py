"""Removing `--zero_config FILE` from a script's arguments."""

import pytest

from hf_zero.launcher.zero_config_arg import pop_zero_config


@pytest.mark.parametrize(
    "args, path, rest",
    [
        ([], None, []),
        (["--lr", "1"], None, ["--lr", "1"]),
        (["--lr", "1", "--zero_config", "z.json", "--bf16"], "z.json", ["--lr", "1", "--bf16"]),
        (["--zero_config=z.json", "--bf16"], "z.json", ["--bf16"]),
        (["--bf16", "--zero-config", "dir/z3.json"], "dir/z3.json", ["--bf16"]),
        (["--zero-config=a=b.json"], "a=b.json", []),
        # look-alikes stay with the script
        (["--zero_config_extra", "x", "--zero"], None, ["--zero_config_extra", "x", "--zero"]),
    ],
)
def test_pop(args, path, rest):
    assert pop_zero_config(args) == (path, rest)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zero_config"], "--zero_config needs a value: write --zero_config FILE (a JSON config file)"),
        (["--zero_config", "--bf16"], "--zero_config needs a value: write --zero_config FILE (a JSON config file)"),
        (["--zero_config="], "--zero_config= needs a value: write --zero_config=FILE (a JSON config file)"),
        (["--zero-config"], "--zero-config needs a value: write --zero-config FILE (a JSON config file)"),
        (
            ["--zero_config", "a.json", "--lr", "1", "--zero_config=b.json"],
            "--zero_config is given twice (--zero_config 'a.json' and --zero_config 'b.json'); keep one",
        ),
        (
            ["--zero_config=a.json", "--zero-config", "a.json"],
            "--zero-config is given twice (--zero_config 'a.json' and --zero-config 'a.json'); keep one",
        ),
    ],
)
def test_errors_name_the_flag(args, message):
    with pytest.raises(ValueError) as caught:
        pop_zero_config(args)
    assert str(caught.value) == message
