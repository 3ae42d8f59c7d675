"""Optimizer offload to NVMe (nvme_swap.py) trains exactly as no offload and as CPU offload
(fp32, CPU gloo ranks), keeps masters and optimizer state in swap files that are gone after
``close()``, cleans up after crashed runs, and refuses an unusable directory before any step."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_zero.config.errors import ConfigError
from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload import nvme_files
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama
from tests.engine.test_offload import _groups, _train

CHUNK = 1500  # elements: several chunks per step, so reads, steps and writes overlap (nvme_swap.py)


def _swap_dirs(path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.name.startswith(nvme_files.PREFIX))


def _compare(rank, world, stage, nvme_path, buffer_count, early=False):
    # Stage 3 steps one chunk per unit at least: 4 layers make 5 units, more chunks than buffers.
    base = add_frozen_and_unused(tiny_llama(0, tied=True, layers=4 if stage == 3 else 2))
    offloads = {
        "none": None,
        "cpu": OptimizerOffload("cpu", chunk_numel=CHUNK),
        "nvme": OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=nvme_path, buffer_count=buffer_count),
    }
    results, files = {}, None
    for name, offload in offloads.items():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)
        engine.set_step_in_backward(early, overlap_forward=early)  # [Note: step in backward]; no-op without offload
        results[name] = _train(model, engine, rank, clip=None if early else 0.5)
        if name == "nvme":
            tier = engine._host_step.tier
            mine = Path(tier.dir.path)
            files = {p.name: p.stat().st_size for p in mine.iterdir()}
            held = results[name][0][-1][1]
            # Masters and both moments in the files; the host holds grads and the chunk buffers only.
            assert held["optimizer_state"] == 0 and held["nvme_offload"] > 0
            resident = tier.resident_bytes()
            assert 0 < resident <= buffer_count * 3 * tier.slot_numel * 4
            assert len(tier.chunks) > buffer_count  # the slots were reused: the bound is real
            # optimizer.state outside the step: views of the files, equal to what the files hold
            piece = next(p for p in opt.param_groups[0]["params"] if opt.state.get(p))
            assert opt.state[piece]["exp_avg"].untyped_storage().data_ptr() == \
                tier.dir.files["exp_avg"].view.untyped_storage().data_ptr()
        engine.close()
        if name == "nvme":
            assert not mine.exists()  # close() removed this rank's files and directory
    (plain, plain_params) = results["none"]
    for name in ("cpu", "nvme"):
        got, params = results[name]
        assert [n for n, _ in got] == [n for n, _ in plain], name  # grad norms, step by step
        for key in plain_params:
            assert torch.equal(params[key], plain_params[key]), (name, key)
    return files


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nvme_matches_no_offload_and_cpu_offload(world, stage, tmp_path):
    files = run_on_ranks(_compare, world, stage, str(tmp_path), 3, timeout=240)
    for rank_files in files:
        assert set(rank_files) == {"master.swap", "state.exp_avg.swap", "state.exp_avg_sq.swap"}
        assert len(set(rank_files.values())) == 1 and rank_files["master.swap"] % nvme_files.BLOCK_BYTES == 0
    assert _swap_dirs(tmp_path) == []


@pytest.mark.parametrize("world,stage", [(1, 2), (2, 3)])
def test_nvme_step_in_backward(world, stage, tmp_path):
    # Chunks read, stepped and written back by the step worker while backward goes on.
    run_on_ranks(_compare, world, stage, str(tmp_path), 2, True, timeout=240)
    assert _swap_dirs(tmp_path) == []


@pytest.mark.parametrize("buffer_count", [1, 2])
def test_nvme_with_few_buffers(buffer_count, tmp_path):
    # One buffer: read, step, write in turn; two: the next chunk is read while one is stepped.
    run_on_ranks(_compare, 1, 2, str(tmp_path), buffer_count, timeout=240)


# ---- checkpoints -----------------------------------------------------------------------------------


def _steps(model, engine, rank, start, stop):
    wrapped, norms = ZeroModule(model, engine), []
    for step in range(start, stop):
        for micro in range(2):
            with (wrapped.no_sync() if micro == 0 else torch.enable_grad()):
                (wrapped(**batch(rank, step, micro, model.config.vocab_size)).loss / 2).backward()
        norms.append(engine.clip_grad_norm_(0.5).item())
        engine.optimizer.step()
        wrapped.zero_grad()
    return norms


def _resume(rank, world, stage, nvme_path, checkpoint):
    from hf_zero.checkpoint import sharded

    base = tiny_llama(0, tied=True)

    def make():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        offload = OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=nvme_path, buffer_count=3)
        return model, ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)

    def params(model, engine):
        with engine.gathered():
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    model, engine = make()
    full = _steps(model, engine, rank, 0, 6)
    full_params = params(model, engine)
    engine.close()

    model, engine = make()
    _steps(model, engine, rank, 0, 3)
    sharded.save(engine, checkpoint)  # reads the masters and moments through the files' views
    torch.distributed.barrier()  # save returns once this rank's part is written, not every rank's
    engine.close()

    model, engine = make()
    sharded.load(engine, checkpoint)  # masters written into the files; moments loaded into memory...
    resumed = _steps(model, engine, rank, 3, 6)
    tier = engine._host_step.tier
    for state in engine.optimizer.state.values():  # ...and taken into the files by the first step
        assert state["exp_avg"].untyped_storage().data_ptr() == tier.dir.files["exp_avg"].view.untyped_storage().data_ptr()
    assert resumed == full[3:]
    for name, value in params(model, engine).items():
        assert torch.equal(value, full_params[name]), name
    engine.close()


@pytest.mark.parametrize("stage", [2, 3])
def test_nvme_checkpoint_resumes_bit_for_bit(stage, tmp_path):
    (tmp_path / "nvme").mkdir()
    run_on_ranks(_resume, 2, stage, str(tmp_path / "nvme"), str(tmp_path / "ckpt"), timeout=240)
    assert _swap_dirs(tmp_path / "nvme") == []


# ---- the directory: errors before the first step, stale files, exit ---------------------------------


def _nvme_engine(nvme_path, stage=2):
    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    offload = OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=str(nvme_path))
    return ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)


KEY = 'zero_optimization.offload_optimizer.nvme_path = "'


def test_missing_directory_is_refused_at_construction(tmp_path):
    with pytest.raises(ConfigError) as error:
        _nvme_engine(tmp_path / "missing")
    assert str(error.value).startswith(f'{KEY}{tmp_path / "missing"}": the directory does not exist '
                                       f'(create it: mkdir -p {tmp_path / "missing"}); allowed: an existing')


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r'nvme_path = ".*/f": not a directory; allowed'):
        _nvme_engine(tmp_path / "f")


def test_unwritable_directory_is_refused(tmp_path, monkeypatch):
    # Tests may run as root, for whom chmod does not stop writes: the OS's refusal is simulated.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(nvme_files.tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match=r'nvme_path = ".*": the directory is not writable: Permission denied'):
        _nvme_engine(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setattr(nvme_files, "free_bytes", lambda path: 5 * 2**20)
    with pytest.raises(ConfigError) as error:
        _nvme_engine(tmp_path)
    text = str(error.value)
    assert text.startswith(f'{KEY}{tmp_path}": 5.00 MiB free, ') and "needed for the optimizer swap files (fp32 " \
        "masters and 2 optimizer state tensors per element) of 1 rank(s) on this host" in text
    assert "allowed: a directory with at least" in text
    assert list(tmp_path.iterdir()) == []


def _shared_directory(rank, world, nvme_path):
    engine = _nvme_engine(nvme_path)
    per_rank = 3 * 4 * engine._host_step.tier.file_numel  # masters + 2 moments, fp32
    engine.close()
    nvme_files.free_bytes = lambda path: per_rank * 3 // 2  # room for one rank's files, not for two
    try:
        _nvme_engine(nvme_path)
    except ConfigError as error:
        return str(error)
    return None


def test_free_space_counts_every_rank_of_the_host(tmp_path):
    errors = run_on_ranks(_shared_directory, 2, str(tmp_path), timeout=120)
    assert all(e is not None and "state tensors per element) of 2 rank(s) on this host" in e for e in errors)
    assert _swap_dirs(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_files_of_dead_runs_are_removed_and_nothing_else(tmp_path):
    host, dead, alive = nvme_files.host_name(), _dead_pid(), os.getppid()
    made = {
        "stale": tmp_path / f"hf_zero-swap-{host}-{dead}-rank0-0",
        "stale_with_foreign_file": tmp_path / f"hf_zero-swap-{host}-{dead}-rank1-0",
        "alive": tmp_path / f"hf_zero-swap-{host}-{alive}-rank0-0",
        "other_host": tmp_path / f"hf_zero-swap-otherhost-{dead}-rank0-0",
    }
    for directory in made.values():
        directory.mkdir()
        (directory / "master.swap").write_bytes(b"x" * 100)
    (made["stale"] / "state.exp_avg.swap").write_bytes(b"x")
    (made["stale_with_foreign_file"] / "notes.txt").write_text("not ours")
    (tmp_path / "unrelated.swap").write_text("not ours")
    engine = _nvme_engine(tmp_path)
    assert not made["stale"].exists()
    assert sorted(p.name for p in made["stale_with_foreign_file"].iterdir()) == ["notes.txt"]
    assert (made["alive"] / "master.swap").exists() and (made["other_host"] / "master.swap").exists()
    assert (tmp_path / "unrelated.swap").exists()
    engine.close()


SCRIPT = """
import os, sys, torch
from hf_zero.engine import ZeroEngine
from hf_zero.engine.offload.settings import OptimizerOffload
from tests.engine.models import tiny_llama
model = tiny_llama(0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine = ZeroEngine(model, opt, stage=1, bucket_numel=3000,
                    offload=OptimizerOffload("nvme", chunk_numel=1500, nvme_path=sys.argv[1]))
ids = torch.randint(0, 101, (2, 8))
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
print(engine._host_step.tier.dir.path, flush=True)
if sys.argv[2] == "crash":
    os._exit(1)  # no finalizers: the files stay, for the next run to remove
"""


def test_files_are_removed_at_exit_and_after_a_crash(tmp_path):
    repo = Path(__file__).resolve().parents[2]

    def run(mode):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), mode], cwd=repo, capture_output=True,
                              text=True, timeout=120)
        return proc.stdout.strip().splitlines()[-1]

    exited = run("exit")  # never closed: removed at interpreter exit
    assert exited.startswith(str(tmp_path)) and not os.path.exists(exited)
    crashed = run("crash")
    assert {p.name for p in Path(crashed).iterdir()} == {"master.swap", "state.exp_avg.swap", "state.exp_avg_sq.swap"}
    engine = _nvme_engine(tmp_path)  # the next run: the crashed run's files go
    assert not os.path.exists(crashed) and len(_swap_dirs(tmp_path)) == 1
    engine.close()
    assert _swap_dirs(tmp_path) == []
