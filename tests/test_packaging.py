"""Packaging facts that drift silently: the build floor, the license file, where `datasets` is
needed, the demo data, and the oldest-versions environment (Makefile, tox.ini) against
pyproject.toml's floors."""

from __future__ import annotations

import ast
import configparser
import fnmatch
import re
import subprocess
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _floors() -> dict[str, str]:
    """Package -> the version of its ">=" in the base dependencies."""
    out = {}
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        out[req.name] = next(s.version for s in req.specifier if s.operator == ">=")
    return out


def test_build_floor_reads_the_license_string():
    """`license = "Apache-2.0"` (an SPDX string, PEP 639) and license-files need setuptools >= 77."""
    assert PROJECT["license"] == "Apache-2.0"
    (requirement,) = PYPROJECT["build-system"]["requires"]
    assert Requirement(requirement).specifier.contains("77") and not Requirement(requirement).specifier.contains("76.9")
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text


def test_datasets_only_where_used():
    """hf_zero never imports `datasets`: it is an extra (recipes, and test, which runs the recipes)."""
    for path in (ROOT / "hf_zero").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n.split(".")[0] == "datasets" for n in names), f"{path} imports datasets"
    assert "datasets" not in {Requirement(r).name for r in PROJECT["dependencies"]}
    extras = PROJECT["optional-dependencies"]
    for extra in ("recipes", "test"):
        assert "datasets" in {Requirement(r).name for r in extras[extra]}, extra
    assert {Requirement(r).name for r in extras["plot"]} == {"matplotlib"}  # estimate --plot


def test_demo_data_is_package_data():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["hf_zero"]
    data = [p.relative_to(ROOT / "hf_zero").as_posix() for p in (ROOT / "hf_zero" / "demo" / "data").iterdir()]
    assert data
    for name in data:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_oldest_environment_pins_the_floors():
    """tox's `oldest` env pins what the Makefile derives from pyproject.toml: the ">=" floors."""
    floors = _floors()
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    pins = dict(line.split("==") for line in tox["testenv:oldest"]["deps"].split())
    assert pins == {name: floors[name] for name in ("transformers", "accelerate")}
    makefile = (ROOT / "Makefile").read_text()
    command = re.search(r"^OLDEST_PINS := \$\(shell (.*)\)$", makefile, re.M).group(1)
    out = subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert dict(pin.split("==") for pin in out.split()) == pins


def test_oldest_test_list_names_existing_tests():
    lines = (ROOT / "tests" / "oldest_versions.txt").read_text().split()
    assert "tests/trainer/test_seam_signatures.py" in lines
    for line in lines:
        assert (ROOT / line.split("::")[0]).is_file(), line


def test_tox_covers_the_oldest_and_newest_python():
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    envs = [e.strip() for e in tox["tox"]["envlist"].split(",")]
    oldest = PROJECT["requires-python"].removeprefix(">=")
    assert envs[0] == "py" + oldest.replace(".", "")
    assert tox["tox"]["skip_missing_interpreters"] == "true"  # plain `tox` runs here with one Python
