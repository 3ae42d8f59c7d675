"""One uninterrupted run shared by the fault tests that compare a resumed run with it."""

from __future__ import annotations

import pytest

from hf_zero.testing.multiprocess import run_on_ranks
from tests.trainer.test_resume import _run


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """``tests/trainer/test_resume.py``'s job on 2 gloo ranks at stage 2 (6 steps, gradient
    accumulation 2, checkpoints 3 and 6), never interrupted: its losses per step, and its folder
    (read only: copy a checkpoint before changing it)."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run_on_ranks(_run, 2, folder, 2, None, timeout=300)[0], folder
