"""Parameter offload at stage 3 (``ParamOffload``, [Note: host shards] in units.py): the same
training as without it, the same collectives, the shards counted on the host, checkpoints.

On CPU gloo ranks the "host" and the "device" are both the CPU, but the code path is the real
one: each unit's shard is a host tensor of its own, every use uploads it into a new tensor and
gathers from that, and the optimizer step must write the new values back into the host shard
(forgetting to would train on stale params, a parity failure below)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_zero.config import ConfigError
from hf_zero.config.schema import OffloadConfig, ZeroConfig
from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.engine.stages import check_supported
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, tiny_llama

STEPS = 4
ALL = 10**9  # prefetch window larger than the model: every unit is gathered ahead


def _groups(model):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _make(base, optimizer_offload, param_offload, persist):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
    offload = None if optimizer_offload is None else OptimizerOffload("cpu", ratio=optimizer_offload, chunk_numel=5000)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=3000, offload=offload,
                        offload_param=ParamOffload(pin_memory=True) if param_offload is True else param_offload or None,
                        prefetch_numel=ALL, persistence_threshold=persist)
    return model, engine


def _steps(model, engine, rank, start, stop, clip=0.5):
    """Steps ``start``..``stop`` (2 micro-steps each, clipped unless ``clip`` is None); per step:
    the grad norm, the held bytes before the optimizer step, the collectives counted."""
    wrapped, out = ZeroModule(model, engine), []
    engine.ctx.take_counts()
    for step in range(start, stop):
        for micro in range(2):
            with (wrapped.no_sync() if micro == 0 else torch.enable_grad()):
                (wrapped(**batch(rank, step, micro, model.config.vocab_size)).loss / 2).backward()
        norm = (engine.clip_grad_norm_(clip) if clip is not None else engine.grad_norm()).item()
        held = engine.held_bytes()
        engine.optimizer.step()
        wrapped.zero_grad()
        out.append((norm, held, engine.ctx.take_counts()))
    return out


def _full_params(model, engine):
    with engine.gathered():
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(rank, world, optimizer_offload, persist):
    base = add_frozen_and_unused(tiny_llama(0, tied=True))  # a frozen weight: a fused unit (units.py)
    runs = []
    # No offload at all (the optimizer steps the shards themselves: no write-back to get wrong),
    # the same optimizer offload without and with parameter offload.
    for opt_offload, param_offload in ((None, False), (optimizer_offload, False), (optimizer_offload, True)):
        model, engine = _make(base, opt_offload, param_offload, persist)
        runs.append((_steps(model, engine, rank, 0, STEPS), _full_params(model, engine), engine))
    (ref, ref_params, ref_engine), (plain, plain_params, plain_engine), (off, off_params, off_engine) = runs
    host_units = [u for u in off_engine.units if u.host is not None]
    # Persistent params stay on the device; every other unit keeps its shards on the host only.
    assert all(u.persistent for u in off_engine.units if u.host is None)
    assert host_units and all(u.local is None or u.local.is_pinned() == torch.cuda.is_available() for u in host_units)
    shard_bytes = sum(u.host_bytes() for u in host_units)
    master_bytes = sum(m.numel() * m.element_size() for m in off_engine.masters)
    for engine in (ref_engine, plain_engine, off_engine):
        engine.close()
    return {
        "norms": ([n for n, _, _ in ref], [n for n, _, _ in plain], [n for n, _, _ in off]),
        "counts": ([c for _, _, c in plain], [c for _, _, c in off]),
        "held": (plain[-1][1], off[-1][1]),
        "equal": sorted(n for n in plain_params if torch.equal(plain_params[n], off_params[n])
                        and torch.equal(ref_params[n], off_params[n])),
        "names": sorted(plain_params),
        "shard_bytes": shard_bytes,
        "master_bytes": master_bytes,
    }


@pytest.mark.parametrize("world,optimizer_offload,persist", [(1, 1.0, 0), (2, 1.0, 100), (2, 0.5, 0), (2, None, 0)])
def test_param_offload_trains_like_no_param_offload(world, optimizer_offload, persist):
    """fp32, prefetch on: bit for bit the same grad norms and params as the same engine without
    parameter offload and as one without any offload, with the same collectives per step (as
    without parameter offload); optimizer offload 1.0 (the host step
    writes every host shard), 0.5 (half the buckets stepped on the device, copied into their host
    shards after the step) and none (the engine allows it; the config asks for optimizer offload)."""
    for r in run_on_ranks(_compare, world, optimizer_offload, persist, timeout=240):
        assert r["norms"][2] == r["norms"][1] == r["norms"][0]
        assert r["equal"] == r["names"]
        assert r["counts"][1] == r["counts"][0]
        if world > 1:
            assert all(c.get("all_gather", 0) > 0 and c.get("reduce_scatter", 0) > 0 for c in r["counts"][1])
        plain, off = r["held"]
        # Measured between backward and step, every unit resharded: the shards moved to the host,
        # nothing else did (a persistent unit's params stay whole on the device).
        assert r["shard_bytes"] > 0
        assert plain["params"] - off["params"] == r["shard_bytes"]
        assert off["host_offload"] - plain["host_offload"] == r["shard_bytes"]
        assert (off["params"] > 0) == (persist > 0)
        if optimizer_offload is None:  # fp32 masters on the device now, no longer the shards themselves
            assert off["optimizer_state"] - plain["optimizer_state"] == r["master_bytes"]


def _resume(rank, world, checkpoint, nvme_path=None):
    """``nvme_path``: the shards in swap files (nvme_params.py): the checkpoint reads and the load
    writes them through their mappings, training reads them through the staging buffers."""
    from hf_zero.checkpoint import sharded

    base = add_frozen_and_unused(tiny_llama(0, tied=True))
    shards = ParamOffload("nvme", nvme_path=nvme_path) if nvme_path is not None else True
    model, engine = _make(base, 1.0, True, 0)
    full = [n for n, _, _ in _steps(model, engine, rank, 0, 6)]
    full_params = _full_params(model, engine)
    engine.close()

    model, engine = _make(base, 1.0, shards, 0)
    _steps(model, engine, rank, 0, 3)
    sharded.save(engine, checkpoint)  # masters, moments and the frozen host shards
    torch.distributed.barrier()  # save returns once this rank's part is written, not every rank's
    engine.close()

    model, engine = _make(base, 1.0, shards, 0)
    sharded.load(engine, checkpoint)  # masters written into the host shards
    resumed = [n for n, _, _ in _steps(model, engine, rank, 3, 6)]
    params = _full_params(model, engine)
    # Edits kept from rank 0 (load_best_model_at_end's path) land in the host shards, frozen ones too.
    frozen, trainable = model.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad(), engine.gathered(modifier_rank=0):
        if rank == 0:
            frozen.fill_(0.5)
            trainable.fill_(0.25)
    with torch.no_grad(), engine.gathered():
        kept = bool((frozen == 0.5).all() and (trainable == 0.25).all())
    engine.close()
    return resumed == full[3:], sorted(n for n in params if not torch.equal(params[n], full_params[n])), kept


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_checkpoint_resumes_bit_for_bit(device, tmp_path):
    """Saved with the shards in host memory or swap files, resumed so: the run without a break (in
    host memory) continued bit for bit."""
    (tmp_path / "nvme").mkdir()
    nvme_path = str(tmp_path / "nvme") if device == "nvme" else None
    for same_norms, differ, kept in run_on_ranks(_resume, 2, str(tmp_path / "ckpt"), nvme_path, timeout=240):
        assert same_norms and differ == [] and kept
    assert list((tmp_path / "nvme").iterdir()) == []


def _early(rank, world):
    """[Note: step in backward] with parameter offload: the worker writes the host shards of
    units whose backward is done while backward goes on, and of the rest while the next forward
    starts (each unit waits for its own before it uploads it)."""
    base = add_frozen_and_unused(tiny_llama(0, tied=True))
    params = []
    for offload in (None, 1.0):
        model, engine = _make(base, offload, offload is not None, 0)
        engine.set_step_in_backward(True, overlap_forward=True)
        _steps(model, engine, rank, 0, STEPS, clip=None)
        params.append(_full_params(model, engine))
        engine.close()
    return sorted(n for n in params[0] if not torch.equal(params[0][n], params[1][n]))


@pytest.mark.parametrize("world", [1, 2])
def test_param_offload_with_step_in_backward(world):
    assert run_on_ranks(_early, world, timeout=240) == [[]] * world


def test_config_asks_for_optimizer_offload_and_cpu():
    ZeroConfig(stage=3, offload_param=OffloadConfig(device="cpu"), offload_optimizer=OffloadConfig(device="cpu"))
    with pytest.raises(ConfigError, match=r'offload_param.device = "cpu".*needs optimizer offload'):
        ZeroConfig(stage=3, offload_param=OffloadConfig(device="cpu"))
    check_supported(3, "cpu", "cpu")
    check_supported(3, "nvme", "nvme")
    with pytest.raises(ValueError, match="offload_param.device must be one of 'none', 'cpu', 'nvme'; got 'disk'"):
        check_supported(3, "cpu", "disk")
    model = tiny_llama(0)
    with pytest.raises(ValueError, match="needs ZeRO stage 3, got stage 2"):
        ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), stage=2, bucket_numel=100,
                   offload_param=ParamOffload())
    with pytest.raises(ValueError, match="'nvme' needs nvme_path"):
        ParamOffload(device="nvme")
    with pytest.raises(ValueError, match=r"one of \('cpu', 'nvme'\), got 'disk'"):
        ParamOffload(device="disk")


class _StateSource:
    """A ``materialize.ParamSource`` that reads a model's state dict (what hf_zero/init reads
    from safetensors files)."""

    device = torch.device("cpu")

    def __init__(self, state):
        self.state = state

    def unit_start(self, params):
        pass

    def read_into(self, name, shape, start, end, out):
        out.copy_(self.state[name].reshape(-1)[start:end])

    def unit_done(self, more_units=False):
        pass


def _sharded_load(rank, world):
    """A model built on the meta device and filled shard by shard (hf_zero/init's path) puts its
    shards straight into host memory; it computes what the model it was read from computes."""
    ref = add_frozen_and_unused(tiny_llama(0, tied=False))
    with torch.device("meta"):
        model = add_frozen_and_unused(tiny_llama(0, tied=False))
    engine = ZeroEngine(model, None, stage=3, bucket_numel=3000, offload_param=ParamOffload(pin_memory=True),
                        source=_StateSource(ref.state_dict()))
    for module, ref_module in zip(model.modules(), ref.modules()):  # buffers (rotary inv_freq): hf_zero/init's job
        module._buffers.update({k: b.clone() for k, b in ref_module._buffers.items()})
    ids = batch(rank, 0, 0, ref.config.vocab_size)["input_ids"]
    with torch.no_grad():
        same_logits = torch.equal(model(ids).logits, ref(ids).logits)
    state = engine.full_state_dict(to_cpu_on=None)
    differ = sorted(n for n, t in ref.state_dict().items() if not torch.equal(state[n], t))
    held = engine.held_bytes()
    return same_logits, differ, held["params"], held["host_offload"], all(u.host is not None for u in engine.units)


def test_sharded_load_fills_host_shards():
    for same_logits, differ, params, host, all_on_host in run_on_ranks(_sharded_load, 2, timeout=240):
        assert same_logits and differ == []
        assert params == 0 and host > 0 and all_on_host


# ---- parameter offload to NVMe (nvme_params.py) ---------------------------------------------------


def _nvme(rank, world, nvme_path, early):
    """The same training with the param shards in swap files as with no offload: bit for bit;
    the shards are views of this rank's param.<n>.swap files, counted as NVMe bytes."""
    from pathlib import Path

    base = add_frozen_and_unused(tiny_llama(0, tied=True))
    runs, seen = [], {}
    for param_offload in (None, ParamOffload("nvme", nvme_path=nvme_path)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        offload = OptimizerOffload("cpu", chunk_numel=5000) if param_offload is not None else None
        engine = ZeroEngine(model, opt, stage=3, bucket_numel=3000, offload=offload, offload_param=param_offload,
                            prefetch_numel=ALL)
        engine.set_step_in_backward(early, overlap_forward=early)
        held = _steps(model, engine, rank, 0, STEPS, clip=None if early else 0.5)[-1][1]
        runs.append(_full_params(model, engine))
        if param_offload is not None:
            memory = engine.strategy.param_memory
            mine = Path(memory.dir.path)
            maps = [(f.view.data_ptr(), f.view.data_ptr() + f.nbytes) for f in memory.dir.files.values()]
            seen = {"files": sorted(p.name for p in mine.iterdir()),
                    "shards": sum(u.host_bytes() for u in engine.units), "held": held,
                    "on_disk": all(any(lo <= t.data_ptr() < hi for lo, hi in maps)
                                   for u in engine.units for t in u.host_shards())}
        engine.close()
        if param_offload is not None:
            seen["removed"] = not mine.exists()
    seen["differ"] = sorted(n for n in runs[0] if not torch.equal(runs[0][n], runs[1][n]))
    return seen


@pytest.mark.parametrize("world,early", [(1, True), (2, False)])
def test_nvme_param_offload_trains_like_no_offload(world, early, tmp_path):
    for seen in run_on_ranks(_nvme, world, str(tmp_path), early, timeout=240):
        assert seen["differ"] == []
        assert seen["files"] and all(f.startswith("param.") and f.endswith(".swap") for f in seen["files"])
        assert seen["on_disk"] and seen["removed"]
        # The shards count as NVMe bytes, not host memory (the host holds the optimizer's masters and state).
        assert seen["held"]["nvme_offload"] == seen["shards"] > 0
    assert list(tmp_path.iterdir()) == []


def test_nvme_param_offload_refuses_a_missing_directory(tmp_path):
    model = tiny_llama(0)
    with pytest.raises(ConfigError, match=r'offload_param.nvme_path = ".*nope": the directory does not exist'):
        ZeroEngine(model, torch.optim.AdamW(model.parameters()), stage=3, bucket_numel=3000,
                   offload=OptimizerOffload("cpu"), offload_param=ParamOffload("nvme", nvme_path=str(tmp_path / "nope")))
    assert list(tmp_path.iterdir()) == []
