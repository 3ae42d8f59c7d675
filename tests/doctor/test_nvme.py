"""The NVMe check: directory, writable, free space against the need, measured speed; no file left."""

import os
from collections import namedtuple

import pytest

from hf_zero.doctor import nvme
from hf_zero.doctor.nvme import check_nvme, measure_throughput
from hf_zero.doctor.result import Status

KEYS = "zero_optimization.offload_optimizer.nvme_path in z.json"
SMALL = 2**20  # 1 MiB speed test keeps the tests fast
Usage = namedtuple("Usage", "total used free")


def test_ok_directory(tmp_path):
    result = check_nvme(str(tmp_path), KEYS, needed=SMALL, test_bytes=SMALL, slow_gbps=0.0)
    assert result.status is Status.PASS, result
    assert f"nvme_path {str(tmp_path)!r} ({KEYS}): " in result.detail
    assert "GB/s" in result.detail and "write" in result.detail and "read" in result.detail
    assert os.listdir(tmp_path) == []  # the test file is gone


def test_slow_drive_warns(tmp_path):
    result = check_nvme(str(tmp_path), KEYS, needed=None, test_bytes=SMALL, slow_gbps=1e9)
    assert result.status is Status.WARN
    assert "pass --model" in result.detail and "network filesystem" in result.fix


def test_missing_directory(tmp_path):
    path = str(tmp_path / "missing")
    result = check_nvme(path, KEYS, needed=None)
    assert (result.status, result.detail) == (Status.FAIL, f"nvme_path {path!r} ({KEYS}) does not exist")
    assert f"mkdir -p {path}" in result.fix


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    result = check_nvme(str(path), KEYS, needed=None)
    assert (result.status, result.detail) == (Status.FAIL, f"nvme_path {str(path)!r} ({KEYS}) is not a directory")


def test_not_writable(tmp_path, monkeypatch):
    """As root too: the temp file cannot be created (what a read-only mount gives)."""
    def mkstemp(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(nvme.tempfile, "mkstemp", mkstemp)
    result = check_nvme(str(tmp_path), KEYS, needed=None)
    assert result.status is Status.FAIL
    assert result.detail == f"nvme_path {str(tmp_path)!r} ({KEYS}) is not writable: Permission denied"


def test_too_little_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(nvme.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - 2**30, 2**30))
    result = check_nvme(str(tmp_path), KEYS, needed=5 * 2**30, test_bytes=SMALL)
    assert result.status is Status.FAIL
    assert result.detail == f"nvme_path {str(tmp_path)!r} ({KEYS}): 1.00 GiB free, 5.00 GiB needed on this node"
    assert os.listdir(tmp_path) == []


def test_no_room_for_the_speed_test(tmp_path, monkeypatch):
    monkeypatch.setattr(nvme.shutil, "disk_usage", lambda path: Usage(2**30, 2**30, SMALL))
    assert check_nvme(str(tmp_path), KEYS, needed=None, test_bytes=SMALL).status is Status.WARN


def test_measure_removes_its_file_even_on_error(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nvme.os, "fsync", fsync)
    with pytest.raises(OSError):
        measure_throughput(str(tmp_path), SMALL)
    assert os.listdir(tmp_path) == []
    result = check_nvme(str(tmp_path), KEYS, needed=None, test_bytes=SMALL)
    assert result.status is Status.FAIL and "No space left on device" in result.detail
