"""Each Trainer seam takes what the installed transformers' method takes, and ``install()`` names a
method that is gone (hf_zero/trainer/seam_check.py)."""

import inspect
import warnings
from pathlib import Path

import pytest
from transformers import Trainer

from hf_zero.trainer import seams
from hf_zero.trainer.seam_check import (SUPPORTED_TRANSFORMERS, UnsupportedTransformersError, original_of,
                                        signature_mismatch)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli there
    import tomli as tomllib


def _unwrapped(cls, name):
    """The installed transformers' own method, whether or not hf_zero is active now."""
    key = f"{cls.__name__}.{name}"
    return seams._ORIGINALS.get(key) or inspect.getattr_static(cls, name)


@pytest.mark.parametrize("key", sorted(seams._SEAMS))
def test_seam_takes_what_transformers_takes(key):
    cls, wrapper = seams._SEAMS[key]
    assert signature_mismatch(wrapper, _unwrapped(cls, wrapper.__name__)) is None


def test_twenty_three_seams_are_checked():
    # evaluation_loop: --torch_compile's failure said in a standalone evaluate() (compile_watch.py); training_step, get_eval_dataloader, prediction_step: pipeline stages (trainer/pipeline.py); get_total_train_batch_size: data-parallel ranks only under SP/tp; create_scheduler: the config's scheduler block (config_blocks.py); floating_point_ops: full counts (param_count.py); compute_loss: tiled_loss (hf_zero/activations); get_train_dataloader: the sequence-parallel split (hf_zero/sequence_parallel); _issue_warnings_after_load: a pipeline stage's resume
    assert len(seams._SEAMS) == 23


def test_rule_names_a_renamed_parameter_and_a_dropped_one():
    def original(self, checkpoint, ignore=None):
        pass

    def renamed(self, checkpoint_dir, ignore=None):
        pass

    def dropped(self, checkpoint, **kwargs):
        pass

    def passes_all_on(self, *args, **kwargs):
        pass

    assert "checkpoint_dir" in signature_mismatch(renamed, original)
    assert "['ignore']" in signature_mismatch(dropped, original)
    assert signature_mismatch(passes_all_on, original) is None
    assert signature_mismatch(original, original) is None


def test_a_method_inherited_from_a_mixin_is_found():
    class Mixin:
        def _load_optimizer_and_scheduler(self, checkpoint):
            return "mixin"

    class MovedTrainer(Mixin):
        pass

    def _load_optimizer_and_scheduler(self, checkpoint):
        pass

    assert original_of(MovedTrainer, _load_optimizer_and_scheduler) is Mixin.__dict__["_load_optimizer_and_scheduler"]


def test_a_changed_signature_warns():
    class Changed:
        def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, new_arg=None):
            pass

    with pytest.warns(UserWarning, match=r"Changed\.train .*new_arg"):
        original_of(Changed, seams._SEAMS["Trainer.train"][1])


def test_install_names_a_missing_method_and_installs_nothing(monkeypatch):
    class Gone:
        pass

    def vanished(self):
        pass

    monkeypatch.setattr(seams, "_SEAMS", {"Gone.vanished": (Gone, vanished), **seams._SEAMS})
    was_installed = dict(seams._ORIGINALS)
    with pytest.raises(UnsupportedTransformersError) as info:
        seams.install()
    message = str(info.value)
    assert "Gone.vanished" in message and SUPPORTED_TRANSFORMERS in message
    assert seams._ORIGINALS == was_installed  # nothing half-installed


def test_install_and_uninstall_leave_trainer_as_it_was():
    before = {key: inspect.getattr_static(cls, w.__name__) for key, (cls, w) in seams._SEAMS.items()}
    if seams._ORIGINALS:
        pytest.fail("a previous test left hf_zero installed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no seam mismatch warning on the installed transformers
        seams.install()
    try:
        assert inspect.getattr_static(Trainer, "train") is not before["Trainer.train"]
    finally:
        seams.uninstall()
    assert {key: inspect.getattr_static(cls, w.__name__) for key, (cls, w) in seams._SEAMS.items()} == before


def test_supported_range_is_pyprojects():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in pyproject["project"]["dependencies"]
