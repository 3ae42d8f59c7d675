"""Rendering check results: the doctor's table, and the launcher's failures-only message.

Checking and rendering are separate: checks return ``CheckResult``s and never print.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hf_zero.doctor.result import CheckResult, Status

HEADER = ("check", "status", "detail")


def render_table(results: Sequence[CheckResult]) -> str:
    """One line per check; a FAIL or WARN gets a ``fix:`` line under its detail. Ends with a summary."""
    name_w = max([len(HEADER[0])] + [len(r.name) for r in results])
    status_w = max(len(HEADER[1]), max((len(str(s)) for s in Status), default=4))
    indent = " " * (name_w + status_w + 4)
    lines = [f"{HEADER[0]:<{name_w}}  {HEADER[1]:<{status_w}}  {HEADER[2]}",
             f"{'-' * name_w}  {'-' * status_w}  {'-' * len(HEADER[2])}"]
    for r in results:
        lines.append(f"{r.name:<{name_w}}  {str(r.status):<{status_w}}  {r.detail}")
        if r.fix and r.status in (Status.FAIL, Status.WARN):
            lines.append(f"{indent}fix: {r.fix}")
    lines.append(summary(results))
    return "\n".join(lines)


def summary(results: Sequence[CheckResult]) -> str:
    """``3 passed, 1 warning, 1 failed, 2 skipped``."""
    counts = Counter(r.status for r in results)
    parts = [
        f"{counts[Status.PASS]} passed",
        f"{counts[Status.WARN]} warning{'' if counts[Status.WARN] == 1 else 's'}",
        f"{counts[Status.FAIL]} failed",
        f"{counts[Status.SKIP]} skipped",
    ]
    return ", ".join(parts)


def render_failures(results: Sequence[CheckResult]) -> str:
    """The launcher's message: only the FAIL rows, each with its fix (empty if none failed)."""
    failures = [r for r in results if r.failed]
    if not failures:
        return ""
    lines = ["preflight check failed before any rank started (skip these checks with --skip_doctor):"]
    for r in failures:
        lines.append(f"  {r.name}: {r.detail}")
        lines.append(f"    fix: {r.fix}")
    return "\n".join(lines)
