"""Warnings about the user's config keys (config/key_warning.py): "accepts but does not apply". Said once per job (rank 0), placed at the user's key in the config file
(``ds.json:4: UserWarning: ...``), not at a line of hf_zero's code."""

from __future__ import annotations

import json
import warnings

from hf_zero.config import load_config
from hf_zero.testing.multiprocess import run_on_ranks

CONFIG = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "round_robin_gradients": True}}


def _write(tmp_path) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(CONFIG, indent=2))
    return str(path)


def _load(path: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(path)
    return [w for w in caught if "does not apply" in str(w.message)]


def test_warning_points_at_the_key_in_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    path = _write(tmp_path)
    [caught] = _load(path)
    assert caught.filename == path
    line = open(path).read().splitlines()[caught.lineno - 1]
    assert line.strip() == '"round_robin_gradients": true', line
    text = warnings.formatwarning(caught.message, caught.category, caught.filename, caught.lineno)
    assert text.startswith(f"{path}:{caught.lineno}: UserWarning: hf_zero accepts but does not apply these keys of "
                           f"{path}: zero_optimization.round_robin_gradients (")
    assert text.endswith('  "round_robin_gradients": true\n')  # the file's line, as Python shows a warning's source
    assert "loader.py" not in text and "not_applied.py" not in text


def test_rank_env_other_than_zero_says_nothing(tmp_path, monkeypatch):
    path = _write(tmp_path)
    monkeypatch.setenv("RANK", "1")
    assert _load(path) == []
    monkeypatch.setenv("RANK", "0")
    assert len(_load(path)) == 1


def _count(rank, world, path):
    return len(_load(path))


def test_once_per_job_in_a_process_group(tmp_path):
    assert run_on_ranks(_count, 2, _write(tmp_path)) == [1, 0]
