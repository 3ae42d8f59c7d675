"""Nothing is unpickled from a checkpoint: a pickle whose ``__reduce__`` would run a command,
planted in each kind of file a resume or ``hf-zero consolidate`` reads, runs nothing and is
refused with the file named (safe_reader.py, [Note: nothing is unpickled from a checkpoint])."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest

from hf_zero.checkpoint import digests, safe_reader, sharded
from hf_zero.checkpoint.consolidate import consolidate
from hf_zero.checkpoint.deepspeed_format import DeepSpeedCheckpointError, load_torch_file
from hf_zero.checkpoint.errors import CheckpointError
from tests.faults.integrity_ckpt import make_checkpoint


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(file: str, marker: str) -> None:
    with open(file, "wb") as f:
        pickle.dump(_Payload(marker), f)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_a_payload_in_dcp_metadata_runs_nothing(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv(digests.MODE_ENV, "off")  # the reader itself refuses, digests or not
    copy = shutil.copytree(ckpt, tmp_path / "c")
    marker = tmp_path / "ran"
    _plant(str(copy / sharded.DIR_NAME / ".metadata"), str(marker))
    with pytest.raises(CheckpointError, match=r"\.metadata names posix\.system|\.metadata names os\.system"):
        sharded.check(str(copy), {})
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        consolidate(str(copy), str(tmp_path / "out"))
    assert not marker.exists()


def test_a_payload_in_a_distcp_file_runs_nothing(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv(digests.MODE_ENV, "off")
    copy = shutil.copytree(ckpt, tmp_path / "c")
    marker = tmp_path / "ran"
    data = copy / sharded.DIR_NAME / "__0_0.distcp"
    size = data.stat().st_size
    _plant(str(data), str(marker))
    with open(data, "ab") as f:  # keep the size the metadata needs
        f.write(b"\0" * (size - data.stat().st_size))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp cannot be read"):
        consolidate(str(copy), str(tmp_path / "out"))
    assert not marker.exists()


def test_dcp_byte_entries_are_refused_before_any_read(ckpt, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    copy = shutil.copytree(ckpt, tmp_path / "c")
    file = copy / sharded.DIR_NAME / ".metadata"
    metadata = safe_reader.read_dcp_metadata(str(file))
    key = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    with open(file, "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError, match=rf"\.metadata: entry '{key}' is a BytesStorageMetadata"):
        safe_reader.read_dcp_metadata(str(file))


@pytest.mark.parametrize("name", ["scheduler.pt", "rng_state_0.pth"])
def test_a_payload_in_a_trainer_file_runs_nothing(tmp_path, name):
    marker = tmp_path / "ran"
    _plant(str(tmp_path / name), str(marker))
    with pytest.raises(CheckpointError, match=rf"{name} cannot be loaded as weights only"):
        safe_reader.check_trainer_files(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_a_payload_in_a_deepspeed_file_runs_nothing(tmp_path, name):
    import torch

    marker = tmp_path / "ran"
    torch.save({"x": _Payload(str(marker))}, tmp_path / name)
    with pytest.raises(DeepSpeedCheckpointError, match=name):
        load_torch_file(str(tmp_path / name))
    if "optim" in name:  # the first file consolidate opens
        with pytest.raises(Exception, match=name):
            consolidate(str(tmp_path), str(tmp_path / "out"))
    assert not marker.exists()
