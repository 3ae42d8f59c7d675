"""``offload_optimizer.device_share: "auto"``: the device leg's share chosen from measured rates.

[Note: leg share] The device leg ([Note: device leg] in device_leg.py) pays only where the copy
engines add bandwidth that the host cores lack; where they take it from the cores (one memory
system feeds both), the CPU's part slows down and the step is no shorter. Which holds, and the
share at which the two legs end together, depends on the machine (host memory channels, the host
link, the cores' own rate), so "auto" measures it on the waiting steps themselves, after the
verdict, as a feedback:

- ``BASELINE``: the share is 0 for the first ``BASELINE_STEPS`` waiting steps with optimizer
  state; their post-verdict host step gives the CPU's time per element alone (the least seen).
- ``TUNING``: from ``START``, each waiting step that used the leg gives the two legs' rates at
  once (elements over the time from the verdict to each leg's last write back: the CPU's from
  the host clock, the device's from device events); the share that would end both together is
  ``leg / (cpu + leg)``, and the share moves halfway there (bounded by ``LIMIT``: the CPU keeps a
  part, and the device's copies stay below its memory). A step with the leg is compared with
  the CPU alone: slower per element than the baseline less ``MARGIN`` on ``MISSES`` waiting steps
  in a row, and the leg is turned off.
- ``OFF``: the share stays 0 for the rest of the run, which is then the host step as without it.

A step whose chunks were all stepped during backward (speculation that stood) gives no sample;
one that speculated on part of them gives one from the chunks that waited. The share changes only
which chunks the device steps, never what is computed (within the two kernels' rounding, as for
a fixed share). Each rank chooses its own share (its own host cores and link); no collective
depends on it. The run report gives the phase, the share and the rates seen
(``ranks[].device_leg``).
"""

from __future__ import annotations

import enum
import logging

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    BASELINE = "baseline"  # share 0: the CPU's rate alone
    TUNING = "tuning"  # the leg runs, its share follows the measured rates
    OFF = "off"  # the leg did not shorten the step: share 0 from now on


class LegShare:
    """The feedback of [Note: leg share]: ``share`` is the share to use at the next waiting step;
    ``record`` takes what a waiting step measured after its verdict."""

    BASELINE_STEPS = 2
    START = 0.3
    LIMIT = 0.75
    MARGIN = 0.03
    MISSES = 2

    def __init__(self) -> None:
        self.phase = Phase.BASELINE
        self.share = 0.0
        self.alone: float | None = None  # seconds per element, the CPU alone after the verdict (least seen)
        self.rates: tuple[float, float] | None = None  # elements/s of the CPU and of the leg, last sample
        self.samples = 0
        self._baselines = 0
        self._misses = 0

    def record(self, cpu_elements: int, cpu_seconds: float, leg_elements: int, leg_seconds: float) -> None:
        """One waiting step after its verdict: the CPU stepped ``cpu_elements`` by ``cpu_seconds``
        after it, the device leg ``leg_elements`` by ``leg_seconds`` (0, 0 when it stepped none)."""
        if cpu_elements + leg_elements == 0 or self.phase is Phase.OFF:
            return
        self.samples += 1
        if leg_elements == 0:
            if cpu_elements and cpu_seconds > 0:
                per = cpu_seconds / cpu_elements
                self.alone = per if self.alone is None else min(self.alone, per)
            if self.phase is Phase.BASELINE:
                self._baselines += 1
                if self._baselines >= self.BASELINE_STEPS and self.alone is not None:
                    self.phase, self.share = Phase.TUNING, self.START
            return
        if self.phase is not Phase.TUNING or leg_seconds <= 0:
            return
        per = max(cpu_seconds, leg_seconds) / (cpu_elements + leg_elements)
        if self.alone is not None and per > self.alone * (1.0 - self.MARGIN):
            self._misses += 1
            if self._misses >= self.MISSES:
                self.phase, self.share = Phase.OFF, 0.0
                logger.info("offload_optimizer.device_share 'auto': the device leg did not shorten the host step "
                            "(%.3g ns an element with it, %.3g alone); the CPU steps everything from now on",
                            per * 1e9, self.alone * 1e9)
                return
        else:
            self._misses = 0
        leg_rate = leg_elements / leg_seconds
        cpu_rate = cpu_elements / cpu_seconds if cpu_elements and cpu_seconds > 0 else None
        self.rates = (cpu_rate or 0.0, leg_rate)
        target = self.LIMIT if cpu_rate is None else leg_rate / (cpu_rate + leg_rate)
        self.share = min(self.LIMIT, max(0.0, self.share + 0.5 * (target - self.share)))

    def summary(self) -> dict:
        """For the run report: the phase, the share now and what it was chosen from."""
        return {"phase": self.phase.value, "share": round(self.share, 4), "samples": self.samples,
                "cpu_ns_per_element_alone": None if self.alone is None else round(self.alone * 1e9, 4),
                "rates": None if self.rates is None else {"cpu": round(self.rates[0]), "device": round(self.rates[1])}}
