"""The recipes (``recipes/*/train.py`` with ``--tiny``) through ``hf-zero launch`` at W = 2 give the per-step
training losses of plain ``torchrun`` with the same arguments, save a model that plain ``from_pretrained``
reloads, and (T5) report the locally computed ROUGE-L metric.

Stages launched: 0 (the Trainer's own DDP and save), 2 (the flat strategy: params whole on every rank,
saved as the plain Trainer saves) and 3 (the sharded params and the streamed save); the llama recipe
also at stage 2 and 3 with offload, resumed across them. Stage 1 takes the launch, recipe and save
paths of stage 2 (it differs in the engine only, launched against torchrun in
test_launch_parity.py); every shipped config file, stage 1's included, is loaded below."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_zero.config import load_config
from hf_zero.testing.multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
COMMON = ["--tiny", "--use_cpu", "--max_steps", "8", "--per_device_train_batch_size", "4", "--logging_steps", "1",
          "--learning_rate", "1e-3", "--max_grad_norm", "1.0", "--save_strategy", "no", "--report_to", "none",
          "--disable_tqdm", "true", "--seed", "0"]
EXTRA = {"llama_finetune": [], "t5_finetune": ["--per_device_eval_batch_size", "4"]}
RTOL = 1e-5


def _script(recipe: str) -> str:
    return os.path.join(RECIPES, recipe, "train.py")


def _run(recipe: str, launcher: list[str], out: str, after: tuple[str, ...] = ()) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = launcher + ["--output_dir", out] + COMMON + EXTRA[recipe] + list(after)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def _torchrun(recipe: str, out: str) -> list[dict]:
    return _run(recipe, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", str(free_port()), _script(recipe)], out)


def _hf_zero(recipe: str, stage: int, out: str) -> list[dict]:
    config = os.path.join(RECIPES, recipe, "configs", f"zero{stage}.json")
    if stage == 0:  # ZeRO off (the Trainer's own DDP): the recipes ship no file for it
        config = os.path.join(ROOT, "integration_tests", "configs", "zero0.json")
    return _run(recipe, [sys.executable, "-m", "hf_zero", "launch", "--nproc_per_node", "2",
                         "--master_port", str(free_port()), _script(recipe), "--zero_config", config], out)


def _losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache: dict[str, list[dict]] = {}

    def get(recipe: str) -> list[dict]:
        if recipe not in cache:
            cache[recipe] = _torchrun(recipe, str(tmp_path_factory.mktemp(f"{recipe}_torchrun")))
        return cache[recipe]

    return get


def _check_parity(got: list[dict], ref: list[dict]) -> None:
    a, b = _losses(got), _losses(ref)
    assert len(a) == len(b) == 8, (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= RTOL * abs(y), (a, b)


def test_every_shipped_config_loads_as_its_name_says():
    """recipes/*/configs/zeroN[_offload].json: stage N, optimizer offload to the CPU with ``_offload``."""
    paths = sorted(os.path.join(RECIPES, r, "configs", f) for r in EXTRA for f in os.listdir(os.path.join(RECIPES, r, "configs")))
    names = [os.path.basename(p) for p in paths]
    assert names == ["zero1.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"] * 2, paths
    for path, name in zip(paths, names):
        zero = load_config(path).zero
        assert zero.stage == int(name[4]), (path, zero.stage)
        assert zero.offload_optimizer.device == ("cpu" if "_offload" in name else "none"), (path, zero.offload_optimizer)
        assert zero.offload_param.device == "none", (path, zero.offload_param)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_llama_recipe_matches_torchrun(stage, references, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = _hf_zero("llama_finetune", stage, str(tmp_path))
    _check_parity(got, references("llama_finetune"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert model.config.model_type == "llama"
    ids = tokenizer("<|user|>\nWhat is the capital of France?\n<|assistant|>\n", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_t5_recipe_matches_torchrun(stage, references, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    got = _hf_zero("t5_finetune", stage, str(tmp_path))
    ref = references("t5_finetune")
    _check_parity(got, ref)
    evals = [h for h in got if "eval_rougeL" in h]
    assert evals and 0.0 <= evals[-1]["eval_rougeL"] <= 100.0, got
    assert any("eval_rougeL" in h for h in ref)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path))
    assert model.config.model_type == "t5" and model.config.decoder_start_token_id == 0


@pytest.mark.slow
def test_llama_recipe_offload_resume_and_consolidate(references, tmp_path):
    """zero2_offload through the launcher matches torchrun; its checkpoint resumes at stage 3 with
    offload, continuing the same losses; the last checkpoint consolidates to what the run saved."""
    import torch
    from transformers import AutoModelForCausalLM

    save = ["--save_strategy", "steps", "--save_steps", "4"]

    def launch(config: str, out: str, extra: list[str]) -> list[dict]:
        cfg = os.path.join(RECIPES, "llama_finetune", "configs", config)
        return _run("llama_finetune", [sys.executable, "-m", "hf_zero", "launch", "--nproc_per_node", "2",
                                       "--master_port", str(free_port()), _script("llama_finetune"),
                                       "--zero_config", cfg], out, tuple(extra + save))

    first = launch("zero2_offload.json", str(tmp_path / "a"), [])
    _check_parity(first, references("llama_finetune"))
    resumed = launch("zero3_offload.json", str(tmp_path / "b"),
                     ["--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-4")])
    a = {h["step"]: h["loss"] for h in first if "loss" in h}
    b = {h["step"]: h["loss"] for h in resumed if "loss" in h}
    for step in (5, 6, 7, 8):
        assert abs(b[step] - a[step]) <= RTOL * abs(a[step]), (step, a, b)
    proc = subprocess.run([sys.executable, "-m", "hf_zero", "consolidate", str(tmp_path / "b" / "checkpoint-8"),
                           str(tmp_path / "c"), "--dtype", "fp32"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "c"))(ids).logits
        want = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"))(ids).logits
    assert torch.equal(got, want)
