"""When the run report measures the bytes a rank holds ([Note: bytes measured] in hf_zero/trainer/report.py),
and when rank 0 rewrites the report file ([Note: report rewrites]).

Driven through the Trainer's callback events for six steps of a six-step run (stage 0, one rank,
no engine: the report's own walk of the model and optimizer): with ``MEASURE_EVERY_S`` longer than
the run, the bytes are measured at steps 1, 2 and 6 only, and every log carries the last measured
step's bytes; with 0 seconds, at every step.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_zero.config import load_config, resolve_config
from hf_zero.trainer import report
from hf_zero.trainer.report import ReportCallback
from hf_zero.trainer.session import ZeroSession

STEPS = 6


def _run(tmp_path, monkeypatch, every_s: float, rewrite_every_s: float = 0.0, written=None
         ) -> tuple[list[int], list[dict]]:
    """``written``: a list that gets the report file's ``step`` after each log (None: no file yet)."""
    measured, original = [], report._held_without_engine
    state = TrainerState(max_steps=STEPS)

    def counting(model, optimizer):
        measured.append(state.global_step + 1)
        return original(model, optimizer)

    monkeypatch.setattr(report, "_held_without_engine", counting)
    monkeypatch.setattr(report, "MEASURE_EVERY_S", every_s)
    monkeypatch.setattr(report, "REWRITE_EVERY_S", rewrite_every_s)
    training_args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    config = resolve_config(load_config({"zero_optimization": {"stage": 0}}, source="ds.json"), training_args,
                            world_size=1)
    callback = ReportCallback(ZeroSession(config=config, trainer_ref=lambda: None))
    args = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, output_dir=str(tmp_path), world_size=1)
    control = TrainerControl()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback.on_train_begin(args, state, control, model=model)
    logs = []
    for step in range(1, STEPS + 1):
        callback.on_step_begin(args, state, control)
        model(torch.randn(2, 8)).square().mean().backward()
        callback.on_pre_optimizer_step(args, state, control, model=model, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        log = {"loss": 1.0}
        state.log_history.append({**log, "step": step})
        callback.on_log(args, state, control, logs=log)
        logs.append(log)
        if written is not None:
            path = os.path.join(tmp_path, report.REPORT_NAME)
            written.append(None)
            if os.path.exists(path):
                with open(path) as f:
                    written[-1] = json.load(f)["step"]
    return measured, logs


@pytest.mark.parametrize("every_s, expected", [(3600.0, [1, 2, STEPS]), (0.0, list(range(1, STEPS + 1)))])
def test_bytes_are_measured_at_the_first_two_steps_the_last_and_every_interval(tmp_path, monkeypatch, every_s, expected):
    measured, logs = _run(tmp_path, monkeypatch, every_s)
    assert measured == expected
    state_bytes = [log["hf_zero/optimizer_state_bytes"] for log in logs]
    # AdamW's moments exist from the second step's pre-step on (the first step creates them)
    assert state_bytes[0] == 0 < state_bytes[1] == state_bytes[-1]
    assert all(b == state_bytes[1] for b in state_bytes[1:])


@pytest.mark.parametrize("rewrite_every_s, expected", [(3600.0, [1] * STEPS), (0.0, list(range(1, STEPS + 1)))])
def test_report_rewritten_at_the_first_log_then_once_an_interval_passed(tmp_path, monkeypatch, rewrite_every_s,
                                                                         expected):
    written = []
    _, logs = _run(tmp_path, monkeypatch, 0.0, rewrite_every_s, written)
    assert written == expected  # the file's step after each log: the first log's, until the interval passed
    assert all("hf_zero/params_bytes" in log for log in logs)  # every log still carries the figures
