"""Digests and run identity at resume, end to end through the Trainer on 2 gloo ranks
([Note: checkpoint digests], [Note: completion marker]): a shard changed after the save is refused
naming the file; the sharded state of another run's save of the same step, copied into a
checkpoint, is refused unless HF_ZERO_FORCE_RESUME=1; and the shared hashing (each rank hashes a
share of the files) verifies a checkpoint saved at 2 ranks on 1, 2 or 3 ranks, every rank raising
for the same damaged file."""

from __future__ import annotations

import os
import shutil

import pytest

from hf_zero.checkpoint import sharded
from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from hf_zero.trainer import checkpoint
from tests.trainer.test_resume import _run


@pytest.fixture(scope="module")
def runs(uninterrupted, tmp_path_factory):
    """Two runs of the same job (run ids drawn per train()): losses of the first, and both folders."""
    full, a = uninterrupted
    b = tmp_path_factory.mktemp("runs") / "b"
    run_on_ranks(_run, 2, b, 2, None, timeout=300)
    return full, a, b


def _flip(file) -> None:
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    file.write_bytes(bytes(raw))


def test_a_shard_changed_after_the_save_is_refused_at_resume(runs, tmp_path):
    _, a, _ = runs
    ckpt = shutil.copytree(a / "checkpoint-3", tmp_path / "checkpoint-3")
    _flip(ckpt / sharded.DIR_NAME / "__1_0.distcp")  # same size: only its digest tells
    with pytest.raises(RankFailure, match=r"checkpoint-3/hf_zero_sharded/__1_0\.distcp does not match its full sha256 "
                                          r"digest in .*hf_zero_digest_rank1\.json"):
        run_on_ranks(_run, 2, tmp_path / "resumed", 2, ckpt, timeout=300)
    assert not (tmp_path / "resumed").exists() or not any((tmp_path / "resumed").iterdir())  # refused before training


def test_another_runs_sharded_state_of_the_same_step_is_refused_unless_forced(runs, tmp_path, monkeypatch):
    full, a, b = runs
    ckpt = shutil.copytree(a / "checkpoint-3", tmp_path / "checkpoint-3")
    shutil.rmtree(ckpt / sharded.DIR_NAME)
    shutil.copytree(b / "checkpoint-3" / sharded.DIR_NAME, ckpt / sharded.DIR_NAME)  # whole, and step 3 too
    with pytest.raises(RankFailure, match=r"is not a complete hf_zero checkpoint: .*hf_zero_complete\.json seals step 3 "
                                          r"of run \w+, but .*hf_zero_digest_rank0\.json records run '\w+': the sharded "
                                          r"state is another run's save.*HF_ZERO_FORCE_RESUME=1"):
        run_on_ranks(_run, 2, tmp_path / "refused", 2, ckpt, timeout=300)
    monkeypatch.setenv(checkpoint.FORCE_ENV, "1")  # the ranks inherit it
    resumed = run_on_ranks(_run, 2, tmp_path / "forced", 2, ckpt, timeout=300)[0]
    # the same job, so the other run's state is this one's: steps 4-6 as uninterrupted
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]


def _verify(rank, world, paths):
    """Every rank checks each checkpoint of ``paths``; returns, per checkpoint, the files this rank
    hashed and its error."""
    from hf_zero.checkpoint import digests

    hashed, original = [], digests.file_digest

    def counted(file, how):
        hashed.append(os.path.basename(file))
        return original(file, how)

    digests.file_digest = counted  # the rank's own module, in its own process
    out = []
    for path in paths:
        hashed.clear()
        shapes = {n: tuple(s) for n, s in sharded.read_meta(os.path.join(path, sharded.DIR_NAME))["params"].items()}
        try:
            sharded.check(path, shapes)
            out.append((list(hashed), None))
        except sharded.CheckpointError as error:
            out.append((list(hashed), str(error)))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_hashes_its_share_at_any_world_size(runs, tmp_path, world):
    _, a, _ = runs
    ckpt = a / "checkpoint-6"  # saved at 2 ranks
    files = sorted(f for f in os.listdir(ckpt / sharded.DIR_NAME) if not f.startswith("hf_zero_digest"))
    damaged = shutil.copytree(ckpt, tmp_path / "checkpoint-6")
    _flip(damaged / sharded.DIR_NAME / "__0_0.distcp")
    results = run_on_ranks(_verify, world, [str(ckpt), str(damaged)], timeout=120)
    shares = [whole[0] for whole, _ in results]
    assert [whole[1] for whole, _ in results] == [None] * world
    assert sorted(f for share in shares for f in share) == files  # every file hashed once, by one rank
    assert all(share for share in shares)  # 4 files: every rank (up to 3) hashes a share
    for _, (_, error) in results:  # every rank refuses, naming the damaged file, whichever rank hashed it
        assert error is not None and "checkpoint-6/hf_zero_sharded/__0_0.distcp does not match its full sha256 digest in" in error
