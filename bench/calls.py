"""The device calls the open issues still owe, one named recipe per call of the lent GPU.

    python3 bench/calls.py --list
    python3 bench/calls.py NAME --tag s17 --git_commit SHA --results_dir "$OUT"   (on the device)
    python3 bench/calls.py NAME --dry_run                                          (here: the commands)

A device call runs at most 10 minutes and a session has 30 minutes of device time, of which failed
starts take a share, so each recipe is one call whose commands fit it (their budgets add up to at
most ``CALL_S``), in the order that keeps the most useful result if the call is cut off. The
commands are the bench scripts' own, with the settings the last session's notes settled on (a
recipe says which issue and which target it measures); the scripts write their JSON, md and log
into ``--results_dir`` (at most 8 files come back from a call: a recipe writes fewer).

Before the commands: wheels in ``.whl/`` (DeepSpeed 0.19.8's, copied from
``../shared/wheels/deepspeed-0.19.8``; bench/README) are installed into ``/tmp/site`` and put on
``PYTHONPATH``, and ``TORCH_CUDA_ARCH_LIST=9.0`` is set (the image's ``9.0a`` breaks DeepSpeed's
op builder); long_seq.py and largest_model.py create the NVMe folders they use. The device copy of the repo has no ``.git``: pass ``--git_commit "$(git rev-parse HEAD)"`` (written
here into an ignored file that travels, e.g. ``.gpu/commit``, and read there with ``$(cat ...)``).

A command may run the bench script of an older commit instead, to tell a regression from a
machine's own speed on the same machine in one call: its first element is ``@COMMIT`` and the
script runs from that commit's tree, untarred from ``<trees>/at_COMMIT.tar.gz`` (written here with
``git archive --format=tar.gz COMMIT -o .gpu/at_COMMIT.tar.gz``; ``--trees``, default ``.gpu``, an
ignored folder that travels) into ``/tmp/at_COMMIT``. The bench scripts run their jobs from their own
tree (``ROOT`` is the script's grandparent), so that commit's hf_zero is what trains; its results
record that commit. A missing tarball stops the recipe before anything runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALL_S = 580  # a call's command limit is 600 s; the rest is margin for set-up and the last write
SITE = "/tmp/site"
AT_DIR = "/tmp"  # an older commit's tree goes to AT_DIR/at_COMMIT


@dataclass(frozen=True)
class Recipe:
    issue: int  # 0: several
    what: str
    commands: tuple[tuple[str, ...], ...]  # ([@COMMIT,] script or "pytest", its arguments); "{name}": the results stem


def _then_and_now(commit: str, mode: str) -> tuple[tuple[str, ...], ...]:
    """The offload-7b job in one ``mode``, 8 steps (3 not timed), at an older ``commit`` (``@COMMIT``)
    and then at this one: the same machine for both."""
    job = ("bench/run.py", "--preset", "7b", "--world_size", "1", "--micro_batch", "2", "--grad_accum", "8",
           "--max_steps", "8", "--warmup_steps", "3", "--init_device", "cuda", "--extra=--gradient_checkpointing",
           "--timeout", "240", "--exit_grace", "10", "--min_mode_s", "140", "--budget_s", "270", "--modes", mode)
    return (("@" + commit, *job, "--name", "{name}_" + commit), (*job, "--name", "{name}"))


RECIPES: dict[str, Recipe] = {
    "offload": Recipe(18, "1.1B stage 2 and stage 3 CPU offload beside DeepSpeed ZeRO-Offload, clip 1.0 (target 2.0x)", (
        ("bench/run.py", "--preset", "1b1", "--world_size", "1", "--max_steps", "24", "--warmup_steps", "8",
               "--timeout", "100", "--exit_grace", "10", "--min_mode_s", "40", "--budget_s", "440",
               "--modes", "hfzero-s2-offload,ds-z2-offload,hfzero-s3-offload,ds-z3-offload,"
                          "hfzero-s2-offload-leg30,hfzero-s2-offload-legauto",
               "--name", "{name}"),
    )),
    # Session 17 ran it with 5 steps (2 not timed) and legauto: 5,664 and 3,347 tok/s, with the leg's
    # first steps timed (a leg chunk's state is moved into pinned memory the first time it goes up,
    # and "auto" was still moving its share). Now a fixed share, 10 steps, the first 4 not timed.
    "offload-7b": Recipe(18, "7B stage 2 + CPU optimizer offload on one H100 (grad accum 8, gradient checkpointing, "
                             "clip 1.0; target >= 6,300 tok/s): ratio auto with the device leg (never measured: "
                             "killed by the host in session 19, a crash in HostMemory.free in session 20), without "
                             "it, and ratio 0.7 with the leg (5,752 in session 20); step 7 of the first profiled "
                             "(bring its .trace.json.gz back: idle_by_host says what holds the GPU)", (
        ("bench/run.py", "--preset", "7b", "--world_size", "1", "--micro_batch", "2", "--grad_accum", "8",
               "--max_steps", "10", "--warmup_steps", "4", "--init_device", "cuda", "--extra=--gradient_checkpointing",
               "--timeout", "230", "--exit_grace", "10", "--min_mode_s", "140", "--budget_s", "560",
               "--modes", "hfzero-s2-offload-auto-leg30,hfzero-s2-offload-auto,hfzero-s2-offload-r70-leg30",
               "--profile_step", "7", "--profile_modes", "hfzero-s2-offload-auto-leg30", "--name", "{name}"),
    )),
    "offload-7b-then": Recipe(18, "the offload-7b job at ratio 0.7 without the leg, at 37308e2 (6,004 tok/s on another "
                                  "H100, h100_7b_w1_offload) and at this commit (5,392 and 5,664 in sessions 17-18), "
                                  "on one machine: a regression or the machine? (needs .gpu/at_37308e2.tar.gz)",
                              _then_and_now("37308e2", "hfzero-s2-offload-r70")),
    "offload-7b-kept": Recipe(18, "the offload-7b job at ratio 0.7 with the leg (share 0.3), before (0ed9146) and with "
                                  "the leg's grads kept on the device ([Note: kept leg grads]), on one machine "
                                  "(needs .gpu/at_0ed9146.tar.gz)",
                              _then_and_now("0ed9146", "hfzero-s2-offload-r70-leg30")),
    "offload-7b-noclip": Recipe(18, "the offload-7b job with clipping that never fires (max_grad_norm 1e9: "
                                    "speculation stands, the host step overlaps backward), reported apart from the "
                                    "target: how much of the 7B tail clipping at every step costs", (
        ("bench/run.py", "--preset", "7b", "--world_size", "1", "--micro_batch", "2", "--grad_accum", "8",
               "--max_steps", "10", "--warmup_steps", "4", "--init_device", "cuda",
               "--extra=--gradient_checkpointing --max_grad_norm 1e9",
               "--timeout", "230", "--exit_grace", "10", "--min_mode_s", "140", "--budget_s", "400",
               "--modes", "hfzero-s2-offload-auto-leg30,hfzero-s2-offload-r70-leg30", "--name", "{name}"),
    )),
    "largest-13b": Recipe(18, "13B full fine-tune on one H100 (fp32 state split host/NVMe), then DeepSpeed's "
                              "result with the same JSON", (
        # ratio and host_share as session 17's run that trained (the plan's own, 0.683 and 0.67, were
        # killed by the host: bench/results/h100_session17_summary.md)
        ("bench/largest_model.py", "--plan", "13b-fp32-split", "--tools", "hfzero,ds", "--budget_s", "560",
               "--ratio", "0.63", "--host_share", "0.66",
               "--name", "{name}"),
    )),
    "longseq-7b-256k": Recipe(19, "7B at 256K tokens on one H100 + 125 GiB host (hfzero-split; target >= 256K)", (
        ("bench/long_seq.py", "--preset", "7b", "--systems", "hfzero-split", "--lengths", "262144",
               "--warmup_steps", "0", "--measure_steps", "1", "--attempt_timeout", "545", "--budget_s", "560",
               "--exit_grace", "10", "--name", "{name}"),
    )),
    "longseq-1b1-512k-hfzero": Recipe(19, "1.1B at 512K, hf_zero with offload (DeepSpeed ALST ran 256K in session 16)", (
        ("bench/long_seq.py", "--preset", "1b1", "--systems", "hfzero-offload", "--lengths", "524288",
               "--warmup_steps", "0", "--measure_steps", "1", "--attempt_timeout", "560", "--budget_s", "570",
               "--exit_grace", "5", "--name", "{name}"),
    )),
    "longseq-1b1-512k-ds": Recipe(19, "1.1B at 512K, DeepSpeed ALST with the same offloads", (
        ("bench/long_seq.py", "--preset", "1b1", "--systems", "ds-alst", "--lengths", "524288",
               "--warmup_steps", "0", "--measure_steps", "1", "--attempt_timeout", "560", "--budget_s", "570",
               "--exit_grace", "5", "--name", "{name}"),
    )),
    "longseq-1b1-plain": Recipe(19, "1.1B, the plain Trainer's longest sequence (gradient checkpointing, no hf_zero): "
                                    "the issue's third column", (
        ("bench/long_seq.py", "--preset", "1b1", "--systems", "plain", "--warmup_steps", "0", "--measure_steps", "1",
               "--attempt_timeout", "150", "--budget_s", "540", "--exit_grace", "10", "--name", "{name}"),
    )),
    "offload-7b-auto": Recipe(18, "issue 18: the offload-7b job with ratio \"auto\" alone, 6 steps (killed by the host in "
                                  "session 19 before its host step freed its grads when replaced)", (
        ("bench/run.py", "--preset", "7b", "--world_size", "1", "--micro_batch", "2", "--grad_accum", "8",
               "--max_steps", "6", "--warmup_steps", "3", "--init_device", "cuda", "--extra=--gradient_checkpointing",
               "--timeout", "200", "--exit_grace", "10", "--min_mode_s", "140", "--budget_s", "220",
               "--modes", "hfzero-s2-offload-auto", "--name", "{name}"),
    )),
    "gpu-tests": Recipe(0, "the GPU tests not yet run on a GPU: the device leg's, with its grads kept on the device "
                           "([Note: kept leg grads]; record_stream, bit for bit as downloaded grads)", (
        ("pytest", "-q", "tests/gpu/test_device_leg_gpu.py"),
    )),
    "host-contention": Recipe(18, "the fused CPU AdamW alone, the pinned copies alone and both at once: is the "
                                  "7B offload step's tail bound by host memory (bench/host_contention.py; seconds)", (
        ("bench/host_contention.py", "--numel", "268435456", "--copy_gb", "4", "--reps", "3", "--budget_s", "90",
               "--name", "{name}"),
    )),
    "cast-copy": Recipe(21, "the bf16 -> fp32 grad upcast, by the ways torch offers (bench/cast_copy.py; seconds)", (
        ("bench/cast_copy.py", "--budget_s", "60", "--name", "{name}"),
    )),
    "compile-7b": Recipe(21, "7B with gradient checkpointing, stage 3 compiled against FSDP2 compiled (target 1.05x), "
                             "eager beside them; needs an H200 (hf_zero s3 peaked at 114 GiB in h200_7b_w1)", (
        ("bench/run.py", "--preset", "7b", "--world_size", "1", "--micro_batch", "2", "--max_steps", "8",
               "--warmup_steps", "3", "--init_device", "cuda", "--extra=--gradient_checkpointing",
               "--timeout", "170", "--exit_grace", "10", "--min_mode_s", "100", "--budget_s", "540",
               "--modes", "hfzero-s3-compile,fsdp2-compile,hfzero-s3,fsdp2", "--name", "{name}"),
    )),
    "compile": Recipe(21, "1.1B compiled against eager at stages 2 and 3, plain and FSDP2 compiled beside them "
                          "(targets 1.25, 1.2, >= plain compiled)", (
        ("bench/run.py", "--preset", "1b1", "--world_size", "1", "--max_steps", "20", "--warmup_steps", "5",
               "--timeout", "150", "--exit_grace", "20", "--budget_s", "560",
               "--modes", "plain,hfzero-s3-compile,hfzero-s3,plain-compile,hfzero-s2-compile,hfzero-s2,fsdp2-compile",
               "--profile_step", "12", "--profile_modes", "hfzero-s3-compile,plain-compile",
               "--name", "{name}"),
    )),
}


def commands(name: str, tag: str, git_commit: str | None, results_dir: str) -> list[list[str]]:
    """The recipe's commands as they run: each bench script with the results stem
    ``gpu_<recipe>_<tag>``, the results folder and the commit."""
    stem = f"gpu_{name.replace('-', '_')}_{tag}"
    out = []
    for command in RECIPES[name].commands:
        if command[0] == "pytest":  # tests: their own output, no results files, cut off inside the call
            out.append(["timeout", str(CALL_S - 40), sys.executable, "-m", "pytest", *command[1:]])
            continue
        script, commit = command[0], git_commit
        if script.startswith("@"):  # an older commit's tree (the module's docstring)
            commit, command = script[1:], command[1:]
            script = f"{AT_DIR}/at_{commit}/{command[0]}"
        args = [a.replace("{name}", stem) for a in command[1:]]
        args += ["--results_dir", results_dir] + (["--git_commit", commit] if commit else [])
        out.append([sys.executable, script, *args])
    return out


def older_trees(name: str) -> list[str]:
    """The commits whose trees the recipe's commands run from (``@COMMIT``), in order."""
    return [c[0][1:] for c in RECIPES[name].commands if c[0].startswith("@")]


def unpack_trees(name: str, trees: Path) -> None:
    """Each older commit's tree of the recipe, from ``trees/at_COMMIT.tar.gz`` into
    ``AT_DIR/at_COMMIT`` (replacing what is there); every tarball is checked before any is unpacked."""
    wanted = {commit: trees / f"at_{commit}.tar.gz" for commit in older_trees(name)}
    missing = [str(path) for path in wanted.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"calls.py {name}: no tree for {', '.join(missing)}; write each with "
                         f"git archive --format=tar.gz COMMIT -o PATH (--trees names the folder)")
    for commit, path in wanted.items():
        target = Path(AT_DIR) / f"at_{commit}"
        subprocess.run(["rm", "-rf", str(target)], check=True)
        target.mkdir(parents=True)
        subprocess.run(["tar", "xzf", str(path), "-C", str(target)], check=True)


def environment() -> dict[str, str]:
    """The commands' environment: the wheels of ``.whl/`` installed into ``SITE`` (when there are
    any) and on ``PYTHONPATH``, DeepSpeed's arch list, unbuffered output."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0", PYTHONUNBUFFERED="1")
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], check=True)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, env.get("PYTHONPATH", "")) if p)
    return env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=list(RECIPES), help="the recipe")
    p.add_argument("--list", action="store_true", help="the recipes, with their issue and what they measure")
    p.add_argument("--tag", default=time.strftime("%m%d"), help="results stem suffix, e.g. the session (s17)")
    p.add_argument("--git_commit", default=None, help="recorded commit (the device copy has no .git)")
    p.add_argument("--results_dir", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--trees", default=str(ROOT / ".gpu"),
                   help="folder of the older commits' tarballs, at_COMMIT.tar.gz (recipes with @COMMIT commands)")
    opts = p.parse_args(argv)
    if not opts.list and opts.name is None:
        p.error("name a recipe, or --list")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.list:
        for name, recipe in RECIPES.items():
            print(f"{name:26} {f'issue {recipe.issue}' if recipe.issue else 'tests'}: {recipe.what}")
        return 0
    todo = commands(opts.name, opts.tag, opts.git_commit, opts.results_dir)
    if opts.dry_run:
        for command in todo:
            print(shlex.join(command))
        return 0
    unpack_trees(opts.name, Path(opts.trees))
    env = environment()
    Path(opts.results_dir).mkdir(parents=True, exist_ok=True)
    worst = 0
    for command in todo:
        print(f"[calls] {shlex.join(command)}", flush=True)
        worst = max(worst, subprocess.run(command, cwd=ROOT, env=env).returncode)
    return worst


if __name__ == "__main__":
    sys.exit(main())
