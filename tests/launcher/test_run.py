"""`python -m hf_zero.run`, in process: argv, sys.path[0], __name__, SLURM mapping, config errors."""

import json
import os
import sys

import pytest

from hf_zero import run

from .conftest import DATA

TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def record(tmp_path, monkeypatch, restore_environ):
    """Isolate sys.argv/sys.path/os.environ; return a reader for what record_run.py saw."""
    path = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["python -m hf_zero.run"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in TORCH_VARIABLES + tuple(n for n in os.environ if n.startswith("SLURM_")):
        os.environ.pop(name, None)
    os.environ["HF_ZERO_TEST_RECORD"] = str(path)
    return lambda: json.loads(path.read_text())


SCRIPT = str(DATA / "record_run.py")


def test_runs_script_like_python_would(record):
    run.main([SCRIPT, "--flag", "x", "--", "--y"])
    seen = record()
    assert seen["argv"] == [SCRIPT, "--flag", "x", "--", "--y"]
    assert seen["name"] == "__main__"
    assert seen["sys_path0"] == str(DATA)
    assert seen["env"] == dict.fromkeys(TORCH_VARIABLES)  # nothing set outside SLURM


def test_relative_script_path(record, monkeypatch):
    monkeypatch.chdir(DATA.parent)
    run.main(["data/record_run.py"])
    assert record()["argv"] == ["data/record_run.py"]
    assert record()["sys_path0"] == str(DATA)


def test_module(record, monkeypatch):
    monkeypatch.syspath_prepend(str(DATA))
    monkeypatch.delitem(sys.modules, "record_run", raising=False)
    run.main(["--module", "record_run", "--flag", "--module"])
    seen = record()
    assert seen["argv"][1:] == ["--flag", "--module"]
    assert seen["argv"][0].endswith("record_run.py")
    assert seen["name"] == "__main__"


@pytest.mark.parametrize("form", [["--zero_config", "z3.json"], ["--zero_config=z3.json"]])
def test_zero_config_is_loaded_activated_and_stripped(record, fake_config, fake_activate, form):
    run.main([SCRIPT, "--lr", "1", *form, "--bf16"])
    assert fake_config == [("z3.json", {})]
    assert [c.source for c in fake_activate] == ["z3.json"]
    assert record()["argv"] == [SCRIPT, "--lr", "1", "--bf16"]


def test_no_zero_config_no_activation(record, fake_config, fake_activate):
    run.main([SCRIPT, "--lr", "1"])
    assert (fake_config, fake_activate) == ([], [])


def test_script_exit_code_passes_through(record):
    os.environ["HF_ZERO_TEST_EXIT"] = "3"
    with pytest.raises(SystemExit) as caught:
        run.main([SCRIPT])
    assert caught.value.code == 3


def expect_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        run.main(argv)
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"hf_zero: {message}\n"


def test_bad_config_exits_2_before_running(record, capsys, fake_config, fake_activate, tmp_path):
    expect_exit_2(capsys, [SCRIPT, "--zero_config", "bad.json"],
                  "bad.json: unknown key 'stgae'; did you mean 'stage'?")  # fmt: skip
    assert fake_activate == []
    assert not (tmp_path / "record.json").exists()


def test_activation_refusal_exits_2(record, capsys, fake_config, monkeypatch):
    import hf_zero.trainer

    def refuse(config):
        raise NotImplementedError("offload_param to nvme is not available in this version")

    monkeypatch.setattr(hf_zero.trainer, "activate", refuse)
    expect_exit_2(capsys, [SCRIPT, "--zero_config", "z.json"], "offload_param to nvme is not available in this version")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([SCRIPT, "--zero_config"], "--zero_config needs a value: write --zero_config FILE (a JSON config file)"),
        ([SCRIPT, "--zero_config=a", "--zero_config=b"],
         "--zero_config is given twice (--zero_config 'a' and --zero_config 'b'); keep one"),
        ([], "no script to run\n" + run.USAGE),
        (["--module"], "no script to run\n" + run.USAGE),
        (["--zero_config", "z.json", SCRIPT], "no script to run\n" + run.USAGE),
    ],
)
def test_usage_errors(record, capsys, argv, message):
    expect_exit_2(capsys, argv, message)


def test_missing_script(record, capsys):
    expect_exit_2(capsys, ["nope.py"], f"script 'nope.py' not found (from {os.getcwd()})")


def test_slurm_mapping(record):
    os.environ.update(
        SLURM_JOB_ID="31337", SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_NODEID="1",
        SLURM_TASKS_PER_NODE="2(x2)", SLURM_JOB_NODELIST="gpu[07-08]",
    )  # fmt: skip
    run.main([SCRIPT])
    assert record()["env"] == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": "16337",
    }  # fmt: skip


def test_slurm_mapping_keeps_torchrun_variables(record):
    os.environ.update(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_JOB_NODELIST="gpu07", RANK="0")
    run.main([SCRIPT])
    assert record()["env"]["RANK"] == "0"
    assert record()["env"]["WORLD_SIZE"] is None


def test_bad_slurm_nodelist_exits_2(record, capsys, monkeypatch):
    monkeypatch.setattr("hf_zero.launcher.slurm.shutil.which", lambda name: None)
    os.environ.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="gpu[07")
    expect_exit_2(capsys, [SCRIPT], "SLURM node list 'gpu[07' has a '[' without ']'")
