"""[Note: host room]: the optimizer offload's host part is checked against the host's memory
before it is allocated; a need the host cannot hold is refused on every rank with what would fit."""

from __future__ import annotations

import pytest
import torch

from hf_zero.config.errors import ConfigError
from hf_zero.engine import ZeroEngine
from hf_zero.engine.offload import auto_ratio, host_room
from hf_zero.engine.offload.host_room import HostNeed, HostReading, check
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import tiny_llama

GIB = 2**30
CPU = OptimizerOffload("cpu", ratio=0.7)
NVME = OptimizerOffload("nvme", ratio=0.7, nvme_path="/nvme", host_share=0.67)


def test_a_need_above_the_hosts_part_is_refused_with_a_ratio_that_fits():
    need = HostNeed(elements=8 * 10**9, host_elements=8 * 10**9, per_element=12)  # 128 GB: 16 bytes each
    reading = HostReading(100 * GIB, 125 * GIB, 1)
    with pytest.raises(ConfigError) as error:
        check(need, [reading], CPU)
    text = str(error.value)
    assert "offload_optimizer (device 'cpu', ratio 0.7) needs 119.21 GiB" in text
    assert "100.00 GiB available" in text and "the kernel would kill the run" in text
    suggested = float(text.split("offload_optimizer.ratio about ")[1].split()[0])
    # the suggested ratio's elements (the same share of the model) fit the host
    elements = int(need.elements * suggested / 0.7)
    with pytest.warns(RuntimeWarning, match="leaves less than 10%"):  # it fits, with little to spare
        check(HostNeed(elements, elements, 12), [reading], CPU)
    assert 16 * elements <= 100 * GIB < 16 * need.elements
    # a host whose memory others hold: no share of the optimizer fits, and the error says so
    with pytest.raises(ConfigError, match="Not even a hundredth of it fits"):
        check(need, [HostReading(64 * 1024, 125 * GIB, 1)], CPU)


def test_nvme_suggests_a_host_share_that_fits():
    elements = 8 * 10**9
    reading = HostReading(90 * GIB, 125 * GIB, 1)  # grads 32 GB + 67% of 96 GB of state + buffers: 94 GiB
    need = HostNeed(elements, int(0.67 * elements), 12, buffer_bytes=4 * 12 * 10**8)
    with pytest.raises(ConfigError, match="host_share at most") as error:
        check(need, [reading], NVME)
    share = float(str(error.value).split("host_share at most ")[1].split()[0])
    assert 0 < share < 0.67
    with pytest.warns(RuntimeWarning, match="leaves less than 10%"):  # it fits, with little to spare
        check(HostNeed(elements, int(share * elements), 12, buffer_bytes=4 * 12 * 10**8), [reading], NVME)
    # grads and buffers alone too large: the ratio is what can move
    with pytest.raises(ConfigError, match="Even with host_share 0"):
        check(HostNeed(elements, 0, 12, buffer_bytes=4 * 12 * 10**8), [HostReading(20 * GIB, 125 * GIB, 1)], NVME)


def test_a_need_that_leaves_less_than_the_margin_is_allowed_with_a_warning():
    need = HostNeed(10**9, 10**9, 12)  # 16 GB
    check(need, [HostReading(40 * GIB, 125 * GIB, 1)], CPU)  # 25 GiB left: above 10%
    with pytest.warns(RuntimeWarning, match="leaves less than 10% of the host free"):
        check(need, [HostReading(20 * GIB, 125 * GIB, 1)], CPU)
    check(need, [], CPU)  # no /proc/meminfo: nothing to judge


def test_ranks_of_one_host_share_it_and_the_tightest_host_decides():
    need = HostNeed(10**9, 10**9, 12)  # 14.9 GiB a rank
    check(need, [HostReading(50 * GIB, 125 * GIB, 2)], CPU)  # 25 GiB a rank, 20 GiB left: no warning
    with pytest.raises(ConfigError, match="each of this host's 4 rank"):
        check(need, [HostReading(50 * GIB, 125 * GIB, 4)], CPU)  # 12.5 GiB a rank
    with pytest.raises(ConfigError, match="each of host 'b'.s 1 rank"):
        check(need, [HostReading(100 * GIB, 125 * GIB, 1, "a"), HostReading(10 * GIB, 125 * GIB, 1, "b")], CPU)


def _engine(offload):
    model = tiny_llama(0)
    return ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), stage=2, bucket_numel=3000,
                      offload=offload)


def test_the_engine_refuses_before_the_host_step_is_built(monkeypatch):
    monkeypatch.setattr(host_room, "meminfo", lambda: (64 * 1024, 125 * GIB))  # 64 KiB available
    with pytest.raises(ConfigError, match="needs .* of host memory"):
        _engine(OptimizerOffload("cpu"))
    monkeypatch.setattr(host_room, "meminfo", lambda: (100 * GIB, 125 * GIB))
    _engine(OptimizerOffload("cpu")).close()


def test_a_rebuild_for_another_ratio_is_not_judged_against_the_memory_it_replaces(monkeypatch):
    """``ratio: "auto"``'s rebuild ([Note: auto ratio]) holds the first layout's masters and state
    while it builds the next; the first build was checked, the smaller rebuild is not."""
    monkeypatch.setattr(host_room, "meminfo", lambda: (100 * GIB, 125 * GIB))
    engine = _engine(OptimizerOffload("cpu"))
    monkeypatch.setattr(host_room, "meminfo", lambda: (64 * 1024, 125 * GIB))  # the old tier holds it all
    auto_ratio.place(engine, 0.5)
    assert engine.offload.ratio == 0.5 and engine._host_step is not None
    engine.close()


def _low_on_rank_one(rank, world):
    import socket

    monkey = pytest.MonkeyPatch()
    # two hosts of one rank each; the second has 64 KiB available
    monkey.setattr(socket, "gethostname", lambda: f"host{rank}")
    monkey.setattr(host_room, "meminfo", lambda: ((100 * GIB if rank == 0 else 64 * 1024), 125 * GIB))

    try:
        _engine(OptimizerOffload("cpu"))
    except ConfigError as error:
        return str(error)
    finally:
        monkey.undo()
    return None


def test_every_rank_refuses_when_one_host_cannot_hold_it():
    errors = run_on_ranks(_low_on_rank_one, 2)
    assert all(e is not None and "host 'host1'" in e for e in errors), errors


MIB = 2**20


def _auto_share_on_two_hosts(rank, world, path):
    """host0 has plenty, host1 little: "auto" must give both ranks one share and the same tiers
    (each sized from its own host, rank 0 once built a HostTier while rank 1 waited in the NVMe
    tier's collective)."""
    import socket

    from hf_zero.engine.offload import tiers

    monkey = pytest.MonkeyPatch()
    monkey.setattr(socket, "gethostname", lambda: f"host{rank}")
    monkey.setattr(host_room, "meminfo",
                   lambda: ((10 * GIB, 11 * GIB) if rank == 0 else (int(0.2 * MIB) + 420 * 1024, 2 * MIB)))
    seen = {}
    chosen = tiers.split_tier.auto_share
    monkey.setattr(tiers.split_tier, "auto_share", lambda *a, **k: seen.setdefault("choice", chosen(*a, **k)))
    try:
        engine = _engine(OptimizerOffload("nvme", nvme_path=path, host_share="auto", chunk_numel=4000))
        out = (seen["choice"].share, type(engine._host_step.tier).__name__)
        engine.close()
        return out
    finally:
        monkey.undo()


def test_auto_share_is_one_share_for_every_host(tmp_path):
    (a, tier_a), (b, tier_b) = run_on_ranks(_auto_share_on_two_hosts, 2, str(tmp_path))
    assert a == b and tier_a == tier_b, ((a, tier_a), (b, tier_b))
    assert a < 0.5  # host1's room, not host0's


def test_auto_share_keeps_only_whole_chunks_that_fit(monkeypatch, tmp_path):
    """"auto" chose 0.04 of the elements; a first chunk of 0.3 used to go to host memory anyway
    (rounded up) and the room check then refused what "auto" itself chose."""
    monkeypatch.setattr(host_room, "meminfo", lambda: (260 * 1024, 300 * 1024))
    engine = _engine(OptimizerOffload("nvme", nvme_path=str(tmp_path), host_share="auto", chunk_numel=4000,
                                      buffer_count=1))
    assert type(engine._host_step.tier).__name__ == "NvmeTier"  # no whole chunk fits in 0.04
    engine.close()


def test_the_suggested_ratio_builds(monkeypatch):
    """A lower ratio still offloads whole buckets (the one it ends in too): the suggestion leaves
    room for that, so following it is not refused again (it once took 1.0, 0.54, 0.40, 0.30...)."""
    import re

    monkeypatch.setattr(host_room, "meminfo", lambda: (200 * 1024, 10 * GIB))

    def build(ratio):
        model = tiny_llama(0)
        return ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), stage=2, bucket_numel=8000,
                          offload=OptimizerOffload("cpu", ratio=ratio, pin_memory=False))

    with pytest.raises(ConfigError) as refused:
        build(1.0)
    ratio = float(re.search(r"ratio about ([0-9.]+)", str(refused.value)).group(1))
    assert 0 < ratio < 1
    with pytest.warns(RuntimeWarning, match="less than 10% of the host free"):  # it fits, without the margin
        engine = build(ratio)
    assert any(b.offloaded for b in engine.buckets)
    engine.close()
