"""bench/nvme_bandwidth.py runs end to end on a small file (the lead runs it on the lent machine's
drive): every figure printed, the JSON written, nothing left in the directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "nvme_bandwidth.py"


def test_the_bench_measures_the_drive_and_both_tiers(tmp_path):
    (tmp_path / "nvme").mkdir()
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(_SCRIPT), "--nvme_path", str(tmp_path / "nvme"), "--gib", "0.0625",
                           "--chunk_mib", "16", "--shard_mib", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=_SCRIPT.parent.parent)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["disk_dd", "disk_fio", "optimizer_tier", "param_tier"]
    figures = json.loads(out.read_text())
    assert figures["bytes"] == 64 << 20
    for name in ("disk_dd", "optimizer_tier", "param_tier"):
        assert figures[name]["write"] > 0 and figures[name]["read"] > 0, figures
    assert figures["optimizer_tier"]["direct"] == 1.0  # the test directory's file system takes O_DIRECT
    assert figures["param_tier"]["read_ahead_hits"] == 7  # 8 shards, each but the first read ahead
    assert list((tmp_path / "nvme").iterdir()) == []
