"""Old checkpoints are deleted only after the new one is sealed, wherever transformers rotates
([Note: rotation], hf_zero/trainer/checkpoint.py): ``checkpoint.rotate`` knows the markers (never the
checkpoint just sealed, the newest complete one or the best; saves cut short go first), and on 2
gloo ranks a Trainer that rotates at other points of its save (right after the model files, and
on rank 0 after its RNG state), with rank 1 killed inside that window (its sharded state written,
the marker not), keeps the older checkpoint, which ``resume_from_checkpoint=True`` then takes."""

from __future__ import annotations

import json
import os

import pytest
from transformers import Trainer, TrainingArguments

from hf_zero.testing.multiprocess import RankFailure, run_on_ranks
from hf_zero.trainer import checkpoint
from tests.trainer import tiny


def _folder(root, step: int, *, complete: bool) -> str:
    folder = root / f"checkpoint-{step}"
    (folder / "hf_zero_sharded").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        (folder / checkpoint.COMPLETE_NAME).write_text(
            json.dumps({"run_id": "r", "global_step": step, "world_size": 2, "stage": 2}))
    return str(folder)


def _left(root) -> list[str]:
    return sorted(os.listdir(root), key=lambda n: int(n.split("-")[1]))


def test_rotate_keeps_the_new_the_newest_complete_and_the_best_and_drops_cut_short_saves_first(tmp_path):
    a = tmp_path / "a"  # 2 complete, 4 cut short, 6 just sealed; limit 2: the cut-short one goes, not 2
    _folder(a, 2, complete=True), _folder(a, 4, complete=False)
    assert checkpoint.rotate(str(a), 2, current=_folder(a, 6, complete=True)) == [str(a / "checkpoint-4")]
    assert _left(a) == ["checkpoint-2", "checkpoint-6"]
    b = tmp_path / "b"  # limit 1, the best (2) kept beside the new one
    best = _folder(b, 2, complete=True)
    _folder(b, 4, complete=True), _folder(b, 5, complete=False)
    checkpoint.rotate(str(b), 1, current=_folder(b, 6, complete=True), best=best)
    assert _left(b) == ["checkpoint-2", "checkpoint-6"]
    c = tmp_path / "c"  # a re-run into an older run's folder: its new checkpoint-2 and the older run's 8 stay
    _folder(c, 8, complete=True)
    assert checkpoint.rotate(str(c), 1, current=_folder(c, 2, complete=True)) == []
    d = tmp_path / "d"  # nothing complete but the new one, no limit: nothing goes
    _folder(d, 2, complete=False)
    assert checkpoint.rotate(str(d), None, current=_folder(d, 4, complete=True)) == []
    assert _left(d) == ["checkpoint-2", "checkpoint-4"]


def _checkpoints(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("checkpoint-"))


def _run(rank, world, out, resume_from, kill_at=None):
    import signal

    import hf_zero.trainer as zt

    try:  # transformers' own rotation, as it runs at the end of its save
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # older transformers: the Trainer method
        rotate_checkpoints = None

    class RotatesElsewhere(Trainer):
        """A transformers that rotates at other points of its save; rank 1 killed (SIGKILL) after
        its sharded state while checkpoint ``kill_at`` is written."""

        def _rotate_here(self, output_dir):
            if not self.args.should_save:
                return
            if rotate_checkpoints is None:
                self._rotate_checkpoints(use_mtime=True, output_dir=os.path.dirname(output_dir))
            else:
                rotate_checkpoints(output_dir=os.path.dirname(output_dir), save_total_limit=self.args.save_total_limit,
                                   use_mtime=True)

        def save_model(self, output_dir=None, _internal_call=False):
            super().save_model(output_dir, _internal_call)
            if _internal_call:  # a checkpoint's model files written, nothing else yet
                self._rotate_here(output_dir)

        def _save_rng_state(self, output_dir):
            if rank == 1 and kill_at and output_dir.endswith(f"checkpoint-{kill_at}"):
                os.kill(os.getpid(), signal.SIGKILL)
            super()._save_rng_state(output_dir)
            self._rotate_here(output_dir)  # rank 0: every file of its own written, the marker not

    model, data = tiny.offload_job()
    data = data[:24]
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=6, save_steps=3,
                             save_total_limit=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, disable_tqdm=True, seed=0)
    zt.activate({"zero_optimization": {"stage": 2}})
    try:
        trainer = RotatesElsewhere(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        zt.deactivate()
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_a_rank_killed_inside_the_rotation_window_leaves_the_older_checkpoint_to_resume(tmp_path):
    full = run_on_ranks(_run, 2, tmp_path / "a", None, timeout=300)[0]
    assert _checkpoints(tmp_path / "a") == ["checkpoint-6"]  # the rotation itself still runs (limit 1)
    out = tmp_path / "b"
    with pytest.raises(RankFailure, match="rank 1's process exited with code -9"):
        run_on_ranks(_run, 2, out, None, 6, timeout=300)
    assert (out / "checkpoint-3" / checkpoint.COMPLETE_NAME).exists()  # not rotated away
    assert not (out / "checkpoint-6" / checkpoint.COMPLETE_NAME).exists()
    resumed = run_on_ranks(_run, 2, out, True, timeout=300)[0]  # takes checkpoint-3
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    assert _checkpoints(out) == ["checkpoint-6"] and (out / "checkpoint-6" / checkpoint.COMPLETE_NAME).exists()


def test_the_saved_training_args_record_the_users_save_total_limit(tmp_path):
    """hf_zero holds the Trainer's save_total_limit at None while it saves ([Note: rotation]); the
    training_args.bin of the checkpoint still records the user's limit (1), and the run's own args
    have it back. (The file is a pickle: only this test loads it, transformers and hf_zero never do.)"""
    import torch

    model, data = tiny.offload_job()
    args = tiny.args(str(tmp_path), max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer = tiny.with_zero(2, lambda: _train(Trainer(model=model, args=args, train_dataset=data[:8])))
    assert _checkpoints(tmp_path) == ["checkpoint-2"] and trainer.args.save_total_limit == 1
    saved = torch.load(tmp_path / "checkpoint-2" / "training_args.bin", weights_only=False)  # our own file
    assert saved.save_total_limit == 1
    assert (tmp_path / "checkpoint-2" / checkpoint.COMPLETE_NAME).exists()
    assert not [n for n in os.listdir(tmp_path / "checkpoint-2") if n.startswith(".")]  # no temporary left


def _train(trainer):
    trainer.train()
    return trainer
