"""--include/--exclude semantics and errors, and --num_nodes/--num_gpus against a hostfile."""

import pytest

from hf_zero.launcher.args import LaunchOptions
from hf_zero.launcher.resources import apply_filter, parse_filter, resolve_hosts

POOL = {"worker-0": (0, 1, 2, 3), "worker-1": (0, 1, 2, 3), "worker-2": (0, 1)}


def test_parse_filter():
    assert parse_filter("host1:0,1@host2", "--include") == [("host1", (0, 1)), ("host2", None)]


@pytest.mark.parametrize(
    "include, expected",
    [
        ("worker-1", {"worker-1": (0, 1, 2, 3)}),
        ("worker-0:0,2@worker-2", {"worker-0": (0, 2), "worker-2": (0, 1)}),
        # hostfile order is kept whatever the order in the spec (node ranks follow it)
        ("worker-2:1@worker-0:3", {"worker-0": (3,), "worker-2": (1,)}),
        # a host named twice gets the union
        ("worker-0:1@worker-0:0", {"worker-0": (0, 1)}),
    ],
)
def test_include(include, expected):
    assert apply_filter(POOL, include, "") == expected


@pytest.mark.parametrize(
    "exclude, expected",
    [
        ("worker-1", {"worker-0": (0, 1, 2, 3), "worker-2": (0, 1)}),
        ("worker-0:0,3@worker-2:1", {"worker-0": (1, 2), "worker-1": (0, 1, 2, 3), "worker-2": (0,)}),
        # a host whose every id is excluded disappears
        ("worker-2:0,1", {"worker-0": (0, 1, 2, 3), "worker-1": (0, 1, 2, 3)}),
    ],
)
def test_exclude(exclude, expected):
    assert apply_filter(POOL, "", exclude) == expected


def test_no_filter_is_identity():
    assert apply_filter(POOL, "", "") == POOL


@pytest.mark.parametrize(
    "include, exclude, message",
    [
        ("worker-9", "", "--include 'worker-9' names unknown host 'worker-9'; known hosts: worker-0, worker-1, worker-2"),
        ("", "worker-0@nodeX:1", "--exclude 'worker-0@nodeX:1' names unknown host 'nodeX'; known hosts: worker-0, worker-1, worker-2"),
        ("worker-2:2", "", "--include 'worker-2:2' names unknown device id 2 on host 'worker-2', which has device ids 0,1"),
        ("worker-0:a", "", "--include 'worker-0:a': device id 'a' of host 'worker-0' is not a non-negative integer; write HOST:0,1"),
        ("worker-0:", "", "--include 'worker-0:': device id '' of host 'worker-0' is not a non-negative integer; write HOST:0,1"),
        ("worker-0@@worker-1", "", "--include 'worker-0@@worker-1' has an entry without a host name (''); write HOST[:ID,ID...] entries separated by '@'"),
        ("", "worker-0@worker-1@worker-2", "--exclude 'worker-0@worker-1@worker-2' leaves no device to run on"),
        ("a", "b", "--include 'a' and --exclude 'b' cannot be used together; keep one"),
    ],
)
def test_filter_errors(include, exclude, message):
    with pytest.raises(ValueError) as caught:
        apply_filter(POOL, include, exclude)
    assert str(caught.value) == message


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("worker-0 slots=4\nworker-1 slots=2\n")
    return str(path)


def no_devices() -> int:
    raise AssertionError("device_count must not be called when the hostfile gives the slots")


def test_hostfile_whole(hostfile):
    options = LaunchOptions(script="t.py", hostfile=hostfile)
    assert resolve_hosts(options, no_devices) == {"worker-0": (0, 1, 2, 3), "worker-1": (0, 1)}


def test_num_nodes_and_gpus_take_the_first(hostfile):
    options = LaunchOptions(script="t.py", hostfile=hostfile, num_nodes=1, nproc_per_node=3)
    assert resolve_hosts(options, no_devices) == {"worker-0": (0, 1, 2)}


def test_num_nodes_does_not_fit(hostfile):
    options = LaunchOptions(script="t.py", hostfile=hostfile, num_nodes=3)
    with pytest.raises(ValueError) as caught:
        resolve_hosts(options, no_devices)
    assert str(caught.value) == (
        f"--num_nodes 3 does not fit hostfile {hostfile!r}, which lists 2 host(s): worker-0, worker-1"
    )


def test_num_gpus_does_not_fit(hostfile):
    options = LaunchOptions(script="t.py", hostfile=hostfile, nproc_per_node=4)
    with pytest.raises(ValueError) as caught:
        resolve_hosts(options, no_devices)
    assert str(caught.value) == f"--num_gpus 4 does not fit hostfile {hostfile!r}: host 'worker-1' has slots=2"


def test_local_pool():
    assert resolve_hosts(LaunchOptions(script="t.py"), lambda: 0) == {"localhost": (0,)}
    assert resolve_hosts(LaunchOptions(script="t.py"), lambda: 8) == {"localhost": tuple(range(8))}
    assert resolve_hosts(LaunchOptions(script="t.py", nproc_per_node=3), no_devices) == {"localhost": (0, 1, 2)}
    options = LaunchOptions(script="t.py", include="localhost:2,3")
    assert resolve_hosts(options, lambda: 4) == {"localhost": (2, 3)}
    options = LaunchOptions(script="t.py", exclude="localhost:0")
    assert resolve_hosts(options, lambda: 4) == {"localhost": (1, 2, 3)}
