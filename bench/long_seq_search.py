"""The search for the longest sequence length that runs, apart from how a length is tried.

`search(probe, ...)` calls `probe(seq_len) -> Outcome` (in `long_seq.py`, one job process) and
returns the longest length that ran and the shortest that did not. Worked example, start 16K,
max 512K, granularity 4K, two bisections, a system whose limit is 100K:

    16K ok, 32K ok, 64K ok, 128K oom       doubling: ran up to 64K, 128K did not
    96K ok                                 bisection 1: (64K + 128K) / 2
    112K oom                               bisection 2: (96K + 128K) / 2
    -> longest 96K, shortest failing 112K

A start that fails halves down (8K, 4K, ... to the granularity) until one runs, then bisects the
same way. An `error` (not a memory limit) or a `skipped` attempt (no time left) ends the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

KINDS = ("ok", "oom", "timeout", "error", "skipped")


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: `ok` (a step ran), `oom`, `timeout` (both: an upper bound),
    `error` (anything else) or `skipped` (not started: no time left)."""

    kind: str
    detail: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Outcome kind {self.kind!r} is not one of {KINDS}")


@dataclass
class SearchResult:
    longest: int | None = None  # longest length that ran
    shortest_fail: int | None = None  # shortest length that did not (oom or timeout)
    stopped_by: str | None = None  # None: the search ran to its end; else "error" or "skipped"
    tried: list[tuple[int, Outcome]] = field(default_factory=list)


def search(probe: Callable[[int], Outcome], lengths: list[int] | None, start: int, max_len: int,
           granularity: int, bisections: int) -> SearchResult:
    """Explicit `lengths` are each tried once, in order; otherwise the search in the docstring."""
    result = SearchResult()

    def attempt(seq_len: int) -> bool:
        """Try one length; False when the search must stop."""
        outcome = probe(seq_len)
        result.tried.append((seq_len, outcome))
        if outcome.kind in ("error", "skipped"):
            result.stopped_by = outcome.kind
            return False
        if outcome.kind == "ok":
            result.longest = max(result.longest or 0, seq_len)
        elif result.shortest_fail is None or seq_len < result.shortest_fail:
            result.shortest_fail = seq_len
        return True

    if lengths is not None:
        for seq_len in lengths:
            if not attempt(seq_len):
                break
        return result

    seq_len = start
    while attempt(seq_len) and result.longest == seq_len and seq_len < max_len:
        seq_len = min(2 * seq_len, max_len)  # doubling while it runs
    if result.stopped_by:
        return result
    if result.longest is None:  # the start failed: halve down
        seq_len = start // 2 // granularity * granularity
        while seq_len >= granularity and attempt(seq_len) and result.longest is None:
            seq_len = seq_len // 2 // granularity * granularity
        if result.stopped_by or result.longest is None:
            return result
    for _ in range(bisections):
        if result.shortest_fail is None:
            break
        mid = (result.longest + result.shortest_fail) // 2 // granularity * granularity
        if mid <= result.longest or not attempt(mid):
            break
    return result
