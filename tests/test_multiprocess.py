"""run_on_ranks forks its ranks from a preloaded server (hf_zero/testing/multiprocess.py's note): a
rank still sees the caller's environment as it is at the call, and a changed variable that torch or
transformers may read at import gets freshly spawned ranks instead."""

import os
import sys

from hf_zero.testing import multiprocess
from hf_zero.testing.multiprocess import run_on_ranks


def _what_the_rank_sees(rank, world_size):
    # This module imports no transformers: a rank that holds it got it from the server's preload.
    return os.environ.get("HF_ZERO_T_MP"), os.environ.get("HF_T_IMPORT"), "transformers" in sys.modules


def test_ranks_see_the_callers_environment_and_a_changed_import_time_variable_spawns(monkeypatch):
    monkeypatch.delenv("HF_T_IMPORT", raising=False)
    run_on_ranks(_what_the_rank_sees, 1)  # the server has started, whichever test came first
    # As if it had started with the environment as it is now (an earlier test may have left one set).
    monkeypatch.setattr(multiprocess, "_server_env", multiprocess._import_time_env())
    monkeypatch.setenv("HF_ZERO_T_MP", "set after the server started")  # hf_zero's: read at run time
    forked = run_on_ranks(_what_the_rank_sees, 2)
    assert forked == [("set after the server started", None, True)] * 2, forked

    monkeypatch.setenv("HF_T_IMPORT", "read at import, maybe")
    assert run_on_ranks(_what_the_rank_sees, 1) == [("set after the server started", "read at import, maybe", False)]


def _crash_in_native_code(rank, world_size):
    if rank == 1:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV inside C, no Python exception
    import torch.distributed as dist

    dist.barrier()  # rank 0 waits for the rank that died
    return rank


def test_a_rank_that_crashes_in_native_code_is_named_with_its_python_stack():
    """A rank killed by a fatal signal (a segfault in a compiled kernel, say) reports no traceback of
    its own: run_on_ranks names it, its signal, and the Python stack faulthandler wrote for it."""
    import pytest

    with pytest.raises(multiprocess.RankFailure) as failure:
        run_on_ranks(_crash_in_native_code, 2, timeout=60)
    text = str(failure.value)
    assert "rank 1's process exited with code -11" in text, text
    assert "Segmentation fault" in text and "in _crash_in_native_code" in text, text
