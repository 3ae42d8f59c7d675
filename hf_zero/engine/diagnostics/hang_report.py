"""The hang report the watchdog prints (``watchdog.py``): every rank's status, grouped, and where
the ranks' collective sequences first disagree. Pure formatting of the reports the ranks
published; no communication."""

from __future__ import annotations

import collections

EXIT_CODE = 3  # a rank stopped by the watchdog; 1 is Python's own for an uncaught exception
GATHER_S = 5.0  # how long a stopping rank waits for the others' reports


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _rec_text(seq: int, kind: str, label: str, nbytes: int) -> str:
    label = f' "{label}"' if label else ""
    return f"#{seq} {kind}{label} ({_size(nbytes)})"


def _ranks_text(ranks: list[int]) -> str:
    ranks = sorted(ranks)
    spans, start = [], 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[i - 1] + 1:
            a, b = ranks[start], ranks[i - 1]
            spans.append(str(a) if a == b else f"{a}-{b}")
            start = i
    word = "rank" if len(ranks) == 1 else "ranks"
    return f"{word} {', '.join(spans)}"


def _status(report: dict) -> tuple[str, str]:
    """(what the rank does, where its main thread is): the grouping key and the line."""
    records = report.get("records") or []
    last = records[-1] if records else None
    if report.get("state") == "raised":
        text = f"raised {report.get('error')}"
        if last:
            text += f"; last started {_rec_text(*last[:4])}"
    elif report.get("state") == "waiting":
        seq, kind, label, nbytes, age = report["pending"]
        text = f"waiting {age:.1f} s in {_rec_text(seq, kind, label, nbytes)}"
        later = report.get("last_seq", seq) - seq
        if later > 0:
            text += f" (and {later} later: up to #{report['last_seq']})"
    elif last is None:
        text = "not in an hf_zero collective; started none yet"
    else:
        ago = f", completed {last[4]:.1f} s ago" if last[4] is not None else ""
        text = f"not in an hf_zero collective; last started {_rec_text(*last[:4])}{ago}"
    if report.get("phase"):
        label, age = report["phase"]
        text += f'; phase "{label}" for {age:.1f} s'
    stack = report.get("stack") or []
    return text, f"{report.get('stack_kind', 'main thread at')} {' < '.join(stack)}" if stack else ""


def stall_headline(stalled: int, stuck: dict[int, tuple[str, float, int]], timeout: float) -> str:
    """The first line of a report for ranks in different phases ([Note: phases] in phases.py).

    ``stuck``: rank -> (phase label, seconds in it, phase count) for every rank in its phase
    longer than ``timeout``; ``stalled`` is the rank behind, the others are grouped by phase."""
    label, age, _ = stuck[stalled]
    others: dict[str, list[int]] = collections.defaultdict(list)
    for rank, (other, _, _) in stuck.items():
        if other != label:
            others[other].append(rank)
    parts = []
    for other, ranks in sorted(others.items(), key=lambda kv: min(kv[1])):
        least = min(stuck[r][1] for r in ranks)
        verb = "has" if len(ranks) == 1 else "have"
        parts.append(f'{_ranks_text(ranks)} {verb} been in "{other}" for {least:.1f} s')
    return (f'stalled: rank {stalled} has been in "{label}" for {age:.1f} s while {"; ".join(parts)} '
            f"(comm_timeout_s = {timeout:g})")


def first_disagreement(reports: dict[int, dict]) -> str | None:
    """Where the ranks' recorded collectives first differ, or who has not started what others wait in."""
    by_seq: dict[int, dict[tuple, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for rank, report in reports.items():
        for seq, kind, label, nbytes, *_ in report.get("records") or []:
            by_seq[seq][(kind, label, nbytes)].append(rank)
    for seq in sorted(by_seq):
        variants = by_seq[seq]
        if len(variants) > 1:
            parts = [f"{_ranks_text(ranks)} {_rec_text(seq, *sig)[len(f'#{seq} '):]}"
                     for sig, ranks in sorted(variants.items(), key=lambda kv: min(kv[1]))]
            return f"ranks first disagree at #{seq}: " + "; ".join(parts)
    waiting = {rank: r["pending"][0] for rank, r in reports.items() if r.get("state") == "waiting"}
    if waiting:
        seq = min(waiting.values())
        behind = [rank for rank, r in reports.items() if r.get("last_seq", 0) < seq]
        if behind:
            waiters = [rank for rank, s in waiting.items() if s == seq]
            verb = "waits" if len(waiters) == 1 else "wait"
            return (f"the recorded collectives agree; {_ranks_text(behind)} never started #{seq}, "
                    f"which {_ranks_text(waiters)} {verb} in")
    return None


def format_report(abort: dict, reports: dict[int, dict], world: int, me: int, timeout: float,
                  full: bool = True) -> str:
    """The text every rank prints (one block, each line prefixed ``hf_zero:``).

    ``full=False`` (large jobs, see ``watchdog.FULL_REPORT_RANKS``): this rank's own line only."""
    mine = reports.get(me, {})
    if not full:
        reports = {me: mine}
    lines = [f"watchdog on rank {me} of {world} (host {mine.get('host', '?')}, pid "
             f"{mine.get('pid', '?')}): {abort.get('headline', 'the job is stopping')}"]
    groups: dict[tuple, list[int]] = {}
    for rank in sorted(reports):
        text, where = _status(reports[rank])
        key = (_strip_numbers(text), where)
        groups.setdefault(key, []).append(rank)
    for (_, where), ranks in sorted(groups.items(), key=lambda kv: min(kv[1])):
        text, _ = _status(reports[ranks[0]])
        mark = " (this rank)" if ranks == [me] else f" (this rank: {me})" if me in ranks else ""
        line = f"  {_ranks_text(ranks)}{mark}: {text}"
        lines.append(line + (f"; {where}" if where else ""))
    if not full:
        others = sorted({0, abort.get("rank", 0)} - {me}) if isinstance(abort.get("rank"), int) else [0]
        lines.append(f"  every rank's status and where they disagree: in the report of {_ranks_text(others)}")
    missing = [r for r in range(world) if r not in reports] if full else []
    if missing:
        lines.append(f"  {_ranks_text(missing)}: no report within {GATHER_S:g} s (process gone, or its Python "
                     "thread blocked outside hf_zero collectives)")
    where = first_disagreement(reports) if full else None
    if where:
        lines.append(f"  {where}")
    if abort.get("why") == "raised" and abort.get("rank") == me:
        ending = f"rank {me} ends with its exception (traceback below)"
    else:
        ending = f"rank {me} exits with code {EXIT_CODE}"
    lines.append(f"  {ending} so that the launcher stops the job (comm_timeout_s = {timeout:g}); "
                 "see \"Hangs\" in docs/troubleshooting.md")
    return "".join(f"hf_zero: {line}\n" for line in lines)


def _strip_numbers(text: str) -> str:
    """Group ranks whose status differs only in ages ("waiting 3.1 s" vs "waiting 3.2 s")."""
    import re

    return re.sub(r"\d+\.\d s", "_ s", text)
