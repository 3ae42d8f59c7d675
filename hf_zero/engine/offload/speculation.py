"""Speculation then validation: the host step overlaps backward with clipping on.

[Note: speculation] With clipping (``max_grad_norm`` > 0) the scale of every grad depends on the
global norm, known only once backward has ended, so the host step of optimizer offload
(host_step.py) would wait for it. Instead (SuperOffload, ASPLOS'26), each chunk whose grads are
down is stepped during backward *as if no clipping were needed* (scale 1), after a copy of what
the step changes is kept (``Snapshots``: the chunk's fp32 masters and optimizer state, AdamW's
``step`` included); at the optimizer step the norm is known and the step is validated:

    backward:    [grads b0][grads b1] ...                 [grads bN]  norm  step
    CPU worker:      [keep c0 | step c0][keep c1 | step c1]   [step c2]     [step c3] ...
                                                               (norm known: no copy kept)

- no clipping needed (the clip coefficient is exactly 1, or no clip was asked for): the
  speculative steps *are* the step, bit for bit: the waiting path multiplies by nothing then;
- clipping needed, or a norm that is not finite (coefficient below 1, or NaN): each
  speculatively stepped chunk gets its copy back and is stepped again with the clipped grads,
  as the waiting path steps it (a NaN coefficient makes NaN params there too);
- no optimizer step at all (an fp16 overflow skips it, or a loop that does): each speculatively
  stepped chunk gets its copy back, and nothing else happens.

A chunk the worker starts after the verdict is stepped once, with the verdict's scale, and keeps
no copy: only what runs before the norm is known costs a copy. Its lifecycle in a step is a
``ChunkStep``, the step's a ``Verdict``.

What it costs: per speculated element a copy of the master and of the optimizer's per-element
state before its step (AdamW: 12 bytes written, read back only for a redo), on the worker. Host
memory for the copies: at most ``SpeculationPolicy.budget`` of the offloaded elements (AdamW:
12 bytes each, so 3 bytes per offloaded element at the default 0.25; the copies of one chunk at
least), allocated the first time and reused (released after ``RELEASE_AFTER`` steps in a row
without speculation: [Note: idle copies]), and never more than leaves ``HOST_RESERVE`` of the
host's available memory (at a run's first step counting the optimizer state that step is about to
create, which ``MemAvailable`` does not show yet; ``host_share`` "auto" leaves room for the copies:
[Note: host share] in split_tier.py). A chunk beyond the budget waits for the norm (``HELD``) and is then
stepped once, still overlapping the next forward. When clipping fired lately speculation waits
(``SpeculationPolicy``): a clipping streak takes the waiting path and costs no copies, no redos.

Only chunks in host memory speculate: a chunk of the NVMe tier is on disk between its steps, and
undoing its step would need a copy of disk state, so it is ``HELD`` whatever the policy says and
stepped once after the verdict (then overlapping the next forward). Which chunks those are is
decided in one place, ``HostStep.overlap``: the chunks none of whose buckets the tier keeps on
disk (``StateTier.on_disk_of``), given to ``Speculation`` as ``speculable``. So the host tier's
chunks may all speculate, the NVMe tier's none, and a host/NVMe split's host-memory chunks as the
host tier's do (the same policy, its counters and the run report's ``host_steps_redone``
included, and the same budget, a share of all offloaded elements) while its NVMe chunks wait
([Note: host share] in split_tier.py).
"""

from __future__ import annotations

import enum
import threading

import torch

from hf_zero.engine.diagnostics.labels import labelled
from hf_zero.engine.offload.host_memory import meminfo

HOST_RESERVE = 0.1  # of the host's memory: snapshots are not allocated into it (MemAvailable)
RELEASE_AFTER = 8  # steps in a row without speculation, after which the copies' buffers go ([Note: idle copies])
DEFAULT_BUDGET = 0.25  # SpeculationPolicy's budget: a share of the offloaded elements


class Verdict(enum.Enum):
    """One step's, as the host step sees it: ``IDLE`` -> ``OPEN`` -> one of the last three -> ``IDLE``."""

    IDLE = "idle"  # between steps: no chunk of this step is down yet
    OPEN = "open"  # chunks are coming down and the global norm is not known
    STOOD = "stood"  # no clipping needed: speculative steps are the step
    CLIPPED = "clipped"  # clipping needed or a norm not finite: speculative steps redone with the scale
    SKIPPED = "skipped"  # the optimizer step never came: speculative steps undone


class ChunkStep(enum.Enum):
    """One chunk's, within a step."""

    HELD = "held"  # its grads are down; it waits for the verdict (policy or budget)
    QUEUED = "queued"  # handed to the worker before the verdict
    SPECULATED = "speculated"  # stepped at scale 1 before the verdict; its copy kept
    FINAL = "final"  # stepped with the verdict's scale (or its speculation stood)
    RESTORED = "restored"  # its speculative step undone; the step was skipped


class Action(enum.Enum):
    """What the worker does with a chunk it starts (``Speculation.start``)."""

    SPECULATE = "speculate"  # keep a copy, step at scale 1
    STEP = "step"  # step with the verdict's scale
    REDO = "redo"  # restore the copy, step with the verdict's scale
    NOTHING = "nothing"  # the step was skipped


class SpeculationPolicy:
    """When to speculate, and how much; the counters for the run report. The engine's, so that
    it outlives a re-layout (each ``HostStep`` makes its ``Speculation`` from it).

    ``budget``: the share of the offloaded elements whose copies may be kept in one step (at
    least one chunk's when above 0). ``max_backoff``: after a step whose speculation had to be
    redone, speculation waits for 1, 2, 4, ... up to this many steps in a row without clipping."""

    def __init__(self, *, budget: float = DEFAULT_BUDGET, max_backoff: int = 64) -> None:
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"speculation budget must be in [0, 1] (a share of the offloaded elements), got {budget}")
        if max_backoff < 1:
            raise ValueError(f"speculation max_backoff must be >= 1 (steps), got {max_backoff}")
        self.budget, self.max_backoff = budget, max_backoff
        self._wait = 0  # steps without clipping still needed before speculating again
        self._backoff = 1
        self.speculated_steps = 0  # steps with a chunk stepped before the norm was known
        self.redone_steps = 0  # ... of which redone (clipped, not finite) or undone (skipped)
        self.clipped_steps = 0  # steps whose verdict was CLIPPED or SKIPPED, speculated or not

    def speculate_now(self) -> bool:
        return self.budget > 0 and self._wait == 0

    def record(self, verdict: Verdict, speculated: bool) -> None:
        """A step's verdict; ``speculated``: a chunk of it was stepped before it."""
        self.speculated_steps += speculated
        if verdict is Verdict.STOOD:
            if speculated:
                self._backoff = 1
            self._wait = max(0, self._wait - 1)
            return
        self.clipped_steps += 1
        if speculated:
            self.redone_steps += 1
            self._backoff = min(2 * self._backoff, self.max_backoff)
        self._wait = self._backoff


class Snapshots:
    """The copies that undo a chunk's speculative step: per stepped piece its master values and
    its optimizer state (None: it had none yet). Buffers are kept per piece and reused."""

    def __init__(self) -> None:
        self._buffers: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}  # piece -> kind -> copy
        self._saved: dict[int, list[tuple[torch.nn.Parameter, dict | None]]] = {}  # chunk -> what keep saw

    @labelled("hf_zero::speculation_keep")
    @torch.no_grad()
    def keep(self, c: int, pieces: list, state: dict) -> None:
        """Before chunk ``c``'s speculative step: copy what the step of ``pieces`` changes."""
        saved = []
        for piece in pieces:
            buffers = self._buffers.setdefault(piece, {})
            _copy_into(buffers, "\0master", piece)  # (a key no optimizer state uses)
            s = state.get(piece)
            saved.append((piece, None if s is None else
                          {k: _copy_into(buffers, k, v) if torch.is_tensor(v) else v for k, v in s.items()}))
        self._saved[c] = saved

    @labelled("hf_zero::speculation_restore")
    @torch.no_grad()
    def restore(self, c: int, state: dict) -> None:
        """Chunk ``c``'s masters and optimizer state as ``keep`` found them."""
        for piece, saved in self._saved.pop(c):
            piece.copy_(self._buffers[piece]["\0master"])
            if saved is None:
                state.pop(piece, None)
                continue
            live = state.get(piece, {})
            back = {}
            for k, v in saved.items():
                if not torch.is_tensor(v):
                    back[k] = v
                elif torch.is_tensor(live.get(k)) and live[k].shape == v.shape and live[k].dtype == v.dtype:
                    back[k] = live[k].copy_(v)  # in place: views of it (checkpoints) stay right
                else:
                    back[k] = v.clone()
            state[piece] = back

    def forget(self) -> None:
        """The step is over: no copy is needed any more (the buffers stay for the next)."""
        self._saved.clear()

    def release(self) -> None:
        """Let the buffers go (between steps: no copy is saved)."""
        self._saved.clear()
        self._buffers.clear()

    def nbytes(self) -> int:
        """Bytes of the buffers (the worker may be adding some: counted from copies of the dicts)."""
        return sum(t.numel() * t.element_size() for b in list(self._buffers.values()) for t in list(b.values()))


def _copy_into(buffers: dict, key: str, src: torch.Tensor) -> torch.Tensor:
    dst = buffers.get(key)
    if dst is None or dst.shape != src.shape or dst.dtype != src.dtype:
        dst = buffers[key] = torch.empty_like(src, device="cpu")
    return dst.copy_(src)


class Speculation:
    """One host step's speculation ([Note: speculation]): the verdict of the current step, each
    chunk's ``ChunkStep``, the copies. The main thread hands chunks over (``hand_over``) and
    gives the verdict (``validate``, ``skip``); the worker asks what to do with each chunk it
    starts (``start``); a lock keeps the two in step.

    ``chunk_numel``: each chunk's elements; ``bytes_per_element``: of its copies (4 for the
    master plus the optimizer's per-element state); ``speculable``: per chunk, whether a copy can
    undo its step (its masters and state are in host memory between steps; None: every chunk).
    The others are always ``HELD``."""

    def __init__(self, policy: SpeculationPolicy, chunk_numel: list[int], bytes_per_element: int,
                 speculable: list[bool] | None = None) -> None:
        self.policy = policy
        self.chunk_numel, self.bytes_per_element = chunk_numel, bytes_per_element
        self.speculable = [True] * len(chunk_numel) if speculable is None else speculable
        self.budget = policy.budget * sum(chunk_numel)
        self.snapshots = Snapshots()
        self.verdict = Verdict.IDLE
        self.scale: float | None = None  # the verdict's clip coefficient (None or 1.0: none)
        self.chunks: dict[int, ChunkStep] = {}
        self._speculating = False  # this step: the policy said so
        self._reserved = 0  # elements of the chunks queued before the verdict, this step
        self._kept: set[int] = set()  # chunks whose copies have buffers (last steps)
        self._promised = 0  # bytes ``_room_for`` granted and not yet allocated ([Note: promised room])
        # chunks admitted without optimizer state: bytes of state copies their next speculative step adds
        self._growth: dict[int, int] = {}
        self._growing: set[int] = set()  # of those, the ones that speculate with state this step
        self._idle = 0  # steps in a row the policy did not let speculate ([Note: idle copies])
        self._lock = threading.Lock()

    def _expect(self, *verdicts: Verdict) -> None:
        if self.verdict not in verdicts:
            raise AssertionError(f"speculation: verdict {self.verdict.name}, expected {[v.name for v in verdicts]}")

    def hand_over(self, c: int, stateless: bool = False) -> bool:
        """Chunk ``c``'s grads are down (before the verdict): True if it goes to the worker now
        (it may speculate), False if it waits for the verdict (``HELD``: not ``speculable``, or
        the policy, the budget or the host's memory says no). ``stateless``: its pieces have no
        optimizer state yet, which this step creates in host memory (``_room_for`` counts it)."""
        with self._lock:
            if self.verdict is Verdict.IDLE:
                self.verdict, self._speculating, self._reserved = Verdict.OPEN, self.policy.speculate_now(), 0
            self._expect(Verdict.OPEN)
            n = self.chunk_numel[c]
            fits = self._reserved == 0 or self._reserved + n <= self.budget
            if self._speculating and self.speculable[c] and fits and self._room_for(c, stateless):
                self._reserved += n
                self.chunks[c] = ChunkStep.QUEUED
                return True
            self.chunks[c] = ChunkStep.HELD
            return False

    def _room_for(self, c: int, stateless: bool) -> bool:
        """Whether chunk ``c``'s copies fit in host memory without eating ``HOST_RESERVE``, checked
        the first time ``c`` would speculate. The copies' buffers grow to their full size at its
        first speculative step after it has optimizer state; ``MemAvailable`` does not yet count a
        ``stateless`` chunk's state (its first step makes it), so that is counted here too."""
        # [Note: promised room] The room granted earlier in this step is subtracted from the
        # reading: a chunk's buffers are allocated by the worker when it starts the chunk, and
        # grads come down faster than it steps, so during a run's first backward several chunks
        # ask while ``MemAvailable`` still shows the room the ones before them were promised (a
        # 13B run on an H100 admitted its whole budget that way and left 0.3 GiB of 125 free).
        # A reading taken after some of those buffers exist counts them twice, which errs toward
        # holding a chunk; ``end_step`` (every chunk done) clears what was allocated. Not all of a
        # ``stateless`` chunk's promise is: its first step copies only its masters (there is no
        # state to copy yet) and creates the state; the state's copies come at its next speculative
        # step. That part stays promised until then (``_growth``), or other chunks admitted in
        # between would read a ``MemAvailable`` that does not show it coming.
        #
        # [Note: state to come] At a run's first step every chunk is stateless: the state of the
        # chunks not yet admitted (handed over later, or held) is also made during this step, after
        # this reading. So a stateless chunk's room leaves out their state too. A 7B run (ratio 1, a
        # 125 GiB host) admitted a quarter of its chunks' copies against readings that did not show
        # the 50 GiB of moments the step was about to create, and the kernel killed it
        # (bench/results/h100_session19_summary.md).
        if c in self._kept:
            if not stateless and c in self._growth:
                self._growing.add(c)  # its state's copies are made this step: promised until end_step
            return True
        got = meminfo()
        needed = self.chunk_numel[c] * (self.bytes_per_element + (self.bytes_per_element - 4) * stateless)
        to_come = 0
        if stateless:  # [Note: state to come]: the others not admitted make their state this step too
            to_come = (self.bytes_per_element - 4) * sum(
                n for o, n in enumerate(self.chunk_numel)
                if o != c and o not in self._kept and self.chunks.get(o, ChunkStep.HELD) is ChunkStep.HELD)
        if got is not None and got[0] - self._promised - to_come - needed < HOST_RESERVE * got[1]:
            return False
        self._promised += needed
        self._kept.add(c)
        if stateless:
            self._growth[c] = self.chunk_numel[c] * (self.bytes_per_element - 4)
        return True

    def start(self, c: int) -> tuple[Action, float | None]:
        """On the worker, as it starts chunk ``c``: what to do, and with which clip scale."""
        with self._lock:
            state = self.chunks[c]
            if self.verdict is Verdict.OPEN:
                if state is not ChunkStep.QUEUED:
                    raise AssertionError(f"chunk {c} started before the verdict in state {state.name}")
                self.chunks[c] = ChunkStep.SPECULATED
                return Action.SPECULATE, None
            self._expect(Verdict.STOOD, Verdict.CLIPPED, Verdict.SKIPPED)
            if self.verdict is Verdict.SKIPPED:
                return Action.NOTHING, None
            self.chunks[c] = ChunkStep.FINAL
            return (Action.REDO if state is ChunkStep.SPECULATED else Action.STEP), self.scale

    def validate(self, scale: float | None) -> tuple[list[int], list[int]]:
        """At the optimizer step, with the clip coefficient (None: no clipping asked for): the
        chunks to step again (speculated, clipping needed) and those never handed over (held);
        both go to the worker now. Records the verdict with the policy."""
        with self._lock:
            self._expect(Verdict.OPEN)
            stands = scale is None or scale == 1.0  # NaN: not equal, so a redo (as the waiting path does)
            self.verdict, self.scale = (Verdict.STOOD if stands else Verdict.CLIPPED), scale
            speculated = [c for c, s in self.chunks.items() if s is ChunkStep.SPECULATED]
            held = [c for c, s in self.chunks.items() if s is ChunkStep.HELD]
            if stands:
                for c in speculated:
                    self.chunks[c] = ChunkStep.FINAL
                self.snapshots.forget()
            self.policy.record(self.verdict, bool(speculated))
            return ([] if stands else speculated), held

    def skip(self) -> list[int]:
        """The step ends without an optimizer step: the chunks to restore (speculated). Chunks
        the worker starts from now on are left alone."""
        with self._lock:
            self._expect(Verdict.OPEN)
            self.verdict = Verdict.SKIPPED
            speculated = [c for c, s in self.chunks.items() if s is ChunkStep.SPECULATED]
            for c in speculated:
                self.chunks[c] = ChunkStep.RESTORED
            self.policy.record(self.verdict, bool(speculated))
            return speculated

    @property
    def open(self) -> bool:
        """Chunks of this step were handed over and its verdict is not known."""
        return self.verdict is Verdict.OPEN

    @property
    def decided(self) -> bool:
        """This step's verdict is known and ``end_step`` has not come yet."""
        return self.verdict in (Verdict.STOOD, Verdict.CLIPPED, Verdict.SKIPPED)

    def end_step(self) -> None:
        """Every chunk of the step is done (``HostStep.settle``): back to ``IDLE``. A step still
        ``OPEN`` (settled before its optimizer step) stays open."""
        with self._lock:
            if self.verdict in (Verdict.IDLE, Verdict.OPEN):
                return
            self.verdict, self.scale, self.chunks = Verdict.IDLE, None, {}
            for c in self._growing:  # their state's copies exist now
                self._growth.pop(c, None)
            self._growing.clear()
            self._promised = sum(self._growth.values())  # [Note: promised room]: not yet allocated
            self.snapshots.forget()
            # [Note: idle copies] The copies' buffers are kept from step to step for the next
            # speculation, but a clipping streak stops it (``SpeculationPolicy``: the wait ends only
            # with steps that do not clip), and a run that clips at every step would hold them for
            # nothing: a 13B run on an H100 held 23 GiB of them after its first step. After
            # ``RELEASE_AFTER`` steps in a row without speculation they go, and the chunks' room is
            # checked again when speculation resumes (a few steps in a row: not every other step,
            # which would allocate them again and again).
            self._idle = 0 if self._speculating else self._idle + 1
            if self._idle >= RELEASE_AFTER and self._kept:
                self.snapshots.release()
                self._kept.clear()
                self._growth.clear()  # re-admitted chunks are promised in full again
                self._promised = 0
