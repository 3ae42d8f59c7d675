"""[Note: cgroup limit] (hf_zero/engine/offload/cgroup_memory.py): a process in a memory-limited
cgroup sees the cgroup's room, not the machine's, in ``host_memory.meminfo``, so the host-room
check refuses what the cgroup would kill. Fake v1 and v2 trees under tmp_path."""

from __future__ import annotations

from hf_zero.engine.offload import cgroup_memory, host_memory

GIB = 2**30


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_the_tightest_of_the_cgroup_and_those_above_it(tmp_path):
    _write(tmp_path / "proc", "0::/job/step\n")
    _write(tmp_path / "cg/job/step/memory.max", "max\n")  # the step itself: no limit
    _write(tmp_path / "cg/job/step/memory.current", str(5 * GIB))
    _write(tmp_path / "cg/job/memory.max", str(16 * GIB))  # the job: 16 GiB
    _write(tmp_path / "cg/job/memory.current", str(12 * GIB))
    _write(tmp_path / "cg/job/memory.stat", f"anon 123\ninactive_file {GIB}\nactive_file 7\n")
    assert cgroup_memory.limit(str(tmp_path / "cg"), str(tmp_path / "proc")) == (5 * GIB, 16 * GIB)


def test_v1_memory_controller_and_no_limit(tmp_path):
    _write(tmp_path / "proc", "9:pids:/\n4:memory:/docker/abc\n0::/\n")
    d = tmp_path / "cg/memory/docker/abc"
    _write(d / "memory.limit_in_bytes", str(8 * GIB))
    _write(d / "memory.usage_in_bytes", str(7 * GIB))
    _write(d / "memory.stat", f"total_inactive_file {GIB // 2}\n")
    _write(tmp_path / "cg/memory/memory.limit_in_bytes", "9223372036854771712")  # the root: unlimited
    _write(tmp_path / "cg/memory/memory.usage_in_bytes", str(30 * GIB))
    assert cgroup_memory.limit(str(tmp_path / "cg"), str(tmp_path / "proc")) == (GIB + GIB // 2, 8 * GIB)
    (d / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert cgroup_memory.limit(str(tmp_path / "cg"), str(tmp_path / "proc")) is None
    assert cgroup_memory.limit(str(tmp_path / "nothing"), str(tmp_path / "no-proc")) is None


def test_usage_above_the_limit_reads_as_nothing_available(tmp_path):
    _write(tmp_path / "proc", "0::/\n")
    _write(tmp_path / "cg/memory.max", str(GIB))
    _write(tmp_path / "cg/memory.current", str(2 * GIB))
    assert cgroup_memory.limit(str(tmp_path / "cg"), str(tmp_path / "proc")) == (0, GIB)


def test_meminfo_takes_the_smaller_of_machine_and_cgroup(monkeypatch):
    monkeypatch.setattr(cgroup_memory, "limit", lambda: None)
    machine = host_memory.meminfo()
    assert machine is not None and machine[0] <= machine[1]
    monkeypatch.setattr(cgroup_memory, "limit", lambda: (GIB // 1024, 2 * GIB // 1024))  # far below any machine
    assert host_memory.meminfo() == (GIB // 1024, 2 * GIB // 1024)
    monkeypatch.setattr(cgroup_memory, "limit", lambda: (1 << 62, 1 << 62))  # a limit above the machine's
    assert host_memory.meminfo()[1] == machine[1]  # MemTotal
