"""SLURM: node lists, tasks-per-node strings, and SLURM_* -> torch.distributed variables.

When srun starts `python -m hf_zero.run` once per rank (no torchrun), nothing sets the
variables `init_process_group(init_method="env://")` and the Trainer read. `torch_env_from_slurm`
derives them:

| torch variable | from |
|---|---|
| RANK | SLURM_PROCID |
| WORLD_SIZE | SLURM_NTASKS (SLURM_NPROCS) |
| LOCAL_RANK | SLURM_LOCALID |
| LOCAL_WORLD_SIZE | SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE |
| MASTER_ADDR | first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST (rank 0 runs there) |
| MASTER_PORT | 15000 + SLURM_JOB_ID % 10000 (``job_master_port``) |

Variables already set are kept; nothing is mapped if RANK is set (torchrun started us).
"""

import re
import shutil
import subprocess
from collections.abc import Mapping

DEFAULT_MASTER_PORT = "29500"
"""MASTER_PORT when srun gives no numeric SLURM_JOB_ID (it always does): torchrun's default."""
PORT_BASE = 15000
PORT_SPAN = 10000
"""MASTER_PORT is PORT_BASE + SLURM_JOB_ID % PORT_SPAN, 15000-24999 (PyTorch Lightning's rule), so
two jobs sharing a node rendezvous on different ports unless their ids are equal modulo 10000; a
fixed port would make the second one fail with "address already in use". Every task of a job
derives the same port without talking to the others. The range lies below Linux's default
ephemeral ports (32768-60999), which outgoing connections take at random. Two job steps of one job
running at once on one node share the port: give each its own MASTER_PORT."""
_TASKS_ENTRY = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas that are outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"SLURM node list {nodelist!r} has nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"SLURM node list {nodelist!r} has a ']' without '['")
        elif char == "," and depth == 0:
            items.append(nodelist[start:index])
            start = index + 1
    if depth != 0:
        raise ValueError(f"SLURM node list {nodelist!r} has a '[' without ']'")
    return items + [nodelist[start:]]


def _expand_range_set(body: str, nodelist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; the width of each range's start is kept."""
    values = []
    for part in body.split(","):
        low, dash, high = part.partition("-")
        if not (low.isascii() and low.isdigit()) or (dash and not (high.isascii() and high.isdigit())):
            raise ValueError(f"SLURM node list {nodelist!r}: bad range {part!r} in '[{body}]'")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"SLURM node list {nodelist!r}: range {part!r} runs backwards")
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values


def _expand_item(item: str, nodelist: str) -> list[str]:
    """'rack[1-2]-n[01-02]' -> every combination, left bracket outermost."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_item(rest, nodelist)
    return [prefix + value + tail for value in _expand_range_set(body, nodelist) for tail in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list.

    >>> expand_nodelist("a[01-03,07],b5,c[1-2]")
    ['a01', 'a02', 'a03', 'a07', 'b5', 'c1', 'c2']
    """
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        if not item or item.startswith("["):
            raise ValueError(f"SLURM node list {nodelist!r} has an empty host name")
        hosts.extend(_expand_item(item, nodelist))
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a node list; asks `scontrol show hostnames` only if our parser cannot."""
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError:
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            raise
        result = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=False
        )
        hosts = result.stdout.split()
        if result.returncode != 0 or not hosts:
            raise
        return hosts[0]


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE.

    >>> expand_tasks_per_node("2(x3),1")
    [2, 2, 2, 1]
    """
    counts = []
    for entry in spec.split(","):
        match = _TASKS_ENTRY.match(entry.strip())
        if match is None:
            raise ValueError(f"cannot parse SLURM tasks per node {spec!r}: bad entry {entry!r}")
        count, repeat = match.groups()
        counts.extend([int(count)] * int(repeat or 1))
    return counts


def _local_world_size(environ: Mapping[str, str]) -> str:
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isascii() and per_node.isdigit():
        return per_node
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        raise ValueError(
            "SLURM_PROCID is set but neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is; "
            "start the ranks with srun, or set LOCAL_WORLD_SIZE"
        )
    counts = expand_tasks_per_node(spec)
    node = int(environ.get("SLURM_NODEID", "0"))
    if node >= len(counts):
        raise ValueError(f"SLURM_NODEID {node} is out of range for SLURM tasks per node {spec!r}")
    return str(counts[node])


def job_master_port(environ: Mapping[str, str]) -> str:
    """The job's rendezvous port (see PORT_SPAN): job 4242 -> 19242, job 1234567 -> 19567."""
    job = environ.get("SLURM_JOB_ID", "").strip()
    if not (job.isascii() and job.isdigit()):
        return DEFAULT_MASTER_PORT
    return str(PORT_BASE + int(job) % PORT_SPAN)


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set for a rank srun started without torchrun (see the table above)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    world_size = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
    if world_size is None:
        raise ValueError("SLURM_PROCID is set but SLURM_NTASKS is not; start the ranks with srun")
    derived = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": world_size,
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_PORT": job_master_port(environ),
    }
    if "LOCAL_WORLD_SIZE" not in environ:
        derived["LOCAL_WORLD_SIZE"] = _local_world_size(environ)
    if "MASTER_ADDR" not in environ:
        nodelist = next(
            (environ[name] for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
             if environ.get(name)),
            None,
        )
        if nodelist is None:
            raise ValueError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not; set MASTER_ADDR")
        derived["MASTER_ADDR"] = first_host(nodelist)
    return {name: value for name, value in derived.items() if name not in environ}
