"""`hf-zero --version`, `hf_zero.__version__` and `hf-zero env` (hf_zero/doctor/env_report.py)."""

import importlib.metadata
import json
import subprocess
import sys

import pytest

import hf_zero
from hf_zero.cli import main
from hf_zero.doctor.env_report import EnvReport, Gpu, collect, render
from hf_zero.doctor.versions import declared_requirements


def test_version_comes_from_the_installed_metadata():
    assert hf_zero.__version__ == importlib.metadata.version("hf-zero")


def test_version_without_installed_metadata_is_the_fallback():
    code = ("import importlib.metadata as m\n"
            "def missing(name):\n"
            "    raise m.PackageNotFoundError(name)\n"
            "m.version = missing\n"
            "import hf_zero\n"
            "print(hf_zero.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == hf_zero.UNKNOWN_VERSION == "0+unknown"


def test_cli_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-zero {importlib.metadata.version('hf-zero')}"


def test_env_prints_every_version_as_markdown(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    declared = declared_requirements()
    assert out.startswith("### hf_zero environment\n")
    assert f"| hf_zero | {hf_zero.__version__} |" in out
    assert f"| Python | {sys.version.split()[0]} (" in out
    for package in ("torch", "transformers", "accelerate"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {package} |"))
        assert importlib.metadata.version(package) in row
        assert f"(hf-zero needs {declared[package]})" in row  # the range pyproject declares
    assert "| CUDA |" in out and "| NCCL |" in out and "GPUs: " in out


def test_env_includes_the_loaded_config(tmp_path, capsys):
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    assert main(["env", str(path)]) == 0
    out = capsys.readouterr().out
    block = out.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block)["zero"]["stage"] == 2


def test_env_takes_the_config_as_doctor_does(tmp_path, capsys):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert main(["env", "--zero_config", str(path)]) == 0
    block = capsys.readouterr().out.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block)["zero"]["stage"] == 3
    assert main(["env", str(path), "--zero_config", str(path)]) == 2
    assert "env takes one config" in capsys.readouterr().err


def test_env_reports_a_config_that_does_not_load(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    report = collect(str(path), environ={})
    assert report.config_json is None
    text = render(report)
    assert f"Config `{path}`\ncould not be loaded: " in text
    assert "stage" in report.config_error and "7" in report.config_error


def test_env_lists_only_the_relevant_variables():
    report = collect(environ={"HF_ZERO_CHECKPOINT_DIGEST": "fast", "NCCL_DEBUG": "INFO",
                              "CUDA_VISIBLE_DEVICES": "0,1", "HOME": "/home/someone", "AWS_SECRET": "x"})
    assert report.environment == (("CUDA_VISIBLE_DEVICES", "0,1"), ("HF_ZERO_CHECKPOINT_DIGEST", "fast"),
                                  ("NCCL_DEBUG", "INFO"))


def test_render_gpus_and_missing_packages():
    report = EnvReport(hf_zero="0.1.0", python="3.12.1 (CPython, python)", platform="Linux",
                       packages=(("torch", "2.13.0", ">=2.11"), ("deepspeed", None, None)),
                       cuda="12.8 (torch's build)", nccl="2.27.3",
                       gpus=(Gpu("NVIDIA H100 80GB HBM3", 85_000_000_000, (9, 0)),) * 2, environment=())
    text = render(report)
    assert "| torch | 2.13.0 (hf-zero needs >=2.11) |" in text
    assert "| deepspeed | not installed |" in text
    assert "| NCCL | 2.27.3 |" in text
    assert "GPUs: 2" in text
    assert "| 1 | NVIDIA H100 80GB HBM3 | 79.16 GiB | 9.0 |" in text
    assert "Config" not in text
