"""`hf-zero` subcommands: check-config, and launch's config check before any rank starts."""

import json

import pytest

from hf_zero import cli
from hf_zero.launcher import multinode


def test_check_config_prints_json(tmp_path, capsys):
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    assert cli.main(["check-config", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["zero"]["stage"] == 2


def test_check_config_error(tmp_path, capsys, fake_config):
    assert cli.main(["check-config", "bad.json"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "hf_zero: bad.json: unknown key 'stgae'; did you mean 'stage'?\n")


def test_check_config_real_error(tmp_path, capsys):
    missing = str(tmp_path / "missing.json")
    assert cli.main(["check-config", missing]) == 2
    assert capsys.readouterr().err.startswith("hf_zero: ")


@pytest.mark.parametrize(
    "config, world_size, message",
    [
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, 4, None),
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, 3,
         "train_batch_size = 16 in {path} but train_micro_batch_size_per_gpu (2) * "
         "gradient_accumulation_steps (2) * world_size (3) = 12; make them equal or set "
         'train_batch_size to "auto"'),
        ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto"}, 6, None),
        ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto"}, 4,
         "train_batch_size = 12 in {path} is not divisible by train_micro_batch_size_per_gpu (2) * "
         'world_size (4) = 8; set it to "auto" or a multiple of 8'),
        ({"train_batch_size": "auto"}, 7, None),
    ],
)
def test_check_config_world_size(tmp_path, capsys, config, world_size, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    code = cli.main(["check-config", str(path), "--world_size", str(world_size)])
    out, err = capsys.readouterr()
    if message is None:
        assert (code, err) == (0, "")
    else:
        assert (code, out, err) == (2, "", f"hf_zero: {message.format(path=path)}\n")


def test_check_config_bad_world_size(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text("{}")
    assert cli.main(["check-config", str(path), "--world_size", "0"]) == 2
    assert capsys.readouterr().err == "hf_zero: --world_size must be a positive integer, got 0\n"


def test_launch_checks_config_before_starting_ranks(tmp_path, capsys, monkeypatch, fake_config):
    def must_not_run(commands):
        raise AssertionError("no rank may start with a bad config")

    monkeypatch.setattr(multinode, "run_all", must_not_run)
    script = tmp_path / "train.py"
    script.write_text("")
    code = cli.main(["launch", "--num_gpus", "2", str(script), "--zero_config", "bad.json"])
    assert code == 2
    assert capsys.readouterr().err == "hf_zero: bad.json: unknown key 'stgae'; did you mean 'stage'?\n"
    code = cli.main(["launch", str(script), "--zero_config"])
    assert code == 2
    assert capsys.readouterr().err == (
        "hf_zero: --zero_config needs a value: write --zero_config FILE (a JSON config file)\n"
    )


def test_no_subcommand(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main([])
    assert caught.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err
