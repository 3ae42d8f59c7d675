"""A hub id served from the local Hugging Face cache (hf_zero/hub_cache.py), for `hf-zero estimate`
and `hf-zero doctor --model`; a hub id not in the cache is refused saying so. Nothing is downloaded:
the cache is a temporary folder laid out as huggingface_hub lays it out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from huggingface_hub import constants
from transformers import LlamaConfig, LlamaForCausalLM

from hf_zero.cli import main
from hf_zero.doctor.sizing import load_model_info
from hf_zero.estimate import load_model_config
from hf_zero.hub_cache import local_model_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-llama"


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE holding REPO's config.json at COMMIT, which refs/main names."""
    root = tmp_path / "hub"
    repo = root / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    _config().to_json_file(str(snapshot / "config.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))  # what HF_HUB_CACHE sets at import
    return root


def test_hub_id_resolves_to_the_cached_snapshot(cache):
    expected = str(cache / f"models--tiny-org--tiny-llama/snapshots/{COMMIT}/config.json")
    assert local_model_config(REPO) == expected
    assert local_model_config(REPO, cache_dir=str(cache)) == expected
    cfg = load_model_config(REPO)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 64, 2)


def test_local_paths_win_and_are_left_alone(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "tiny-org" / "tiny-llama"
    local.mkdir(parents=True)
    assert local_model_config(REPO) == REPO  # a directory of that name here is read, not the cache
    for path in ("missing/config.json", str(tmp_path / "missing"), "./missing"):
        assert local_model_config(path) == path  # not a hub id: the caller says it does not exist


def test_estimate_and_doctor_take_a_cached_hub_id(cache, capsys):
    assert main(["estimate", REPO, "--world", "2", "--stage", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model: {REPO} (llama); params ")
    info = load_model_info(REPO)  # what doctor --model counts
    snapshot = cache / f"models--tiny-org--tiny-llama/snapshots/{COMMIT}"
    assert info.path == REPO
    assert info.counts == load_model_info(str(snapshot)).counts
    assert info.counts.total == sum(p.numel() for p in LlamaForCausalLM(_config()).parameters())


def test_hub_id_not_in_the_cache_is_refused_saying_so(cache, capsys):
    assert main(["estimate", "tiny-org/other-model"]) == 2
    err = capsys.readouterr().err
    assert err == (f"hf_zero: MODEL_CONFIG 'tiny-org/other-model' is not a local path, and the local Hugging Face "
                   f"cache ({cache}) does not hold the hub model 'tiny-org/other-model' (revision main); nothing is "
                   "downloaded: fetch it first (hf download tiny-org/other-model config.json), or give a config.json "
                   "or a model directory\n")


def test_cached_repo_without_a_config_is_named(cache):
    (cache / "models--tiny-org--no-config" / "snapshots" / COMMIT).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"\) has no config.json for the hub model 'tiny-org/no-config'"):
        load_model_config("tiny-org/no-config")


def test_hf_hub_cache_variable_reaches_the_command(cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "hf_zero", "estimate", REPO, "--world", "1", "--stage", "0"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"model: {REPO} (llama)")
