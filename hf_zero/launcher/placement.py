"""Where the ranks of a tensor-parallel group run: inside one node, checked before any rank starts.

[Note: rank order]
torchrun numbers ranks node by node (its agents' ranks follow the node ranks, each node's local
ranks in order; srun's default block distribution does the same): node k holds the global ranks
from the sum of the earlier nodes' process counts on. The (dp, tp) mesh is tp-inner
(``hf_zero/tensor_parallel/mesh.py``): the tp group of rank r is ``[r - r % tp, ..., r - r % tp + tp - 1]``.
So every tp group lies inside one node exactly when tp divides every node's process count (each node
then starts at a multiple of tp). Worked example, 2 nodes:

    2 processes per node, tp 2:  node 0 = ranks 0 1 | node 1 = ranks 2 3
                                 tp groups {0, 1}, {2, 3}: inside a node; dp groups {0, 2}, {1, 3} cross
    3 processes per node, tp 2:  node 0 = ranks 0 1 2 | node 1 = ranks 3 4 5
                                 tp group {2, 3}: rank 2 on node 0, rank 3 on node 1

A tp group spanning nodes would still compute the right thing, but its all-reduces (two per decoder
block in forward, and the colwise inputs' in backward, every micro-step) would all cross the link
between nodes, the slowest one. ``hf-zero launch`` refuses that layout (``check_tp_placement``), and
``hf_zero.run`` under another launcher warns of it (``spanning_warning``); only the dp collectives (ZeRO's reduce-scatters and all-gathers, once per bucket per step) should
cross nodes.
"""

from collections.abc import Mapping, Sequence

from hf_zero.launcher.args import LaunchOptions
from hf_zero.launcher.resources import Hosts


def node_process_counts(options: LaunchOptions, hosts: Hosts) -> list[int]:
    """Processes per node in node-rank order: each hostfile host's ids, else ``--num_nodes`` nodes
    of this machine's count (the torchrun and slurm launchers start the same count on every node)."""
    if options.hostfile is not None:
        return [len(ids) for ids in hosts.values()]
    per_node = len(next(iter(hosts.values())))
    return [per_node] * (options.num_nodes or 1)


def node_ranks(counts: Sequence[int]) -> list[range]:
    """Each node's global ranks, in the launcher's order ([Note: rank order]).

    >>> node_ranks([2, 2])
    [range(0, 2), range(2, 4)]
    """
    out, start = [], 0
    for count in counts:
        out.append(range(start, start + count))
        start += count
    return out


def check_tp_placement(tp: int, counts: Sequence[int], *, source: str, hosts: Sequence[str] = ()) -> None:
    """ValueError unless every tp group of ``tp`` neighbouring ranks lies inside one node.

    ``counts``: processes per node (``node_process_counts``); ``hosts``: their names, for the message.
    A tp that does not divide the world size is left to the config's own check, which names the world
    size (``resolve_config``, the launch preflight); so is one node."""
    if tp <= 1 or len(counts) <= 1 or sum(counts) % tp:
        return
    # the world is a multiple of tp: once every node but the last runs a multiple of tp, so does the last
    for node, (count, ranks) in enumerate(zip(counts[:-1], node_ranks(counts))):
        if count % tp == 0:
            continue
        last = ranks[-1]
        group = range(last - last % tp, last - last % tp + tp)
        name = f" ({hosts[node]})" if node < len(hosts) else ""
        allowed = [d for d in range(1, min(counts) + 1) if all(c % d == 0 for c in counts)]
        raise ValueError(
            f"tensor_parallel.autotp_size = {tp} in {source} does not divide the {count} processes of node "
            f"{node}{name}: the tensor-parallel group of ranks {group.start}..{group.stop - 1} would span nodes "
            f"{node} and {node + 1}, and its all-reduces (every split layer, every micro-step) would cross the "
            f"link between them. Allowed autotp_size for {list(counts)} processes per node: {allowed}; or run a "
            f"multiple of {tp} processes on every node (--nproc_per_node, hostfile slots)")


def spanning_warning(tp: int, environ: Mapping[str, str]) -> str | None:
    """For ranks another launcher started (torchrun, srun: ``hf_zero.run``): one line saying that tp
    groups span nodes, from WORLD_SIZE and LOCAL_WORLD_SIZE (the same on every node, as torchrun's
    --nproc_per_node and srun's --ntasks-per-node make it); None when they do not, or it cannot tell.
    A warning, not a refusal: the job computes the same, only slower (``hf-zero launch`` refuses it)."""
    world, local = environ.get("WORLD_SIZE", ""), environ.get("LOCAL_WORLD_SIZE", "")
    if not (world.isascii() and world.isdigit() and local.isascii() and local.isdigit()):
        return None
    world_size, per_node = int(world), int(local)
    if tp <= 1 or per_node < 1 or world_size <= per_node or world_size % per_node or world_size % tp:
        return None
    if per_node % tp == 0:
        return None
    last = per_node - 1
    return (f"hf_zero: warning: tensor_parallel.autotp_size = {tp} does not divide the {per_node} ranks per node "
            f"(LOCAL_WORLD_SIZE): tensor-parallel groups span nodes (ranks {last - last % tp}..{last - last % tp + tp - 1} "
            f"first), so their all-reduces cross the link between nodes; run a multiple of {tp} ranks per node")
