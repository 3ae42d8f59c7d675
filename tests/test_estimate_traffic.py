"""``hf-zero estimate --traffic``: bytes each rank sends per optimizer step, over NVLink and over the network,
checked against hand counts of the tiny Llama of the tensor-parallel tests ([Note: traffic per step] in
hf_zero/estimate_traffic.py); the placement follows the (pp, dp, tp) mesh; bad layouts are refused; the
tables of docs/parallelism.md are what the command prints. No process group is started."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from hf_zero.cli import main
from hf_zero.estimate import ActivationShape, count_params, load_model_config, meta_model
from hf_zero.estimate_parallel import Axes
from hf_zero.estimate_traffic import (ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, Placement, busiest, ring_bytes,
                                      step_traffic)
from tests.test_estimate_parallel import ROOT, SPLIT_PER_BLOCK, TINY, TP2_RANK, WHOLE_MODEL, WHOLE_PER_BLOCK

REPO = Path(__file__).resolve().parents[1]
S, B, H = 12, 2, 64  # seq len, micro batch, hidden
HIDDEN_STATES = S * B * H * 4  # one micro-batch's (b, s, h) in fp32: 6,144 bytes
BLOCK = SPLIT_PER_BLOCK + WHOLE_PER_BLOCK  # 36,992 elements
SHAPE = ActivationShape(layers=2, hidden=H, heads=4, vocab=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_traffic") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def counts(tiny):
    return count_params(meta_model(load_model_config(tiny)))


def traffic(counts, *, world, gpus_per_node, stage, tp=1, pp=1, grad_accum=2, checkpointing=False):
    placement = Placement(Axes(world=world, tp=tp, pp=pp), gpus_per_node)
    return step_traffic(counts, SHAPE, placement, stage=stage, seq_len=S, micro_batch=B, grad_accum=grad_accum,
                        dtype="fp32", model_dtype="fp32", gradient_checkpointing=checkpointing)


def flows(rank_traffic):
    return {f.what: (f.calls, f.payload, f.nvlink, f.network) for f in rank_traffic.flows}


def test_ring_bytes():
    assert ring_bytes(ALL_GATHER, 1600, 16) == ring_bytes(REDUCE_SCATTER, 1600, 16) == 1500  # (n - 1) / n
    assert ring_bytes(ALL_REDUCE, 1600, 16) == 3000  # 2 (n - 1) / n
    assert ring_bytes(ALL_REDUCE, 1600, 1) == 0


def test_placement_is_the_mesh():
    """W = 8, pp 2, tp 2 on 2 nodes of 4: the table of hf_zero/tensor_parallel/mesh.py, nodes of 4 ranks."""
    p = Placement(Axes(world=8, tp=2, pp=2), 4)
    assert [p.coords(r) for r in range(8)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                                               (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert (p.tp_group(5), p.dp_group(5), p.dp_group(0), p.pipeline_peer(1, +1), p.pipeline_peer(6, -1)) == \
        ([4, 5], [5, 7], [0, 2], 5, 2)
    assert (p.nodes, [p.node(r) for r in range(8)]) == (2, [0, 0, 0, 0, 1, 1, 1, 1])


def test_the_notes_worked_example(counts):
    """tp 2 x dp 2 on 2 nodes of 2, ZeRO 2, 2 micro-batches: tp inside a node on NVLink, dp across on the network."""
    assert TP2_RANK == 53_568
    ranks = traffic(counts, world=4, gpus_per_node=2, stage=2, tp=2)
    assert flows(ranks[0]) == {
        "grad reduce-scatter (every micro-batch)": (2, 2 * TP2_RANK * 4, 0, TP2_RANK * 4),  # 428,544 B; sends half
        "param all-gather (after the step)": (1, TP2_RANK * 4, 0, TP2_RANK * 4 // 2),
        "tp activation all-reduce": (16, 16 * HIDDEN_STATES, 16 * HIDDEN_STATES, 0),  # 2 layers x 4 x 2; 2 (n-1)/n = 1
    }
    assert (ranks[0].nvlink, ranks[0].network) == (98_304, 321_408)
    assert all((r.nvlink, r.network) == (98_304, 321_408) for r in ranks)  # every rank alike here
    # the same job on one node of 4: nothing on the network
    one_node = traffic(counts, world=4, gpus_per_node=4, stage=2, tp=2)[0]
    assert (one_node.nvlink, one_node.network) == (98_304 + 321_408, 0)
    # gradient checkpointing recomputes each layer's forward: its 2 all-reduces again
    assert flows(traffic(counts, world=4, gpus_per_node=2, stage=2, tp=2, checkpointing=True)[0])[
        "tp activation all-reduce"][:2] == (24, 24 * HIDDEN_STATES)


def test_zero_stages_by_hand(counts):
    """dp 2 on 2 nodes of 1 (all on the network), 3 micro-batches, fp32: the stage rows of the Note's table."""
    whole = WHOLE_MODEL * 4  # 361,728 bytes; every param a multiple of 32 elements and W x 32 divides the sums
    blocks_and_root = (2 * BLOCK + ROOT) * 4
    assert blocks_and_root == whole
    expected = {
        0: {"grad all-reduce (DDP, last micro-batch)": (1, whole, 0, whole)},  # 2 (n-1)/n of it
        1: {"grad reduce-scatter (last micro-batch)": (1, whole, 0, whole // 2),
            "param all-gather (after the step)": (1, whole, 0, whole // 2)},
        2: {"grad reduce-scatter (every micro-batch)": (3, 3 * whole, 0, 3 * whole // 2),
            "param all-gather (after the step)": (1, whole, 0, whole // 2)},
        # each block gathered in forward and backward, the root once (held from forward to backward)
        3: {"param all-gather (fwd + bwd, root once)": (3 * 5, 3 * (4 * BLOCK + ROOT) * 4, 0, 3 * (4 * BLOCK + ROOT) * 2),
            "grad reduce-scatter (every micro-batch)": (3 * 3, 3 * whole, 0, 3 * whole // 2)},
    }
    for stage, rows in expected.items():
        ranks = traffic(counts, world=2, gpus_per_node=1, stage=stage, grad_accum=3)
        assert flows(ranks[0]) == rows, stage
        assert flows(ranks[1]) == rows, stage
    # on one node of 2 the same bytes go over NVLink
    same = traffic(counts, world=2, gpus_per_node=2, stage=3, grad_accum=3)[0]
    assert (same.nvlink, same.network) == (3 * (4 * BLOCK + ROOT) * 2 + 3 * whole // 2, 0)


def test_a_group_spanning_nodes_splits_by_its_hops(counts):
    """dp 16 on 2 nodes of 8: a ring with 2 of its 16 hops across nodes sends 2/16 of each rank's bytes on the network."""
    rank = traffic(counts, world=16, gpus_per_node=8, stage=1)[3]
    calls, payload, nvlink, network = flows(rank)["grad reduce-scatter (last micro-batch)"]
    assert payload == 90_624 * 4  # 90,432 elements padded to a multiple of 16 x 32
    sent = 15 * payload // 16
    assert (nvlink, network) == (sent - sent * 2 // 16, sent * 2 // 16)
    assert rank.flows[0].where == "dp 16: 2 nodes, 8 a node"


def test_pipeline_sends(counts):
    """pp 2 x tp 2 on 2 nodes of 2: each stage on its own node, so a pipeline send crosses; tp stays inside."""
    ranks = traffic(counts, world=4, gpus_per_node=2, stage=1, tp=2, pp=2)
    assert flows(ranks[0]) == {  # dp 1: no ZeRO collective; stage 0 has 1 layer and sends activations only
        "tp activation all-reduce": (8, 8 * HIDDEN_STATES, 8 * HIDDEN_STATES, 0),
        "pipeline send: activations": (2, 2 * HIDDEN_STATES, 0, 2 * HIDDEN_STATES),
    }
    assert flows(ranks[3]) == {  # the last stage sends the grads of its input back
        "tp activation all-reduce": (8, 8 * HIDDEN_STATES, 8 * HIDDEN_STATES, 0),
        "pipeline send: activation grads": (2, 2 * HIDDEN_STATES, 0, 2 * HIDDEN_STATES),
    }
    assert ranks[0].flows[1].where == "to rank 2 (stage 1, node 1)"
    one_node = traffic(counts, world=4, gpus_per_node=4, stage=1, tp=2, pp=2)[1]
    assert (one_node.nvlink, one_node.network) == (10 * HIDDEN_STATES, 0)


def test_busiest_rank():
    from hf_zero.estimate_traffic import Flow, RankTraffic

    quiet = RankTraffic(0, (Flow("x", "", 1, 0, 900, 0),))  # 900 B on NVLink
    loud = RankTraffic(1, (Flow("x", "", 1, 0, 0, 300),))  # 300 B on the network: 300 / 50 > 900 / 450
    assert busiest([quiet, loud], 450, 50).rank == 1
    assert busiest([quiet, loud], 450, 500).rank == 0
    assert loud.seconds(450, 50) == (0.0, 300 / 50e9)


@pytest.mark.parametrize("world,gpus,tp,pp,stage,message", [
    (4, 3, 1, 1, 1, r"gpus_per_node = 3 does not divide the world size 4.*allowed here: \[1, 2, 4\]"),
    (8, 2, 4, 1, 1, r"autotp_size = 4 does not divide gpus_per_node = 2: a tensor-parallel group is kept inside "
                    r"one node.*allowed here: \[1, 2\]"),
    (4, 2, 1, 2, 3, r"ZeRO stage 3 with pipeline.stages = 2: not built yet"),
    (4, 0, 1, 1, 1, r"gpus_per_node = 0: must be a positive integer"),
])
def test_refusals(counts, world, gpus, tp, pp, stage, message):
    with pytest.raises(ValueError, match=message):
        traffic(counts, world=world, gpus_per_node=gpus, stage=stage, tp=tp, pp=pp)


def test_refusals_of_the_step(counts):
    placement = Placement(Axes(world=4, tp=2), 2)
    with pytest.raises(ValueError, match=r"grad_accum = 0: must be a positive integer"):
        step_traffic(counts, SHAPE, placement, stage=1, seq_len=S, micro_batch=B, grad_accum=0)
    with pytest.raises(ValueError, match=r"stage = 4: allowed 0, 1, 2, 3"):
        step_traffic(counts, SHAPE, placement, stage=4, seq_len=S, micro_batch=B, grad_accum=1)
    with pytest.raises(ValueError, match=r"modelled for decoder-only models"):
        step_traffic(counts, None, placement, stage=1, seq_len=S, micro_batch=B, grad_accum=1)


def test_estimate_command(tiny, capsys):
    argv = ["estimate", tiny, "--traffic", "--world", "4", "--nodes", "2", "--tp", "2", "--stage", "2", "--dtype",
            "fp32", "--seq_len", str(S), "--micro_batch", str(B), "--grad_accum", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "world 4 ranks = 2 node(s) x 2 GPUs; (pp, dp, tp) = (1, 2, 2)" in out
    assert "gradient accumulation 2: 8 sequences (96 tokens) a step" in out
    assert "rank 0 (node 0; pp stage 0, dp rank 0, tp rank 0), the busiest rank" in out
    rows = {line[:40].strip(): line[40:].split() for line in out.splitlines()}
    assert rows["tp activation all-reduce"] == ["tp", "2:", "1", "node", "16", "96.00", "KiB", "96.00", "KiB", "0", "B"]
    assert rows["grad reduce-scatter (every micro-batch)"][-4:] == ["0", "B", "209.25", "KiB"]  # 214,272 B
    assert rows["total sent by this rank"] == ["96.00", "KiB", "313.88", "KiB"]  # 98,304 and 321,408 B
    # NVLink 98,304 B at 450 GB/s, network 321,408 B at 50 GB/s
    assert "NVLink 0.000 s, network 0.000 s" in out
    assert main([*argv, "--network_bw", "0.0001"]) == 0
    assert "network 3.214 s; lower bound 3.214 s a step" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--world", "4", "--nodes", "2", "--gpus_per_node", "3"],
     "--nodes 2 x --gpus_per_node 3 = 6 ranks, not --world 4; allowed --gpus_per_node here: 2"),
    (["--world", "8", "--nodes", "4", "--tp", "4"],
     "--tp 4 does not divide --gpus_per_node 2: a tensor-parallel group is kept inside one node (hf-zero launch "
     "refuses it too); allowed --tp here: [1, 2]"),
    (["--world", "4", "--grad_accum", "0"], "--grad_accum must be a positive integer, got 0"),
    (["--world", "4", "--pp", "2", "--grad_accum", "1"], "--grad_accum 1 with --pp 2: allowed: >= 2"),
    (["--world", "4", "--pp", "2", "--grad_accum", "2", "--micro_batches", "2"],
     "--micro_batches with --traffic"),
    (["--world", "4", "--pp", "2", "--grad_accum", "2", "--stage", "3"], "--stage 3 with --pp 2"),
    (["--world", "4", "--network_bw", "0"], "--network_bw must be a positive number of GB/s, got 0.0"),
    (["--world", "4", "--plot", "x.png"], "--plot draws the memory table; it does not go with --traffic"),
])
def test_estimate_command_refusals(tiny, capsys, argv, message):
    assert main(["estimate", tiny, "--traffic", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf_zero: ") and message in err, err


# ---- docs/parallelism.md, "Paper model: 70B on 2 x 8 GPUs" -------------------------------------------------------

DOC = REPO / "docs" / "parallelism.md"
BLOCK_RE = re.compile(r"```\n\$ (hf-zero estimate [^\n]*--traffic[^\n]*)\n(.*?)\n```", re.S)


def doc_blocks() -> list[tuple[str, str]]:
    return BLOCK_RE.findall(DOC.read_text())


def test_docs_show_five_layouts():
    assert len(doc_blocks()) == 5
    assert "a paper model, not a measurement" in DOC.read_text()


@pytest.mark.parametrize("index", range(5))
def test_docs_tables_are_what_the_command_prints(index, capsys, monkeypatch):
    command, printed = doc_blocks()[index]
    monkeypatch.chdir(REPO)  # the docs name the config by its path in the repository
    assert main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.rstrip("\n") == printed, (
        f"docs/parallelism.md is stale: paste the output of `{command}` into it")


def test_docs_summary_matches_the_tables():
    """Each row of the summary table repeats its layout's totals and times, in the order of the tables."""
    text = DOC.read_text()
    summary = text[text.index("| layout |"):]
    rows = [line for line in summary.splitlines()[2:] if line.startswith("|")][:5]
    assert len(rows) == 5
    for row, (_, printed) in zip(rows, doc_blocks()):
        total = re.search(r"^total sent by this rank +(\S+ \S+) +(\S+ \S+)$", printed, re.M)
        times = re.search(r"NVLink ([\d.]+ s), network ([\d.]+ s); lower bound ([\d.]+ s)", printed)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:7] == [*total.groups(), *times.groups()], row
