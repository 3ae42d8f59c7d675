"""The NVMe parameter tier reads its shards through a few staging buffers, one unit ahead
(nvme_staging.py, [Note: staging]): the same training bit for bit as without parameter offload,
read-aheads used and never stale, and a host RSS bounded by the buffers, not by the model."""

from __future__ import annotations

import copy
import ctypes
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload.nvme_params import NvmeParamMemory
from hf_zero.engine.offload.nvme_staging import STAGING_BUFFERS, StagingBuffers
from hf_zero.engine.offload.settings import OptimizerOffload, ParamOffload
from hf_zero.testing.multiprocess import run_on_ranks
from tests.engine.models import add_frozen_and_unused, batch, slow_host_step, tiny_llama
from tests.engine.test_param_offload import _full_params, _groups, _steps

STEPS = 4


# ---- the buffers alone ---------------------------------------------------------------------------


def test_a_read_ahead_written_meanwhile_is_read_again(tmp_path):
    memory = NvmeParamMemory(str(tmp_path), 8 << 20, None, pin=False)
    try:
        a = memory.like(torch.arange(1000, dtype=torch.float32))
        b = memory.like(torch.arange(3000), torch.bfloat16)
        memory.read_ahead(a)
        memory.read_ahead(b)
        memory.write(a, torch.full((1000,), 7.0))  # the host step's write, after a's read-ahead started
        staged = memory.stage(a)
        assert torch.equal(staged, torch.full((1000,), 7.0)) and staged.data_ptr() != a.data_ptr()
        memory.done_with(staged, torch.device("cpu"))
        staged = memory.stage(b)
        assert staged.dtype == torch.bfloat16 and torch.equal(staged, torch.arange(3000, dtype=torch.bfloat16))
        memory.done_with(staged, torch.device("cpu"))
        assert (memory.staging.hits, memory.staging.stale, memory.staging.misses) == (1, 1, 0)
        staged = memory.stage(a)  # nothing read ahead: read now
        memory.done_with(staged, torch.device("cpu"))
        assert memory.staging.misses == 1
        assert torch.equal(a, torch.full((1000,), 7.0))  # the mapping sees the write (one page cache)
        assert memory.staging_bytes() <= STAGING_BUFFERS * (1 << 20)  # each file is one 1 MiB block here
    finally:
        memory.close()
    assert list(tmp_path.iterdir()) == []


def test_read_ahead_never_blocks_and_every_buffer_lent_is_an_error(tmp_path):
    memory = NvmeParamMemory(str(tmp_path), 8 << 20, None, pin=False)
    try:
        shards = [memory.like(torch.full((10,), float(i))) for i in range(4)]
        lent = [memory.stage(s) for s in shards[:STAGING_BUFFERS]]
        memory.read_ahead(shards[3])  # no free buffer: skipped, not waited for
        assert all(b.state.name == "LENT" for b in memory.staging.buffers)
        with pytest.raises(AssertionError, match="every staging buffer is lent"):
            memory.stage(shards[3])
        for t in lent:
            memory.done_with(t, torch.device("cpu"))
        with pytest.raises(AssertionError, match="no staging buffer lent"):
            memory.done_with(lent[0], torch.device("cpu"))
    finally:
        memory.close()
    with pytest.raises(ValueError, match="at least 2 buffers"):
        StagingBuffers(memory.dir, pin=False, count=1)


# ---- through the engine ----------------------------------------------------------------------------


def _train(rank, world, nvme_path, early):
    """No gather prefetch (``prefetch_numel`` 0): each unit is gathered at its use, so the disk
    read of the next one is what runs ahead. ``early``: the host step overlaps backward and the
    next forward, slowed, so shards are written while their read-aheads may be in flight."""
    base = add_frozen_and_unused(tiny_llama(0, tied=True, layers=4))
    if early:
        slow_host_step()
    runs, stats = [], None
    for param_offload in (None, ParamOffload("nvme", nvme_path=nvme_path)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
        engine = ZeroEngine(model, opt, stage=3, bucket_numel=3000, offload=OptimizerOffload("cpu", chunk_numel=5000),
                            offload_param=param_offload, prefetch_numel=0)
        engine.set_step_in_backward(early, overlap_forward=early)
        norms = [n for n, _, _ in _steps(model, engine, rank, 0, STEPS, clip=None if early else 0.5)]
        runs.append((norms, _full_params(model, engine)))
        if param_offload is not None:
            s = engine.strategy.param_memory.staging
            stats = {"hits": s.hits, "stale": s.stale, "misses": s.misses,
                     "held": engine.held_bytes()["host_offload"], "staging": s.resident_bytes()}
        engine.close()
    (ref_norms, ref), (norms, params) = runs
    stats["same_norms"] = norms == ref_norms
    stats["differ"] = sorted(n for n in ref if not torch.equal(ref[n], params[n]))
    return stats


@pytest.mark.parametrize("world,early", [(1, False), (2, False), (2, True)])
def test_staged_reads_train_like_no_param_offload(world, early, tmp_path):
    for stats in run_on_ranks(_train, world, str(tmp_path), early, timeout=240):
        assert stats["same_norms"] and stats["differ"] == [], stats
        # Every use but the first of each pass stages from a read-ahead (5 units, 2 micro-steps a step).
        assert stats["hits"] > stats["misses"] > 0, stats
        assert 0 < stats["staging"] <= stats["held"], stats  # the run report counts the buffers as host memory
    assert list(tmp_path.iterdir()) == []


# ---- host RSS ----------------------------------------------------------------------------------------


def _proc(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _mapped_rss(directory: str) -> int:
    """RSS of this process's mappings of files in ``directory`` (/proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                ours = len(head) >= 6 and head[5].startswith(directory)
            elif ours and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def _rss(rank, world, nvme_path):
    """A 32-layer model (a 7 MiB shard file per layer) whose weights are frozen but for the norms, so
    grads and optimizer state are small, with its shards on NVMe and no gather prefetch.

    - Evaluation (no grad): each unit is gathered, used and dropped in turn; peak RSS may grow by
      the staging buffers and a unit or two in flight, not by the model.
    - Training: after each step RSS is back where it was (no creep), and the files' mappings hold
      no resident page. (Within a step a unit's gathered weights go after its forward, though
      autograd saved views of them: [Note: full storage], tests/engine/test_stage3_memory.py.)
    - Control: reading the shards through their mappings makes every page resident (the tier before
      this one read them so); the next staged pass drops them again.

    Large blocks are given back to the OS when freed (glibc's mmap threshold fixed at 1 MiB): with
    its sliding default the heap keeps freed gathers and RSS creeps with host memory or swap files
    alike, which would measure the allocator, not the tier."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    cfg = LlamaConfig(vocab_size=256, hidden_size=384, intermediate_size=1024, num_hidden_layers=32,
                      num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1 << 20, offload=OptimizerOffload("cpu"),
                        offload_param=ParamOffload("nvme", nvme_path=nvme_path), prefetch_numel=0)
    memory = engine.strategy.param_memory
    wrapped = ZeroModule(model, engine)

    def step(i):
        wrapped(**batch(rank, i, 0, cfg.vocab_size, bsz=1, seq=16)).loss.backward()
        engine.optimizer.step()
        wrapped.zero_grad()

    def evaluate():
        with torch.no_grad():
            for i in range(3):
                wrapped(**batch(rank, i, 0, cfg.vocab_size, bsz=1, seq=16))

    out = {"model": model_bytes, "largest": max(f.nbytes for f in memory.dir.files.values())}
    step(0)  # the first step makes the host grads, the optimizer's state and the staging buffers
    evaluate()
    base = _proc("VmRSS")
    with _PeakRss() as peak:
        evaluate()
    out["eval_grew"] = peak.bytes - base
    after = []
    for i in range(1, 4):
        step(i)
        after.append(_proc("VmRSS") - base)
    out["after_steps"], out["mapped"] = after, _mapped_rss(memory.dir.path)
    out["staging"], out["hits"] = memory.staging_bytes(), memory.staging.hits
    shards = [t for u in engine.units for t in u.host_shards()]
    out["shard_bytes"] = sum(t.numel() * t.element_size() for t in shards)
    sum(float(t.sum()) for t in shards)  # through the mappings
    out["mapped_read"] = _mapped_rss(memory.dir.path)
    evaluate()
    out["mapped_after_staging"] = _mapped_rss(memory.dir.path)
    engine.close()
    return out


class _PeakRss:
    """The largest RSS seen by a thread that samples it every half millisecond (VmHWM cannot be
    reset on every kernel: /proc/self/clear_refs "5" is ignored on some)."""

    def __enter__(self):
        import threading

        self.bytes, self._stop = _proc("VmRSS"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.0005):
            with open("/proc/self/statm") as f:
                self.bytes = max(self.bytes, int(f.read().split()[1]) * page)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, _proc("VmRSS"))


def test_host_rss_is_bounded_by_the_staging_buffers(tmp_path):
    """Bound: evaluation's peak RSS grows by at most the staging buffers (3 x the largest shard
    file, there already) + two units in flight (gathered, uploaded) + 16 MiB for activations and
    the allocator; after each training step RSS is within that same bound of where it was (the
    allocator's free lists hold a few MiB more or less from run to run: 16 MiB alone was exceeded
    by 1.6-2.5 MiB in some runs, before and after the stage-3 full-storage change; a tier that kept
    the model's pages would grow by the model, over 4 bounds); the mappings hold nothing."""
    out = run_on_ranks(_rss, 1, str(tmp_path), timeout=300)[0]
    mib = 2**20
    bound = out["staging"] + 2 * out["largest"] + 16 * mib
    assert out["model"] > 4 * bound, out  # the model is far bigger than what may grow
    assert 0 < out["staging"] <= STAGING_BUFFERS * out["largest"], out
    assert out["eval_grew"] <= bound, out
    assert all(grew <= bound for grew in out["after_steps"]), out
    assert out["mapped"] == 0 and out["hits"] > 0, out
    # The control: the measure sees mapped pages (all of them once read so), and staging drops them.
    assert out["mapped_read"] >= out["shard_bytes"] > out["model"] - mib, out
    assert out["mapped_after_staging"] == 0, out
    assert list(tmp_path.iterdir()) == []


# ---- construction writes the shards back ([Note: shards written back]) -----------------------------


def _cached_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache (mincore over a fresh read-only mapping of it)."""
    import mmap

    import numpy as np

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size, page = os.path.getsize(path), os.sysconf("SC_PAGE_SIZE")
    if size == 0:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        vec = (ctypes.c_ubyte * -(-size // page))()
        view = np.frombuffer(m, dtype=np.uint8)  # the mapping's address (a read-only buffer has no ctypes one)
        failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
        if failed:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(b & 1 for b in vec) * page


def _filesystem(path: str) -> str:
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            mount, fs = line.split()[1], line.split()[2]
            if os.path.realpath(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, kind = mount, fs
    return kind


def _built(rank, world, nvme_path, sharded_load):
    """Right after the engine is built without an optimizer (the shards written by construction,
    or by the sharded load's ``materialize``): the swap files' mappings hold no resident page, and
    the files' pages are not left in the page cache (written to the disk first: fdatasync, then
    dropped). Then the optimizer comes: its masters are read from the shards through staging
    (``pread``: clean pages in the cache, which the kernel may drop), not through the mappings."""
    from tests.engine.test_param_offload import _StateSource

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    if sharded_load:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
        source = _StateSource(ref.state_dict())
    else:
        model, source = copy.deepcopy(ref), None
    engine = ZeroEngine(model, None, stage=3, bucket_numel=1 << 20, offload=OptimizerOffload("cpu"),
                        offload_param=ParamOffload("nvme", nvme_path=nvme_path), source=source)
    memory = engine.strategy.param_memory
    files = [f for name, f in memory.dir.files.items() if name.startswith("param.")]
    out = {"mapped": _mapped_rss(memory.dir.path), "cached": sum(_cached_bytes(f.path) for f in files),
           "shard_bytes": sum(t.numel() * t.element_size() for u in engine.units for t in u.host_shards()),
           "fs": _filesystem(memory.dir.path)}
    engine.attach_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    out["mapped_with_masters"] = _mapped_rss(memory.dir.path)
    masters = torch.cat([m.reshape(-1) for m in engine.masters])
    out["masters_equal_shards"] = torch.equal(masters, torch.cat(
        [t.reshape(-1).float() for u in engine.units for t in u.host_shards() if u.buffer is not None]))
    state = engine.full_state_dict(to_cpu_on=None)  # the values came back from the disk
    out["differ"] = sorted(n for n, t in ref.state_dict().items() if n in state and not torch.equal(state[n], t))
    engine.close()
    return out


@pytest.mark.parametrize("sharded_load", [False, True])
def test_built_shards_leave_rss_and_the_page_cache(sharded_load, tmp_path):
    out = run_on_ranks(_built, 1, str(tmp_path), sharded_load, timeout=240)[0]
    assert out["shard_bytes"] > 8 * 2**20, out  # the model is well above what the assertions allow
    assert out["mapped"] == 0 and out["mapped_with_masters"] == 0 and out["differ"] == [], out
    assert out["masters_equal_shards"], out
    # tmpfs keeps a file's pages in memory whatever is asked (they are the file); on a disk they go.
    limit = out["shard_bytes"] + 2**20 if out["fs"] in ("tmpfs", "ramfs") else 2**20
    assert out["cached"] <= limit, out
    assert list(tmp_path.iterdir()) == []


# ---- edits kept by gathered(modifier_rank=...) are written back too ----------------------------------


def _edited(rank, world, nvme_path, how):
    """Right after ``gathered(modifier_rank=0)`` kept edits of every param (``how``: each param + 1,
    or a ``load_state_dict`` of those values, as the Trainer's ``load_best_model_at_end`` loads into
    the gathered params), of a model with frozen params beside trainable ones in every layer (one
    file per unit: the frozen edits go through the mapping, ``keep_edits``; the trainable ones with
    ``write``, their masters copied from the shards, ``take_full``): the swap files' mappings hold no
    resident page and the files' pages are not left in the page cache. Then, read back through
    staging, the shards hold the edits and the masters follow them."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" not in name)
    edited = {n: t + 1.0 for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = ZeroEngine(model, opt, stage=3, bucket_numel=1 << 20, offload=OptimizerOffload("cpu"),
                        offload_param=ParamOffload("nvme", nvme_path=nvme_path))
    memory = engine.strategy.param_memory
    files = [f for name, f in memory.dir.files.items() if name.startswith("param.")]
    out = {"fused": sum(u._fused for u in engine.units), "fs": _filesystem(memory.dir.path),
           "shard_bytes": sum(t.numel() * t.element_size() for u in engine.units for t in u.host_shards())}
    with torch.no_grad(), engine.gathered(modifier_rank=0):
        if how == "load_state_dict":
            model.load_state_dict(edited)
        else:
            for p in model.parameters():
                p.add_(1.0)
    out["mapped"] = _mapped_rss(memory.dir.path)
    out["cached"] = sum(_cached_bytes(f.path) for f in files)
    state = engine.full_state_dict(to_cpu_on=None)  # staged: from the disk
    out["differ"] = sorted(n for n, t in edited.items() if not torch.equal(state[n], t))
    out["masters_differ"] = [b.index for b in engine.buckets if not torch.equal(b.master, b.shard().float())]
    engine.close()
    return out


@pytest.mark.parametrize("world,how", [(1, "add"), (1, "load_state_dict"), (2, "add")])
def test_kept_edits_leave_rss_and_the_page_cache(world, how, tmp_path):
    for out in run_on_ranks(_edited, world, str(tmp_path), how, timeout=240):
        assert out["fused"] >= 8 and out["shard_bytes"] > 8 * 2**20 // world, out
        assert out["mapped"] == 0, out
        limit = out["shard_bytes"] + 2**20 if out["fs"] in ("tmpfs", "ramfs") else 2**20
        assert out["cached"] <= limit, out
        assert out["differ"] == [] and out["masters_differ"] == [], out
    assert list(tmp_path.iterdir()) == []
