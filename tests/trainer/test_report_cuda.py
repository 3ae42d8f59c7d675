"""The run report's CUDA branch on a machine without a GPU (hf_zero/trainer/report.py, report_file.py).

The report callback reads a CUDA device through one value it is given (device_memory.MemorySource);
here a stand-in answers for ``cuda:0`` while the model trains on CPU, and the callback is driven
through the Trainer's events for two logged steps and the end of training. Everything the report
says of the device comes from the stand-in: the rank's device name and memory, the peak as "CUDA max
allocated" in the file, in the ``hf_zero/*`` scalars and in the summary rank 0 prints. The same run
on ``cpu`` reads peak RSS and never asks the stand-in.
"""

from __future__ import annotations

import json
import os
import types

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_zero.byte_units import fmt_bytes
from hf_zero.config import load_config, resolve_config
from hf_zero.trainer.device_memory import MemorySource
from hf_zero.trainer.report import REPORT_NAME, ReportCallback
from hf_zero.trainer.session import ZeroSession

NAME, TOTAL = "NVIDIA H100 80GB HBM3", 85_520_809_984


class StandIn:
    """A CUDA device as torch.cuda would describe it; its peak grows by 1 MiB at each reading."""

    def __init__(self) -> None:
        self.asked: list[torch.device] = []
        self.peak = 3 * 2**30

    def max_allocated(self, device: torch.device) -> int:
        self.asked.append(device)
        self.peak += 2**20
        return self.peak

    def properties(self, device: torch.device) -> tuple[str, int]:
        self.asked.append(device)
        return NAME, TOTAL

    def source(self) -> MemorySource:
        return MemorySource(max_allocated=self.max_allocated, properties=self.properties)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids)).logsumexp(-1).mean()


def _run(tmp_path, monkeypatch, device: torch.device, memory: MemorySource):
    """Two logged steps and the end of training, as the Trainer calls the callback (stage 0, one rank);
    the report rewritten at each log (``REWRITE_EVERY_S`` 0, [Note: report rewrites])."""
    from hf_zero.trainer import report

    monkeypatch.setattr(report, "REWRITE_EVERY_S", 0.0)
    training_args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    config = resolve_config(load_config({"zero_optimization": {"stage": 0}}, source="ds.json"), training_args,
                            world_size=1)
    session = ZeroSession(config=config, trainer_ref=lambda: None)
    callback = ReportCallback(session, memory=memory)
    args = types.SimpleNamespace(device=device, process_index=0, output_dir=str(tmp_path), world_size=1)
    state, control = TrainerState(), TrainerControl()
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback.on_train_begin(args, state, control, model=model)
    logs, reports = [], []
    for step in (1, 2):
        callback.on_step_begin(args, state, control)
        loss = model(input_ids=torch.randint(0, 16, (2, 5)))
        loss.backward()
        callback.on_pre_optimizer_step(args, state, control, model=model, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        control.should_log = True
        callback.on_step_end(args, state, control)
        log = {"loss": loss.item(), "learning_rate": 1e-3, "epoch": step / 2}
        state.log_history.append({**log, "step": step})
        callback.on_log(args, state, control, logs=log)
        logs.append(log)
        with open(os.path.join(tmp_path, REPORT_NAME)) as f:
            reports.append(json.load(f))
        control.should_log = False
    callback.on_train_end(args, state, control, model=model)
    with open(os.path.join(tmp_path, REPORT_NAME)) as f:
        finished = json.load(f)
    return logs, reports, finished, state


def test_cuda_branch_reads_the_device_through_its_source(tmp_path, monkeypatch, capsys):
    stand_in = StandIn()
    logs, reports, finished, state = _run(tmp_path, monkeypatch, torch.device("cuda", 0), stand_in.source())
    assert stand_in.asked and set(stand_in.asked) == {torch.device("cuda", 0)}
    for report, log in zip(reports, logs):
        assert report["status"] == "training"
        [rank] = report["ranks"]
        assert (rank["device"], rank["name"], rank["memory_bytes"]) == ("cuda:0", NAME, TOTAL)
        assert rank["peak_memory"]["kind"] == "cuda_max_allocated"
        assert 3 * 2**30 < rank["peak_memory"]["bytes"] <= stand_in.peak
        assert 3 * 2**30 < log["hf_zero/peak_memory_bytes"] <= stand_in.peak  # the scalar every integration gets
        assert state.log_history[reports.index(report)]["hf_zero/peak_memory_bytes"] == log["hf_zero/peak_memory_bytes"]
    assert reports[0]["ranks"][0]["peak_memory"]["bytes"] < reports[1]["ranks"][0]["peak_memory"]["bytes"]
    [rank] = finished["ranks"]
    assert finished["status"] == "finished" and (rank["name"], rank["memory_bytes"]) == (NAME, TOTAL)
    peak = rank["peak_memory"]["bytes"]
    assert finished["summary"]["peak_memory"] == f"{fmt_bytes(peak)} (CUDA max allocated)"
    printed = capsys.readouterr().err
    assert f"peak memory {fmt_bytes(peak)} (CUDA max allocated)" in printed
    assert rank["bytes"]["params"] == (16 * 8 + 8 * 16 + 16) * 4  # the measured tensors, not the device's


def test_cpu_run_reads_peak_rss_and_never_the_cuda_source(tmp_path, monkeypatch, capsys):
    stand_in = StandIn()
    _, reports, finished, _ = _run(tmp_path, monkeypatch, torch.device("cpu"), stand_in.source())
    assert stand_in.asked == []
    [rank] = finished["ranks"]
    assert rank["device"] == "cpu" and "name" not in rank and "memory_bytes" not in rank
    assert rank["peak_memory"]["kind"] == "host_peak_rss" and rank["peak_memory"]["bytes"] > 0
    assert finished["summary"]["peak_memory"].endswith("(host peak RSS)")
    assert "(host peak RSS)" in capsys.readouterr().err
