"""Real launches on this machine: 2 gloo ranks through `hf-zero launch` and through torchrun.

Without `--zero_config` (the config-activated variants live with the Trainer integration).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA

pytestmark = pytest.mark.slow

SCRIPT = DATA / "print_rank.py"
REPO = DATA.parents[2]


def hf_zero_command() -> list[str]:
    console_script = Path(sys.executable).parent / "hf-zero"
    return [str(console_script)] if console_script.exists() else [sys.executable, "-m", "hf_zero"]


def check_ranks(out_dir: Path, script_argv0: str) -> None:
    records = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == [0, 1]
    for record in records:
        assert record["world_size"] == 2
        assert record["local_rank"] == record["rank"]
        assert record["sum"] == 3.0  # (0 + 1) + (1 + 1): the all_reduce ran across both ranks
        assert record["argv"] == [script_argv0, "--flag", "x", "--out_dir", str(out_dir)]
        assert record["name"] == "__main__"
        assert record["sys_path0"] == str(DATA)
        assert record["flag"] == "x"


def run(argv: list[str]) -> None:
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hf_zero_launch(tmp_path, free_port):
    script = str(SCRIPT.relative_to(REPO))
    run(hf_zero_command() + ["launch", "--nproc_per_node", "2", "--master_port", str(free_port),
                             script, "--flag", "x", "--out_dir", str(tmp_path)])  # fmt: skip
    check_ranks(tmp_path, script)


def test_torchrun_then_hf_zero_run(tmp_path, free_port):
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port), "-m", "hf_zero.run",
         str(SCRIPT), "--flag", "x", "--out_dir", str(tmp_path)])  # fmt: skip
    check_ranks(tmp_path, str(SCRIPT))


def test_launch_failure_exit_code(tmp_path, free_port):
    """A rank that fails makes `hf-zero launch` fail (torchrun reports 1)."""
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(5)\n")
    result = subprocess.run(
        hf_zero_command() + ["launch", "--nproc_per_node", "1", "--master_port", str(free_port), str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0


REFUSAL = ("rank 1 raised CheckpointError: checkpoint-4/hf_zero_sharded/__1_0.distcp: sha256 differs from the "
           "digest recorded at save (hf_zero_digest_rank1.json): the file was changed after the save")


@pytest.mark.parametrize("watchdog", [False, True], ids=["torchrun_ends_rank_0", "watchdog_ends_rank_0"])
def test_launch_failure_ends_with_one_line_naming_the_refusal(free_port, watchdog):
    """Rank 1 refuses a checkpoint while rank 0 waits: after torchrun's ChildFailedError table, the
    last line names rank 1's refusal (from the error file torchrun copies from its first failure).
    Without the watchdog rank 0 is ended by torchrun (SIGTERM, no error file of its own); with it,
    rank 0's watchdog ends it with os._exit, usually before rank 1 exits, and its error file (the
    one torchrun then takes: stamped with the time of rank 1's raise) names rank 1's refusal."""
    script = str((DATA / "refuse_checkpoint.py").relative_to(REPO))
    result = subprocess.run(
        hf_zero_command() + ["launch", "--nproc_per_node", "2", "--master_port", str(free_port), script]
        + ["--watchdog"] * watchdog,
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"hf_zero: job failed: {REFUSAL}"), result.stderr[-3000:]
    # rank 1's own line, or (the watchdog's headline, from rank 0's file) the same with where it raised
    allowed = [REFUSAL] + [f"{REFUSAL} at refuse_checkpoint.py:29 in main"] * watchdog
    assert last in [f"hf_zero: job failed: {line}" for line in allowed], last
    # torchrun's table shows the line too, instead of "To enable traceback see: ..."
    assert f"traceback : {REFUSAL}" in result.stderr, result.stderr[-3000:]


def test_srun_style_ranks_without_torchrun(tmp_path, free_port):
    """Two processes started the way srun starts them: only SLURM_* set, no RANK/WORLD_SIZE."""
    import os

    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                         "LOCAL_WORLD_SIZE", "MASTER_ADDR")}  # fmt: skip
    ranks = []
    for rank in range(2):
        env = {**base, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
               "MASTER_PORT": str(free_port)}  # fmt: skip
        argv = [sys.executable, "-m", "hf_zero.run", str(SCRIPT), "--flag", "x", "--out_dir", str(tmp_path)]
        ranks.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=60)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    check_ranks(tmp_path, str(SCRIPT))


def test_accelerate_launch_then_hf_zero_run(tmp_path, free_port):
    """`accelerate launch --multi_gpu` starts torchrun-style workers; gloo makes it run on CPU."""
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port), "-m", "hf_zero.run",
         str(SCRIPT), "--flag", "x", "--out_dir", str(tmp_path)])  # fmt: skip
    check_ranks(tmp_path, str(SCRIPT))
