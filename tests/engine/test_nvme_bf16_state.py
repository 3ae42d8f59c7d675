"""bf16 optimizer state on NVMe ([Note: bf16 swap files] in hf_zero/engine/offload/nvme_swap.py):
the swap files and chunk buffers hold the moments in bf16 and the masters in fp32, and training is
bit for bit that of device "cpu" with bf16 state ([Note: bf16 host state]): stages 1-3, W = 1 and 2
CPU gloo ranks, clipping on, several sub-steps per piece, all on NVMe and with host_share 0.5.
Checkpoints: bf16 NVMe state resumes into bf16 NVMe and bf16 cpu, fp32 state into bf16 NVMe, bit
for bit. The files on disk, the chunk buffers, the free-space check and the run report's bytes
count 2 bytes per state value.

Each world size is one rank start: every comparison and the resumes run in it."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from hf_zero.byte_units import fmt_bytes
from hf_zero.config import load_config
from hf_zero.config.errors import ConfigError
from hf_zero.config.unsupported import refusals
from hf_zero.engine import ZeroEngine
from hf_zero.engine.offload import nvme_files, split_tier
from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.offload.host_room import HostReading
from hf_zero.engine.offload.nvme_swap import NvmeTier, block_numel, bytes_per_element
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.split_tier import SplitTier
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, tiny_llama
from tests.engine.test_offload import _groups, _train
from tests.engine.test_offload_nvme import _steps

CHUNK = 1500  # elements: several chunks per step, so reads, steps and writes overlap; 0.5 splits them


def _state(opt) -> list[dict[str, torch.Tensor]]:
    """Every piece's optimizer state, in the optimizer's order (the same pieces in every engine)."""
    return [{k: v.clone() for k, v in opt.state.get(p, {}).items()} for g in opt.param_groups for p in g["params"]]


def _equal_state(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k])
                                                                 for k in x) for x, y in zip(a, b))


def _offload(device, nvme_path, state_dtype="bf16", **more):
    if device == "cpu":
        return OptimizerOffload("cpu", chunk_numel=CHUNK, state_dtype=state_dtype)
    return OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=nvme_path, buffer_count=3, state_dtype=state_dtype,
                            **more)


def _files_of(tier: NvmeTier) -> dict:
    """Each swap file's size on disk and its view's dtype."""
    return {name: (os.path.getsize(f.path), f.view.dtype) for name, f in tier.dir.files.items()}


def _parity(rank, world, stage, nvme_path):
    base = add_frozen_and_unused(tiny_llama(0, tied=True, layers=4 if stage == 3 else 2))
    offloads = {"cpu": _offload("cpu", nvme_path), "nvme": _offload("nvme", nvme_path),
                "split": _offload("nvme", nvme_path, host_share=0.5)}
    out = {}
    for name, offload in offloads.items():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)
        norms, params = _train(model, engine, rank, clip=0.5)
        held = norms[-1][1]
        tier = engine._host_step.tier
        out[name] = [n for n, _ in norms], params, _state(opt), held
        if name != "cpu":
            nvme = tier.nvme if name == "split" else tier
            assert type(tier) is (SplitTier if name == "split" else NvmeTier)
            n = nvme.file_numel
            # On disk: fp32 masters, bf16 moments (2 bytes each), every region whole blocks.
            assert _files_of(nvme) == {"master": (4 * n, torch.float32), "exp_avg": (2 * n, torch.bfloat16),
                                       "exp_avg_sq": (2 * n, torch.bfloat16)}, name
            assert all(s * 2 % nvme_files.BLOCK_BYTES == 0 for s in nvme.start + nvme.span)
            # The chunk buffers: 4 + 2 x 2 bytes per element of the largest chunk, per slot used.
            used = [s for s in nvme.slots if s.buffers]
            assert {k: b.dtype for s in used for k, b in s.buffers.items()} == \
                {"master": torch.float32, "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}
            assert nvme.resident_bytes() == len(used) * 8 * nvme.slot_numel
            # Outside the step the state is bf16 views of the files (what a checkpoint saves).
            files = {nvme.dir.files[k].view.untyped_storage().data_ptr() for k in ("exp_avg", "exp_avg_sq")}
            on_disk = [s for p, s in opt.state.items() if s["exp_avg"].untyped_storage().data_ptr() in files]
            assert on_disk and all(s[k].dtype == torch.bfloat16 for s in on_disk for k in ("exp_avg", "exp_avg_sq"))
            out[name] += (nvme.resident_bytes(), nvme.disk_bytes())
        engine.close()
    ref_norms, ref_params, ref_state, cpu_held = out["cpu"]
    assert {v.dtype for s in ref_state for v in s.values() if v.dim() > 0} == {torch.bfloat16}
    for name in ("nvme", "split"):
        norms, params, state, held, resident, disk = out[name]
        assert norms == ref_norms, name
        assert all(torch.equal(params[k], ref_params[k]) for k in ref_params), name
        assert _equal_state(state, ref_state), name
        # The run report's bytes: every offloaded byte is somewhere, at 2 bytes per moment.
        assert held["host_offload"] + held["nvme_offload"] - resident == cpu_held["host_offload"], name
        assert held["nvme_offload"] <= disk
    return out["nvme"][3]["nvme_offload"]


def _resume(rank, world, stage, nvme_path, checkpoint):
    """bf16 NVMe state saved after 3 steps resumes into bf16 NVMe and bf16 cpu as the uninterrupted
    run; an fp32-state checkpoint resumes into bf16 NVMe as into bf16 cpu (rounded at the first step)."""
    from hf_zero.checkpoint import sharded

    base = tiny_llama(0, tied=True)

    def make(offload):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        return model, ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)

    def params(model, engine):
        with engine.gathered():
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    model, engine = make(_offload("nvme", nvme_path))
    full = _steps(model, engine, rank, 0, 6)
    full_params, full_state = params(model, engine), _state(engine.optimizer)
    engine.close()

    model, engine = make(_offload("nvme", nvme_path))
    _steps(model, engine, rank, 0, 3)
    sharded.save(engine, f"{checkpoint}/bf16")  # reads the bf16 moments through the files' views
    torch.distributed.barrier()  # save returns once this rank's part is written, not every rank's
    engine.close()
    for device in ("nvme", "cpu"):
        model, engine = make(_offload(device, nvme_path))
        sharded.load(engine, f"{checkpoint}/bf16")
        assert _steps(model, engine, rank, 3, 6) == full[3:], device
        got = params(model, engine)
        assert all(torch.equal(got[k], full_params[k]) for k in full_params), device
        assert _equal_state(_state(engine.optimizer), full_state), device
        engine.close()

    model, engine = make(_offload("nvme", nvme_path, state_dtype="fp32"))
    _steps(model, engine, rank, 0, 3)
    sharded.save(engine, f"{checkpoint}/fp32")
    torch.distributed.barrier()  # save returns once this rank's part is written, not every rank's
    engine.close()
    resumed = {}
    for device in ("nvme", "cpu"):
        model, engine = make(_offload(device, nvme_path))
        sharded.load(engine, f"{checkpoint}/fp32")
        resumed[device] = _steps(model, engine, rank, 3, 6), params(model, engine), _state(engine.optimizer)
        engine.close()
    (norms, got, state), (ref_norms, ref, ref_state) = resumed["nvme"], resumed["cpu"]
    assert norms == ref_norms and all(torch.equal(got[k], ref[k]) for k in ref)
    assert _equal_state(state, ref_state) and {v.dtype for s in state for v in s.values() if v.dim() > 0} == \
        {torch.bfloat16}


def _all(rank, world, root):
    from hf_zero.engine.offload import state_dtype

    state_dtype.SUB_NUMEL = 700  # several sub-steps per piece (in this rank's process only)
    root = Path(root)
    disk = {stage: _parity(rank, world, stage, str(root / "nvme")) for stage in (1, 2, 3)}
    _resume(rank, world, 3 if world == 2 else 2, str(root / "nvme"), str(root / "ckpt"))
    return disk


@pytest.mark.parametrize("world", [1, 2])
def test_bf16_nvme_state_is_bf16_cpu_state_bit_for_bit_and_resumes(world, tmp_path):
    (tmp_path / "nvme").mkdir()
    run_on_ranks(_all, world, str(tmp_path), timeout=300)
    assert [p for p in (tmp_path / "nvme").iterdir() if p.name.startswith(nvme_files.PREFIX)] == []


# ---- the files, the free-space check, the settings ----------------------------------------------


def test_bf16_file_regions_move_whole_blocks(tmp_path):
    # Every chunk starts and is padded at a block of the narrowest dtype: bf16 regions are whole blocks.
    assert block_numel(torch.float32) == nvme_files.BLOCK_BYTES // 4
    assert block_numel(torch.float32, torch.bfloat16) == nvme_files.BLOCK_BYTES // 2
    swap = nvme_files.SwapDir(str(tmp_path), 0, direct=nvme_files.use_direct_io(str(tmp_path)))
    try:
        numel = 2 * block_numel(torch.bfloat16)
        swap.file("exp_avg", numel, torch.bfloat16)
        assert os.path.getsize(swap.files["exp_avg"].path) == 2 * numel
        memory = HostMemory(False)
        out = nvme_files.page_aligned(memory, numel // 2, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and out.data_ptr() % nvme_files.PAGE_BYTES == 0
        out.copy_(torch.randn(numel // 2))
        [f.result() for f in swap.write("exp_avg", out, numel // 2)]  # the second half: byte offset 1 block
        back = nvme_files.page_aligned(memory, numel // 2, torch.bfloat16)
        [f.result() for f in swap.read("exp_avg", back, numel // 2)]
        assert torch.equal(back, out) and torch.equal(swap.files["exp_avg"].view[numel // 2 :], out)
        with pytest.raises(AssertionError, match="torch.float32 elements for the torch.bfloat16 file 'exp_avg'"):
            swap.write("exp_avg", nvme_files.page_aligned(memory, numel // 4), 0)
    finally:
        swap.remove()


def _engine(nvme_path, state_dtype, **more):
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return ZeroEngine(model, opt, stage=2, bucket_numel=3000,
                      offload=_offload("nvme", str(nvme_path), state_dtype, **more))


def test_free_space_check_counts_two_bytes_per_state_value(tmp_path, monkeypatch):
    assert bytes_per_element(torch.optim.AdamW([torch.zeros(1)]), "bf16") == 8
    assert bytes_per_element(torch.optim.AdamW([torch.zeros(1)], amsgrad=True), "bf16") == 10
    assert bytes_per_element(torch.optim.AdamW([torch.zeros(1)])) == 12
    needed = {}
    for dtype in ("fp32", "bf16"):
        engine = _engine(tmp_path, dtype)
        needed[dtype] = bytes_per_element(engine.optimizer, dtype) * engine._host_step.tier.file_numel
        engine.close()
    monkeypatch.setattr(nvme_files, "free_bytes", lambda path: needed["bf16"] - 1)
    with pytest.raises(ConfigError) as error:
        _engine(tmp_path, "bf16")
    text = str(error.value)
    assert "needed for the optimizer swap files (fp32 masters and 2 bf16 optimizer state tensors per element)" in text
    assert f"({fmt_bytes(needed['bf16'])} per rank)" in text
    monkeypatch.setattr(nvme_files, "free_bytes", lambda path: needed["bf16"])
    _engine(tmp_path, "bf16").close()  # just enough room


def test_auto_host_share_counts_two_bytes_per_state_value(tmp_path, monkeypatch, capsys):
    # host_share "auto" ([Note: host share]): master and bf16 moments take 8 bytes per element in host
    # memory and in the chunk buffers, so more of them fit than of fp32 state (12)
    gib = 2**30
    got = HostReading(100 * gib, 128 * gib, 1)
    chunks = [10**9] * 10
    fp32, bf16 = split_tier.auto_share(chunks, 12, 4, got), split_tier.auto_share(chunks, 8, 4, got)
    assert (fp32.state_bytes_per_element, bf16.state_bytes_per_element) == (12, 8)
    assert bf16.fixed_bytes == int(4e10 + 4 * 8 * 1e9)
    assert bf16.share == pytest.approx((100 * gib - 0.1 * 128 * gib - 4e10 - 4 * 8e9) / 8e10)
    assert bf16.share > fp32.share > 0
    capsys.readouterr()
    engine = _engine(tmp_path, "bf16", host_share="auto")  # the engine passes its state dtype
    engine.close()
    assert "8 bytes per element of masters and optimizer state" in capsys.readouterr().err


def test_bf16_state_with_nvme_is_no_longer_refused(tmp_path):
    OptimizerOffload("nvme", nvme_path=str(tmp_path), state_dtype="bf16", host_share=0.5)
    config = load_config({"bf16": {"enabled": True, "bf16_optimizer_states": True},
                          "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme",
                                                                                  "nvme_path": str(tmp_path)}}})
    assert config.zero.offload_optimizer.state_dtype == "bf16" and refusals(config) == []
