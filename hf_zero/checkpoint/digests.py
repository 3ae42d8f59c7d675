"""Per-rank digests of a sharded checkpoint's files, written at save and checked at every load.

[Note: checkpoint digests]
Missing and truncated files show in sizes; a flipped byte, or a rank's file of another save
copied in, does not: DCP reads it and the run goes on from wrong values. So at save each rank
writes ``hf_zero_digest_rank{r}.json`` next to its data: the run id (drawn once per training
run, the same on every rank), the global step, the world size, and for every file it wrote
(its ``__{r}_*.distcp``; rank 0 also DCP's ``.metadata`` and ``hf_zero_meta.json``) the size
and a digest. ``verify`` (resume, ``sharded.load``, ``hf-zero consolidate``) refuses, naming
the file: a manifest missing or of another run or step than rank 0's, a data file no manifest
lists, a size or digest that differs, a step other than ``trainer_state.json``'s next to it.
A folder without manifests (written before hf_zero recorded them, or with the mode ``off``)
still loads, with a one-line warning that it cannot be verified.

The config key ``checkpoint_digest`` (``configure``, called where a Trainer takes the config)
picks the mode at save (``MODES``), and ``HF_ZERO_CHECKPOINT_DIGEST``, where set, overrides it (it
is the only switch of ``hf-zero consolidate``). The load checks what each manifest recorded
(``off`` at load: identity and sizes only, no hashing):

- ``full`` (default): sha256 of the whole file, read back after DCP has written it. The hash,
  more than the re-read (mostly served by the page cache), costs about as much as the write:
  see docs/checkpoints.md and bench/results/*checkpoint_digest.md.
- ``fast``: sha256 of the size and the first and last ``FAST_SPAN`` bytes: catches files of
  another save and damage at either end, not a flip in the middle of a large file.

Where ranks exist, each hashes a share of the files (file j by rank j mod W) and the lowest
failing file is shared with one all-reduce, so every rank raises the same error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import uuid
import warnings

import torch
import torch.distributed as dist

from hf_zero.checkpoint.errors import CheckpointError

MODE_ENV = "HF_ZERO_CHECKPOINT_DIGEST"
MODES = ("full", "fast", "off")
DEFAULT_MODE = "full"
FAST_SPAN = 1 << 20  # bytes hashed at each end of a file in the fast mode
MANIFEST = "hf_zero_digest_rank{rank}.json"
_MANIFEST_RE = re.compile(r"^hf_zero_digest_rank(\d+)\.json$")
FORMAT, VERSION = "hf_zero-digest", 1
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer's own file, beside hf_zero_sharded/


_CONFIGURED = {"mode": DEFAULT_MODE}  # this process's config key checkpoint_digest


def configure(how: str) -> None:
    """Set this process's mode from the config key ``checkpoint_digest`` (validated there)."""
    if how not in MODES:
        raise AssertionError(f"checkpoint_digest {how!r} is not one of {MODES}; HfZeroConfig validates it")
    _CONFIGURED["mode"] = how


def mode() -> str:
    """The digest mode: ``HF_ZERO_CHECKPOINT_DIGEST`` where set, else the configured one (default ``full``)."""
    value = os.environ.get(MODE_ENV, "").strip().lower() or _CONFIGURED["mode"]
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: allowed values are {', '.join(MODES)}")
    return value


# ---- who wrote a checkpoint ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Identity:
    """The save a file belongs to: the training run and its global step (None outside a Trainer)."""

    run_id: str
    step: int | None


def draw_run_id() -> str:
    """A run id drawn on rank 0 and shared with every rank (a tensor broadcast where ranks exist:
    a collective, every rank calls it at the same point)."""
    raw = torch.frombuffer(bytearray(uuid.uuid4().bytes[:8]), dtype=torch.uint8).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raw = raw.to(_collective_device())
        dist.broadcast(raw, src=0)
    return bytes(raw.cpu().tolist()).hex()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---- save -------------------------------------------------------------------------------------


def manifest_path(path: str, rank: int) -> str:
    return os.path.join(path, MANIFEST.format(rank=rank))


def discard(path: str, rank: int, world_size: int) -> None:
    """Before a save into ``path``: this rank's earlier manifest goes (a save cut short must not
    leave one that vouches for files it no longer describes); rank 0 also removes those of
    ranks this world size does not have (an earlier, larger run)."""
    stale = [manifest_path(path, rank)]
    if rank == 0 and os.path.isdir(path):
        stale += [os.path.join(path, n) for n in os.listdir(path)
                  if (m := _MANIFEST_RE.match(n)) and int(m.group(1)) >= world_size]
    for file in stale:
        if os.path.lexists(file):
            os.unlink(file)


def file_digest(file: str, how: str) -> str:
    """sha256 of ``file`` (``full``), or of its size and first and last ``FAST_SPAN`` bytes (``fast``)."""
    if how not in ("full", "fast"):
        raise AssertionError(f"file_digest: mode {how!r} is not full or fast")
    h = hashlib.sha256()
    with open(file, "rb") as f:
        if how == "full":
            while chunk := f.read(1 << 22):
                h.update(chunk)
        else:
            size = os.fstat(f.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            h.update(f.read(FAST_SPAN))
            f.seek(max(0, size - FAST_SPAN))
            h.update(f.read(FAST_SPAN))
    return h.hexdigest()


def write_manifest(path: str, *, rank: int, world_size: int, files: list[str], identity: Identity) -> str | None:
    """This rank's manifest of ``files`` (names relative to ``path``) in the mode of the
    environment; none in the mode ``off``. Returns its path."""
    how = mode()
    if how == "off":
        return None
    manifest = {
        "format": FORMAT, "version": VERSION, "rank": rank, "world_size": world_size,
        "run_id": identity.run_id, "step": identity.step, "mode": how, "algorithm": "sha256",
        "files": {name: {"size": os.path.getsize(os.path.join(path, name)),
                         "digest": file_digest(os.path.join(path, name), how)} for name in sorted(set(files))},
    }
    target = manifest_path(path, rank)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, target)
    return target


# ---- load -------------------------------------------------------------------------------------

_VERIFIED: set = set()  # (path, stats of every file, mode): checked once per process
_WARNED: set = set()


def _read_manifest(file: str, rank: int) -> dict:
    try:
        with open(file) as f:
            m = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} cannot be read: {error}") from error
    fields = {"rank": int, "world_size": int, "run_id": str, "mode": str, "files": dict}
    if (not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION
            or not all(isinstance(m.get(k), t) for k, t in fields.items())
            or not (m.get("step") is None or isinstance(m.get("step"), int))):
        raise CheckpointError(f"{file} is not an hf_zero digest manifest (format {FORMAT!r} version {VERSION} "
                              f"with {', '.join(fields)} and step)")
    if m["rank"] != rank or m["mode"] not in ("full", "fast"):
        raise CheckpointError(f"{file} holds rank {m['rank']} and mode {m['mode']!r}; expected rank {rank} "
                              "(its file name) and mode full or fast")
    for name, entry in m["files"].items():
        if (os.path.basename(name) != name or not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("digest"), str)):
            raise CheckpointError(f"{file}: entry {name!r} is not a file of this folder with a size and digest")
    return m


def _trainer_step(path: str) -> tuple[str, int | None]:
    file = os.path.join(os.path.dirname(os.path.normpath(os.path.abspath(path))), TRAINER_STATE_NAME)
    try:
        with open(file) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return file, None
    step = state.get("global_step") if isinstance(state, dict) else None
    return file, step if isinstance(step, int) else None


def verify(path: str, needed: list[str], *, world_size: int, distributed: bool) -> None:
    """Refuse the sharded checkpoint folder ``path`` unless its manifests vouch for every file in
    ``needed`` (names relative to ``path``) as one save of ``world_size`` ranks
    ([Note: checkpoint digests]). ``distributed``: every rank of the default group calls this,
    and each hashes a share."""
    names = sorted(os.listdir(path))
    found = {int(m.group(1)): os.path.join(path, n) for n in names if (m := _MANIFEST_RE.match(n))}
    if not found:
        if path not in _WARNED:
            _WARNED.add(path)
            warnings.warn(f"{path} has no hf_zero_digest_rank*.json (saved before hf_zero recorded digests, or with "
                          f"{MODE_ENV}=off): its files cannot be verified", UserWarning, stacklevel=3)
        return
    for r in range(world_size):
        if r not in found:
            raise CheckpointError(f"{manifest_path(path, r)} is missing: a checkpoint of {world_size} ranks has one "
                                  "per rank (the save was cut short, or the folder mixes saves)")
    extra = sorted(r for r in found if r >= world_size)
    if extra:
        raise CheckpointError(f"{found[extra[0]]}: rank {extra[0]} in a checkpoint of {world_size} ranks; it is "
                              "from another save")
    manifests = [_read_manifest(found[r], r) for r in range(world_size)]
    first = manifests[0]
    for r, m in enumerate(manifests):
        if (m["run_id"], m["step"], m["world_size"]) != (first["run_id"], first["step"], world_size):
            raise CheckpointError(
                f"{found[r]} is of run {m['run_id']} step {m['step']} ({m['world_size']} ranks), but {found[0]} of run "
                f"{first['run_id']} step {first['step']} ({world_size} ranks): files of another checkpoint are mixed in"
            )
    state_file, step = _trainer_step(path)
    if step is not None and first["step"] is not None and step != first["step"]:
        raise CheckpointError(f"{found[0]} records step {first['step']}, but {state_file} is at global_step {step}: "
                              f"{os.path.basename(path)}/ is another checkpoint's")
    owner = {name: r for r, m in enumerate(manifests) for name in m["files"]}
    for name in needed:
        if name not in owner:
            raise CheckpointError(f"{os.path.join(path, name)} is not listed in any hf_zero_digest_rank*.json: it was "
                                  f"not written by the save of run {first['run_id']} step {first['step']}")
    entries = sorted((name, r) for name, r in owner.items())
    for name, r in entries:
        file, size = os.path.join(path, name), manifests[r]["files"][name]["size"]
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            raise CheckpointError(f"{file} has {actual if actual is not None else 'no'} bytes, {found[r]} recorded "
                                  f"{size}: the file was changed after the save, or is another checkpoint's")
    if mode() == "off":
        return
    key = (os.path.abspath(path), tuple((n, os.stat(os.path.join(path, n)).st_mtime_ns) for n in names))
    if key in _VERIFIED:
        return
    _hash_check(path, entries, manifests, found, distributed)
    _VERIFIED.add(key)


def _hash_check(path, entries, manifests, found, distributed: bool) -> None:
    share, count = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    bad, detail = len(entries), ""
    for j in range(share, len(entries), count):
        name, r = entries[j]
        recorded = manifests[r]["files"][name]["digest"]
        found_digest = file_digest(os.path.join(path, name), manifests[r]["mode"])
        if found_digest != recorded:
            bad, detail = j, f" (recorded {recorded[:16]}..., found {found_digest[:16]}...)"
            break
    if count > 1:
        flag = torch.tensor([bad], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) != bad:
            bad, detail = int(flag.item()), " (found by another rank)"
    if bad < len(entries):
        name, r = entries[bad]
        raise CheckpointError(
            f"{os.path.join(path, name)} does not match its {manifests[r]['mode']} sha256 digest in {found[r]}{detail}: "
            "the file was changed after the save (damaged, or copied from another checkpoint)"
        )
