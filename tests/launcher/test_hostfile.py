"""Hostfile parsing: the format and every error message."""

import pytest

from hf_zero.launcher.resources import parse_hostfile, read_hostfile


def test_hosts_in_order_with_comments_and_blank_lines():
    text = "# cluster\nworker-0 slots=8\n\n  worker-1   slots=4  # half node\nworker-2 slots=1\n"
    assert parse_hostfile(text, "hf") == {"worker-0": 8, "worker-1": 4, "worker-2": 1}
    assert list(parse_hostfile(text, "hf")) == ["worker-0", "worker-1", "worker-2"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("worker-0\n", "hf:1: expected 'HOSTNAME slots=N', got 'worker-0'"),
        ("a slots=1\nworker-0 gpus=4\n", "hf:2: expected 'HOSTNAME slots=N', got 'worker-0 gpus=4'"),
        ("worker-0 slots=4 extra\n", "hf:1: expected 'HOSTNAME slots=N', got 'worker-0 slots=4 extra'"),
        ("worker-0 slots=0\n", "hf:1: slots of host 'worker-0' must be a positive integer, got slots='0'"),
        ("worker-0 slots=-2\n", "hf:1: slots of host 'worker-0' must be a positive integer, got slots='-2'"),
        ("worker-0 slots=four\n", "hf:1: slots of host 'worker-0' must be a positive integer, got slots='four'"),
        ("worker-0 slots=\n", "hf:1: slots of host 'worker-0' must be a positive integer, got slots=''"),
        (
            "worker-0 slots=4\n# x\nworker-0 slots=8\n",
            "hf:3: host 'worker-0' is listed twice (first on line 1); give each host one line",
        ),
        ("# only comments\n\n", "hostfile 'hf' lists no hosts; write one 'HOSTNAME slots=N' line per host"),
    ],
)
def test_errors_name_file_and_line(text, message):
    with pytest.raises(ValueError) as caught:
        parse_hostfile(text, "hf")
    assert str(caught.value) == message


def test_read_hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("a slots=2\nb slots=2\n")
    assert read_hostfile(str(path)) == {"a": 2, "b": 2}
    path.write_text("a slots=2\nb\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: expected"):
        read_hostfile(str(path))


def test_missing_hostfile(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError) as caught:
        read_hostfile(missing)
    assert str(caught.value) == f"hostfile {missing!r} not found"
