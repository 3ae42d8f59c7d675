"""Run `bench/job.py` under several training modes, one fresh subprocess each, and tabulate.

    python bench/run.py --modes plain,hfzero-s2,ds-z2 --preset 1b1 --world_size 1 --name h100_1b1

Every mode runs the same job with the same flags under `torchrun --nproc_per_node W` (also for
W = 1, so process setup is alike across modes); only the mode's own switch differs:

    plain           the Trainer alone (DDP when W > 1)
    hfzero-sN       python -m hf_zero.run bench/job.py ... --zero_config bench/configs/hfzero_sN.json
    ds-zN           the Trainer's --deepspeed bench/configs/ds_zN.json
    fsdp2           the Trainer's --fsdp "full_shard auto_wrap" --fsdp_config bench/configs/fsdp2.json

A mode that fails (OOM, import error, timeout) is recorded with the tail of its output and the run
goes on. After each mode `<results_dir>/<name>.json` (list of records) and `<name>.md` (table) are
rewritten, and every mode's full output is appended to `<name>.log`.

Scaling: `--world_sizes 1,2,4` runs the mode list at each W in turn (in the order given), one
results set per W named `<name>_w<W>`, plus `<name>_scaling.json` / `.md`: tok/s per GPU, scaling
efficiency against the smallest W where the mode ran, peak memory, and hf_zero against DeepSpeed
and FSDP2 at each W. A W larger than the visible GPU count is skipped.

    python bench/run.py --preset 7b --world_sizes 2,4 --modes hfzero-s2,hfzero-s3,ds-z2,ds-z3,fsdp2 \
        --micro_batch 2 --extra="--gradient_checkpointing" --init_device cuda --name h100_7b

[Note: activation checkpointing] `--gradient_checkpointing` (or `--activation_checkpointing`) in
`--extra` reaches plain, hf_zero and DeepSpeed modes as the Trainer flag (the model's own
checkpointing of each decoder layer). FSDP modes get FSDP's equivalent instead: the flag is
dropped from their command line and `activation_checkpointing: true` is added to their
`--fsdp_config` (`bench/configs/fsdp2_ac.json`), which has accelerate wrap each decoder layer in
torch's non-reentrant `checkpoint_wrapper` before `fully_shard`. transformers warns that its own
flag under FSDP re-gathers every layer's params once more in backward; the fsdp_config key does not.

Budget: `--budget_s` caps the whole invocation. A mode is not started with less than
`--min_mode_s` seconds left (recorded as `skipped`), and a started mode's timeout is cut to what
is left, so results come back before an outer limit (a 10-minute device call) kills the run.
"""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from report import comparison_rows, markdown, scaling_markdown, scaling_rows

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = "bench/configs"

_HFZERO = ("-m", "hf_zero.run")
# mode -> (runner placed between torchrun and the script, arguments appended to the job)
MODES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": ((), ()),
    **{f"hfzero-s{n}": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s{n}.json")) for n in range(4)},
    **{f"hfzero-s{n}-offload": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s{n}_offload.json")) for n in (2, 3)},
    # partial optimizer offload: NN% of the optimizer state on the host, the rest stepped on the GPU
    **{f"hfzero-s2-offload-r{r}": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s2_offload_r{r}.json"))
       for r in (80, 70, 60, 50)},
    # issue 18: the device leg ([Note: device leg]): NN% of the offloaded elements stepped on the GPU
    # (copied up and back) when the step waits for the clip norm, the rest on the host at the same time
    **{f"hfzero-s2-offload-leg{s}": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s2_offload_leg{s}.json"))
       for s in (30, 50)},
    "hfzero-s3-offload-leg30": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s3_offload_leg30.json")),
    # device_share "auto" ([Note: leg share]): the share follows the two legs' measured rates
    **{f"hfzero-s{n}-offload-legauto": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s{n}_offload_legauto.json"))
       for n in (2, 3)},
    "hfzero-s2-offload-r70-legauto": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s2_offload_r70_legauto.json")),
    "hfzero-s2-offload-r70-leg30": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s2_offload_r70_leg30.json")),
    # issue 18 D2: the share chosen after the first step from the GPU memory then free
    "hfzero-s2-offload-auto": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s2_offload_auto.json")),
    "hfzero-s2-offload-auto-leg30": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s2_offload_auto_leg30.json")),
    # issue 18 D3 (opt-in numerics): bf16 AdamW moments on the host (bf16.bf16_optimizer_states)
    **{f"hfzero-s{n}-offload-bf16state": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s{n}_offload_bf16state.json"))
       for n in (2, 3)},
    # optimizer state in swap files under /tmp/hf_zero_nvme (create it first; any disk or tmpfs works)
    "hfzero-s2-nvme": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s2_nvme.json")),
    # stage 3, optimizer state in host memory, param shards in swap files under /tmp/hf_zero_nvme
    "hfzero-s3-nvme-param": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s3_nvme_param.json")),
    **{f"ds-z{n}": ((), ("--deepspeed", f"{CONFIGS}/ds_z{n}.json")) for n in (2, 3)},
    **{f"ds-z{n}-offload": ((), ("--deepspeed", f"{CONFIGS}/ds_z{n}_offload.json")) for n in (2, 3)},
    "fsdp2": ((), ("--fsdp", "full_shard auto_wrap", "--fsdp_config", f"{CONFIGS}/fsdp2.json")),
}
# issue 21: the same modes with the Trainer's --torch_compile, so that one invocation compares eager
# and compiled (each mode its own process, as ever)
MODES.update({f"{m}-compile": (MODES[m][0], (*MODES[m][1], "--torch_compile"))
              for m in ("plain", "hfzero-s1", "hfzero-s2", "hfzero-s3", "hfzero-s2-offload", "hfzero-s3-offload", "fsdp2")})
DEFAULT_MODES = "plain,hfzero-s0,hfzero-s1,hfzero-s2,hfzero-s3,ds-z2,ds-z3,fsdp2"
# Per-mode timeout when --timeout is not given. 7b: import ~15 s, building 7 B fp32 params on one CPU
# thread per rank 40-80 s (--init_device cuda: seconds), moving them, ~10 steps of ~1 s, teardown.
DEFAULT_TIMEOUT = {"tiny": 600, "1b1": 600, "7b": 360}
CHECKPOINTING_FLAGS = ("--gradient_checkpointing", "--activation_checkpointing")
FSDP_AC_CONFIG = f"{CONFIGS}/fsdp2_ac.json"  # fsdp2.json + activation_checkpointing: true

# Runs in a child so that this process never creates a CUDA context of its own.
_PROBE = """
import json, importlib.metadata as md, platform, torch
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
print(json.dumps({
    "cuda": cuda,
    "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
    "gpu_count": torch.cuda.device_count() if cuda else 0,
    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                 **{d: version(d) for d in ("transformers", "accelerate", "deepspeed", "hf-zero")}},
}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma list of: {', '.join(MODES)}")
    p.add_argument("--preset", default="1b1", help="job.py model preset: tiny, 1b1, 7b")
    p.add_argument("--world_size", type=int, default=1, help="processes (GPUs) per mode")
    p.add_argument("--world_sizes", default=None,
                   help="comma list: run the modes at each W in turn (overrides --world_size); see Scaling")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch", type=int, default=4, help="per-device train batch size")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--warmup_steps", type=int, default=3, help="optimizer steps left out of tok/s")
    p.add_argument("--name", default=None, help="results file stem (default: preset, world, time)")
    p.add_argument("--extra", default="", help="extra Trainer arguments appended to every mode, one string")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds per mode before it is killed (default by preset: {DEFAULT_TIMEOUT})")
    p.add_argument("--budget_s", type=float, default=None, help="seconds for the whole invocation; see Budget")
    p.add_argument("--min_mode_s", type=float, default=60, help="do not start a mode with less budget left")
    p.add_argument("--init_device", choices=("cpu", "cuda"), default="cpu",
                   help="job.py --init_device: where the random-init model is built")
    p.add_argument("--profile_step", type=int, default=None,
                   help="job.py --profile_step: profile this optimizer step (1-based) on rank 0")
    p.add_argument("--profile_modes", default="hfzero-s3", help="comma list of modes that --profile_step applies to")
    p.add_argument("--profile_world_sizes", default="max",
                   help="comma list of W that --profile_step applies to, or 'max' (the largest W run), or 'all'")
    p.add_argument("--exit_grace", type=float, default=60, help="seconds a job may linger after writing results")
    p.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu: --use_cpu, no bf16")
    p.add_argument("--git_commit", default=None, help="recorded commit when the tree has no .git")
    opts = p.parse_args(argv)
    opts.modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    unknown = [m for m in opts.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if opts.max_steps <= opts.warmup_steps:
        p.error(f"--max_steps {opts.max_steps} must exceed --warmup_steps {opts.warmup_steps}")
    opts.scaling = opts.world_sizes is not None
    try:
        sizes = [int(w) for w in opts.world_sizes.split(",") if w.strip()] if opts.scaling else [opts.world_size]
    except ValueError:
        p.error(f"--world_sizes {opts.world_sizes!r} is not a comma list of integers")
    if not sizes or any(w < 1 for w in sizes):
        p.error(f"world sizes must be >= 1, got {sizes}")
    opts.world_size_list = list(dict.fromkeys(sizes))
    if opts.timeout is None:
        opts.timeout = DEFAULT_TIMEOUT.get(opts.preset, 600)
    opts.profile_modes = [m.strip() for m in opts.profile_modes.split(",") if m.strip()]
    unknown = [m for m in opts.profile_modes if m not in MODES]
    if unknown:
        p.error(f"unknown --profile_modes {unknown}; choose from {list(MODES)}")
    if opts.profile_world_sizes in ("max", "all"):
        opts.profile_worlds = {"max": [max(sizes)], "all": sizes}[opts.profile_world_sizes]
    else:
        opts.profile_worlds = [int(w) for w in opts.profile_world_sizes.split(",") if w.strip()]
    if opts.profile_step is not None:
        if not 1 <= opts.profile_step <= opts.max_steps:
            p.error(f"--profile_step {opts.profile_step} must be within 1..--max_steps {opts.max_steps}")
        if opts.profile_step > opts.warmup_steps and opts.max_steps - opts.warmup_steps < 2:
            p.error("--profile_step inside the timed steps needs --max_steps >= --warmup_steps + 2 "
                    "(the profiled step is not timed)")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if opts.scaling:
        opts.base_name = opts.name or f"{opts.preset}_{stamp}"
    else:
        opts.name = opts.name or f"{opts.preset}_w{opts.world_size}_{stamp}"
        opts.base_name = opts.name
    return opts


def probe_environment() -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"environment probe failed:\n{out.stderr[-3000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info["versions"]["hf-zero"] is None:  # run from a source tree that is not pip-installed
        with open(ROOT / "pyproject.toml", "rb") as f:
            info["versions"]["hf-zero"] = tomllib.load(f)["project"]["version"] + " (source tree)"
    return info


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def job_arguments(opts, cuda: bool) -> list[str]:
    """The flags every mode shares: the issue's job (AdamW, bf16 autocast on GPU)."""
    args = [
        "--preset", opts.preset,
        "--seq_len", str(opts.seq_len),
        "--per_device_train_batch_size", str(opts.micro_batch),
        "--gradient_accumulation_steps", str(opts.grad_accum),
        "--max_steps", str(opts.max_steps),
        "--bench_warmup_steps", str(opts.warmup_steps),
        "--init_device", opts.init_device,
    ]  # fmt: skip
    args += ["--bf16", "--optim", "adamw_torch_fused"] if cuda else ["--use_cpu", "--optim", "adamw_torch"]
    # The Trainer's DDP default (find unused parameters) costs an extra graph walk every step.
    args += ["--ddp_find_unused_parameters", "False"]
    return args


def _is_checkpointing_flag(token: str) -> bool:
    return any(token == f or token.startswith(f + "=") for f in CHECKPOINTING_FLAGS)


def mode_extra(mode: str, extra: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """(extra Trainer flags, mode switch) for `mode`; see [Note: activation checkpointing]."""
    _, mode_args = MODES[mode]
    if "--fsdp_config" not in mode_args or not any(_is_checkpointing_flag(t) for t in extra):
        return extra, mode_args
    flags = [t for t in extra if not _is_checkpointing_flag(t)]
    switch = list(mode_args)
    switch[switch.index("--fsdp_config") + 1] = FSDP_AC_CONFIG
    return flags, tuple(switch)


def mode_command(mode: str, opts, shared: list[str], bench_out: Path, output_dir: Path, profile_out=None) -> list[str]:
    runner, _ = MODES[mode]
    extra, mode_args = mode_extra(mode, shlex.split(opts.extra))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(opts.world_size)]
    job = ["bench/job.py", *shared, "--bench_out", str(bench_out), "--output_dir", str(output_dir)]
    if profile_out is not None:
        job += ["--profile_step", str(opts.profile_step), "--profile_out", str(profile_out)]
    return [*torchrun, *runner, *job, *extra, *mode_args]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the mode's process group (torchrun passes it on to the ranks), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd, log_path: Path, timeout: float, done_file: Path, exit_grace: float):
    """Run `cmd` in its own process group with output to `log_path`.

    Returns (return code, seconds, why it was killed or None). A job is killed at `timeout`, or
    `exit_grace` seconds after it wrote `done_file` if it is still running then (a rank stuck in
    process-group teardown must not cost the rest of the run its time).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    done_at, killed = None, None
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            now = time.perf_counter()
            if done_at is None and done_file.exists():
                done_at = now
            if now - start > timeout:
                killed = f"timeout after {timeout:.0f} s"
            elif done_at is not None and now - done_at > exit_grace:
                killed = f"still running {exit_grace:.0f} s after writing its results"
            if killed:
                _kill_group(proc)
                log.write(f"\n[bench] killed: {killed}\n")
                break
            time.sleep(0.5)
    return proc.returncode, time.perf_counter() - start, killed


# What a failed mode's log says went wrong, most telling first.
_NOISE = re.compile(r"ChildFailedError|SignalException")  # the launcher reporting, not the cause
_FAILURE_PATTERNS = [
    re.compile(r"^hf_zero: .*"),
    re.compile(r"^\s*(\[rank\d+\]:\s*)?(torch\.[\w.]*OutOfMemoryError|[\w.]*(Error|Exception))\b.*"),
    re.compile(r"No module named .*|CUDA error.*|NCCL error.*"),
    re.compile(r"terminate called.*|Killed|Segmentation fault.*"),
    re.compile(r"^\s*exitcode\s*:\s*-?\d+.*"),
]


def failure_summary(text: str) -> tuple[str, str]:
    """(one-line error, output tail) from a failed mode's log."""
    lines = text.rstrip().splitlines()
    error = None
    for pattern in _FAILURE_PATTERNS:
        hits = [ln.strip() for ln in lines if pattern.search(ln) and not _NOISE.search(ln)]
        if hits:
            error = hits[-1]
            break
    error = error or (lines[-1].strip() if lines else "no output")
    return error[:300], "\n".join(lines[-60:])[-6000:]


def _profiled(mode: str, opts) -> bool:
    return opts.profile_step is not None and mode in opts.profile_modes and opts.world_size in opts.profile_worlds


def run_mode(mode: str, opts, env_info: dict, commit: str | None, workdir: Path, log_all: Path,
             timeout: float | None = None) -> dict:
    bench_out = workdir / f"{mode}.jsonl"
    profile_out = Path(opts.results_dir) / f"{opts.name}_{mode}" if _profiled(mode, opts) else None
    cmd = mode_command(mode, opts, job_arguments(opts, env_info["cuda"]), bench_out, workdir / f"out_{mode}",
                       profile_out)
    log_path = workdir / f"{mode}.log"
    rc, wall, killed = run_logged(cmd, log_path, timeout or opts.timeout, bench_out, opts.exit_grace)
    text = log_path.read_text(errors="replace")
    with open(log_all, "a") as f:
        f.write(f"\n{'=' * 30} {mode} (rc={rc}, {wall:.0f} s) {'=' * 30}\n{text}")

    record = {
        "name": opts.name,
        "mode": mode,
        "status": "failed",
        "error": None,
        "error_tail": None,
        "command": shlex.join(cmd),
        "returncode": rc,
        "wall_s": wall,
        "device_name": env_info["device_name"],
        "gpu_count": env_info["gpu_count"],
        "world_size": opts.world_size,
        "versions": env_info["versions"],
        "git_commit": commit,
        "settings": {k: getattr(opts, k) for k in ("preset", "seq_len", "micro_batch", "grad_accum", "max_steps")}
        | {"warmup_steps": opts.warmup_steps, "extra": opts.extra, "device": "cuda" if env_info["cuda"] else "cpu",
           "init_device": opts.init_device, "profile_step": opts.profile_step if profile_out else None},
        "tok_per_s": None,
        "x_plain": None,
        "exit_note": None,
    }
    if bench_out.exists():  # every rank finished training: the numbers stand even if exit went wrong
        record.update(json.loads(bench_out.read_text()))
        record["status"] = "ok"
        if rc != 0:
            record["exit_note"] = killed or f"exit code {rc} after writing its results"
    else:
        record["error"], record["error_tail"] = failure_summary(text)
        if killed:
            record["error"] = f"{killed}; last: {record['error']}"
    return record


def write_results(records: list[dict], opts) -> str:
    plain = next((r["tok_per_s"] for r in records if r["mode"] == "plain" and r["status"] == "ok"), None)
    for r in records:
        r["x_plain"] = r["tok_per_s"] / plain if plain and r["tok_per_s"] else None
    out = Path(opts.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{opts.name}.json").write_text(json.dumps(records, indent=2) + "\n")
    table = markdown(records)
    (out / f"{opts.name}.md").write_text(table)
    return table


def write_scaling(by_world: dict[int, list[dict]], opts, skipped_worlds: list[int]) -> str:
    """`<base_name>_scaling.json` (rows) and `.md` (tables) over every world size run so far."""
    rows = scaling_rows(by_world)
    out = Path(opts.results_dir)
    doc = {"name": opts.base_name, "world_sizes": sorted(by_world), "skipped_world_sizes": skipped_worlds,
           "rows": rows, "comparisons": comparison_rows(rows)}
    (out / f"{opts.base_name}_scaling.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = scaling_markdown(by_world, skipped_worlds)
    (out / f"{opts.base_name}_scaling.md").write_text(table)
    return table


def skipped_record(mode: str, opts, env_info: dict, commit: str | None, why: str) -> dict:
    """A mode the budget left no time for: listed, with why, so the table shows the gap."""
    return {
        "name": opts.name, "mode": mode, "status": "skipped", "error": why, "error_tail": None,
        "command": None, "returncode": None, "wall_s": 0.0, "device_name": env_info["device_name"],
        "gpu_count": env_info["gpu_count"], "world_size": opts.world_size, "versions": env_info["versions"],
        "git_commit": commit,
        "settings": {k: getattr(opts, k) for k in ("preset", "seq_len", "micro_batch", "grad_accum", "max_steps")}
        | {"warmup_steps": opts.warmup_steps, "extra": opts.extra, "device": "cuda" if env_info["cuda"] else "cpu",
           "init_device": opts.init_device, "profile_step": None},
        "tok_per_s": None, "x_plain": None, "exit_note": None,
    }


def main(argv=None) -> int:
    opts = parse_args(argv)
    started = time.perf_counter()
    env_info = probe_environment()
    if opts.device != "auto":
        env_info["cuda"] = opts.device == "cuda"
    commit = opts.git_commit or git_commit()
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    worlds, skipped_worlds = [], []
    for w in opts.world_size_list:
        if env_info["cuda"] and w > env_info["gpu_count"]:
            print(f"[bench] skipping W = {w}: {env_info['gpu_count']} GPUs visible", flush=True)
            skipped_worlds.append(w)
        else:
            worlds.append(w)
    if opts.profile_world_sizes == "max" and worlds:
        opts.profile_worlds = [max(worlds)]  # the largest W that actually runs

    def budget_left() -> float | None:
        return None if opts.budget_s is None else opts.budget_s - (time.perf_counter() - started)

    by_world: dict[int, list[dict]] = {}
    all_ok = bool(worlds)
    for w in worlds:
        opts.world_size = w
        opts.name = f"{opts.base_name}_w{w}" if opts.scaling else opts.base_name
        log_all = results_dir / f"{opts.name}.log"
        log_all.write_text("")
        print(f"[bench] {opts.name}: {env_info['device_name']} x{env_info['gpu_count']}, W = {w}, "
              f"modes {opts.modes}", flush=True)
        records: list[dict] = by_world.setdefault(w, [])
        with tempfile.TemporaryDirectory(prefix="hf_zero_bench_") as tmp:
            for mode in opts.modes:
                left = budget_left()
                if left is not None and left < opts.min_mode_s:
                    record = skipped_record(mode, opts, env_info, commit,
                                            f"not started: {max(left, 0):.0f} s of --budget_s left")
                else:
                    print(f"[bench] {mode} ...", flush=True)
                    timeout = opts.timeout if left is None else min(opts.timeout, left)
                    record = run_mode(mode, opts, env_info, commit, Path(tmp), log_all, timeout)
                records.append(record)
                table = write_results(records, opts)
                if opts.scaling:
                    write_scaling(by_world, opts, skipped_worlds)
                shown = f"{record['tok_per_s']:.0f} tok/s" if record["status"] == "ok" else record["error"]
                print(f"[bench] {mode}: {record['status']} in {record['wall_s']:.0f} s: {shown}", flush=True)
        print(table, flush=True)
        print(f"[bench] wrote {results_dir / opts.name}.json, .md, .log", flush=True)
        all_ok = all_ok and all(r["status"] == "ok" for r in records)
    if opts.scaling:
        print(write_scaling(by_world, opts, skipped_worlds), flush=True)
        print(f"[bench] wrote {results_dir / opts.base_name}_scaling.json, .md", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
