"""The largest Llama-shaped model one GPU fully fine-tunes (issue 18 D5): hf_zero and DeepSpeed, one config.

    python bench/largest_model.py --plan fp32-10b --tools hfzero,ds --name h100_largest_fp32 --results_dir "$OUT"

Each tool runs `bench/job.py` (the unmodified Trainer script of `run.py`) once under
`torchrun --nproc_per_node 1`: hf_zero as `-m hf_zero.run ... --zero_config NAME_config.json`,
DeepSpeed as the Trainer's `--deepspeed NAME_ds_config.json`, both written from the plan into the
results directory and the same but for DeepSpeed's `optimizer` block (its CPUAdam; `zero_json`).
The job: the 13B shape (hidden 5120, intermediate 13824, 40 heads, vocab 32000) with the plan's
layer count, seq 2048, bf16 weights built on the GPU (`--model_dtype bf16 --init_device cuda`),
`--gradient_checkpointing`, grad accum 1, clipping at the Trainer's default 1.0, a few steps.

[Note: placement] Bytes per parameter N, and where a plan puts them (one H100: 79.1 GiB that torch
sees, ~125 GiB host, ~64 GiB disk). hf_zero keeps bf16 params (2), fp32 masters (4), the fp32 grad
at the step (4) and AdamW's two moments (8, or 4 as bf16 with `state_dtype` bf16): 18 bytes, 234 GB
at 13.0 B. Per element of the optimizer that `offload_optimizer.ratio` leaves on the GPU: 16 bytes
(master, moments, main grad); per offloaded element on the host: 16 (fp32 state) or 12 (bf16).
The params (2 N) go to the host or, with `offload_param` nvme, to files. So with the GPU taking
x elements and the host at most H bytes of tier data:

    GPU:  16 x + W                       W: activations, gathered units, grad staging (~13 GiB)
    host: s (N - x) + (2 N if params on the host)    s = 16 (fp32 state) or 12 (bf16 state)
    disk: 2 N if params on NVMe

With H = 104 GiB (leaving ~21 GiB of the host for the processes, CUDA, the NVMe staging buffers
and the step's speculative copies, which take only what leaves 10% of it free) and 16 x + W at
most ~70 GiB, fp32 state fits 10.5 G (32 layers) with params on NVMe, 9.2 G (28 layers) with
params on the host; two more layers put the GPU at 79 GiB. 13.0 G fits only with bf16 state
(12 x 9.2 G = 103 GiB on the host, params on NVMe, 57 + 13 GiB on the GPU), an opt-in numerics
change. The ratio counts whole stage-3 units (``offloaded_elements``), as the engine splits.

fp32 13.0 G (plan ``13b-fp32-split``) spreads the optimizer over all three: the GPU takes what fits
(16 x + W at most ``GPU_TIER_BYTES``, 70 GiB: the ratio is set by the GPU, ``ratio_for``), the host
the offloaded elements' fp32 grads (4 bytes each) and ``offload_optimizer.host_share`` of their
masters and moments (12 bytes each: [Note: host share] in hf_zero/engine/offload/split_tier.py,
``host_share_for`` spends H), and NVMe the rest of them plus the params: at 13.0 G about 3.8 G
elements on the GPU (57 GiB), 9.2 G offloaded: 34 GiB of grads and 0.67 of the 103 GiB of state
on the host, 33 GiB of state and 24 GiB of params on the disk (57 GiB: ``main`` refuses before
starting when the disk under ``--nvme_path`` has less free). DeepSpeed has no host share: its
config puts all of the offloaded optimizer on NVMe (the same JSON less ``host_share``). Gradient
accumulation is left at 1: at W = 1 every bucket's fp32 main grad stays on the GPU while
micro-steps accumulate (4 N: 52 GB at 13B), so a larger micro batch buys the tokens instead.
`--ratio` overrides the plan's (`ratio_for`: H spent whole), `--host_share` ``host_share_for``'s;
`placement` prints what to expect. Measured on an H100 (bench/results/h100_session17_summary.md):
W at micro batch 2 is a few GiB, not 13, and the process holds ~25 GiB of host beside the tiers
while it builds them, so the plan's own 13B split (ratio 0.683, share 0.67) was killed by the
host; `--ratio 0.63 --host_share 0.66` (GPU 73.5 GiB, host 124.8 GiB, disk 52.6 GiB) trained.

Progress: a line per optimizer step from the job (`--progress_out`, [Note: progress] in job.py)
echoed with a timestamp; every 5 s a host sample (used = MemTotal - MemAvailable, swap-file bytes
under `nvme_path`) into the record; the results (`NAME.json`, `NAME.md`) rewritten after every
step and tool, so a call cut off at its time limit still returns what ran. Files in the results
directory: those two, the two configs and `NAME_TOOL.log` per tool (six for two tools: a device
call returns at most eight). `--shape tiny --device cpu` runs the same
plan and flags at a tiny shape on CPU (tests/test_bench_largest_model.py does).
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from long_seq import cpu_environment
from run import ROOT, failure_summary, git_commit, job_arguments, probe_environment, run_logged

GIB = 1 << 30
HOST_TIER_BYTES = 104 * GIB  # H: host bytes the tiers may take (see the Note)
GPU_TIER_BYTES = 70 * GIB  # the GPU's optimizer share plus its working set, for a GPU-bound plan (see the Note)
GPU_WORK_BYTES = 13 * GIB  # W at micro batch 2 (see the Note)
SHAPES = {"13b": (5120, 13824, 32000), "tiny": (64, 128, 256)}  # hidden, intermediate, vocab (job.py's presets)


@dataclass(frozen=True)
class Plan:
    layers: int
    state_dtype: str  # "fp32", or "bf16" (opt-in numerics: offload_optimizer.state_dtype)
    params: str  # "cpu" or "nvme": offload_param.device
    micro_batch: int = 2
    note: str = ""
    optimizer: str = "cpu"  # offload_optimizer.device; "nvme": the host keeps host_share of it (see the Note)


PLANS = {
    "fp32-10b": Plan(32, "fp32", "nvme", note="the largest with fp32 optimizer state: 10.5 B"),
    "fp32-9b": Plan(28, "fp32", "cpu", note="fp32 state, params in host memory (no disk traffic): 9.2 B"),
    "13b-bf16state": Plan(40, "bf16", "nvme", note="13.0 B, bf16 AdamW moments on the host (opt-in numerics)"),
    "13b-fp32-split": Plan(40, "fp32", "nvme", optimizer="nvme",
                           note="13.0 B, fp32 state over GPU, host (host_share) and NVMe"),
}
TOOLS = {"hfzero": ("-m", "hf_zero.run"), "ds": ()}


def n_params(shape: str, layers: int) -> int:
    """Llama parameters (untied embeddings, as job.py's count_params)."""
    hidden, inter, vocab = SHAPES[shape]
    return layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + 2 * vocab * hidden + hidden


def host_bytes_per_element(plan: Plan) -> int:
    return 4 + 4 + (8 if plan.state_dtype == "fp32" else 4)  # master, grad, two moments


def ratio_for(plan: Plan, n: int, host_bytes: int = HOST_TIER_BYTES) -> float:
    """The largest ratio (to 0.001) whose host tiers fit ``host_bytes``, whole units counted; with
    the optimizer on NVMe, the smallest whose GPU share fits ``GPU_TIER_BYTES`` (the host then
    takes what ``host_share_for`` gives it)."""
    if plan.optimizer == "nvme":
        ratio = 0.001
        while ratio < 1.0 and 16 * (n - offloaded_elements(plan.layers, ratio)) + GPU_WORK_BYTES > GPU_TIER_BYTES:
            ratio = round(ratio + 0.001, 3)
        return ratio
    ratio = max(0.001, min(1.0, int(1000 * (host_bytes - (2 * n if plan.params == "cpu" else 0))
                                    / host_bytes_per_element(plan) / n) / 1000))
    while ratio > 0.001 and placement(plan, n, ratio)["host_tier_bytes"] > host_bytes:
        ratio = round(ratio - 0.001, 3)
    return ratio


def offloaded_elements(layers: int, ratio: float, shape: str = "13b") -> int:
    """Elements whose optimizer the host steps: whole stage-3 units (one a layer, the root last), the
    first ones until ``ratio`` of all is reached, as ``OptimizerOffload.offloaded`` picks them (so up
    to one unit more than ``ratio`` says)."""
    hidden, inter, vocab = SHAPES[shape]
    sizes = [n_params(shape, 1) - 2 * vocab * hidden - hidden] * layers + [2 * vocab * hidden + hidden]
    total, acc = sum(sizes), 0
    for size in sizes:
        if acc >= ratio * total:
            break
        acc += size
    return acc


def host_share_for(plan: Plan, n: int, ratio: float, host_bytes: int = HOST_TIER_BYTES) -> float:
    """The optimizer on NVMe: the largest ``host_share`` (to 0.01) whose host bytes fit ``host_bytes``:
    the offloaded elements' grads (4 bytes), that share of their masters and moments (12), the
    params if they are on the host."""
    offloaded = offloaded_elements(plan.layers, ratio)
    room = host_bytes - 4 * offloaded - (2 * n if plan.params == "cpu" else 0)
    return max(0.0, min(1.0, int(100 * room / (12 * offloaded)) / 100))


def placement(plan: Plan, n: int, ratio: float, host_share: float | None = None) -> dict:
    """Bytes where they live ([Note: placement]) for the plan's model of ``n`` params; GPU work is
    an estimate at micro batch 2. The optimizer on NVMe: ``host_share`` (default ``host_share_for``)."""
    offloaded = offloaded_elements(plan.layers, ratio)
    where = {"params": n, "ratio": ratio, "gpu_optimizer_bytes": 16 * (n - offloaded),
             "gpu_work_bytes_est": GPU_WORK_BYTES}
    params_host, params_disk = (2 * n, 0) if plan.params == "cpu" else (0, 2 * n)
    if plan.optimizer == "nvme":
        share = host_share_for(plan, n, ratio) if host_share is None else host_share
        state_host = round(share * 12 * offloaded)
        return where | {"host_share": share, "host_tier_bytes": 4 * offloaded + state_host + params_host,
                        "disk_bytes": 12 * offloaded - state_host + params_disk}
    return where | {"host_tier_bytes": host_bytes_per_element(plan) * offloaded + params_host, "disk_bytes": params_disk}


def zero_json(plan: Plan, ratio: float, nvme_path: str, deepspeed: bool = False, host_share: float = 0.0) -> dict:
    """The config both tools read (DeepSpeed's format; hf_zero reads it as it is). ``deepspeed``: with
    an ``optimizer`` block naming AdamW, so that DeepSpeed steps with its CPUAdam, as its offload docs
    publish it (with the Trainer's own torch optimizer it refuses offload); hf_zero's file has none,
    so the Trainer's ``--optim adamw_torch_fused`` (torch's fused CPU kernel on the host) steps. The
    optimizer block is the only difference: each tool gets its fastest AdamW; with the optimizer on
    NVMe, also ``host_share`` (hf_zero's key: DeepSpeed keeps all of it on NVMe)."""
    params = {"device": plan.params, "pin_memory": True}
    optimizer = {"device": plan.optimizer, "pin_memory": True, "ratio": ratio}
    if plan.optimizer == "nvme":
        optimizer["nvme_path"] = nvme_path
        if not deepspeed:
            optimizer["host_share"] = host_share
    if plan.params == "nvme":  # DeepSpeed's param swapper needs a buffer as large as the largest param
        params |= {"nvme_path": nvme_path, "buffer_count": 5, "buffer_size": 200_000_000}
    bf16 = {"enabled": "auto"} | ({"bf16_optimizer_states": True} if plan.state_dtype == "bf16" else {})
    return {
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": False,
            "offload_optimizer": optimizer,
            "offload_param": params,
        },
        **({"optimizer": {"type": "AdamW", "params": {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}}}
           if deepspeed else {}),
        "bf16": bf16, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, choices=list(PLANS))
    p.add_argument("--tools", default="hfzero,ds", help=f"comma list, run in order: {', '.join(TOOLS)}")
    p.add_argument("--shape", default="13b", choices=list(SHAPES), help="tiny: the CPU dry run's shape")
    p.add_argument("--ratio", type=float, default=None, help="offload_optimizer.ratio (default: the plan's)")
    p.add_argument("--host_share", type=float, default=None,
                   help="offload_optimizer.host_share for a plan with the optimizer on NVMe (default: host_share_for's)")
    p.add_argument("--micro_batch", type=int, default=None, help="default: the plan's")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--max_steps", type=int, default=5)
    p.add_argument("--warmup_steps", type=int, default=2, help="steps left out of tok/s")
    p.add_argument("--nvme_path", default=os.path.join(tempfile.gettempdir(), "hf_zero_nvme"))
    p.add_argument("--budget_s", type=float, default=560, help="the whole invocation; the last tool gets what is left")
    p.add_argument("--min_tool_s", type=float, default=150, help="kept for each tool after the current one")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--name", default=None)
    p.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--git_commit", default=None)
    opts = p.parse_args(argv)
    opts.tools = [t.strip() for t in opts.tools.split(",") if t.strip()]
    if not opts.tools or any(t not in TOOLS for t in opts.tools):
        p.error(f"--tools {opts.tools}: choose from {list(TOOLS)}")
    if opts.ratio is not None and not 0 < opts.ratio <= 1:
        p.error(f"--ratio {opts.ratio} must be in (0, 1]")
    if opts.max_steps <= opts.warmup_steps:
        p.error(f"--max_steps {opts.max_steps} must exceed --warmup_steps {opts.warmup_steps}")
    opts.name = opts.name or f"largest_{opts.plan}_{opts.shape}_{time.strftime('%Y%m%d_%H%M%S')}"
    return opts


def job_command(tool: str, opts, plan: Plan, cuda: bool, configs: dict, work: Path, progress: Path) -> list[str]:
    shared = argparse.Namespace(preset="13b" if opts.shape == "13b" else "tiny", seq_len=opts.seq_len,
                                micro_batch=opts.micro_batch or plan.micro_batch, grad_accum=1,
                                max_steps=opts.max_steps, warmup_steps=opts.warmup_steps,
                                init_device="cuda" if cuda else "cpu")
    job = ["bench/job.py", *job_arguments(shared, cuda), "--num_layers", str(plan.layers if opts.shape == "13b" else 2),
           "--gradient_checkpointing", "--progress_out", str(progress), "--bench_out", str(work / f"{tool}.jsonl"),
           "--output_dir", str(work / f"out_{tool}")]
    if cuda:
        job += ["--model_dtype", "bf16"]
    switch = ["--zero_config", str(configs[tool])] if tool == "hfzero" else ["--deepspeed", str(configs[tool])]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return [*torchrun, *TOOLS[tool], *job, *switch]


def _read_lines(path: Path) -> list[dict]:
    out = []
    for text in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:  # cut off by a kill
            break
    return out


# What "used" is made of (session 17: a 13B run held ~25 GiB of host beside its tiers before they were
# built, which CPU runs of the same code do not show): anonymous pages, page-locked ones, dirty pages.
BREAKDOWN = ("AnonPages", "Mlocked", "Unevictable", "Shmem", "Dirty", "Writeback", "Cached")


def _meminfo() -> dict[str, int]:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info


def _host_used(info: dict[str, int] | None = None) -> int:
    info = info or _meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def _disk_used(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Watch(threading.Thread):
    """Echoes the job's progress lines, samples host and disk use; ``tick`` runs on each new step."""

    def __init__(self, tool: str, progress: Path, samples: list, nvme_path: str, tick):
        super().__init__(daemon=True)
        self.tool, self.progress, self.samples, self.nvme_path, self.tick = tool, progress, samples, nvme_path, tick
        self.stop, self.seen = threading.Event(), 0
        self.host_max = self.disk_max = 0

    def run(self) -> None:
        last_sample = 0.0
        while not self.stop.wait(1.0):
            self.poll()
            if time.time() - last_sample >= 5:
                last_sample = time.time()
                info = _meminfo()
                host, disk = _host_used(info), _disk_used(self.nvme_path)
                self.host_max, self.disk_max = max(self.host_max, host), max(self.disk_max, disk)
                self.samples.append([round(last_sample, 1), round(host / GIB, 2), round(disk / GIB, 2),
                                     {k: round(info.get(k, 0) / GIB, 2) for k in BREAKDOWN}])

    def poll(self) -> None:
        lines = _read_lines(self.progress)
        info = _meminfo() if len(lines) > self.seen else {}
        for line in lines[self.seen:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(line["wall"]))
            what = f"step {line['step']}: {line['step_s']:.1f} s" if line.get("event") == "step" else line.get("event")
            print(f"[largest {stamp}] {self.tool} {what}; peak alloc {line['peak_alloc_gib']} GiB, "
                  f"rank RSS {line['host_rss_gib']:.1f} GiB, host used {_host_used(info) / GIB:.1f} GiB "
                  f"(anon {info.get('AnonPages', 0) / GIB:.1f}, locked {info.get('Mlocked', 0) / GIB:.1f}, "
                  f"dirty {info.get('Dirty', 0) / GIB:.1f})", flush=True)
        if len(lines) > self.seen:
            self.seen = len(lines)
            self.tick(lines)


def measure(lines: list[dict], warmup: int, tokens_per_step: int) -> dict:
    steps = [ln["step_s"] for ln in lines if ln.get("event") == "step"]
    steady = steps[warmup:] or steps[-1:]  # cut short: the last step, flagged
    peaks = [ln["peak_alloc_gib"] for ln in lines if ln.get("peak_alloc_gib") is not None]
    return {"steps_done": len(steps), "step_s": steps, "tok_per_s": tokens_per_step * len(steady) / sum(steady)
            if steady else None, "tok_s_includes_warmup": len(steps) <= warmup and bool(steps),
            "peak_alloc_gib": max(peaks, default=None),
            "host_rss_gib": max((ln["host_rss_gib"] for ln in lines), default=None)}


def markdown(doc: dict) -> str:
    p = doc["placement"]
    out = [f"# {doc['name']}\n", f"{doc['device_name']}, plan `{doc['plan']}` ({doc['plan_settings']['note']}), "
           f"{p['params'] / 1e9:.2f} B params, seq {doc['seq_len']}, micro batch {doc['micro_batch']}, grad accum 1, "
           f"clip 1.0, ratio {p['ratio']}; commit {doc['git_commit']}\n",
           f"Expected: GPU optimizer {p['gpu_optimizer_bytes'] / GIB:.1f} GiB + ~{p['gpu_work_bytes_est'] / GIB:.0f} "
           f"GiB working set; host tiers {p['host_tier_bytes'] / GIB:.1f} GiB; disk {p['disk_bytes'] / GIB:.1f} GiB\n",
           "| tool | status | steps | tok/s | step s | peak alloc GiB | rank RSS GiB | host used GiB | disk GiB | error |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in doc["runs"]:
        steps = ", ".join(f"{s:.1f}" for s in r.get("step_s", []))
        out.append(f"| {r['tool']} | {r['status']} | {r.get('steps_done', 0)} | {_num(r.get('tok_per_s'))} | {steps} | "
                   f"{_num(r.get('peak_alloc_gib'), 2)} | {_num(r.get('host_rss_gib'), 1)} | "
                   f"{_num(r.get('host_used_max_gib'), 1)} | {_num(r.get('disk_max_gib'), 1)} | {r.get('error') or ''} |")
    return "\n".join(out) + "\n"


def _num(v, digits=0):
    return "" if v is None else f"{v:,.{digits}f}"


def main(argv=None) -> int:
    opts = parse_args(argv)
    started = time.time()
    plan = PLANS[opts.plan]
    env_info = cpu_environment() if opts.device == "cpu" else probe_environment()  # --device cpu: no torch child
    cuda = env_info["cuda"] if opts.device == "auto" else opts.device == "cuda"
    n = n_params("13b", plan.layers)  # the plan's model: --shape tiny runs its config at a tiny shape
    ratio = opts.ratio if opts.ratio is not None else ratio_for(plan, n)
    where = placement(plan, n, ratio, opts.host_share)
    results, out = Path(opts.results_dir), Path(opts.results_dir) / opts.name
    results.mkdir(parents=True, exist_ok=True)
    configs = {"hfzero": results / f"{opts.name}_config.json", "ds": results / f"{opts.name}_ds_config.json"}
    for tool, path in configs.items():
        config = zero_json(plan, ratio, opts.nvme_path, deepspeed=tool == "ds", host_share=where.get("host_share", 0.0))
        path.write_text(json.dumps(config, indent=2) + "\n")
    if where["disk_bytes"]:
        os.makedirs(opts.nvme_path, exist_ok=True)
        free = os.statvfs(opts.nvme_path).f_bavail * os.statvfs(opts.nvme_path).f_frsize
        if opts.shape == "13b" and free < where["disk_bytes"] * 1.05:
            print(f"[largest] {opts.nvme_path}: {free / GIB:.1f} GiB free, the plan's files need "
                  f"{where['disk_bytes'] / GIB:.1f} GiB: pass --nvme_path on a larger disk", flush=True)
            return 2
    print(f"[largest] {env_info['device_name']}: plan {opts.plan} ({plan.note}), {n / 1e9:.2f} B params, "
          f"ratio {ratio}: " + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in where.items() if k.endswith("bytes")),
          flush=True)
    micro = opts.micro_batch or plan.micro_batch
    doc = {"name": opts.name, "plan": opts.plan, "plan_settings": asdict(plan), "shape": opts.shape,
           "seq_len": opts.seq_len, "micro_batch": micro, "placement": where,
           "configs": {k: str(v) for k, v in configs.items()},
           "device_name": env_info["device_name"], "versions": env_info["versions"],
           "git_commit": opts.git_commit or git_commit(), "runs": []}

    def write():
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(doc))

    all_ok = True
    with tempfile.TemporaryDirectory(prefix="hf_zero_largest_") as tmp:
        for i, tool in enumerate(opts.tools):
            left = opts.budget_s - (time.time() - started) - opts.min_tool_s * (len(opts.tools) - 1 - i)
            record = {"tool": tool, "status": "skipped", "error": f"not started: {left:.0f} s left"}
            doc["runs"].append(record)
            if left < 30:
                all_ok = False
                write()
                continue
            work = Path(tmp)  # what comes back from a device call is few files: the record holds the steps
            progress = work / f"{tool}.progress.jsonl"
            cmd = job_command(tool, opts, plan, cuda, configs, work, progress)
            record |= {"status": "running", "error": None, "command": shlex.join(cmd)}
            tokens = micro * opts.seq_len

            def tick(lines, record=record):
                record.update(measure(lines, opts.warmup_steps, tokens))
                write()

            record["host_samples"] = []  # [wall, host used GiB, swap files GiB, {BREAKDOWN: GiB}] every 5 s
            watch = Watch(tool, progress, record["host_samples"], opts.nvme_path, tick)
            watch.start()
            print(f"[largest] {tool}: {shlex.join(cmd)}", flush=True)
            log = results / f"{opts.name}_{tool}.log"
            rc, wall, killed = run_logged(cmd, log, left, work / f"{tool}.jsonl", 30)
            watch.stop.set()
            watch.join()
            watch.poll()
            record |= measure(_read_lines(progress), opts.warmup_steps, tokens)
            record |= {"returncode": rc, "wall_s": wall, "host_used_max_gib": watch.host_max / GIB,
                       "disk_max_gib": watch.disk_max / GIB}
            done = (work / f"{tool}.jsonl").exists()
            record["status"] = "ok" if done else ("timeout" if killed and record["steps_done"] else "failed")
            if not done:
                all_ok = False
                record["error"], record["error_tail"] = failure_summary(log.read_text(errors="replace"))
                record["error"] = f"{killed}; {record['error']}" if killed else record["error"]
            write()
            print(f"[largest] {tool}: {record['status']} after {wall:.0f} s, {record['steps_done']} steps, "
                  f"tok/s {record['tok_per_s']}, {record.get('error') or ''}", flush=True)
    print(markdown(doc), flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
