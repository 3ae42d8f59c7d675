"""bench/cast_copy.py on CPU, small: every way writes the exact bf16 -> fp32 upcast (the GPU run
measures them; a way that wrote something else would be timed for nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "bench" / "cast_copy.py"
_spec = importlib.util.spec_from_file_location("bench_cast_copy", _PATH)
cast_copy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cast_copy)


def test_every_way_writes_the_exact_upcast(tmp_path):
    rows = cast_copy.main(["--device", "cpu", "--numel", "40000", "--tensors", "5", "--results_dir", str(tmp_path),
                           "--name", "check", "--git_commit", "abc"])
    assert [r["way"] for r in rows] == ["per-slot copy_", "foreach_copy_", "flat copy_ (one bucket at once)",
                                        "per-slot bf16 halves"]
    assert all(r["exact"] for r in rows), rows
    assert all(r["ms"] > 0 and r["numel"] == 5 * 8000 for r in rows)
    assert json.loads((tmp_path / "check.json").read_text()) == rows
