"""bench/long_seq.py: the length search, how an attempt is classified and measured, the budget's
refusal to start an attempt it cannot finish, each system's command line, and one real attempt
of the tiny preset on the CPU through the whole driver (bench/ is not a package: its directory
goes on sys.path while the modules load)."""

from __future__ import annotations

import json
import time

import pytest

from hf_zero.config.loader import load_config

from tests.test_bench_scaling import _BENCH, _load


search_mod = _load("long_seq_search", register=True)
long_seq = _load("long_seq", register=True)
K = 1024


def _limit_probe(limit: int, calls: list[int], kind: str = "oom"):
    def probe(n):
        calls.append(n)
        return search_mod.Outcome("ok" if n <= limit else kind)

    return probe


def test_search_doubles_then_bisects_as_the_docstring_says():
    calls = []
    r = search_mod.search(_limit_probe(100 * K, calls), None, 16 * K, 512 * K, 4 * K, 2)
    assert calls == [16 * K, 32 * K, 64 * K, 128 * K, 96 * K, 112 * K]
    assert (r.longest, r.shortest_fail, r.stopped_by) == (96 * K, 112 * K, None)


def test_search_halves_down_when_the_start_fails_and_stops_at_max_len():
    calls = []
    r = search_mod.search(_limit_probe(6 * K, calls, "timeout"), None, 16 * K, 512 * K, 4 * K, 2)
    assert calls == [16 * K, 8 * K, 4 * K]  # the midpoint of 4K and 8K is not a multiple of 4K above 4K
    assert (r.longest, r.shortest_fail) == (4 * K, 8 * K)
    calls = []
    r = search_mod.search(_limit_probe(10**9, calls), None, 16 * K, 64 * K, 4 * K, 2)
    assert calls == [16 * K, 32 * K, 64 * K] and (r.longest, r.shortest_fail) == (64 * K, None)
    calls = []
    r = search_mod.search(_limit_probe(0, calls), None, 16 * K, 64 * K, 4 * K, 2)
    assert calls == [16 * K, 8 * K, 4 * K] and r.longest is None and r.shortest_fail == 4 * K


@pytest.mark.parametrize("kind", ["error", "skipped"])
def test_an_error_or_no_time_ends_the_search(kind):
    calls = []

    def probe(n):
        calls.append(n)
        return search_mod.Outcome("ok" if n < 64 * K else kind)

    r = search_mod.search(probe, None, 16 * K, 512 * K, 4 * K, 2)
    assert calls == [16 * K, 32 * K, 64 * K] and r.stopped_by == kind and r.longest == 32 * K
    assert r.shortest_fail is None  # an error is not a memory limit
    calls = []
    r = search_mod.search(_limit_probe(40 * K, calls), [48 * K, 32 * K], 16 * K, 512 * K, 4 * K, 2)
    assert calls == [48 * K, 32 * K] and (r.longest, r.shortest_fail) == (32 * K, 48 * K)
    with pytest.raises(ValueError, match="'fit'"):
        search_mod.Outcome("fit")


def test_classify_and_measure():
    c = long_seq.classify
    assert c(0, None, "", 3, 3) == ("ok", None)
    assert c(None, "timeout after 9 s", "", 1, 3) == ("ok", "timeout after 9 s")  # cut off after a step: it ran
    assert c(1, None, "x\ntorch.OutOfMemoryError: CUDA out of memory. Tried\nexitcode  : 1", 0, 3)[0] == "oom"
    assert c(1, None, "torch.OutOfMemoryError: CUDA out of memory.", 1, 3) == (
        "oom", "torch.OutOfMemoryError: CUDA out of memory. (after 1 steps)")  # ran once, then did not
    assert c(1, None, "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried", 0, 3)[0] == "oom"
    assert c(None, "timeout after 9 s", "loading", 0, 3) == ("timeout", "timeout after 9 s")
    assert c(-9, None, "", 0, 3)[0] == "oom"
    assert c(1, None, "Traceback\nValueError: --preset 'x' is not one of", 0, 3) == (
        "error", "ValueError: --preset 'x' is not one of")
    lines = [{"event": "train_begin", "wall": 103.0, "host_rss_gib": 1.0},
             {"event": "step", "step_s": 9.0, "peak_alloc_gib": 5.0, "host_rss_gib": 2.0},
             {"event": "step", "step_s": 2.0, "peak_alloc_gib": 6.0, "host_rss_gib": 2.5},
             {"event": "step", "step_s": 2.0, "peak_alloc_gib": 6.0, "host_rss_gib": 2.5}]
    m = long_seq.measure(lines, 1000, 1, 100.0)
    assert m["tok_per_s"] == 500 and not m["tok_s_includes_warmup"] and m["startup_s"] == 3.0
    assert (m["steps_done"], m["train_peak_alloc_gib"], m["host_rss_gib"]) == (3, 6.0, 2.5)
    m = long_seq.measure(lines[:2], 1000, 1, 100.0)  # cut off after the warm-up step
    assert m["tok_per_s"] == 1000 / 9.0 and m["tok_s_includes_warmup"]


def test_system_commands_and_configs(tmp_path):
    opts = long_seq.parse_args(["--preset", "1b1", "--name", "n"])
    assert opts.system_list == ["plain", "hfzero", "hfzero-offload", "ds-alst"]
    cmds = {s: long_seq.attempt_command(s, opts, 32 * K, True, tmp_path) for s in long_seq.SYSTEMS}
    for s, cmd in cmds.items():
        job = cmd[cmd.index("bench/job.py"):]
        assert job[job.index("--seq_len") + 1] == "32768" and job[job.index("--max_steps") + 1] == "3"
        assert job[job.index("--gradient_checkpointing_kwargs") + 1] == '{"use_reentrant": false}'
        assert "--bf16" in job and job[job.index("--per_device_train_batch_size") + 1] == "1"
        assert ("--alst" in job) == s.startswith("ds-alst") and ("hf_zero.run" in cmd) == s.startswith("hfzero")
    assert "bench/configs/ds_z3_offload.json" in cmds["ds-alst"]
    for s in ("hfzero", "hfzero-offload"):
        path = _BENCH.parent / cmds[s][cmds[s].index("--zero_config") + 1]
        config = load_config(path)
        assert config.zero.stage == 3 and config.activation_checkpointing.cpu_checkpointing
        assert config.tiled_mlp is not None and config.tiled_loss is not None
        assert (config.zero.offload_param.device == "cpu") == (s == "hfzero-offload")
    # hfzero-split (7B at 256K): the folder long_seq.py creates is the config's nvme_path; 6 checkpoints
    # on the GPU (12 ran out of GPU memory in session 16's first backward)
    split = load_config(_BENCH.parent / cmds["hfzero-split"][cmds["hfzero-split"].index("--zero_config") + 1])
    assert split.zero.offload_optimizer.device == "nvme" and split.zero.offload_optimizer.nvme_path == long_seq.NVME_PATH
    assert split.zero.offload_optimizer.host_share == 0.3 and split.activation_checkpointing.device_checkpoints == 6
    with pytest.raises(SystemExit):
        long_seq.parse_args(["--systems", "fsdp2-cp"])
    with pytest.raises(SystemExit):
        long_seq.parse_args(["--start", "10000"])  # not a multiple of the granularity


def test_budget_refuses_an_attempt_it_cannot_finish(tmp_path):
    opts = long_seq.parse_args(["--preset", "1b1", "--name", "n"])
    seen = []
    prober = long_seq.Prober("plain", opts, {"cuda": True}, tmp_path, tmp_path / "log", (1_100_000_000, 22, 2048),
                             time.time() + 100, on_attempt=lambda: seen.append(1))
    prober.startup_s, prober.last_ok = 20.0, (32 * K, 10.0)
    # 64K: 2x the tokens and more attention per token: > 2x the step; with start-up under 100 s
    assert 40 < prober.predicted_s(64 * K) < 100
    outcome = prober(256 * K)  # predicted far beyond the 100 s left: not started
    assert outcome.kind == "skipped" and "predicted" in outcome.detail and seen == [1]
    assert prober.attempts[0]["outcome"] == "skipped"


def test_one_real_attempt_of_the_tiny_preset_on_cpu(tmp_path, monkeypatch):
    # main() sets PYTORCH_CUDA_ALLOC_CONF in this process for its attempts (the value set here): put
    # back as it was once the test ends. Left changed, every later run_on_ranks of the suite spawned
    # fresh interpreters instead of forking its ranks (hf_zero/testing/multiprocess.py's note).
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    code = long_seq.main(["--preset", "tiny", "--device", "cpu", "--systems", "plain", "--lengths", "128",
                          "--warmup_steps", "1", "--measure_steps", "1", "--name", "t", "--results_dir", str(tmp_path),
                          "--attempt_timeout", "120", "--budget_s", "150"])
    doc = json.loads((tmp_path / "t.json").read_text())
    (row,) = doc["systems"]
    (attempt,) = row["attempts"]
    assert code == 0 and attempt["outcome"] == "ok", attempt.get("error_tail")
    assert attempt["steps_done"] == 2 and len(attempt["step_s"]) == 2
    assert row["longest_ok"] == 128 and row["tok_per_s"] == pytest.approx(128 / attempt["step_s"][1])
    assert attempt["host_rss_gib"] > 0 and attempt["final_loss"] > 0
    assert doc["settings"]["shape"]["hidden"] == 64 and "fsdp2-cp" in doc["not_run"]
    assert "| plain | 128 |" in (tmp_path / "t.md").read_text()
