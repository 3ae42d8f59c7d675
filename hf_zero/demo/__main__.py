"""``python -m hf_zero.demo``: the main job on an embedded default, end to end.

Fine-tunes a tiny Llama-shaped model on the bundled sentences on 2 CPU ranks (gloo) through
``hf-zero launch ... --zero_config zero3.json``, the path a user takes; then prints the falling
loss, what each rank held, tokens/s and where the model went, and reloads it with plain
``AutoModelForCausalLM.from_pretrained`` to generate a line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from hf_zero.trainer.report_file import REPORT_NAME, summary_text

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE = 3  # the highest ZeRO stage this version implements


def _mib(n: int) -> str:
    return f"{n / 2**20:8.3f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_zero.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=os.path.abspath("hf_zero_demo_output"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=150)
    opts = parser.parse_args(argv)

    os.makedirs(opts.output_dir, exist_ok=True)
    config_path = os.path.join(opts.output_dir, f"zero{STAGE}.json")
    with open(config_path, "w") as f:
        # "auto" persistence: 10 x hidden size, so the demo's tiny matrices are sharded and only norms
        # stay whole (DeepSpeed's default 1e5 would keep every param of this model whole).
        json.dump({"zero_optimization": {"stage": STAGE, "reduce_bucket_size": 50000,
                                         "stage3_param_persistence_threshold": "auto",
                                         "stage3_prefetch_bucket_size": "auto"},
                   "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
                   "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}, f, indent=2)
    model_dir = os.path.join(opts.output_dir, "model")
    cmd = [sys.executable, "-m", "hf_zero", "launch", "--nproc_per_node", str(opts.nproc),
           os.path.join(HERE, "train_tiny.py"), "--zero_config", config_path,
           "--output_dir", model_dir, "--use_cpu", "--max_steps", str(opts.max_steps),
           "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "10",
           "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none",
           "--disable_tqdm", "true", "--seed", "0"]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        print(f"demo: training failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    print(f"trained in {time.perf_counter() - start:.1f} s on {opts.nproc} CPU ranks, ZeRO stage {STAGE}\n")

    with open(os.path.join(model_dir, REPORT_NAME)) as f:
        report = json.load(f)
    with open(os.path.join(model_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    print("loss by step:")
    for entry in history:
        if "loss" in entry:
            print(f"  step {entry['step']:4d}  loss {entry['loss']:.3f}")
    print("\nper-rank memory held at the optimizer step (measured from the tensors):")
    for r in report["ranks"]:
        b = r["bytes"]
        print(f"  rank {r['rank']}: params {_mib(b['params'])}  grads {_mib(b['grads'])}"
              f"  optimizer state {_mib(b['optimizer_state'])}  collectives/step {r['collectives_per_step']}")
    print(f"\ntokens/s (all ranks): {report['tokens_per_s_total']:.0f}")
    print(f"model and tokenizer saved to: {model_dir}")
    report_path = os.path.join(model_dir, REPORT_NAME)
    print(f"run report: {report_path}; its summary, as rank 0 printed it at the end of training:")
    print(f"  {summary_text(report, report_path)}\n")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "<s>the cat"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(f"reloaded with plain from_pretrained; greedy continuation of {prompt[3:]!r}:\n  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
