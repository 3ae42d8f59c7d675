"""docs/choosing-a-stage.md's decision table is what hf_zero/stage_choice.py computes from the estimator."""

from __future__ import annotations

from pathlib import Path

from hf_zero.estimate import ParamCounts
from hf_zero.stage_choice import GiB, SETUPS, USABLE, choose, per_rank_bytes, render_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "choosing-a-stage.md"


def test_doc_table_is_the_computed_one():
    assert "\n" + render_markdown() + "\n" in DOC.read_text(), (
        "docs/choosing-a-stage.md is stale: paste the output of python -m hf_zero.stage_choice into it")


def test_choose_takes_the_first_setup_that_fits():
    counts = ParamCounts(units=((4_000_000,) * 4 + (1_000_000,),), root_index=None, hidden_size=1024)
    sizes = [per_rank_bytes(counts, 0, setup)[0] for setup in SETUPS]
    for gib in (0.02, 0.05, 0.1, 0.5):
        chosen = choose(counts, 0, int(gib * GiB))
        fitting = [setup for setup, size in zip(SETUPS, sizes) if size <= USABLE * gib * GiB]
        assert (chosen[0] if chosen else None) == (fitting[0] if fitting else None)
    assert choose(counts, 0, 1) is None
