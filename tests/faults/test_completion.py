"""Completion is per save, not per directory ([Note: completion marker], hf_zero/trainer/checkpoint.py):
a save into a folder that held an earlier complete checkpoint first removes its marker, so a save
cut short there is never resumed; a marker counts only where it matches its folder; an explicit
path without a valid marker is refused unless HF_ZERO_FORCE_RESUME=1."""

from __future__ import annotations

import json

import pytest

from hf_zero.checkpoint.sharded import CheckpointError
from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from hf_zero.trainer import checkpoint
from tests.trainer.test_resume import _run


def _seal(folder) -> dict:
    return json.loads((folder / checkpoint.COMPLETE_NAME).read_text())


def test_a_rank_killed_while_saving_over_a_complete_checkpoint_leaves_it_unresumable(uninterrupted, tmp_path,
                                                                                    monkeypatch, caplog):
    full = uninterrupted[0]  # the run to continue (ga 2)
    out = tmp_path / "b"
    run_on_ranks(_run, 2, out, 2, None, 1, timeout=300)  # an earlier run (ga 1) completes checkpoints 3 and 6
    earlier = _seal(out / "checkpoint-6")
    with pytest.raises(RankFailure):  # the new run: rank 1 killed while checkpoint-6 is saved over the earlier one
        run_on_ranks(_run, 2, out, 2, None, 2, 2, 3, 6, "rng", timeout=150)
    assert (out / "checkpoint-3" / checkpoint.COMPLETE_NAME).exists()
    assert not (out / "checkpoint-6" / checkpoint.COMPLETE_NAME).exists()  # the earlier run's marker went first
    # its files are all there (rank 1 died after the sharded state), yet an explicit path is refused (what
    # train() calls first; through the Trainer, with and without HF_ZERO_FORCE_RESUME: test_resume_trust.py) ...
    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint='[^']*checkpoint-6' is not a complete hf_zero "
                                              r"checkpoint: .*hf_zero_complete.json is missing.*HF_ZERO_FORCE_RESUME=1"):
        checkpoint.require_complete(str(out / "checkpoint-6"))
    monkeypatch.setenv(checkpoint.FORCE_ENV, "1")  # ... unless forced: taken, with a warning naming the problem
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        checkpoint.require_complete(str(out / "checkpoint-6"))
    assert "hf_zero_complete.json is missing" in caplog.text
    monkeypatch.delenv(checkpoint.FORCE_ENV)
    # ... and resume_from_checkpoint=True takes checkpoint-3 of the new run: steps 4-6 as uninterrupted
    resumed = run_on_ranks(_run, 2, out, 2, True, timeout=300)
    assert [step for _, step in resumed] == [6, 6]
    assert [resumed[0][0][s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    again = _seal(out / "checkpoint-6")  # saved anew, by the resumed run
    assert {k: earlier[k] for k in ("global_step", "world_size", "stage")} == {"global_step": 6, "world_size": 2,
                                                                               "stage": 2}
    assert again["global_step"] == 6 and again["run_id"] != earlier["run_id"]


def _folder(tmp_path, name, *, step, seal):
    folder = tmp_path / name
    (folder / "hf_zero_sharded").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "hf_zero_sharded" / "hf_zero_meta.json").write_text(json.dumps({"world_size": 2, "stage": 3}))
    if seal is not None:
        (folder / checkpoint.COMPLETE_NAME).write_text(json.dumps(seal))
    return folder


def test_a_marker_counts_only_where_it_matches_its_folder(tmp_path, monkeypatch):
    seal = {"run_id": "r1", "global_step": 4, "world_size": 2, "stage": 3}
    good = _folder(tmp_path / "out", "checkpoint-4", step=4, seal=seal)
    assert checkpoint.marker_problem(str(good)) is None
    renamed = _folder(tmp_path, "best", step=4, seal=seal)  # a copy under another name still counts
    assert checkpoint.marker_problem(str(renamed)) is None
    cases = {
        "checkpoint-8": (8, seal, r"seals step 4, but the folder is checkpoint-8"),
        "checkpoint-4": (6, seal, r"seals step 4 of run r1, but .*trainer_state.json is at global_step 6"),
        "checkpoint-5": (5, {**seal, "global_step": 5, "stage": 2},
                         r"world size 2, stage 2, but .*hf_zero_meta.json was written at world size 2, stage 3"),
        "checkpoint-2": (2, {"world_size": 2, "stage": 3}, r"not a completion marker of this hf_zero"),
        "checkpoint-1": (1, None, r"hf_zero_complete.json is missing"),
    }
    for name, (step, marker, why) in cases.items():
        folder = _folder(tmp_path / name, name, step=step, seal=marker)
        assert checkpoint.newest_complete(str(folder.parent)) is None, name
        with pytest.raises(CheckpointError, match=f"resume_from_checkpoint='{folder}' is not a complete hf_zero "
                                                  f"checkpoint: .*{why}.*HF_ZERO_FORCE_RESUME=1"):
            checkpoint.require_complete(str(folder))
    # the sharded state of another run's save of the same step (its digest manifest names that run)
    other = _folder(tmp_path / "other", "checkpoint-4", step=4, seal=seal)
    (other / "hf_zero_sharded" / "hf_zero_digest_rank0.json").write_text(json.dumps({"run_id": "r2"}))
    assert checkpoint.newest_complete(str(other.parent)) is None
    with pytest.raises(CheckpointError, match=r"seals step 4 of run r1, but .*hf_zero_digest_rank0.json records run "
                                              r"'r2': the sharded state is another run's save.*HF_ZERO_FORCE_RESUME=1"):
        checkpoint.require_complete(str(other))
    (other / "hf_zero_sharded" / "hf_zero_digest_rank0.json").write_text(json.dumps({"run_id": "r1"}))
    assert checkpoint.marker_problem(str(other)) is None
    # resume_from_checkpoint=True takes the newest valid one, skipping newer ones without a valid marker
    _folder(tmp_path / "out", "checkpoint-6", step=6, seal=None)
    _folder(tmp_path / "out", "checkpoint-8", step=8, seal={**seal, "global_step": 6})
    assert checkpoint.newest_complete(str(tmp_path / "out")) == str(good)
    monkeypatch.setenv(checkpoint.FORCE_ENV, "1")
    checkpoint.require_complete(str(tmp_path / "checkpoint-1" / "checkpoint-1"))  # forced: taken
    monkeypatch.setenv(checkpoint.FORCE_ENV, "yes")
    with pytest.raises(CheckpointError, match=r"HF_ZERO_FORCE_RESUME='yes': allowed values are 1"):
        checkpoint.require_complete(str(tmp_path / "checkpoint-1" / "checkpoint-1"))
