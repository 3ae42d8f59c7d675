"""The longest sequence one training step runs at, and tok/s there, per system (issue 19's target).

    python bench/long_seq.py --preset 1b1 --systems plain,hfzero,hfzero-offload,ds-alst --name h100_1b1_longseq

Every attempt is `bench/job.py` (the same unmodified Trainer script as `run.py`'s modes) at one
sequence length, in its own `torchrun --nproc_per_node 1` process, so an out-of-memory attempt
cannot poison the next. The job: a random-init Llama of the preset's shape, micro batch 1, no
gradient accumulation, `--gradient_checkpointing` (`use_reentrant: false`), bf16 with fused
AdamW on a GPU (`--use_cpu`, fp32 on a CPU), `--init_device cuda`, `warmup + measure` steps.

| system | what it adds to the job |
|---|---|
| `plain` | nothing: the Trainer alone |
| `hfzero` | `-m hf_zero.run ... --zero_config bench/configs/hfzero_s3_longseq.json`: stage 3, `activation_checkpointing.cpu_checkpointing`, `tiled_mlp`, `tiled_loss` |
| `hfzero-offload` | the same plus parameter and optimizer offload to pinned host memory (`hfzero_s3_offload_longseq.json`) |
| `hfzero-split` | for 7B at 256K on one H100 with a 125 GiB host, where neither the checkpoints (32 x 2 GiB) nor the offloaded states (108 GB of fp32 masters, moments, grads) fit the host next to each other: `hfzero` with the optimizer offloaded 30% to host memory and 70% to NVMe under `/tmp/hf_zero_nvme` (`host_share` 0.3; created when missing), the params on the GPU, and the first 6 checkpoints of each forward held on the GPU (`device_checkpoints`), the other 26 on the host (`hfzero_s3_split_longseq.json`; with 12 on the GPU, session 16's H100 ran out of GPU memory in the first backward: 74.5 GiB allocated, 4 GiB more asked) |
| `ds-alst` | DeepSpeed ALST on one GPU: `--deepspeed bench/configs/ds_z3_offload.json` (ZeRO-3, params and optimizer offloaded, DeepSpeed's CPU AdamW) and `job.py --alst` (DeepSpeed's TiledMLP, TiledFusedLogitsLoss and checkpoint offload, as `bench/alst.py` says) |
| `ds-alst-nooffload` | the same with `ds_z3.json` (ZeRO-3, nothing offloaded) |

Not run, with why (in the results under `not_run`): FSDP2 with accelerate's context parallelism
needs `cp_size` > 1, so two or more GPUs (accelerate requires the parallelism sizes to multiply
to the process count and refuses FSDP2 with neither `dp_shard` nor `cp` above 1); on one GPU it
would be FSDP2 with checkpointing only. For `7b`, `plain` and `hfzero` unless asked for: their
model states alone (16 and 18 bytes a parameter, 108 and 121 GB) exceed an 80 GB GPU.

[Note: search] Lengths are multiples of `--granularity`. From `--start` the length doubles while
a step runs, up to `--max_len`; if `--start` itself fails it halves down to `--granularity`.
Then `--bisections` midpoints between the longest that ran and the shortest that did not.
An attempt counts as run when all its steps ended, or its first did before its time limit cut
it off (the job's progress lines, see `step_progress.py`); as `oom` when its output names an out-of-memory error (or it died by
SIGKILL, the host's OOM killer); as `timeout` when its time limit came first (an upper bound,
flagged: the step might fit); anything else is an `error` and ends that system's search (a bug
is never read as a memory limit).

[Note: budget] `--budget_s` covers the whole invocation; each system gets an equal share of what
is left when it starts (time a system leaves over passes on). An attempt's limit is the smaller
of `--attempt_timeout` and the system's time left. An attempt is not started when the time
predicted for its start-up and first step exceeds what is left: start-up as the shortest one
seen, the step from the last one that ran, scaled by the job's model FLOPs per step
(`L * (6 N + 12 layers hidden L)`). An attempt cut off after its first step still counts as run;
its tok/s then comes from the steps it finished (`tok_s_includes_warmup` when only the first).

Results: `<results_dir>/<name>.json` (the command, device, versions, commit, settings, and per
system the longest length, its tok/s, peak GPU memory, host RSS, and every attempt) and
`<name>.md` (the table), rewritten after every attempt; every attempt's output in `<name>.log`.
"""

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from long_seq_search import Outcome, search
from run import CONFIGS, ROOT, failure_summary, git_commit, job_arguments, probe_environment
from run import run_logged

_HFZERO = ("-m", "hf_zero.run")
# system -> (runner between torchrun and the script, arguments appended to the job)
SYSTEMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": ((), ()),
    "hfzero": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s3_longseq.json")),
    "hfzero-offload": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s3_offload_longseq.json")),
    "hfzero-split": (_HFZERO, ("--zero_config", f"{CONFIGS}/hfzero_s3_split_longseq.json")),
    "ds-alst": ((), ("--deepspeed", f"{CONFIGS}/ds_z3_offload.json", "--alst")),
    "ds-alst-nooffload": ((), ("--deepspeed", f"{CONFIGS}/ds_z3.json", "--alst")),
}
DEFAULT_SYSTEMS = {"tiny": "plain,hfzero", "1b1": "plain,hfzero,hfzero-offload,ds-alst", "7b": "hfzero-offload,ds-alst"}
NOT_RUN = {
    "fsdp2-cp": "FSDP2 + accelerate context parallelism needs cp_size > 1, i.e. two or more GPUs: accelerate "
                "requires the parallelism sizes to multiply to the process count and refuses FSDP2 with neither "
                "dp_shard nor cp above 1; on one GPU it is FSDP2 with activation checkpointing only",
}
NOT_FITTING_7B = "model states alone exceed an 80 GB GPU: {bytes} bytes/param x 6.74 B = {gb} GB ({what})"
_7B_DEFAULT_SKIPS = {
    "plain": NOT_FITTING_7B.format(bytes=16, gb=108, what="fp32 weights, grads, two AdamW moments"),
    "hfzero": NOT_FITTING_7B.format(bytes=18, gb=121, what="bf16 weights, fp32 masters, grads, AdamW moments"),
}
NVME_PATH = "/tmp/hf_zero_nvme"  # hfzero_s3_split_longseq.json's offload_optimizer.nvme_path
CHECKPOINTING = ["--gradient_checkpointing", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}']


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b1", help="job.py model preset: tiny, 1b1, 7b")
    p.add_argument("--systems", default=None, help=f"comma list of {list(SYSTEMS)} (default by preset: {DEFAULT_SYSTEMS})")
    p.add_argument("--start", type=int, default=16384, help="first sequence length tried")
    p.add_argument("--max_len", type=int, default=524288, help="longest sequence length tried")
    p.add_argument("--granularity", type=int, default=4096, help="every length tried is a multiple of this")
    p.add_argument("--bisections", type=int, default=2, help="midpoints tried after the doubling; see [Note: search]")
    p.add_argument("--lengths", default=None, help="comma list: try exactly these lengths instead of searching")
    p.add_argument("--warmup_steps", type=int, default=1, help="steps left out of tok/s")
    p.add_argument("--measure_steps", type=int, default=2, help="steps tok/s is measured over")
    p.add_argument("--attempt_timeout", type=float, default=240, help="seconds one attempt may run")
    p.add_argument("--budget_s", type=float, default=510, help="seconds for the whole invocation; see [Note: budget]")
    p.add_argument("--exit_grace", type=float, default=20, help="seconds an attempt may linger after its results")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu: --use_cpu, no bf16")
    p.add_argument("--no_expandable_segments", action="store_true",
                   help="do not set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the attempts")
    p.add_argument("--name", default=None, help="results file stem (default: preset and time)")
    p.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--git_commit", default=None, help="recorded commit when the tree has no .git")
    opts = p.parse_args(argv)
    systems = opts.systems or DEFAULT_SYSTEMS.get(opts.preset, "plain")
    opts.system_list = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = [s for s in opts.system_list if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)} (not runnable here: {list(NOT_RUN)})")
    g = opts.granularity
    if g < 1 or opts.start < g or opts.start % g or opts.max_len < opts.start or opts.max_len % g:
        p.error(f"need --granularity >= 1 dividing --start ({opts.start}) <= --max_len ({opts.max_len}); got {g}")
    opts.length_list = None
    if opts.lengths:
        try:
            opts.length_list = [int(x) for x in opts.lengths.split(",") if x.strip()]
        except ValueError:
            p.error(f"--lengths {opts.lengths!r} is not a comma list of integers")
        if not opts.length_list or any(n < 1 for n in opts.length_list):
            p.error(f"--lengths must be positive integers, got {opts.lengths!r}")
    if opts.warmup_steps < 0 or opts.measure_steps < 1:
        p.error(f"need --warmup_steps >= 0 and --measure_steps >= 1, got {opts.warmup_steps}, {opts.measure_steps}")
    opts.name = opts.name or f"{opts.preset}_longseq_{time.strftime('%Y%m%d_%H%M%S')}"
    return opts


def attempt_command(system: str, opts, seq_len: int, cuda: bool, work: Path) -> list[str]:
    runner, switch = SYSTEMS[system]
    shared = argparse.Namespace(preset=opts.preset, seq_len=seq_len, micro_batch=1, grad_accum=1,
                                max_steps=opts.warmup_steps + opts.measure_steps, warmup_steps=opts.warmup_steps,
                                init_device="cuda" if cuda else "cpu")
    tag = f"{system}_{seq_len}"
    job = ["bench/job.py", *job_arguments(shared, cuda), *CHECKPOINTING,
           "--progress_out", str(work / f"{tag}.progress.jsonl"), "--bench_out", str(work / f"{tag}.jsonl"),
           "--output_dir", str(work / f"out_{tag}")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return [*torchrun, *runner, *job, *switch]


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # a line cut off by the kill
            break
    return lines


def step_flops(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """The job's model FLOPs for one step of one sequence (job.py's formula)."""
    return seq_len * (6 * n_params + 12 * layers * hidden * seq_len)


class Prober:
    """Runs one system's attempts and remembers what the budget prediction needs."""

    def __init__(self, system: str, opts, env_info: dict, work: Path, log_all: Path, shape: tuple, deadline: float,
                 on_attempt):
        self.system, self.opts, self.env_info, self.work, self.log_all = system, opts, env_info, work, log_all
        self.shape, self.deadline, self.on_attempt = shape, deadline, on_attempt
        self.attempts: list[dict] = []
        self.startup_s: float | None = None  # shortest seen: process start to train begin
        self.last_ok: tuple[int, float] | None = None  # (length, seconds of its last step)

    def predicted_s(self, seq_len: int) -> float | None:
        if self.startup_s is None or self.last_ok is None:
            return None
        length, step_s = self.last_ok
        return self.startup_s + step_s * step_flops(*self.shape, seq_len) / step_flops(*self.shape, length)

    def __call__(self, seq_len: int) -> Outcome:
        left = self.deadline - time.time()
        predicted = self.predicted_s(seq_len)
        if predicted is not None and predicted > left or left < 5:
            why = f"not started: {left:.0f} s left" + (f", predicted {predicted:.0f} s" if predicted else "")
            self._record({"seq_len": seq_len, "outcome": "skipped", "detail": why, "wall_s": 0.0})
            return Outcome("skipped", why)
        cmd = attempt_command(self.system, self.opts, seq_len, self.env_info["cuda"], self.work)
        tag = f"{self.system}_{seq_len}"
        log_path, bench_out = self.work / f"{tag}.log", self.work / f"{tag}.jsonl"
        started = time.time()
        rc, wall, killed = run_logged(cmd, log_path, min(self.opts.attempt_timeout, left), bench_out,
                                      self.opts.exit_grace)
        text = log_path.read_text(errors="replace")
        with open(self.log_all, "a") as f:
            f.write(f"\n{'=' * 20} {tag} (rc={rc}, {wall:.0f} s) {'=' * 20}\n{text}")
        lines = read_lines(self.work / f"{tag}.progress.jsonl")
        record = measure(lines, seq_len, self.opts.warmup_steps, started)
        record |= {"seq_len": seq_len, "wall_s": wall, "returncode": rc, "killed": killed, "command": shlex.join(cmd)}
        if bench_out.exists():
            job = json.loads(bench_out.read_text())
            record |= {k: job.get(k) for k in ("peak_alloc_gib", "peak_reserved_gib", "train_peak_alloc_gib",
                                               "host_rss_gib", "final_loss", "param_dtypes", "n_params")}
        wanted = self.opts.warmup_steps + self.opts.measure_steps
        record["outcome"], record["detail"] = classify(rc, killed, text, record["steps_done"], wanted)
        if record["outcome"] != "ok":
            record["error_tail"] = failure_summary(text)[1][-3000:]
        else:
            if record.get("startup_s") is not None:
                self.startup_s = min(self.startup_s or math.inf, record["startup_s"])
            self.last_ok = (seq_len, record["step_s"][-1])
        self._record(record)
        return Outcome(record["outcome"], record["detail"])

    def _record(self, record: dict) -> None:
        self.attempts.append(record)
        tok = record.get("tok_per_s")
        print(f"[long_seq] {self.system} {record['seq_len']}: {record['outcome']} ({record.get('detail') or ''})"
              + ("" if tok is None else f", {tok:.0f} tok/s"), flush=True)
        self.on_attempt()


def measure(lines: list[dict], seq_len: int, warmup: int, started: float) -> dict:
    """Steps, tok/s and peaks from an attempt's progress lines; see [Note: budget]."""
    steps = [ln for ln in lines if ln.get("event") == "step"]
    begin = next((ln for ln in lines if ln.get("event") == "train_begin"), None)
    step_s = [ln["step_s"] for ln in steps]
    timed = step_s[warmup:] or step_s[:1]
    peaks = [ln["peak_alloc_gib"] for ln in steps if ln.get("peak_alloc_gib") is not None]
    return {
        "steps_done": len(steps),
        "step_s": step_s,
        "startup_s": begin["wall"] - started if begin else None,
        "tok_per_s": len(timed) * seq_len / sum(timed) if timed else None,
        "tok_s_includes_warmup": bool(step_s) and len(step_s) <= warmup,
        "train_peak_alloc_gib": max(peaks) if peaks else None,
        "host_rss_gib": max((ln["host_rss_gib"] for ln in lines), default=None),
    }


_OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "out of memory", "can't allocate memory",
                "Cannot allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def classify(rc: int | None, killed: str | None, text: str, steps_done: int, steps_wanted: int) -> tuple[str, str | None]:
    """(outcome, detail) of one attempt; see [Note: search]. Cut off by its time limit after a
    step, an attempt ran; one that fails after a step fails (a step that runs once is not training)."""
    if steps_done >= steps_wanted or steps_done > 0 and killed and killed.startswith("timeout"):
        return "ok", killed
    after = f" (after {steps_done} steps)" if steps_done else ""
    for line in text.splitlines():
        if any(m in line for m in _OOM_MARKERS):
            return "oom", line.strip()[:300] + after
    if killed and killed.startswith("timeout"):
        return "timeout", killed
    if rc == -9 or "Signals.SIGKILL" in text or "exitcode  : -9" in text:
        return "oom", "killed by SIGKILL (the host's OOM killer?)" + after
    return "error", failure_summary(text)[0] + after


def system_summary(system: str, attempts: list[dict], stopped_by: str | None) -> dict:
    """One system's row: the longest length that ran and its measurements, the shortest that did not."""
    ran = [a for a in attempts if a["outcome"] == "ok"]
    bounds = [a for a in attempts if a["outcome"] in ("oom", "timeout")]
    best = max(ran, key=lambda a: a["seq_len"], default=None)
    failed = min(bounds, key=lambda a: a["seq_len"], default=None)
    runner, switch = SYSTEMS[system]
    return {
        "system": system,
        "switch": " ".join([*runner, *switch]),
        "longest_ok": best["seq_len"] if best else None,
        "first_fail": failed["seq_len"] if failed else None,
        "first_fail_outcome": failed["outcome"] if failed else None,
        "stopped_by": stopped_by,
        **{k: best.get(k) if best else None for k in ("tok_per_s", "tok_s_includes_warmup", "step_s",
                                                      "train_peak_alloc_gib", "peak_reserved_gib",
                                                      "host_rss_gib", "final_loss")},
        "attempts": attempts,
    }


def _gib(x) -> str:
    return "" if x is None else f"{x:.1f}"


def _len(n: int | None) -> str:
    return "none" if n is None else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _fail_cell(s: dict, max_len: int | None) -> str:
    if s["first_fail"]:
        return f"{_len(s['first_fail'])} ({s['first_fail_outcome']})"
    if s["stopped_by"]:
        return f"search stopped: {s['stopped_by']}"
    return "none up to --max_len" if s["longest_ok"] == max_len else ""


def markdown(doc: dict) -> str:
    rows = ["| system | longest step that ran | first that did not | tok/s there | step s | train peak alloc GiB "
            "| host RSS GiB | attempts (length: outcome) |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for s in doc["systems"]:
        fail = _fail_cell(s, doc["settings"]["search"]["max_len"])
        tok = "" if s["tok_per_s"] is None else f"{s['tok_per_s']:,.0f}" + (" (1st step)" if s["tok_s_includes_warmup"] else "")
        step = "" if not s["step_s"] else f"{s['step_s'][-1]:.1f}"
        tried = ", ".join(f"{_len(a['seq_len'])}: {a['outcome']}" for a in s["attempts"])
        rows.append(f"| {s['system']} | {_len(s['longest_ok'])} | {fail} | {tok} | {step} "
                    f"| {_gib(s['train_peak_alloc_gib'])} | {_gib(s['host_rss_gib'])} | {tried} |")
    rows += ["", f"{doc['device_name']}, preset {doc['settings']['preset']}, micro batch 1, "
             f"{doc['settings']['warmup_steps']} warm-up + {doc['settings']['measure_steps']} measured steps, "
             f"PYTORCH_CUDA_ALLOC_CONF={doc['settings']['alloc_conf']}"]
    rows += [f"- not run: {k}: {v}" for k, v in doc["not_run"].items()]
    return "\n".join(rows) + "\n"


def cpu_environment() -> dict:
    """`run.probe_environment`'s answer for `--device cpu`, without importing torch in a child."""
    import importlib.metadata as md
    import platform

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    dists = ("torch", "transformers", "accelerate", "deepspeed", "hf-zero")
    return {"cuda": False, "device_name": "cpu", "gpu_count": 0,
            "versions": {"python": platform.python_version(), **{d: version(d) for d in dists}}}


def main(argv=None) -> int:
    opts = parse_args(argv)
    started = time.time()
    env_info = cpu_environment() if opts.device == "cpu" else probe_environment()
    if opts.device == "cuda":
        env_info["cuda"] = True
    if not opts.no_expandable_segments:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # ALST's advice, for every system
    sys.path.insert(0, str(ROOT / "bench"))
    from job import PRESETS, BenchArguments, count_params, llama_config

    config = llama_config(BenchArguments(preset=opts.preset))
    shape = (count_params(config), config.num_hidden_layers, config.hidden_size)
    not_run = dict(NOT_RUN)
    if "hfzero-split" in opts.system_list:
        Path(NVME_PATH).mkdir(parents=True, exist_ok=True)  # hf_zero refuses a missing nvme_path
    if opts.preset == "7b" and opts.systems is None:
        not_run |= _7B_DEFAULT_SKIPS
    doc = {"name": opts.name, "command": shlex.join([sys.executable, *sys.argv]), "device_name": env_info["device_name"],
           "gpu_count": env_info["gpu_count"], "world_size": 1, "versions": env_info["versions"],
           "git_commit": opts.git_commit or git_commit(),
           "settings": {"preset": opts.preset, "shape": dict(zip(("hidden", "layers", "intermediate", "heads",
                                                                  "kv_heads", "vocab"), PRESETS[opts.preset])),
                        "n_params": shape[0], "micro_batch": 1, "grad_accum": 1,
                        "bf16": env_info["cuda"], "gradient_checkpointing": CHECKPOINTING[1:],
                        "warmup_steps": opts.warmup_steps, "measure_steps": opts.measure_steps,
                        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                        "search": {k: getattr(opts, k) for k in ("start", "max_len", "granularity", "bisections",
                                                                 "length_list", "attempt_timeout", "budget_s")}},
           "systems": [], "not_run": not_run}
    out = Path(opts.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_all = out / f"{opts.name}.log"
    log_all.write_text("")

    def write() -> None:
        (out / f"{opts.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / f"{opts.name}.md").write_text(markdown(doc))

    all_ok = True
    with tempfile.TemporaryDirectory(prefix="hf_zero_longseq_") as tmp:
        for i, system in enumerate(opts.system_list):
            left = opts.budget_s - (time.time() - started)
            deadline = time.time() + left / (len(opts.system_list) - i)
            doc["systems"].append(system_summary(system, [], None))

            def write_running(system=system) -> None:
                doc["systems"][-1] = system_summary(system, prober.attempts, None)
                write()

            prober = Prober(system, opts, env_info, Path(tmp), log_all, shape, deadline, on_attempt=write_running)
            result = search(prober, opts.length_list, opts.start, opts.max_len, opts.granularity, opts.bisections)
            doc["systems"][-1] = system_summary(system, prober.attempts, result.stopped_by)
            all_ok = all_ok and result.stopped_by != "error"
            write()
    table = markdown(doc)
    print(table, flush=True)
    print(f"[long_seq] wrote {out / opts.name}.json, .md, .log", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
