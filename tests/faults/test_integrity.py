"""Every shard verified (digests.py, [Note: checkpoint digests]): a flipped byte in a .distcp, or
files of another checkpoint copied in, are refused naming the file; the fast mode catches
another checkpoint's file; a folder without manifests loads with a warning."""

from __future__ import annotations

import os
import shutil

import pytest

from hf_zero.checkpoint import digests, sharded
from hf_zero.checkpoint.consolidate import consolidate
from hf_zero.checkpoint.errors import CheckpointError
from tests.faults.integrity_ckpt import make_checkpoint


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    a = make_checkpoint(tmp_path_factory.mktemp("a"), step=4, run_id="run-a", seed=0)
    b = make_checkpoint(tmp_path_factory.mktemp("b"), step=2, run_id="run-b", seed=1)
    return a, b


def test_a_flipped_byte_in_a_distcp_is_refused(two, tmp_path):
    copy = shutil.copytree(two[0], tmp_path / "c")
    data = copy / sharded.DIR_NAME / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not match its full sha256 digest"):
        sharded.check(str(copy), {})
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not match"):
        consolidate(str(copy), str(tmp_path / "out"))
    consolidate(str(two[0]), str(tmp_path / "whole"))  # the untouched one consolidates


def test_files_of_another_checkpoint_are_refused(two, tmp_path, monkeypatch):
    a, b = two
    copy = shutil.copytree(a, tmp_path / "c")
    shutil.copy(b / sharded.DIR_NAME / "__0_0.distcp", copy / sharded.DIR_NAME / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp (has \d+ bytes|does not match)"):
        sharded.check(str(copy), {})
    monkeypatch.setenv(digests.MODE_ENV, "fast")
    fast = make_checkpoint(tmp_path / "fast", step=4, run_id="run-a", seed=0)
    shutil.copy(b / sharded.DIR_NAME / "__0_0.distcp", fast / sharded.DIR_NAME / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp (has \d+ bytes|does not match its fast)"):
        sharded.check(str(fast), {})
    # the whole sharded folder of checkpoint b (step 2) inside a (step 4)
    whole = shutil.copytree(a, tmp_path / "w")
    shutil.rmtree(whole / sharded.DIR_NAME)
    shutil.copytree(b / sharded.DIR_NAME, whole / sharded.DIR_NAME)
    with pytest.raises(CheckpointError, match=r"hf_zero_digest_rank0\.json records step 2, but .*trainer_state\.json is at global_step 4"):
        sharded.check(str(whole), {})


def test_a_manifest_of_another_run_is_refused(two, tmp_path):
    import json

    copy = shutil.copytree(two[0], tmp_path / "c")
    m = copy / sharded.DIR_NAME / "hf_zero_digest_rank0.json"
    manifest = json.loads(m.read_text())
    manifest["run_id"] = "run-b"
    m.write_text(json.dumps(manifest))
    (copy / sharded.DIR_NAME / "hf_zero_digest_rank1.json").write_text(json.dumps({**manifest, "rank": 1}))
    with pytest.raises(CheckpointError, match=r"hf_zero_digest_rank1\.json: rank 1 in a checkpoint of 1 ranks"):
        sharded.check(str(copy), {})


def test_a_checkpoint_without_manifests_loads_with_a_warning(two, tmp_path):
    copy = shutil.copytree(two[0], tmp_path / "c")
    os.unlink(copy / sharded.DIR_NAME / "hf_zero_digest_rank0.json")
    with pytest.warns(UserWarning, match="its files cannot be verified"):
        consolidate(str(copy), str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_config_key_picks_the_mode_and_the_environment_overrides_it(tmp_path, monkeypatch):
    """checkpoint_digest "fast" writes fast manifests; HF_ZERO_CHECKPOINT_DIGEST, where set, wins;
    a value other than full, fast or off is refused when the config is read, naming the key."""
    import json

    from hf_zero.config import ConfigError, load_config

    assert load_config({"checkpoint_digest": "fast"}).checkpoint_digest == "fast"
    assert load_config({}).checkpoint_digest == "full"
    with pytest.raises(ConfigError, match=r"checkpoint_digest = \"sometimes\" in <dict>: not a valid choice; allowed: one of 'full', 'fast', 'off'"):
        load_config({"checkpoint_digest": "sometimes"})
    monkeypatch.delenv(digests.MODE_ENV, raising=False)
    recorded = {}
    try:
        for key, env in (("fast", None), ("off", "full"), ("full", None)):
            digests.configure(key)
            if env is not None:
                monkeypatch.setenv(digests.MODE_ENV, env)
            folder = make_checkpoint(tmp_path / f"{key}-{env}", step=4)
            manifest = folder / sharded.DIR_NAME / "hf_zero_digest_rank0.json"
            recorded[key, env] = json.loads(manifest.read_text())["mode"]
            monkeypatch.delenv(digests.MODE_ENV, raising=False)
    finally:
        digests.configure(digests.DEFAULT_MODE)
    assert recorded == {("fast", None): "fast", ("off", "full"): "full", ("full", None): "full"}
    digests.configure("off")
    try:
        assert not (make_checkpoint(tmp_path / "off", step=4) / sharded.DIR_NAME / "hf_zero_digest_rank0.json").exists()
    finally:
        digests.configure(digests.DEFAULT_MODE)


def test_a_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv(digests.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="HF_ZERO_CHECKPOINT_DIGEST='sometimes': allowed values are full, fast, off"):
        digests.mode()
