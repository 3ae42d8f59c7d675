"""version checks: ranges come from hf-zero's installed metadata; FAIL below the minimum."""

import importlib.metadata

import pytest

from hf_zero.doctor import versions
from hf_zero.doctor.result import Status
from hf_zero.doctor.versions import check_version, check_versions, declared_requirements

REQUIRES = ['torch>=2.11', 'transformers<6,>=5.17', 'accelerate>=1.15', 'pytest>=8; extra == "test"']


@pytest.fixture
def fake_metadata(monkeypatch):
    """importlib.metadata with hf-zero's requirements and crafted installed versions."""
    installed = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "accelerate": "1.15.0"}

    def requires(name):
        if name != "hf-zero":
            raise importlib.metadata.PackageNotFoundError(name)
        return list(REQUIRES)

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(versions.metadata, "requires", requires)
    monkeypatch.setattr(versions.metadata, "version", version)
    return installed


def test_declared_requirements_leave_extras_out(fake_metadata):
    assert declared_requirements() == {"torch": ">=2.11", "transformers": "<6,>=5.17", "accelerate": ">=1.15"}


def test_installed_versions_pass(fake_metadata):
    results = check_versions()
    assert [(r.name, r.status) for r in results] == [
        ("version torch", Status.PASS), ("version transformers", Status.PASS), ("version accelerate", Status.PASS)]
    assert results[0].detail == "torch 2.13.0+cpu (torch>=2.11)"


def test_below_minimum_fails(fake_metadata):
    fake_metadata["torch"] = "2.10.1"
    fake_metadata["accelerate"] = "1.14.9"
    results = {r.name: r for r in check_versions()}
    assert results["version torch"].status is Status.FAIL
    assert results["version torch"].detail == "torch 2.10.1 is installed; hf-zero needs torch>=2.11"
    assert results["version torch"].fix.startswith("pip install 'torch>=2.11'")
    assert results["version accelerate"].status is Status.FAIL
    assert results["version transformers"].status is Status.PASS


def test_above_the_range_fails_and_missing_package_fails(fake_metadata):
    fake_metadata["transformers"] = "6.0.0"
    del fake_metadata["accelerate"]
    results = {r.name: r for r in check_versions()}
    assert results["version transformers"].status is Status.FAIL
    assert results["version accelerate"].detail == "accelerate is not installed; hf-zero needs accelerate>=1.15"


def test_prerelease_and_local_versions_count_as_their_release():
    assert check_version("torch", ">=2.11", "2.12.0.dev20260101+cu130").status is Status.PASS
    assert check_version("torch", ">=2.11", "2.11.0rc1").status is Status.FAIL  # a pre-release is below 2.11


def test_not_installed_distribution_is_skipped(monkeypatch):
    def requires(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(versions.metadata, "requires", requires)
    [result] = check_versions()
    assert result.status is Status.SKIP


def test_the_real_environment_meets_the_ranges():
    """This venv was installed from pyproject.toml, so every range holds."""
    assert all(r.status is Status.PASS for r in check_versions())
