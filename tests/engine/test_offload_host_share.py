"""``offload_optimizer.host_share`` ([Note: host share] in split_tier.py): part of the NVMe-offloaded
masters and optimizer state kept in host memory trains bit for bit as all-host and all-NVMe (fp32,
clipping on, stages 2 and 3, W = 1 and 2 CPU gloo ranks), counts each part where it lives, resumes
a checkpoint under another share, and is refused with the key, the value and what is allowed.

Each world size is one rank start: every comparison and the resume run in it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hf_zero.config import load_config
from hf_zero.config.errors import ConfigError
from hf_zero.engine import ZeroEngine
from hf_zero.engine.offload import host_room, nvme_files, split_tier
from hf_zero.engine.offload.host_room import HostReading
from hf_zero.engine.offload.nvme_swap import NvmeTier
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.engine.offload.split_tier import SplitTier, host_chunks
from hf_zero.engine.offload.tiers import HostTier
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, tiny_llama
from tests.engine.test_offload import _groups, _train
from tests.engine.test_offload_nvme import _steps

CHUNK = 1500  # elements: several chunks, so a share of 0.5 puts some on each side


def _state(opt) -> list[dict[str, torch.Tensor]]:
    """Every piece's optimizer state, in the optimizer's order (the same pieces in every engine)."""
    return [{k: v.clone() for k, v in opt.state.get(p, {}).items()} for g in opt.param_groups for p in g["params"]]


def _run(base, stage, offload, rank, early=False):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)
    if early:  # [Note: speculation]: clipping on, chunks stepped during backward where the tier lets them
        engine.set_step_in_backward(True, overlap_forward=True, speculation=SpeculationPolicy())
    norms, params = _train(model, engine, rank, clip=0.5)
    engine.settle()
    return engine, norms, params, _state(opt)


def _disk_bytes(engine) -> int:
    """What the NVMe part holds, counted from the buckets the tier put there: fp32 masters and
    the optimizer's per-element state of their pieces."""
    tier, total = engine._host_step.tier, 0
    for b in engine.buckets:
        if b.offloaded and tier.on_disk_of(b.index):
            total += 4 * b.master.numel()
            for p in b.pieces:
                total += sum(4 * v.numel() for v in engine.optimizer.state.get(p.piece, {}).values() if v.dim() > 0)
    return total


def _parity(rank, world, stage, nvme_path, early_too):
    base = add_frozen_and_unused(tiny_llama(0, tied=True, layers=4 if stage == 3 else 2))
    nvme = dict(device="nvme", chunk_numel=CHUNK, nvme_path=nvme_path, buffer_count=3)
    offloads = {
        "cpu": OptimizerOffload("cpu", chunk_numel=CHUNK),
        "nvme": OptimizerOffload(**nvme),
        "split": OptimizerOffload(**nvme, host_share=0.5),
        "all-host": OptimizerOffload(**nvme, host_share=1.0),
    }
    if early_too:
        offloads["split-early"] = offloads["split"]
    out = {}
    for name, offload in offloads.items():
        engine, norms, params, state = _run(base, stage, offload, rank, early=name.endswith("early"))
        tier = engine._host_step.tier
        held = norms[-1][1]
        out[name] = norms, params, state
        if name == "all-host":
            assert type(tier) is HostTier and held["nvme_offload"] == 0
        if name == "nvme":
            assert type(tier) is NvmeTier
            nvme_held, nvme_file, nvme_resident = held, tier.file_numel, tier.resident_bytes()
        if name.startswith("split"):
            assert type(tier) is SplitTier and 0 < tier.count < len(tier.chunks)
            numel = [sum(b.shard_numel for b in engine.buckets if b.index in c) for c in tier.chunks]
            assert tier.count == host_chunks(numel, 0.5)
            assert 0 < tier.nvme.file_numel < nvme_file  # only the NVMe part is in the files
            # The run report's bytes: the NVMe part's masters and state counted as NVMe, the rest as host.
            assert held["nvme_offload"] == _disk_bytes(engine) > 0
            assert 0 < held["nvme_offload"] < nvme_held["nvme_offload"]
            # (host_offload counts the chunk buffers too: the NVMe part may use fewer of them)
            assert held["host_offload"] - tier.resident_bytes() > nvme_held["host_offload"] - nvme_resident
            if name == "split":  # (split-early's host part also holds speculation's copies)
                split_held, split_resident = held, tier.resident_bytes()
            swap_dir = Path(tier.nvme.dir.path)
        if name == "cpu":
            cpu_held = held
        engine.close()
        if name.startswith("split"):
            assert not swap_dir.exists()
    # Every offloaded byte is somewhere: the split holds all-host's bytes plus its chunk buffers.
    assert split_held["host_offload"] + split_held["nvme_offload"] - split_resident == cpu_held["host_offload"]
    ref_norms, ref_params, ref_state = out["cpu"]
    for name in offloads:
        norms, params, state = out[name]
        assert [n for n, _ in norms] == [n for n, _ in ref_norms], name
        for key in ref_params:
            assert torch.equal(params[key], ref_params[key]), (name, key)
        assert len(state) == len(ref_state)
        for mine, ref in zip(state, ref_state):
            assert mine.keys() == ref.keys(), name
            for k in ref:
                assert torch.equal(mine[k], ref[k]), (name, k)


def _resume(rank, world, stage, nvme_path, checkpoint):
    """Saved under host_share 0.25, resumed under 0.6 and under 0 (all NVMe): the same as the
    uninterrupted run under 0.5, loss norms and params bit for bit."""
    from hf_zero.checkpoint import sharded

    base = tiny_llama(0, tied=True)

    def make(share):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        offload = OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=nvme_path, buffer_count=3, host_share=share)
        return model, ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)

    def params(model, engine):
        with engine.gathered():
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    model, engine = make(0.5)
    full = _steps(model, engine, rank, 0, 6)
    full_params = params(model, engine)
    engine.close()

    model, engine = make(0.25)
    _steps(model, engine, rank, 0, 3)
    sharded.save(engine, checkpoint)
    torch.distributed.barrier()  # save returns once this rank's part is written, not every rank's
    engine.close()

    for share in (0.6, 0.0):
        model, engine = make(share)
        sharded.load(engine, checkpoint)
        assert type(engine._host_step.tier) is (SplitTier if share else NvmeTier)
        resumed = _steps(model, engine, rank, 3, 6)
        assert resumed == full[3:], share
        for name, value in params(model, engine).items():
            assert torch.equal(value, full_params[name]), (share, name)
        engine.close()


def _all(rank, world, root):
    root = Path(root)
    for stage in (2, 3):
        _parity(rank, world, stage, str(root / "nvme"), early_too=stage == 3)
    _resume(rank, world, 3 if world == 2 else 2, str(root / "nvme"), str(root / "ckpt"))


@pytest.mark.parametrize("world", [1, 2])
def test_host_share_matches_all_host_and_all_nvme_and_resumes(world, tmp_path):
    (tmp_path / "nvme").mkdir()
    run_on_ranks(_all, world, str(tmp_path), timeout=300)
    assert [p for p in (tmp_path / "nvme").iterdir() if p.name.startswith(nvme_files.PREFIX)] == []


# ---- the split rule and "auto" -------------------------------------------------------------------


def test_host_chunks_by_elements_in_chunk_order():
    assert [host_chunks([400] * 4, s) for s in (0.0, 0.25, 0.5, 0.51, 0.99, 1.0)] == [0, 1, 2, 3, 4, 4]
    assert host_chunks([100, 700, 200], 0.1) == 1  # a chunk is never split: 0.1 of 1000 is within c0
    assert host_chunks([100, 700, 200], 0.11) == 2


def test_auto_share_from_available_host_memory(monkeypatch):
    gib = 2**30
    # 100 GiB available of 128: 12.8 GiB margin; 1e10 elements: 40 GB of grads, 4 x 12 x 1e9 of
    # buffers, 120 GB of masters and AdamW state, of which the 5.6 GB left fit.
    got = HostReading(100 * gib, 128 * gib, 1)
    chunks = [10**9] * 10
    choice = split_tier.auto_share(chunks, 12, 4, got)
    expected = (100 * gib - 0.1 * 128 * gib - 4e10 - 4 * 12 * 1e9) / (12 * 1e10)
    assert choice.share == pytest.approx(expected) and 0.04 < choice.share < 0.05
    assert choice.fixed_bytes == int(4e10 + 4.8e10) and choice.ranks_on_host == 1
    assert "host_share \"auto\" chose" in choice.line()
    got = HostReading(1000 * gib, 1024 * gib, 1)
    assert split_tier.auto_share(chunks, 12, 4, got).share == 1.0
    got = HostReading(10 * gib, 128 * gib, 1)
    assert split_tier.auto_share(chunks, 12, 4, got).share == 0.0


def test_auto_share_leaves_room_for_speculations_copies():
    """[Note: host share]: host-memory chunks may keep copies of up to ``copy_share`` of the
    offloaded elements (12 bytes each with AdamW), so "auto" leaves room for them."""
    gib = 2**30
    chunks = [10**9] * 10
    fixed = 4e10 + 4 * 12 * 1e9
    reading = HostReading(500 * gib, 512 * gib, 1)
    room = (500 * gib - 0.1 * 512 * gib - fixed) / 12  # elements of state (or copies) that fit: 3.0e10
    got = split_tier.auto_share(chunks, 12, 4, reading, copy_share=0.25)
    assert room - 0.25e10 > 1e10 and got.share == 1.0  # all fit, with their copies
    reading = HostReading(200 * gib, 256 * gib, 1)
    room = (200 * gib - 0.1 * 256 * gib - fixed) / 12  # 1.03e10 elements: more than 2 x 0.25 of 1e10
    got, without = (split_tier.auto_share(chunks, 12, 4, reading, copy_share=c) for c in (0.25, 0.0))
    assert got.share == pytest.approx((room - 0.25e10) / 1e10) and without.share == pytest.approx(min(1.0, room / 1e10))
    assert "speculation's copies of up to 0.25" in got.line() and "speculation" not in without.line()
    reading = HostReading(100 * gib, 128 * gib, 1)
    room = (100 * gib - 0.1 * 128 * gib - fixed) / 12  # 4.7e8 elements: every host element may have a copy
    got = split_tier.auto_share(chunks, 12, 4, reading, copy_share=0.25)
    assert got.share == pytest.approx(room / 2 / 1e10) and 0.02 < got.share < 0.025
    assert split_tier.auto_share(chunks, 12, 4, None).share == 0.0  # no host memory to read: all on NVMe


def test_auto_builds_the_tier_it_chose(monkeypatch, tmp_path):
    gib = 2**30
    monkeypatch.setattr(host_room, "meminfo", lambda: (100 * gib, 128 * gib))
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    offload = OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=str(tmp_path), host_share="auto")
    engine = ZeroEngine(model, opt, stage=2, bucket_numel=3000, offload=offload)
    assert type(engine._host_step.tier) is HostTier  # a tiny model fits: all in host memory
    engine.close()
    # the margin only: all in swap files, and the NVMe side's grads and chunk buffers (a tiny
    # model's: under 1 MiB) fit but eat into the margin ([Note: host room])
    monkeypatch.setattr(host_room, "meminfo", lambda: (int(12.8 * gib), 128 * gib))
    model = tiny_llama(0)
    with pytest.warns(RuntimeWarning, match="leaves less than 10% of the host free"):
        engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), stage=2, bucket_numel=3000, offload=offload)
    assert type(engine._host_step.tier) is NvmeTier
    engine.close()


# ---- refusals ---------------------------------------------------------------------------------------


def _load(offload: dict, stage: int = 2, param: dict | None = None):
    zero = {"stage": stage, "offload_optimizer": offload}
    if param is not None:
        zero["offload_param"] = param
    return load_config({"zero_optimization": zero, "bf16": {"enabled": True}})


KEY = "zero_optimization.offload_optimizer.host_share"


@pytest.mark.parametrize("value,problem", [
    (1.5, "out of range"), (-0.1, "out of range"), ("half", "not a number"), (True, "not a number"),
    (float("nan"), "not finite"),
])
def test_bad_values_are_refused_naming_the_key(value, problem, tmp_path):
    with pytest.raises(ConfigError) as error:
        _load({"device": "nvme", "nvme_path": str(tmp_path), "host_share": value})
    text = str(error.value)
    assert text.startswith(f"{KEY} = ") and problem in text
    assert 'allowed: a finite number >= 0 and <= 1 or "auto"' in text


@pytest.mark.parametrize("value", [0.5, "auto"])
def test_host_share_needs_device_nvme(value):
    with pytest.raises(ConfigError) as error:
        _load({"device": "cpu", "host_share": value})
    text = str(error.value)
    assert text.startswith(f"{KEY} = ") and 'needs device "nvme"' in text
    assert 'allowed: 0, or set offload_optimizer.device to "nvme" (it is "cpu")' in text


def test_param_offload_has_no_host_share(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'zero_optimization.offload_param.host_share'"):
        _load({"device": "cpu"}, stage=3, param={"device": "cpu", "host_share": 0.5})
    with pytest.raises(ConfigError, match=r'zero.offload_param.host_share = 0.5 .*applies to offload_optimizer only'):
        load_config({"hf_zero": 1, "zero": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                            "offload_param": {"device": "cpu", "host_share": 0.5}}})


def test_the_config_maps_onto_the_engine_setting(tmp_path):
    from hf_zero.engine.options import engine_options

    for value, want in ((0.25, 0.25), ("auto", "auto"), (1, 1.0)):
        config = _load({"device": "nvme", "nvme_path": str(tmp_path), "host_share": value})
        assert engine_options(config)["offload"].host_share == want
    assert engine_options(_load({"device": "nvme", "nvme_path": str(tmp_path)}))["offload"].host_share == 0.0


def test_the_engine_setting_refuses_too():
    with pytest.raises(ValueError, match=r"host_share must be a number in \[0, 1\] or 'auto', got 2"):
        OptimizerOffload("nvme", nvme_path="x", host_share=2)
    with pytest.raises(ValueError, match=r"host_share 0.5 applies to device 'nvme' only .* got device 'cpu'; allowed: 0"):
        OptimizerOffload("cpu", host_share=0.5)
