"""The optimizer tier's swap files move with O_DIRECT where the file system allows ([Note: direct
I/O] in nvme_files.py), and through the page cache, said once, where it refuses; the training is
the same bit for bit either way (the engine in this process, W = 1; the W = 1 and 2 runs of
test_offload_nvme.py go through whichever the test directory's file system takes)."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import warnings

import pytest
import torch

from hf_zero.engine import ZeroEngine
from hf_zero.engine.offload import nvme_files
from hf_zero.engine.offload.settings import OptimizerOffload
from tests.engine.models import add_frozen_and_unused, tiny_llama
from tests.engine.test_offload import _groups, _train

CHUNK = 1500


def _run(offload):
    model = add_frozen_and_unused(tiny_llama(0, tied=True))
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000, offload=offload)
    return model, engine


def _train_and_close(offload):
    model, engine = _run(offload)
    result = _train(model, engine, 0)
    direct, flags = None, {}
    if offload.device == "nvme":
        files = engine._host_step.tier.dir.files
        direct = engine._host_step.tier.dir.direct
        flags = {kind: fcntl.fcntl(f.io_fd, fcntl.F_GETFL) & os.O_DIRECT for kind, f in files.items()}
    engine.close()
    return result, direct, flags


def _equal(a, b) -> bool:
    (steps_a, params_a), (steps_b, params_b) = a, b
    return [n for n, _ in steps_a] == [n for n, _ in steps_b] and \
        all(torch.equal(params_a[k], params_b[k]) for k in params_a)


def test_the_probe_round_trips_a_page_where_the_file_system_takes_o_direct(tmp_path):
    # ext4 and xfs take O_DIRECT (this machine's /tmp is ext4; tmpfs takes it since Linux 6.6).
    assert nvme_files.direct_io_problem(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_transfers_bypass_the_page_cache_and_train_the_same(tmp_path):
    cpu, _, _ = _train_and_close(OptimizerOffload("cpu", chunk_numel=CHUNK))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning where O_DIRECT works
        nvme, direct, flags = _train_and_close(OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=str(tmp_path)))
    assert direct is True
    assert set(flags) == {"master", "exp_avg", "exp_avg_sq"} and all(flags.values())  # every transfer fd: O_DIRECT
    assert _equal(nvme, cpu)


def test_a_refusing_file_system_falls_back_said_once(tmp_path, monkeypatch):
    """An old tmpfs (and some FUSE and network file systems) refuse O_DIRECT with EINVAL at open;
    this kernel's tmpfs takes it, so the refusal is the OS's answer simulated at the one place
    the tier opens a file so."""
    def refuse(path):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(nvme_files, "open_direct", refuse)
    monkeypatch.setattr(nvme_files, "_said_direct", set())
    cpu, _, _ = _train_and_close(OptimizerOffload("cpu", chunk_numel=CHUNK))
    offload = OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=str(tmp_path))
    with pytest.warns(UserWarning) as said:
        nvme, direct, flags = _train_and_close(offload)
        again, _, _ = _train_and_close(offload)  # a second engine on the same directory: not said again
    ours = [str(w.message) for w in said if "O_DIRECT" in str(w.message)]
    assert ours == [f'zero_optimization.offload_optimizer.nvme_path = "{tmp_path}": O_DIRECT refused: Invalid '
                    "argument (EINVAL); the NVMe tier reads and writes its swap files through the page cache "
                    "there, so its speed is partly the page cache's and the files' pages take host memory the "
                    "kernel can reclaim (a directory on a local NVMe drive with ext4 or xfs takes O_DIRECT)"]
    assert direct is False and flags and not any(flags.values())
    assert _equal(nvme, cpu) and _equal(again, cpu)
    assert [p for p in tmp_path.iterdir()] == []  # probe files and swap directories gone


def test_slot_buffers_are_page_aligned(tmp_path):
    model, engine = _run(OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=str(tmp_path)))
    _train(model, engine, 0)
    buffers = [b for slot in engine._host_step.tier.slots for b in slot.buffers.values()]
    engine.close()
    assert buffers and all(b.data_ptr() % nvme_files.PAGE_BYTES == 0 for b in buffers)


def test_tmpfs_uses_whatever_its_probe_says():
    """/dev/shm (tmpfs): refused before Linux 6.6 (the fallback above), taken since; the tier
    follows the probe."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = tempfile.mkdtemp(dir=shm)
    try:
        takes = nvme_files.direct_io_problem(path) is None
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert nvme_files.use_direct_io(path) is takes
        assert any("O_DIRECT refused" in str(w.message) for w in said) is (not takes)
    finally:
        os.rmdir(path)
