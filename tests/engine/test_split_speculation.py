"""Speculation in a host/NVMe split ([Note: speculation] in speculation.py, [Note: host share] in
split_tier.py): with ``host_share`` in (0, 1) and clipping on, the host-memory chunks are stepped
during backward before the global norm is known, as all-host's are, and the NVMe chunks wait for
it. Params and optimizer state stay bit for bit those of all-host (``device "cpu"``) and of
all-NVMe, stepped the same way, at stages 2 and 3 (and 1 at W = 2), W = 1 and 2 CPU gloo ranks,
through test_speculation's schedule: clipping that fires, that does not, no clip call, an
overflowing step skipped (speculation undone) and a NaN norm (redone into NaN params). Per step the
chunks' ``ChunkStep`` before the verdict shows which side speculated: in the split exactly the
host chunks, never an NVMe one, while the NVMe part reads its first chunk ahead, and the copies
kept are of host pieces only; the policy's counters are all-host's. A save mid-run (in the split)
resumes, speculating again, to the uninterrupted run's numbers. Through the Trainer, the run
report's ``host_steps_redone`` counts the split's redone steps as all-host's.

Each world size is one rank start."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hf_zero.engine import ZeroEngine, ZeroModule
from hf_zero.engine.offload import nvme_files
from hf_zero.engine.offload.nvme_swap import NvmeTier
from hf_zero.engine.offload.settings import OptimizerOffload
from hf_zero.engine.offload.speculation import SpeculationPolicy
from hf_zero.engine.offload.split_tier import SplitTier
from hf_zero.engine.offload.tiers import HostTier
from hf_zero.testing.multiprocess import run_on_ranks, run_report
from tests.engine.models import add_frozen_and_unused, tiny_llama
from tests.engine.test_speculation import (HUGE, REDONE, SCHEDULE, SPECULATED, TINY, _bits, _groups, _snapshot,
                                           let_the_worker_start, scheduled_backward)

CHUNK = 1500  # elements: several chunks, so a share of 0.5 puts some on each side
# Steps 0-2 before the save, 3-5 after: clipping fires before and after it (after it a fresh
# policy speculates at once: redone), step 4 waits for the norm (backoff), step 5 is skipped (undone).
RESUME = [(HUGE, 1.0), (TINY, 1.0), (HUGE, 1.0), (TINY, 1.0), (HUGE, 1.0), (HUGE, float("inf"))]
SAVED_AT = 3


def _offload(name: str, nvme_path: str) -> OptimizerOffload:
    if name == "cpu":
        return OptimizerOffload("cpu", chunk_numel=CHUNK)
    return OptimizerOffload("nvme", chunk_numel=CHUNK, nvme_path=nvme_path, buffer_count=3,
                            host_share=0.5 if name == "split" else 0.0)


def _engine(base, stage, offload):
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, foreach=True)
    engine = ZeroEngine(model, opt, stage=stage, bucket_numel=3000, offload=offload)
    # budget 1: every chunk's copy may be kept, so a chunk that waits does so for its tier alone;
    # max_backoff 1: after a redone step exactly one step waits for the norm (SCHEDULE's counts)
    policy = SpeculationPolicy(budget=1.0, max_backoff=1)
    engine.set_step_in_backward(True, overlap_forward=True, speculation=policy)
    return model, engine, policy


def _steps(model, engine, rank, schedule, start=0):
    """``schedule``'s steps from ``start`` (as test_speculation's ``_train``). Per step: the grad
    norm's bits; before the verdict, once the worker has started what it was given, the
    ``ChunkStep`` name of each chunk handed over in backward (a bucket that backward never reduced,
    the unused param's, goes down at the step), and in a split the state of the NVMe part's
    first chunk."""
    wrapped, norms, seen, nvme_first = ZeroModule(model, engine), [], [], []
    for step, (threshold, factor) in enumerate(schedule[start:], start):
        scheduled_backward(wrapped, model, rank, step, factor)
        let_the_worker_start(engine, every_chunk=True)
        spec, tier = engine._host_step.speculation, engine._host_step.tier
        seen.append({c: s.name for c, s in sorted(spec.chunks.items())})
        nvme_first.append(tier.nvme.states[0].name if isinstance(tier, SplitTier) else None)
        norm = engine.clip_grad_norm_(threshold) if threshold is not None else engine.grad_norm()
        norms.append(_bits(norm))
        if torch.isfinite(norm) or factor != float("inf"):
            engine.optimizer.step()  # (inf: skipped, as GradScaler skips an overflowing step)
        wrapped.zero_grad()
    return norms, seen, nvme_first


def _host_chunks(engine) -> int:
    tier = engine._host_step.tier
    return tier.count if isinstance(tier, SplitTier) else len(engine._host_step.chunks) if not tier.on_disk else 0


def _copied_chunks(engine) -> set[int]:
    """The chunks whose pieces have speculation's copies (buffers of any step so far)."""
    host_step = engine._host_step
    chunk_of_piece = {id(piece): host_step._chunk_of[i] for i, ps in host_step._pieces.items() for piece, _, _ in ps}
    return {chunk_of_piece[id(piece)] for piece in host_step.speculation.snapshots._buffers}


def _parity(rank, world, stage, nvme_path):
    layers = 4 if stage == 3 else 2
    base = add_frozen_and_unused(tiny_llama(0, tied=True, layers=layers))
    out = {}
    for name in ("cpu", "nvme", "split"):
        model, engine, policy = _engine(base, stage, _offload(name, nvme_path))
        norms, seen, nvme_first = _steps(model, engine, rank, SCHEDULE)
        # (after the steps: stages 1-2 lay the buckets out again after the first backward)
        tier, chunks, host = engine._host_step.tier, len(engine._host_step.chunks), _host_chunks(engine)
        assert type(tier) is {"cpu": HostTier, "nvme": NvmeTier, "split": SplitTier}[name]
        if name == "split":
            assert 0 < host < chunks
        snap = _snapshot(model, engine)
        out[name] = {
            "norms": norms, "snap": snap, "host": host, "chunks": chunks, "seen": seen, "nvme_first": nvme_first,
            "counts": (policy.speculated_steps, policy.redone_steps, policy.clipped_steps),
            "copied": _copied_chunks(engine), "copy_bytes": engine._host_step.speculation.snapshots.nbytes(),
        }
        engine.close()
    return out


def _resume(rank, world, stage, nvme_path, checkpoint):
    """The split, speculating, saved after step ``SAVED_AT`` and resumed (speculating, a fresh
    policy) into a new engine: the uninterrupted run's norms and params bit for bit."""
    from hf_zero.checkpoint import sharded

    base = add_frozen_and_unused(tiny_llama(0, tied=True))
    model, engine, _ = _engine(base, stage, _offload("split", nvme_path))
    full, _, _ = _steps(model, engine, rank, RESUME)
    full_snap = _snapshot(model, engine)
    engine.close()

    model, engine, _ = _engine(base, stage, _offload("split", nvme_path))
    before, _, _ = _steps(model, engine, rank, RESUME[:SAVED_AT])
    engine.settle()
    sharded.save(engine, checkpoint)
    torch.distributed.barrier()  # save returns once this rank's part is written, not every rank's
    engine.close()

    model, engine, policy = _engine(base, stage, _offload("split", nvme_path))
    sharded.load(engine, checkpoint)
    after, seen, _ = _steps(model, engine, rank, RESUME, start=SAVED_AT)
    snap = _snapshot(model, engine)
    host = _host_chunks(engine)
    engine.close()
    return {"norms": before + after == full, "differ": [k for k in full_snap if full_snap[k] != snap[k]][:5],
            "first_step": seen[0], "host": host, "redone": policy.redone_steps}


def _all(rank, world, root):
    root = Path(root)
    stages = (2, 3) if world == 1 else (1, 2, 3)
    parity = {stage: _parity(rank, world, stage, str(root / "nvme")) for stage in stages}
    resume = _resume(rank, world, 3 if world == 2 else 2, str(root / "nvme"), str(root / "ckpt"))
    return parity, resume


@pytest.mark.parametrize("world", [1, 2])
def test_split_host_chunks_speculate_bit_for_bit_all_host_and_all_nvme(world, tmp_path):
    (tmp_path / "nvme").mkdir()
    results = run_on_ranks(_all, world, str(tmp_path), timeout=300)
    assert [p for p in (tmp_path / "nvme").iterdir() if p.name.startswith(nvme_files.PREFIX)] == []
    for rank, (parity, resume) in enumerate(results):
        for stage, runs in parity.items():
            where = (rank, stage)
            ref = runs["cpu"]
            for name in ("nvme", "split"):
                assert runs[name]["norms"] == ref["norms"], (where, name)
                assert set(runs[name]["snap"]) == set(ref["snap"]), (where, name)
                differ = [k for k in ref["snap"] if runs[name]["snap"][k] != ref["snap"][k]]
                assert differ == [], (where, name, differ[:5])
            last = torch.tensor(ref["snap"]["model.norm.weight"], dtype=torch.int32).view(torch.float32)
            assert last.isnan().all()  # the NaN step really made NaN params

            # Which chunks were stepped before the verdict: at step 0 (the policy speculates) the
            # host-memory chunks and no NVMe chunk; the NVMe chunks are HELD at every step, while
            # the NVMe part's first chunk is being read ahead.
            for name, run in runs.items():
                host, step0 = run["host"], run["seen"][0]
                assert step0 == {c: ("SPECULATED" if c < host else "HELD") for c in step0}, (where, name, step0)
                assert ("SPECULATED" in step0.values()) == (host > 0), (where, name, step0)
                for seen in run["seen"]:
                    assert all(s == "HELD" for c, s in seen.items() if c >= host), (where, name, seen)
                assert set(run["nvme_first"]) == ({"READING"} if name == "split" else {None}), (where, name, run)
                # (a chunk of params without grads, the unused one's, has nothing to copy)
                assert run["copied"] <= set(range(host)) and bool(run["copied"]) == (host > 0), (where, name, run)
                assert (run["copy_bytes"] > 0) == (host > 0), (where, name)
            # The policy's counters, which the run report's host_steps_redone reads: the split's
            # are all-host's; all-NVMe never speculates, and counts its clipped steps all the same.
            assert ref["counts"] == runs["split"]["counts"] == (SPECULATED, REDONE, 5), where
            assert runs["nvme"]["counts"] == (0, 0, 5), where
            assert runs["split"]["copy_bytes"] < ref["copy_bytes"], where  # copies of the host part only

        assert resume["norms"] and resume["differ"] == [], (rank, resume)
        host = resume["host"]
        # the first step after the resume: the host chunks speculated (then redone), the NVMe chunks held
        first = resume["first_step"]
        assert first == {c: ("SPECULATED" if c < host else "HELD") for c in first}, resume
        assert set(range(host)) < set(first), resume
        assert resume["redone"] == 2, resume  # step 3 redone, step 5 undone


# ---- through the Trainer: the run report ------------------------------------------------------------


def _trainer_runs(rank, world, out):
    """The tiny Trainer job (max_grad_norm 1.5: some steps clip, some do not) with all-host offload
    and with a split: per run its (loss, grad norm) per step, the report's ``host_steps_redone``,
    the policy's redone steps and the host chunks."""

    from transformers import Trainer, TrainingArguments

    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S
    from tests.trainer import tiny

    class WorkerFirst(Trainer):  # the steps that speculate are the policy's choice, not the timing's
        def _clip_grad_norm(self, model):
            let_the_worker_start(S.session_of(self).engine, every_chunk=True)
            return super()._clip_grad_norm(model)

    runs = {}
    for name in ("cpu", "split"):
        block = {"device": "cpu", "buffer_size": 2000}
        if name == "split":
            block = {"device": "nvme", "nvme_path": out, "buffer_count": 3, "buffer_size": 2000, "host_share": 0.5}
        model, data = tiny.offload_job()
        args = TrainingArguments(output_dir=f"{out}/{name}", use_cpu=True, report_to="none", max_steps=5,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                                 max_grad_norm=1.5, logging_steps=1, disable_tqdm=True, seed=0)
        zt.activate({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "offload_optimizer": block}})
        try:
            trainer = WorkerFirst(model=model, args=args, train_dataset=data)
            trainer.train()
            engine = S.session_of(trainer).engine
            tier = engine._host_step.tier
            host = tier.count if isinstance(tier, SplitTier) else len(engine._host_step.chunks)
            redone = engine.speculation.redone_steps
        finally:
            zt.deactivate()
        reported = run_report(f"{out}/{name}")["ranks"][rank]["host_steps_redone"]
        history = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        runs[name] = {"train": history, "reported": reported, "redone": redone, "host": host,
                      "chunks": len(engine._host_step.chunks)}
    return runs


def test_the_run_report_counts_the_splits_redone_steps(tmp_path):
    runs = run_on_ranks(_trainer_runs, 1, str(tmp_path), timeout=300)[0]
    cpu, split = runs["cpu"], runs["split"]
    assert 0 < split["host"] < split["chunks"]
    assert split["train"] == cpu["train"] and len(cpu["train"]) == 5
    norms = [n for _, n in cpu["train"]]
    assert min(norms) < 1.5 < max(norms)  # some steps clip, some do not
    assert split["reported"] == split["redone"] == cpu["reported"] == cpu["redone"] >= 1, runs
