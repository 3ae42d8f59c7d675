"""A two-node job on one machine through the launcher's hostfile path: tp groups stay inside a node.

Two ``hf-zero launch --hostfile HOSTS --launcher torchrun --node_rank N`` commands, as each node of a
cluster without ssh runs its own (hostfile ``127.0.0.1 slots=2``, ``127.0.0.2 slots=2``: node 1's host
is a local address too, the rendezvous is node 0's ``127.0.0.1:PORT``), start 2 gloo ranks each for one
Trainer job at ``tensor_parallel.autotp_size`` 2, ZeRO stage 2: dp 2 x tp 2 over 4 ranks. Checked:

- the ranks' order and groups: node 0 holds ranks 0, 1 and node 1 ranks 2, 3 ([Note: rank order] in
  ``hf_zero/launcher/placement.py``); the tp groups are {0, 1} and {2, 3}, the dp groups {0, 2}, {1, 3};
- every logged loss and clipped grad norm equals one plain Trainer process on the whole batch (1e-5);
- every collective of ``train()``, counted by its process group (``data/tp_two_nodes.py``): the tp
  all-reduces run inside a node only, and only dp-group and world-group collectives cross nodes;
- the bytes every rank's run report measures are ``hf-zero estimate``'s for W 4 at tp 2
  ([Note: per-rank shares] in ``hf_zero/estimate_parallel.py``).

A layout that would split a tp group over two nodes is refused by ``hf-zero launch`` before any rank
starts (``test_tp_group_across_nodes_is_refused``).
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import Trainer

from hf_zero import cli
from hf_zero.estimate import count_params, estimate_bytes, meta_model
from hf_zero.estimate_parallel import Axes
from hf_zero.launcher import placement
from hf_zero.testing.multiprocess import free_port
from tests.launcher.data import tp_two_nodes as job
from tests.tensor_parallel.models import tiny_llama
from tests.trainer.tiny import history, same_training

from .conftest import DATA

REPO = DATA.parents[2]
SCRIPT = DATA / "tp_two_nodes.py"
NODES, PER_NODE, TP = 2, 2, 2
DP = NODES * PER_NODE // TP
LAYERS = 2  # tiny_llama's decoder blocks
# tp all-reduces per optimizer step (one micro-step each), [Note: f and g] in tensor_parallel/split.py:
# forward, g after each rowwise layer: o_proj, down_proj              2 per block
# backward, f before each colwise layer: q, k, v, gate, up           5 per block
# the global grad norm's split part (tensor_parallel/norm.py)         1
TP_ALL_REDUCES_PER_STEP = LAYERS * (2 + 5) + 1


def _launch(node: int, flags: list[str], config: str, port: int, out: str, device: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "hf_zero", "launch", *flags, "--launcher", "torchrun", "--node_rank", str(node),
            "--master_port", str(port), str(SCRIPT.relative_to(REPO)), "--zero_config", config, "--out_dir", out,
            "--device", device]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _census(records: list[dict], node_of: dict[int, int], tp_groups: set, dp_groups: set) -> dict:
    """Per node: collective calls and bytes inside it and across nodes, by group kind (tp, dp, world)."""
    world = tuple(range(NODES * PER_NODE))
    table = {node: Counter() for node in range(NODES)}
    for record in records:
        for op, ranks, calls, size in record["collectives"]:
            ranks = tuple(ranks)
            kind = "tp" if ranks in tp_groups else "dp" if ranks in dp_groups else "world" if ranks == world else None
            assert kind is not None, (record["rank"], op, ranks)  # no other group exists
            where = "inside" if len({node_of[r] for r in ranks}) == 1 else "across"
            table[record["node"]][f"{kind} {where} calls"] += calls
            table[record["node"]][f"{kind} {where} bytes"] += size
    return table


def two_node_job(tmp_path, *, device: str = "cpu", slots: int = PER_NODE, include: str = "") -> None:
    """Run the job as NODES hf-zero launch commands and check it (see the module docstring). ``device``
    "cuda" (tests/gpu/test_two_nodes_nccl.py): NCCL, ``include`` pins each node's GPUs."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"127.0.0.{n + 1} slots={slots}\n" for n in range(NODES)))
    flags = ["--hostfile", str(hostfile)] + (["--include", include] if include else [])
    config = tmp_path / "zero2_tp2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": TP}}))
    port = free_port()
    nodes = [_launch(n, flags, str(config), port, str(tmp_path), device) for n in range(NODES)]
    # the reference while the nodes run: one process, the whole global batch (BATCH per dp rank)
    ref_args = job.job_args(str(tmp_path / "ref"), job.BATCH * DP, device)
    if device == "cuda" and ref_args.n_gpu > 1:
        ref_args._n_gpu = 1  # one GPU, not nn.DataParallel over all (as the Trainer does for a model-parallel model)
    ref = Trainer(model=tiny_llama(), args=ref_args, train_dataset=job.rows())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes' ranks beside it (OMP_NUM_THREADS=1): tiny tensors, busy cores
    try:
        ref.train()
    finally:
        torch.set_num_threads(threads)
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0] * NODES, "\n".join(o[-4000:] for o in outputs)

    records = sorted((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(NODES * PER_NODE)),
                     key=lambda r: r["rank"])
    node_of = {r["rank"]: r["node"] for r in records}
    # torchrun's order: node by node, local ranks in order
    assert [(r["node"], r["local_rank"]) for r in records] == [(n, i) for n in range(NODES) for i in range(PER_NODE)]
    tp_groups = {tuple(r["tp_group"]) for r in records}
    dp_groups = {tuple(r["dp_group"]) for r in records}
    assert tp_groups == {(0, 1), (2, 3)} and dp_groups == {(0, 2), (1, 3)}, (tp_groups, dp_groups)
    for record in records:
        same_training(record["history"], history(ref), job.STEPS, f"rank {record['rank']}")

    # the bytes each rank holds, measured by the run report, are hf-zero estimate's for (W 4, tp 2)
    rank_counts, dp = count_params(meta_model(ref.model.config)).per_rank(Axes(world=NODES * PER_NODE, tp=TP))
    want = estimate_bytes(rank_counts, stage=2, world=dp, dtype="fp32", optimizer="adamw")
    report = json.loads((tmp_path / "trainer" / "hf_zero_report.json").read_text())
    for measured in report["ranks"]:
        got = measured["bytes"]
        assert (got["params"], got["grads"], got["peak_grads"], got["optimizer_state"]) == (
            want["params"], want["grads_at_step"], want["peak_grads"], want["optimizer_state"]), (got, want)

    table = _census(records, node_of, tp_groups, dp_groups)
    print("\ncollectives of train() per node (summed over its ranks):")
    for node, counts in table.items():
        print(f"  node {node}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for node, counts in table.items():
        assert counts["tp inside calls"] == PER_NODE * job.STEPS * TP_ALL_REDUCES_PER_STEP, counts
        assert counts["tp across calls"] == 0, counts
        assert counts["dp inside calls"] == 0, counts  # each dp group has one rank on each node
        # ZeRO-2's traffic over dp: one bucket (this model is far below reduce_bucket_size) reduce-scattered
        # and all-gathered per step, on each rank
        by_op = Counter()
        for record in records:
            if record["node"] == node:
                for op, ranks, calls, _ in record["collectives"]:
                    if tuple(ranks) in dp_groups:
                        by_op[op] += calls
        assert by_op["_reduce_scatter_base_"] == by_op["_allgather_base_"] == PER_NODE * job.STEPS, by_op
        assert set(k.rsplit(" ", 1)[0] for k in counts) <= {"tp inside", "dp across", "world across"}, counts


@pytest.mark.slow
def test_two_nodes_keep_tp_inside_a_node(tmp_path):
    two_node_job(tmp_path)


# every way hf-zero launch runs several nodes; ssh and slurm with --dry_run (nothing would start either way)
@pytest.mark.parametrize("flags", [
    ["--hostfile", "HOSTS", "--launcher", "torchrun", "--node_rank", "0"],
    ["--hostfile", "HOSTS", "--launcher", "ssh", "--dry_run"],
    ["--hostfile", "HOSTS", "--launcher", "slurm", "--dry_run"],
    ["--num_nodes", "2", "--nproc_per_node", "3", "--node_rank", "1", "--master_addr", "127.0.0.1"],
], ids=["hostfile-torchrun", "ssh", "slurm", "num_nodes-torchrun"])
def test_tp_group_across_nodes_is_refused(tmp_path, capsys, flags):
    """3 processes on each of 2 nodes at tp 2: the group {2, 3} would be rank 2 on node 0 and rank 3 on
    node 1. Refused with exit code 2 before any rank starts (the script would leave a file)."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=3\n127.0.0.2 slots=3\n")
    config = tmp_path / "tp2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": TP}}))
    marker = tmp_path / "started"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    flags = [str(hostfile) if f == "HOSTS" else f for f in flags]
    code = cli.main(["launch", *flags, "--master_port", str(free_port()), str(script), "--zero_config", str(config)])
    assert code == 2
    err = capsys.readouterr().err
    node0 = " (127.0.0.1)" if "--hostfile" in flags else ""
    assert (f"hf_zero: tensor_parallel.autotp_size = 2 in {config} does not divide the 3 processes of node 0{node0}: "
            "the tensor-parallel group of ranks 2..3 would span nodes 0 and 1") in err, err
    assert "Allowed autotp_size for [3, 3] processes per node: [1, 3]" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("tp,counts,spans", [
    (2, [2, 2], None), (4, [4, 4], None), (2, [4, 2, 6], None), (1, [3, 5], None),
    (3, [3], None),  # one node: the world-size check's business
    (2, [3, 3, 1], None),  # 7 ranks: tp 2 does not divide the world, which the config's check says
    (4, [2, 2], "ranks 0..3 would span nodes 0 and 1"),
    (2, [3, 3], "ranks 2..3 would span nodes 0 and 1"),
    (2, [2, 3, 3], "ranks 4..5 would span nodes 1 and 2"),
])
def test_tp_placement_rule(tp, counts, spans):
    if spans is None:
        placement.check_tp_placement(tp, counts, source="z.json")
        return
    with pytest.raises(ValueError, match=spans):
        placement.check_tp_placement(tp, counts, source="z.json")


@pytest.mark.parametrize("tp,world,local,warned", [
    (2, "6", "3", "does not divide the 3 ranks per node (LOCAL_WORLD_SIZE): tensor-parallel groups span nodes "
                  "(ranks 2..3 first)"),
    (4, "8", "2", "(ranks 0..3 first)"),
    (2, "4", "2", None), (2, "3", "3", None),  # inside a node; one node
    (2, "6", None, None), (1, "6", "3", None),  # not torchrun's variables; no tp
])
def test_warning_under_another_launcher(tp, world, local, warned):
    """hf_zero.run started by torchrun or srun themselves: rank 0 warns once of tp groups spanning nodes."""
    environ = {"WORLD_SIZE": world} | ({} if local is None else {"LOCAL_WORLD_SIZE": local})
    line = placement.spanning_warning(tp, environ)
    if warned is None:
        assert line is None
    else:
        assert line.startswith(f"hf_zero: warning: tensor_parallel.autotp_size = {tp} ") and warned in line, line
