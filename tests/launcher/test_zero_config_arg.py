"""Removing `--zero_config FILE` (or `--deepspeed FILE`) from a script's arguments; its --fp16/--bf16."""

import pytest

from hf_zero.launcher.zero_config_arg import script_dtype, split_config_flag


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
def test_split(args, path, rest):
    flag = split_config_flag(args)
    assert (flag.path, flag.rest, flag.from_deepspeed) == (path, rest, False)


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
        (["--zero_config", "a.json", "--deepspeed", "b.json"],
         "--zero_config 'a.json' and --deepspeed 'b.json' name different files; hf_zero takes --deepspeed FILE as "
         "its zero config, so keep one of them"),
        (["--deepspeed", "a.json", "--deepspeed=b.json"],
         "--deepspeed is given twice (--deepspeed 'a.json' and --deepspeed 'b.json'); keep one"),
        # DeepSpeed's own `--deepspeed --deepspeed_config FILE` (a script calling deepspeed.initialize)
        (["--deepspeed", "--deepspeed_config", "ds.json"],
         "--deepspeed needs a value: write --deepspeed FILE (a DeepSpeed JSON config, which hf_zero takes as its "
         "zero config; a script that calls deepspeed.initialize itself cannot run under hf_zero)"),
    ],
)
def test_errors_name_the_flag(args, message):
    with pytest.raises(ValueError) as caught:
        split_config_flag(args)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "args, path, rest, from_deepspeed",
    [
        (["--deepspeed", "ds.json", "--bf16"], "ds.json", ["--bf16"], True),
        (["--bf16", "--deepspeed=ds.json"], "ds.json", ["--bf16"], True),
        # the same file twice (spelled differently): taken once, as --zero_config, nothing to say
        (["--zero_config", "ds.json", "--deepspeed", "./ds.json"], "ds.json", [], False),
        (["--deepspeed_config", "x"], None, ["--deepspeed_config", "x"], False),
    ],
)
def test_deepspeed_is_the_zero_config(args, path, rest, from_deepspeed):
    flag = split_config_flag(args)
    assert (flag.path, flag.rest, flag.from_deepspeed) == (path, rest, from_deepspeed)
    if from_deepspeed:
        assert flag.note == (f"hf_zero: --deepspeed {path} is taken as the zero config: hf_zero shards with it, "
                             "and the script's Trainer does not see --deepspeed (DeepSpeed is not used)")
    else:
        assert flag.note is None


@pytest.mark.parametrize(
    "args, dtype",
    [
        ([], None), (["--fp16"], "fp16"), (["--bf16", "--lr", "1"], "bf16"), (["--fp16", "True"], "fp16"),
        (["--fp16=false", "--bf16=yes"], "bf16"), (["--fp16", "no"], None), (["--fp16", "--bf16"], None),
        (["--fp16_full_eval"], None),
    ],
)
def test_script_dtype(args, dtype):
    assert script_dtype(args) == dtype
