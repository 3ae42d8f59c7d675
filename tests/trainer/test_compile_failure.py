"""A model or setting ``--torch_compile`` cannot compile (hf_zero/trainer/compile_watch.py, issue 21 D3),
in ``train()`` and in a standalone ``evaluate()``.

The uncompilable setting is a real one: ``--torch_compile_backend tvm`` (a backend accelerate accepts
and torch registers) without Apache TVM installed; torch's tvm backend raises ImportError at the
first compile, inside the first step. By default every rank stops with hf_zero's CompileFailed
naming the model, the stage, the backend, torch's cause and the way on; with torch's own switch to
run on eagerly (``torch._dynamo.config.suppress_errors``, TORCHDYNAMO_SUPPRESS_ERRORS=1) the run
trains as eager does and the run report lists each fallback and its cause.

Every run of the module is made in one rank start (``runs``): each leaves dynamo reset, its
suppress switch off and hf_zero deactivated, and each run's fallbacks are recorded by its own session.
"""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stderr

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from hf_zero.testing.multiprocess import run_on_ranks

STEPS = 3


def _job(rank, world, out, stage, backend, suppress, evaluate=False):
    import hf_zero.trainer as zt
    from hf_zero.trainer import session as S
    from hf_zero.trainer.compile_watch import CompileFailed

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": i, "labels": i} for i in torch.randint(0, 64, (16, 12), generator=g)]
    compiled = {"torch_compile": True, "torch_compile_backend": backend} if backend else {}
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=STEPS,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                             disable_tqdm=True, **compiled)
    zt.activate({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}})
    torch._dynamo.config.suppress_errors = suppress
    err = io.StringIO()
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        with redirect_stderr(err):
            if evaluate:  # a standalone evaluate(): the first compile is that of its forward
                return {"metrics": trainer.evaluate(eval_dataset=data)}
            trainer.train()
    except CompileFailed as error:
        return {"error": str(error), "cause": type(error.__cause__).__name__}
    finally:
        zt.deactivate()
        torch._dynamo.reset()
        torch._dynamo.config.suppress_errors = False
    report = S.session_of(trainer).figures
    return {"loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "fallbacks": [r["compile_fallbacks"] for r in report["ranks"]], "stderr": err.getvalue()}


@pytest.fixture(autouse=True)
def _no_tvm():
    assert importlib.util.find_spec("tvm") is None, "these tests need a backend that fails: tvm must not be installed"


# name -> (stage, backend, suppress, evaluate); eager first: it compiles nothing
RUNS = {"eager": (3, None, False, False), "fallback": (3, "tvm", True, False), "stops0": (0, "tvm", False, False),
        "stops3": (3, "tvm", False, False), "evaluate": (3, "tvm", False, True)}


def _runs_job(rank, world, out):
    return {name: _job(rank, world, out / name, *how) for name, how in RUNS.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Per run of ``RUNS``, every rank's result, from one start."""
    ranks = run_on_ranks(_runs_job, 2, tmp_path_factory.mktemp("runs"), timeout=600)
    return {name: [r[name] for r in ranks] for name in RUNS}


@pytest.mark.parametrize("stage", [0, 3])
def test_every_rank_stops_with_one_clear_message(stage, runs):
    got = runs[f"stops{stage}"]
    for result in got:
        message = result["error"]
        assert message.startswith(f"--torch_compile could not compile LlamaForCausalLM at ZeRO stage {stage} "
                                  "(torch_compile_backend 'tvm'): BackendCompilerFailed: backend="), message
        assert "raised: ImportError: Please install apache-tvm" in message and ".. " not in message
        assert "TORCHDYNAMO_SUPPRESS_ERRORS=1" in message and "docs/getting-started.md#compiled-training" in message
        assert "TORCHDYNAMO_VERBOSE" not in message  # torch's advice about its own traceback is left out
        assert result["cause"] == "BackendCompilerFailed"


def test_asked_to_go_on_it_trains_as_eager_and_the_report_says_it_fell_back(runs):
    eager, got = runs["eager"], runs["fallback"]
    for rank in range(2):
        assert got[rank]["loss"] == eager[rank]["loss"] and len(eager[rank]["loss"]) == STEPS
        assert eager[rank]["fallbacks"] == [[], []]
        for fallbacks in got[rank]["fallbacks"]:  # every rank's list, in the report rank 0 writes
            assert fallbacks and all("ImportError: Please install apache-tvm" in f for f in fallbacks), fallbacks
            assert any(f.startswith("forward ") for f in fallbacks), fallbacks  # the code object torch ran eagerly
    summary = [line for line in got[0]["stderr"].splitlines() if line.startswith("hf_zero: ZeRO stage 3")]
    assert len(summary) == 1 and "code object(s) eagerly that it could not compile" in summary[0]
    assert not [line for line in eager[0]["stderr"].splitlines() if "eagerly that it could not" in line]


def test_a_standalone_evaluate_stops_with_the_same_message(runs):
    """evaluate() before (or without) train() compiles the model at its own first forward: the same
    CompileFailed, once (not wrapped again by an outer watch)."""
    got = runs["evaluate"]
    for result in got:
        assert result.get("error", "").startswith("--torch_compile could not compile LlamaForCausalLM at ZeRO stage 3 "
                                                  "(torch_compile_backend 'tvm'): BackendCompilerFailed: backend="), result
        assert result["error"].count("--torch_compile could not compile") == 1
        assert result["cause"] == "BackendCompilerFailed"
