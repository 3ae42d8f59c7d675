"""bench/device_leg_probe.py runs end to end on CPU (host copies instead of the device), so a lent
GPU's minutes are not spent on a typo: each share's row, its wall time, and the JSON written."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import device_leg_probe  # noqa: E402


def test_probe_runs_on_cpu(tmp_path):
    out = device_leg_probe.main(["--device", "cpu", "--elements", str(1 << 20), "--chunk", str(1 << 17),
                                 "--shares", "0,0.25,1", "--results_dir", str(tmp_path)])
    assert [r["share"] for r in out["rows"]] == [0.0, 0.25, 1.0]
    assert all(r["wall_s"] > 0 and r["cpu_done_s"] <= r["wall_s"] for r in out["rows"])
    assert out["rows"][0]["x_cpu_alone"] == 1.0
    assert json.loads((tmp_path / "device_leg_probe.json").read_text())["elements"] == 1 << 20
