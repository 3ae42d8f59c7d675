"""SLURM node lists, tasks-per-node strings, and the SLURM_* -> RANK/... mapping."""

import pytest

from hf_zero.launcher import slurm
from hf_zero.launcher.slurm import expand_nodelist, expand_tasks_per_node, job_master_port, torch_env_from_slurm


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("a[01-03,07],b5,c[1-2]", ["a01", "a02", "a03", "a07", "b5", "c1", "c2"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("node1", ["node1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a[1-2].cluster,b", ["a1.cluster", "a2.cluster", "b"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("a[1-2", "SLURM node list 'a[1-2' has a '[' without ']'"),
        ("a1-2]", "SLURM node list 'a1-2]' has a ']' without '['"),
        ("a[[1]]", "SLURM node list 'a[[1]]' has nested brackets"),
        ("a[3-1]", "SLURM node list 'a[3-1]': range '3-1' runs backwards"),
        ("a[x-2]", "SLURM node list 'a[x-2]': bad range 'x-2' in '[x-2]'"),
        ("a[]", "SLURM node list 'a[]': bad range '' in '[]'"),
        ("a,,b", "SLURM node list 'a,,b' has an empty host name"),
    ],
)
def test_bad_nodelist(nodelist, message):
    with pytest.raises(ValueError) as caught:
        expand_nodelist(nodelist)
    assert str(caught.value) == message


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    assert slurm.first_host("gpu[07-09]") == "gpu07"
    with pytest.raises(ValueError, match="has a '\\[' without"):
        slurm.first_host("gpu[07")


def test_first_host_falls_back_to_scontrol(monkeypatch, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho weird-host-a\necho weird-host-b\n")
    fake.chmod(0o755)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: str(fake))
    assert slurm.first_host("a[1-2") == "weird-host-a"


@pytest.mark.parametrize(
    "spec, counts", [("8", [8]), ("2(x3),1", [2, 2, 2, 1]), ("4(x2),2(x1),3", [4, 4, 2, 3])]
)
def test_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


def test_bad_tasks_per_node():
    with pytest.raises(ValueError, match=r"cannot parse SLURM tasks per node '2\(3\)': bad entry '2\(3\)'"):
        expand_tasks_per_node("2(3)")


SRUN_RANK_5 = {
    "SLURM_JOB_ID": "1234567",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
}


def test_mapping():
    assert torch_env_from_slurm(SRUN_RANK_5) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu01",
        "MASTER_PORT": "19567",  # 15000 + 1234567 % 10000
    }


@pytest.mark.parametrize(
    ("job_id", "port"),
    [("4242", "19242"), ("1234567", "19567"), ("90000", "15000"), ("99999", "24999"), (" 7 ", "15007"),
     (None, "29500"), ("", "29500"), ("12a", "29500")],
)
def test_master_port_comes_from_the_job(job_id, port):
    environ = {k: v for k, v in SRUN_RANK_5.items() if k != "SLURM_JOB_ID"}
    if job_id is not None:
        environ["SLURM_JOB_ID"] = job_id
    assert job_master_port(environ) == port
    assert torch_env_from_slurm(environ)["MASTER_PORT"] == port


def test_two_jobs_on_one_node_get_different_ports():
    """Every task of one job agrees on the port; the next job on the node gets another one."""
    ports = {torch_env_from_slurm({**SRUN_RANK_5, "SLURM_JOB_ID": str(job), "SLURM_PROCID": str(rank)})["MASTER_PORT"]
             for job in (500123, 500124) for rank in range(8)}
    assert ports == {"15123", "15124"}


def test_mapping_prefers_explicit_values():
    environ = {
        **SRUN_RANK_5,
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_STEP_NODELIST": "gpu02",
        "MASTER_PORT": "1234",
    }
    derived = torch_env_from_slurm(environ)
    assert derived["LOCAL_WORLD_SIZE"] == "2"
    assert derived["MASTER_ADDR"] == "gpu02"
    assert "MASTER_PORT" not in derived
    assert "MASTER_ADDR" not in torch_env_from_slurm({**SRUN_RANK_5, "MASTER_ADDR": "10.0.0.1"})


def test_uneven_tasks_per_node():
    environ = {**SRUN_RANK_5, "SLURM_TASKS_PER_NODE": "3,1", "SLURM_NTASKS": "4", "SLURM_PROCID": "3"}
    assert torch_env_from_slurm(environ)["LOCAL_WORLD_SIZE"] == "1"


def test_no_mapping_under_torchrun_or_outside_slurm():
    assert torch_env_from_slurm({**SRUN_RANK_5, "RANK": "0"}) == {}
    assert torch_env_from_slurm({"SLURM_JOB_NODELIST": "gpu01"}) == {}


def test_mapping_errors():
    missing_ntasks = {k: v for k, v in SRUN_RANK_5.items() if k != "SLURM_NTASKS"}
    with pytest.raises(ValueError, match="SLURM_PROCID is set but SLURM_NTASKS is not"):
        torch_env_from_slurm(missing_ntasks)
    missing_list = {k: v for k, v in SRUN_RANK_5.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(ValueError, match="SLURM_PROCID is set but SLURM_JOB_NODELIST is not; set MASTER_ADDR"):
        torch_env_from_slurm(missing_list)
