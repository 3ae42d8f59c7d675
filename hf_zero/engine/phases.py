"""What this rank is doing, for the hang watchdog: one label and since when.

[Note: phases]
The flight recorder (``flight_recorder.RECORDER``) sees hf_zero's own collectives only. The Trainer runs
collectives of its own (the token count and logged loss all-gathers between steps, the flops
broadcast and barriers of a checkpoint save), and a rank can stall anywhere (a slow filesystem,
a data loader, a callback). A rank that waits in such a collective has nothing pending in the
recorder, so before phases nothing reported it.

So the Trainer seams name what the rank is doing: ``set_phase("step 12: forward and backward")``,
``set_phase("checkpoint save checkpoint-4: barrier (every rank's part written)")`` (the callback in
``hf_zero/trainer/phase_callback.py`` and the checkpoint seams). A label replaces the previous one
and its time starts anew, so a phase's age is how long the rank has been at exactly this point.
The watchdog thread publishes the current phase in the store (when it changed since its last
poll) and, once this rank's phase is older than ``comm_timeout_s``, reads the others'. Two ranks
in *different* phases, both for longer than ``comm_timeout_s``, cannot both be making progress
(in a data-parallel job every rank passes the same points), so the job is stopped with a report
that names the stalled rank and where the others wait. The stalled rank is the one behind: every
rank sets the same phases in the same order (no seam sets one on some ranks only), so the rank
that has entered the fewest (``Phase.seq``) stopped there, while the others moved on and then
waited (among ranks as far, one not waiting in a collective); ages alone cannot tell, as a rank
stalls milliseconds before the others block. Ranks in
the same phase (every rank in a long evaluation batch or a slow save) are left alone: they agree.
Within one phase, the watchdog tells a waiting rank from a stalled one by where its main thread
is: one that has been inside a single ``torch.distributed`` call for longer than the timeout
publishes its phase with ``"; waiting in torch.distributed <function>"`` added, which then differs
from the stalled rank's (a data loader that hangs on one rank while the others wait in the
Trainer's token-count all-gather). What stays unseen: a stall where the others wait in the same
phase in a collective that does not block in Python (NCCL returns at once and waits later, in
``.item()``), unless it is one of hf_zero's own (the flight recorder sees those).

Labels carry the step number, so two ranks at the same point of different steps differ. Times
are wall-clock (``time.time()``) so that ranks on different hosts compare them; NTP keeps
cluster clocks within milliseconds of each other, far below any useful ``comm_timeout_s``.

Setting a phase is a counter and one tuple (no lock, no communication): the watchdog thread reads
one tuple, which Python replaces atomically.
"""

from __future__ import annotations

import time
from typing import NamedTuple


class Phase(NamedTuple):
    label: str
    since: float  # time.time() when this rank entered it
    seq: int  # how many phases this process has entered (this one included)


_CURRENT: list[Phase | None] = [None]
_COUNT = [0]


def set_phase(label: str) -> None:
    """This rank is now at ``label`` (replacing the previous phase; its age starts at 0)."""
    _COUNT[0] += 1
    _CURRENT[0] = Phase(label, time.time(), _COUNT[0])


def current() -> Phase | None:
    """The phase last set, or None (outside training: nothing set, or cleared)."""
    return _CURRENT[0]


def clear() -> None:
    """No phase: the rank is outside the points the seams mark (it is compared with no one)."""
    _CURRENT[0] = None
