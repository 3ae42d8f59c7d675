"""Progress bars and the run report on 2 gloo ranks, one job (hf_zero/progress.py, trainer/report.py,
trainer/report_file.py):

- the sharded load and the stage-3 save draw a bar on rank 0 only, and none once Hugging Face's
  progress bars or the Trainer's ``disable_tqdm`` are off;
- the report is rewritten at every logging step with ``REWRITE_EVERY_S`` 0 (a callback reads it as
  each log is made; test_report_bytes_measured.py: the default interval), holds
  the resolved config, versions, devices and world size, and a run that dies leaves the last one;
- every training log carries this rank's ``hf_zero/*`` scalars, seen by a callback of the user's and
  kept in ``log_history``, and hf_zero's callback runs before every ``report_to`` integration (right
  after the Trainer's flow);
- at the end, rank 0 alone prints the summary in human units, which the finished report holds too.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from transformers import DefaultFlowCallback, Trainer, TrainerCallback

from hf_zero.testing.multiprocess import run_on_ranks
from hf_zero.trainer import report_file
from hf_zero.trainer.report import REPORT_NAME, ReportCallback
from tests.init.test_sharded_load import _llama_dir

from . import tiny

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
STEPS = 3
SCALARS = {"hf_zero/params_bytes", "hf_zero/grads_bytes", "hf_zero/peak_grads_bytes", "hf_zero/optimizer_state_bytes",
           "hf_zero/host_offload_bytes", "hf_zero/nvme_offload_bytes", "hf_zero/peak_memory_bytes",
           "hf_zero/tokens_per_s"}


class Recorder(TrainerCallback):
    """What a user's callback receives at each log, and the report on disk at that moment (rank 0)."""

    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.reports: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))
        if args.process_index == 0 and "loss" in logs:
            with open(os.path.join(args.output_dir, REPORT_NAME)) as f:
                self.reports.append(json.load(f))


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:  # after step 1's log, before step 2's
            raise RuntimeError("simulated crash")


def _captured(fn) -> tuple[object, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        value = fn()
    return value, err.getvalue()


def _job(rank, world, path, out):
    import hf_zero.init as zi
    import hf_zero.trainer as zt
    from hf_zero.trainer import report
    from transformers.utils import logging as hf_logging

    report.REWRITE_EVERY_S = 0.0  # a rewrite at every log, read by Recorder ([Note: report rewrites])

    got = {}
    model, got["load"] = _captured(lambda: zi.from_pretrained(path, zero_config=ZERO3))
    hf_logging.disable_progress_bar()
    try:
        _, got["load_bars_off"] = _captured(lambda: zi.from_pretrained(path, zero_config=ZERO3))
    finally:
        hf_logging.enable_progress_bar()

    zt.activate(ZERO3)
    try:
        recorder = Recorder()
        trainer = Trainer(model=model, args=tiny.args(os.path.join(out, "run"), max_steps=STEPS),
                          train_dataset=tiny.lm_rows(16), callbacks=[recorder])
        order = [type(cb) for cb in trainer.callback_handler.callbacks]
        got["order"] = order.index(ReportCallback) - order.index(DefaultFlowCallback)
        _, got["train"] = _captured(trainer.train)
        got["logs"], got["reports"], got["history"] = recorder.logs, recorder.reports, trainer.state.log_history
        _, got["save_tqdm_off"] = _captured(lambda: trainer.save_model(os.path.join(out, "saved")))
        trainer.args.disable_tqdm = False
        _, got["save"] = _captured(lambda: trainer.save_model(os.path.join(out, "saved")))

        crashing = Trainer(model=tiny.llama(0), args=tiny.args(os.path.join(out, "crash"), max_steps=STEPS),
                           train_dataset=tiny.lm_rows(16), callbacks=[Crash()])
        with pytest.raises(RuntimeError, match="simulated crash"):
            crashing.train()
    finally:
        zt.deactivate()
    return got


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    path = _llama_dir(str(root), tied=False)
    return str(root), run_on_ranks(_job, 2, path, str(root), timeout=300)


def test_bars_on_rank_0_only_and_off_by_the_switches(job):
    _, (r0, r1) = job
    assert "Filling parameter shards" in r0["load"] and "100%" in r0["load"]
    assert "Writing model shards" in r0["save"] and "100%" in r0["save"]
    for text in (r1["load"], r1["save"], r0["load_bars_off"], r0["save_tqdm_off"]):
        assert "Filling parameter shards" not in text and "Writing model shards" not in text, text


def test_scalars_reach_every_log_before_the_integrations(job):
    _, ranks = job
    for got in ranks:
        assert got["order"] == 1  # right after DefaultFlowCallback: before every report_to callback
        training = [log for log in got["logs"] if "loss" in log]
        assert len(training) == STEPS
        for log in training:
            assert SCALARS <= set(log), sorted(log)
            assert log["hf_zero/params_bytes"] > 0
            assert log["hf_zero/tokens_per_s"] > 0 and log["hf_zero/peak_memory_bytes"] > 0
        # measured before each optimizer step: AdamW's moments exist from step 2 (fp32 stage 3: no master copy)
        assert training[0]["hf_zero/optimizer_state_bytes"] == 0 < training[-1]["hf_zero/optimizer_state_bytes"]
        history = [entry for entry in got["history"] if "loss" in entry]
        assert [{k: e[k] for k in SCALARS} for e in history] == [{k: log[k] for k in SCALARS} for log in training]
        final = got["logs"][-1]  # the end-of-run figures, logged once more
        assert final["hf_zero/train_tokens_per_s"] > 0 and "loss" not in final


def test_report_rewritten_at_every_log_with_config_versions_devices(job):
    root, (r0, _) = job
    assert [r["step"] for r in r0["reports"]] == list(range(1, STEPS + 1))
    for report, log in zip(r0["reports"], [log for log in r0["logs"] if "loss" in log]):
        assert report["status"] == "training" and "summary" not in report
        assert report["last_log"]["loss"] == log["loss"]
        assert [r["rank"] for r in report["ranks"]] == [0, 1] and report["world_size"] == 2
        assert [r["steps"] for r in report["ranks"]] == [report["step"]] * 2
    with open(os.path.join(root, "run", REPORT_NAME)) as f:
        final = json.load(f)
    assert final["status"] == "finished" and final["step"] == STEPS
    assert final["config"]["zero"]["stage"] == 3 and final["config"]["precision"]["dtype"] == "fp32"
    assert final["config_source"] == "<dict>"
    assert {"hf_zero", "python", "torch", "transformers", "accelerate"} <= set(final["versions"])
    assert all(final["versions"][k] for k in ("hf_zero", "python", "torch", "transformers", "accelerate"))
    assert all(r["device"].startswith("cpu") and r["host"] and "name" not in r for r in final["ranks"])
    assert [r["tokens"] for r in final["ranks"]] == [STEPS * 2 * tiny.SEQ] * 2


def test_summary_in_human_units_printed_by_rank_0(job):
    root, (r0, r1) = job
    with open(os.path.join(root, "run", REPORT_NAME)) as f:
        summary = json.load(f)["summary"]
    assert summary["run"].startswith(f"ZeRO stage 3, 2 rank(s), fp32, {STEPS} steps in ")
    assert summary["throughput"].endswith(" tok/s (all ranks)")
    assert summary["params"].endswith((" B", " KiB")) and summary["peak_memory"].endswith("(host peak RSS)")
    lines = [line for line in r0["train"].splitlines() if line.startswith("hf_zero: ZeRO stage 3")]
    assert len(lines) == 1 and summary["throughput"] in lines[0] and REPORT_NAME in lines[0]
    assert "hf_zero: ZeRO stage" not in r1["train"]


def test_a_run_that_dies_leaves_its_last_report(job):
    root, _ = job
    with open(os.path.join(root, "crash", REPORT_NAME)) as f:
        report = json.load(f)
    assert report["status"] == "training" and report["step"] == 1
    assert not [name for name in os.listdir(os.path.join(root, "crash")) if name.endswith(".hf_zero-tmp")]


def _docs_sample() -> tuple[dict, str, str]:
    """getting-started.md's sample report (from ``python -m hf_zero.demo``) and its printed summary line."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "getting-started.md").read_text()
    section = text[text.index("## What a run writes"):text.index("## Progress bars")]
    line = section.split("```\n", 2)[1].strip()
    sample = section[section.index("```json\n") + len("```json\n"):]
    return json.loads(sample[:sample.index("\n```")]), line, section


def test_docs_sample_has_the_reports_shape(job):
    root, _ = job
    sample, line, section = _docs_sample()
    with open(os.path.join(root, "run", REPORT_NAME)) as f:
        report = json.load(f)
    assert set(sample) == set(report) - {"config"}  # the docs leave the config out, and say so
    for key in ("summary", "last_log", "versions"):
        assert set(sample[key]) == set(report[key]), key
    [rank] = sample["ranks"]
    assert set(rank) == set(report["ranks"][0]) and set(rank["bytes"]) == set(report["ranks"][0]["bytes"])
    for key in [k for k in report if k != "ranks"] + [k for k in report["ranks"][0] if k != "rank"]:
        assert f"`{key}`" in section or f"`ranks[].{key}" in section, f"{key} is not in the docs' field table"
    # the printed line is what report_file prints for that very report
    assert line == report_file.summary_text(sample, sample_path := line.rsplit("Report: ", 1)[1]) and sample_path
