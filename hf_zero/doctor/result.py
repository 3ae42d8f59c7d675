"""What one preflight check reports: a name, a status, what was found, and how to fix it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(str, enum.Enum):
    """Outcome of one check. Only FAIL makes ``hf-zero doctor`` exit 1 (and the launcher refuse)."""

    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor's table."""

    name: str
    """Short stable name of the check, e.g. ``"config"``, ``"master port"``."""
    status: Status
    detail: str
    """What was measured or found, naming the file/key/value involved."""
    fix: str = ""
    """What to do about a FAIL or WARN; empty for PASS and SKIP."""

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL


def passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.PASS, detail)


def warned(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.WARN, detail, fix)


def failed(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, fix)


def skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)
