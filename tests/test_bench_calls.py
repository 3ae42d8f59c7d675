"""bench/calls.py: every recipe's commands are accepted by the bench script they run (its own
argument parser), their budgets fit one device call, and the dry run shows what would run."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from tests.test_bench_scaling import _BENCH, _load

ROOT = _BENCH.parent

calls = _load("calls", register=True)  # its dataclass is looked up by module name
SCRIPTS = {"bench/run.py": "run", "bench/long_seq.py": "long_seq", "bench/largest_model.py": "largest_model",
           "bench/cast_copy.py": "cast_copy", "bench/host_contention.py": "host_contention"}


@pytest.mark.parametrize("name", list(calls.RECIPES))
def test_each_recipe_parses_and_fits_one_call(name):
    commands = calls.commands(name, "s99", "abc123", "/tmp/out")
    assert commands
    budget = 0.0
    for command in commands:
        if "pytest" in command:  # the GPU tests, under a timeout inside the call: every file named exists
            assert command[0] == "timeout" and int(command[1]) <= calls.CALL_S
            assert all((ROOT / path).is_file() for path in command if path.endswith(".py"))
            continue
        script, args = command[1], command[2:]
        older = script.startswith(calls.AT_DIR + "/at_")  # an older commit's tree: its script, its commit
        if older:
            commit, script = script[len(calls.AT_DIR + "/at_"):].split("/", 1)
            assert commit in calls.older_trees(name)
        # (an older commit's script is parsed with this commit's: the recipe uses arguments both have)
        opts = _load(SCRIPTS[script]).parse_args(args)  # exits (fails the test) on an argument it refuses
        assert opts.name == f"gpu_{name.replace('-', '_')}_s99" + (f"_{commit}" if older else "")
        assert opts.results_dir == "/tmp/out" and opts.git_commit == (commit if older else "abc123")
        budget += opts.budget_s
    assert budget <= calls.CALL_S


def test_list_and_dry_run(capsys):
    assert calls.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(calls.RECIPES)
    assert calls.main(["longseq-7b-256k", "--dry_run", "--tag", "s99", "--results_dir", "/tmp/out"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    args = shlex.split(line)
    assert args[1] == "bench/long_seq.py" and args[args.index("--lengths") + 1] == "262144"
    assert args[args.index("--name") + 1] == "gpu_longseq_7b_256k_s99"
    with pytest.raises(SystemExit):
        calls.parse_args([])  # a recipe or --list
    with pytest.raises(SystemExit):
        calls.parse_args(["no-such-recipe"])



def test_an_older_commits_tree_is_unpacked_and_a_missing_one_refused(tmp_path, monkeypatch):
    """``@COMMIT`` commands run that commit's script from ``AT_DIR/at_COMMIT``, unpacked from the
    tarball in ``--trees``; without the tarball the recipe stops before anything runs."""
    (name,) = [n for n in calls.RECIPES if calls.older_trees(n)][:1]
    (commit,) = calls.older_trees(name)
    monkeypatch.setattr(calls, "AT_DIR", str(tmp_path / "at"))
    trees = tmp_path / "trees"
    trees.mkdir()
    ran = []
    monkeypatch.setattr(calls, "environment", lambda: ran.append("environment") or {})
    with pytest.raises(SystemExit, match=f"at_{commit}.tar.gz"):
        calls.main([name, "--trees", str(trees), "--results_dir", str(tmp_path / "out")])
    assert ran == []  # refused before the wheels or any command
    source = tmp_path / "src" / "bench"
    source.mkdir(parents=True)
    (source / "run.py").write_text("# the older tree's script\n")
    subprocess.run(["tar", "czf", str(trees / f"at_{commit}.tar.gz"), "-C", str(tmp_path / "src"), "bench"], check=True)
    stale = tmp_path / "at" / f"at_{commit}" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier call")
    calls.unpack_trees(name, trees)
    assert (tmp_path / "at" / f"at_{commit}" / "bench" / "run.py").read_text() == "# the older tree's script\n"
    assert not stale.exists()
    first = calls.commands(name, "s99", "abc123", "/tmp/out")[0]
    assert first[1] == f"{tmp_path}/at/at_{commit}/bench/run.py"
