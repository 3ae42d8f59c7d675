"""A plain Hugging Face Trainer job used as the benchmark workload.

This is the script a user would write: it imports nothing from hf_zero. It builds a randomly
initialised Llama from a config, trains it on synthetic tokens with the Trainer's own command-line
flags (`--bf16`, `--deepspeed`, `--fsdp`, `--optim`, `--gradient_checkpointing`, ...), and at the
end rank 0 writes one JSON line to `--bench_out`.

    torchrun --nproc_per_node 1 bench/job.py --preset 1b1 --seq_len 2048 \
        --per_device_train_batch_size 4 --max_steps 20 --bf16 --bench_out /tmp/plain.jsonl

[Note: throughput] A step is one optimizer step (grad_accum micro-batches on every rank). Step
wall times are the gaps between consecutive `on_step_end` callbacks, each taken after a
`torch.cuda.synchronize()`, so they include data loading, forward, backward, the optimizer and
the per-step logging, exactly what a user waits for. The first `--bench_warmup_steps` steps (CUDA
context, allocator growth, kernel autotuning, lazy sharding) are left out:

    tok/s = steady_steps * micro_batch * seq_len * grad_accum * world_size / steady_seconds

[Note: profile] `--profile_step N` wraps the N-th optimizer step (1-based; pick one after the
warm-up) in `torch.profiler` on rank 0, CPU and CUDA activities, no shapes or stacks: profiler
start at `on_step_begin`, stop at `on_step_end`, so the window is that step's micro-batches,
gradient reduction, clipping and optimizer step. Rank 0 writes `<profile_out>_stepN.trace.json.gz`
(chrome trace, one step only) and `<profile_out>_stepN.profile.json`, the summary
`profile_summary.py` computes from the trace's kernels (NCCL time, compute time, their overlap);
the summary also lands in the JSON record under `profile`. The profiled step is slower (CUPTI,
trace export), so it is left out of tok/s; its callback runs before the timer's, so the export
is charged to that step alone. The step after it is left out too: work the profiled step left
running (an offloaded host step overlapping the next forward) finishes during the export, so that
step is short (session 16: 0.215 s against 0.49 s steady, with the profiled step at 1.43 s).

[Note: progress] `--progress_out FILE`: rank 0 appends a JSON line at train begin and at every
step end (wall-clock time, the step's seconds, peak GPU memory so far, host
RSS), flushed at once, so a driver that kills a long job after its first steps still has them
(`bench/long_seq.py`).

[Note: init device] `--init_device cuda` builds the random-init model directly on the rank's GPU (the default, cpu,
builds it in host memory as a user's script would, and the Trainer moves it). Same steps and
memory during training; it saves the minute a 7 B fp32 init takes on one CPU thread per rank.
Under DeepSpeed ZeRO-3 the model is built inside `deepspeed.zero.Init` (born sharded on the GPU)
either way, so the option does nothing there.
"""

import contextlib
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

# hidden, layers, intermediate, heads, kv heads, vocab
PRESETS = {
    "tiny": (64, 2, 128, 4, 2, 256),
    "1b1": (2048, 22, 5632, 32, 4, 32000),
    "7b": (4096, 32, 11008, 32, 32, 32000),
    "13b": (5120, 40, 13824, 40, 40, 32000),  # issue 18 D5 (bench/largest_model.py); fewer layers: --num_layers
}
GIB = 1024**3


@dataclass(kw_only=True)
class BenchArguments:
    """Model shape, data and benchmark output; everything else is `TrainingArguments`."""

    preset: str = field(default="1b1", metadata={"help": f"model size preset: {', '.join(PRESETS)}"})
    hidden_size: int | None = field(default=None, metadata={"help": "overrides the preset"})
    num_layers: int | None = field(default=None, metadata={"help": "overrides the preset"})
    intermediate_size: int | None = field(default=None, metadata={"help": "overrides the preset"})
    num_heads: int | None = field(default=None, metadata={"help": "overrides the preset"})
    num_kv_heads: int | None = field(default=None, metadata={"help": "overrides the preset"})
    vocab_size: int | None = field(default=None, metadata={"help": "overrides the preset"})
    seq_len: int = field(default=2048, metadata={"help": "tokens per sample"})
    model_dtype: str = field(
        default="fp32",
        metadata={"help": "dtype the model is built in: fp32 (Trainer mixed precision) or bf16 (pure bf16 params)"},
    )
    # Not `--warmup_steps`: that is the Trainer's learning-rate warmup.
    bench_warmup_steps: int = field(default=3, metadata={"help": "optimizer steps left out of tok/s"})
    bench_out: str | None = field(default=None, metadata={"help": "JSON line written by rank 0 at the end"})
    init_device: str = field(
        default="cpu", metadata={"help": "where the random-init model is built: cpu, or cuda; see [Note: init device]"}
    )
    profile_step: int | None = field(
        default=None, metadata={"help": "profile this optimizer step (1-based) on rank 0; see [Note: profile]"}
    )
    profile_out: str | None = field(
        default=None, metadata={"help": "path prefix of the trace and summary (default: next to --bench_out)"}
    )
    progress_out: str | None = field(
        default=None, metadata={"help": "rank 0 appends one JSON line per optimizer step; see [Note: progress]"}
    )
    alst: bool = field(
        default=False, metadata={"help": "DeepSpeed ALST's single-GPU pieces in this script (bench/alst.py)"}
    )

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.model_dtype not in ("fp32", "bf16"):
            raise ValueError(f"--model_dtype {self.model_dtype!r} is not one of ['bf16', 'fp32']")
        if self.init_device not in ("cpu", "cuda"):
            raise ValueError(f"--init_device {self.init_device!r} is not one of ['cpu', 'cuda']")
        if self.profile_step is not None and self.profile_step < 1:
            raise ValueError(f"--profile_step {self.profile_step} must be >= 1 (optimizer steps count from 1)")


def llama_config(bench: BenchArguments) -> LlamaConfig:
    hidden, layers, inter, heads, kv, vocab = PRESETS[bench.preset]
    return LlamaConfig(
        hidden_size=bench.hidden_size or hidden,
        num_hidden_layers=bench.num_layers or layers,
        intermediate_size=bench.intermediate_size or inter,
        num_attention_heads=bench.num_heads or heads,
        num_key_value_heads=bench.num_kv_heads or kv,
        vocab_size=bench.vocab_size or vocab,
        max_position_embeddings=max(2048, bench.seq_len),
        use_cache=False,
    )


def count_params(c: LlamaConfig) -> int:
    """Parameter count from the config, so it is right even when the model is born sharded."""
    head_dim = c.hidden_size // c.num_attention_heads
    attn = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.num_key_value_heads * head_dim
    layer = attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    return c.num_hidden_layers * layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size


class RandomTokens(Dataset):
    """`rows` samples of uniform random token ids; row i depends only on (seed, i)."""

    def __init__(self, rows: int, seq_len: int, vocab_size: int, seed: int):
        self.rows, self.seq_len, self.vocab_size, self.seed = rows, seq_len, vocab_size, seed

    def __len__(self):
        return self.rows

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=gen)
        return {"input_ids": ids, "labels": ids.clone()}


_PER_STEP_KEYS = {"loss", "grad_norm", "learning_rate", "epoch"}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step and the logged loss; see [Note: throughput]."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.ends: list[float] = []
        self.compute_s: list[float] = []
        self.losses: list[float] = []
        self.logged: dict = {}  # last value of every other logged key (train_runtime, extra metrics)
        self._begin = None
        self.train_begin = None
        self.setup_peaks = (0, 0)  # (allocated, reserved) bytes before training began
        self.running_peaks: list[int] = []  # max allocated so far, at each step's end: where the peak came

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = self._now()
        if self.cuda:  # set-up's high-water marks (model build, wrapping, sharding), then a fresh window
            self.setup_peaks = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.ends.append(now)
        if self.cuda:
            self.running_peaks.append(torch.cuda.max_memory_allocated())
        if self._begin is not None:
            self.compute_s.append(now - self._begin)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))
        self.logged.update((k, v) for k, v in logs.items() if k not in _PER_STEP_KEYS)

    def step_seconds(self) -> list[float]:
        """Gap between consecutive step ends; the first step is measured from train begin."""
        starts = [self.train_begin] + self.ends[:-1]
        return [end - start for start, end in zip(starts, self.ends)]


class StepProfiler(TrainerCallback):
    """torch.profiler around one optimizer step on rank 0; see [Note: profile]."""

    def __init__(self, step: int, out_prefix: str, cuda: bool):
        self.step, self.out_prefix, self.cuda = step, out_prefix, cuda
        self.summary: dict | None = None
        self._prof = None
        self._t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.step or not state.is_world_process_zero:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.start()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is None or state.global_step != self.step:
            return
        if self.cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - self._t0) * 1e6
        self._prof.stop()
        trace = f"{self.out_prefix}_step{self.step}.trace.json.gz"
        self._prof.export_chrome_trace(trace)
        self._prof = None
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # profile_summary.py, beside this file
        from profile_summary import describe, summarize_trace

        self.summary = summarize_trace(trace, step_wall_us=wall_us) | {"step": self.step, "trace": trace}
        self.summary["note"] = describe(self.summary)
        with open(f"{self.out_prefix}_step{self.step}.profile.json", "w") as f:
            json.dump(self.summary, f, indent=2)
        print(f"[bench] profiled step {self.step}: {self.summary['note']}", flush=True)


def rank_stats(cuda: bool, timer: StepTimer) -> dict:
    """Peaks over the whole process (set-up included), and over training alone: a model built on
    the GPU (`--init_device cuda`) or moved there whole has a set-up peak that training may not reach."""
    stats = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    if not cuda:
        return stats | dict.fromkeys(("peak_alloc_gib", "peak_reserved_gib", "train_peak_alloc_gib"))
    train_alloc, train_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    stats["peak_alloc_gib"] = max(train_alloc, timer.setup_peaks[0]) / GIB
    stats["peak_reserved_gib"] = max(train_reserved, timer.setup_peaks[1]) / GIB
    stats["train_peak_alloc_gib"] = train_alloc / GIB
    return stats


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def summarize(bench, targs, timer, per_rank, model, n_params, build_s, train_s, profile=None) -> dict:
    steps = timer.step_seconds()
    # The profiled step (if any) ran under the profiler, and the step after it finished work the
    # profiled one left running: neither is a steady step. See [Note: profile].
    skip = {bench.profile_step - 1, bench.profile_step} if profile is not None else set()
    steady = [s for i, s in enumerate(steps) if i >= bench.bench_warmup_steps and i not in skip]
    world = targs.world_size
    tokens_per_step = targs.per_device_train_batch_size * bench.seq_len * targs.gradient_accumulation_steps * world
    tok_s = len(steady) * tokens_per_step / sum(steady) if steady else None
    # Model FLOPs per token: 6N for the matmuls plus 12 * layers * hidden * seq for attention scores.
    cfg = model.config
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * bench.seq_len
    cuda = targs.device.type == "cuda"

    def column(key):
        return [r[key] for r in per_rank]

    def peak(key):
        values = [v for v in column(key) if v is not None]
        return max(values) if values else None

    return {
        "tok_per_s": tok_s,
        "tflops_per_gpu": tok_s * flops_per_token / world / 1e12 if tok_s else None,
        "mean_step_s": sum(steady) / len(steady) if steady else None,
        "mean_compute_s": _mean(timer.compute_s[bench.bench_warmup_steps :]),
        "step_s": steps,
        "steady_steps": len(steady),
        "tokens_per_step": tokens_per_step,
        "world_size": world,
        "peak_alloc_gib": peak("peak_alloc_gib"),
        "peak_reserved_gib": peak("peak_reserved_gib"),
        "train_peak_alloc_gib": peak("train_peak_alloc_gib"),
        "host_rss_gib": peak("host_rss_gib"),
        "per_rank": per_rank,
        "final_loss": timer.losses[-1] if timer.losses else None,
        "losses": timer.losses,
        "running_peak_alloc_gib": [round(b / GIB, 3) for b in timer.running_peaks],
        "logged": timer.logged,
        "param_dtypes": dict(Counter(str(p.dtype).removeprefix("torch.") for p in model.parameters())),
        "n_params": n_params,
        "attn_implementation": cfg._attn_implementation,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "build_s": build_s,
        "train_s": train_s,
        "init_device": bench.init_device,
        "alst": bench.alst,
        # Which activation checkpointing ran: the model's own (the Trainer flag) or FSDP's wrapper.
        "activation_checkpointing": {
            "model": any(getattr(model, a, False)
                         for a in ("is_gradient_checkpointing", "is_activation_checkpointing")),
            "fsdp_wrapper": any("CheckpointWrapper" in type(m).__name__ for m in model.modules()),
        },
        "profile": profile,
        "run_report": run_report(targs.output_dir),
    }


# The run report's engine figures that explain a speed: what ratio "auto" chose, the device leg's
# share and rates, the host steps speculation redid (hf_zero's OUTPUT_DIR/hf_zero_report.json:
# hf_zero.trainer.report_file.REPORT_NAME, spelled out since this script imports nothing from hf_zero).
_REPORT_KEYS = ("offload_auto", "device_leg", "host_steps_redone")


def run_report(output_dir: str) -> list[dict] | None:
    """Each rank's ``_REPORT_KEYS`` from hf_zero's run report in ``output_dir``; None without one
    (plain, DeepSpeed and FSDP2 modes)."""
    path = os.path.join(output_dir, "hf_zero_report.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        doc = json.load(f)
    return [{k: r.get(k) for k in ("rank", *_REPORT_KEYS)} for r in doc.get("ranks", [])]


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def main():
    parser = HfArgumentParser((BenchArguments, TrainingArguments))
    parser.set_defaults(
        output_dir=os.path.join(tempfile.gettempdir(), "hf_zero_bench_out"),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    bench, targs = parser.parse_args_into_dataclasses()
    if targs.max_steps <= bench.bench_warmup_steps:
        raise ValueError(f"--max_steps {targs.max_steps} must exceed --bench_warmup_steps {bench.bench_warmup_steps}")
    if bench.profile_step is not None and bench.profile_step > targs.max_steps:
        raise ValueError(f"--profile_step {bench.profile_step} is past --max_steps {targs.max_steps}")
    record = train(bench, targs)
    if record is not None:
        print(f"[bench] tok/s={record['tok_per_s']} peak_alloc_gib={record['peak_alloc_gib']}", flush=True)
        if bench.bench_out:
            with open(bench.bench_out, "w") as f:
                f.write(json.dumps(record) + "\n")
    # Free the trainer and model while the process group still exists, then close it.
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def train(bench: BenchArguments, targs: TrainingArguments) -> dict | None:
    """Build, train, measure; the summary on rank 0, None on the other ranks."""
    # The model is built after TrainingArguments, as the Trainer docs ask (ZeRO-3 init hooks).
    set_seed(targs.seed)  # same initial weights on every rank and in every mode
    t0 = time.perf_counter()
    config = llama_config(bench)
    dtype = torch.bfloat16 if bench.model_dtype == "bf16" else torch.float32
    with _init_device(bench, targs):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    trainer_cls = Trainer
    if bench.alst:
        from alst import AlstTrainer, apply_alst  # beside this file

        apply_alst(model)
        trainer_cls = AlstTrainer
    build_s = time.perf_counter() - t0
    n_params = count_params(config)

    rows = targs.max_steps * targs.per_device_train_batch_size * targs.gradient_accumulation_steps
    data = RandomTokens(rows * targs.world_size, bench.seq_len, config.vocab_size, targs.seed)
    cuda = targs.device.type == "cuda"
    timer = StepTimer(cuda)
    callbacks = [timer]
    if bench.progress_out:
        from step_progress import StepProgress  # beside this file

        callbacks.append(StepProgress(bench.progress_out, timer.step_seconds, cuda))  # after the timer
    profiler = None
    if bench.profile_step is not None:
        prefix = bench.profile_out or os.path.splitext(bench.bench_out or os.path.join(targs.output_dir, "bench"))[0]
        profiler = StepProfiler(bench.profile_step, prefix, cuda)
        callbacks.insert(0, profiler)  # before the timer: the export is charged to the profiled step
    trainer = trainer_cls(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0

    per_rank = gather(rank_stats(cuda, timer))
    if not trainer.is_world_process_zero():
        return None
    profile = profiler.summary if profiler is not None else None
    return summarize(bench, targs, timer, per_rank, model, n_params, build_s, train_s, profile)


def _init_device(bench: BenchArguments, targs: TrainingArguments):
    """Default-device context for building the model; see [Note: init device]."""
    if bench.init_device == "cpu" or targs.device.type != "cuda":
        return contextlib.nullcontext()
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # zero.Init places the shards itself
        return contextlib.nullcontext()
    return torch.device(targs.device)


if __name__ == "__main__":
    main()
