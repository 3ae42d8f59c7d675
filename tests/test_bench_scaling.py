"""bench/run.py and bench/report.py without running jobs: how each mode gets activation
checkpointing, the world-size list and profiling flags, and the scaling table's arithmetic.
(bench/ is not a package: its directory goes on sys.path while run.py is loaded.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, *, register: bool = False):
    """bench/NAME.py as a module (as ``bench_NAME``); ``register``: as ``NAME`` in sys.modules, for modules
    whose dataclasses or pickled functions are looked up there by name."""
    sys.path.insert(0, str(_BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name if register else f"bench_{name}", _BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        if register:
            sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(_BENCH))


run = _load("run")
report = _load("report")


def _cmd(mode, *argv):
    opts = run.parse_args(["--modes", mode, *argv])
    opts.world_size = opts.world_size_list[0]
    return run.mode_command(mode, opts, ["--preset", "tiny"], Path("/tmp/o.jsonl"), Path("/tmp/out"))


@pytest.mark.parametrize(
    "flag", ["--gradient_checkpointing", "--activation_checkpointing", "--gradient_checkpointing=True"]
)
def test_fsdp_gets_its_own_activation_checkpointing(flag):
    cmd = _cmd("fsdp2", f"--extra={flag} --logging_steps 1")
    assert not any(t.startswith(flag.split("=")[0]) for t in cmd)
    assert cmd[cmd.index("--fsdp_config") + 1] == run.FSDP_AC_CONFIG
    assert "--logging_steps" in cmd  # other extra flags stay
    config = json.loads((_BENCH.parent / run.FSDP_AC_CONFIG).read_text())
    base = json.loads((_BENCH / "configs" / "fsdp2.json").read_text())
    assert config == base | {"activation_checkpointing": True}


@pytest.mark.parametrize("mode", ["plain", "hfzero-s2", "hfzero-s3", "ds-z2", "ds-z3"])
def test_other_modes_keep_the_trainer_flag(mode):
    cmd = _cmd(mode, "--extra=--gradient_checkpointing")
    assert "--gradient_checkpointing" in cmd
    assert run.FSDP_AC_CONFIG not in cmd


def test_fsdp_without_checkpointing_is_unchanged():
    cmd = _cmd("fsdp2")
    assert cmd[cmd.index("--fsdp_config") + 1] == "bench/configs/fsdp2.json"


def test_world_sizes_names_timeouts_and_profiling():
    opts = run.parse_args(["--preset", "7b", "--world_sizes", "2,4,2", "--name", "x", "--profile_step", "5",
                           "--max_steps", "8"])
    assert opts.world_size_list == [2, 4] and opts.scaling and opts.base_name == "x"
    assert opts.timeout == run.DEFAULT_TIMEOUT["7b"]
    assert opts.profile_modes == ["hfzero-s3"] and opts.profile_worlds == [4]
    opts.world_size, opts.name = 4, "x_w4"
    cmd = run.mode_command("hfzero-s3", opts, [], Path("/tmp/o.jsonl"), Path("/tmp/out"), Path("/r/x_w4_hfzero-s3"))
    assert cmd[cmd.index("--profile_step") + 1] == "5"
    assert run._profiled("hfzero-s3", opts) and not run._profiled("ds-z3", opts)
    single = run.parse_args(["--world_size", "2", "--name", "y"])
    assert single.world_size_list == [2] and not single.scaling and single.name == "y"
    with pytest.raises(SystemExit):
        run.parse_args(["--profile_step", "4", "--max_steps", "4", "--warmup_steps", "3"])


def _rec(mode, w, tok, status="ok", peak=10.0):
    return {"name": f"n_w{w}", "mode": mode, "status": status, "tok_per_s": tok, "world_size": w,
            "peak_alloc_gib": peak, "error": None if status == "ok" else "OOM",
            "settings": {"preset": "7b", "seq_len": 2048, "micro_batch": 2, "grad_accum": 1, "max_steps": 8,
                         "warmup_steps": 3, "extra": "", "init_device": "cuda"},
            "versions": {"torch": "2.11"}, "device_name": "H100", "gpu_count": 4, "git_commit": "abc"}


def test_scaling_efficiency_is_against_the_smallest_world_where_the_mode_ran():
    by_world = {
        1: [_rec("hfzero-s3", 1, 1000), _rec("ds-z3", 1, None, status="failed")],
        2: [_rec("hfzero-s3", 2, 1900), _rec("ds-z3", 2, 1000)],
        4: [_rec("hfzero-s3", 4, 3600), _rec("ds-z3", 4, 1800), _rec("fsdp2", 4, 3000)],
    }
    rows = {(r["mode"], r["world_size"]): r for r in report.scaling_rows(by_world)}
    assert rows[("hfzero-s3", 4)]["tok_per_s_per_gpu"] == 900
    assert rows[("hfzero-s3", 4)]["scaling_efficiency"] == pytest.approx(0.9)
    assert rows[("ds-z3", 1)]["scaling_efficiency"] is None
    assert rows[("ds-z3", 4)]["efficiency_vs_world_size"] == 2
    assert rows[("ds-z3", 4)]["scaling_efficiency"] == pytest.approx(0.9)
    comps = {(c["theirs"], c["world_size"]): c for c in report.comparison_rows(list(rows.values()))}
    assert comps[("ds-z3", 2)]["ratio"] == pytest.approx(1.9) and comps[("ds-z3", 2)]["meets_target"]
    assert comps[("fsdp2", 4)]["ratio"] == pytest.approx(1.2) and comps[("fsdp2", 4)]["meets_target"]
    md = report.scaling_markdown(by_world, skipped_worlds=[8])
    assert "| hfzero-s3 | 4 | ok | 3,600 | 900 | 90% | 1 |" in md
    assert "`ds-z3` W = 1: OOM" in md and "[8]" in md
