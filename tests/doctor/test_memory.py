"""Memory checks: the estimator's per-rank bytes against free GPU memory, MemAvailable, ulimit -l."""

import pytest

from hf_zero.byte_units import fmt_bytes
from hf_zero.config import load_config
from hf_zero.doctor import memory
from hf_zero.doctor.memory import check_gpu_memory, check_host_memory, check_model, check_pinned_memory
from hf_zero.doctor.result import Status
from hf_zero.doctor.sizing import RunSpec, host_load_bytes, load_model_info, rank_bytes, spec_from_config
from hf_zero.estimate import estimate_bytes, gathered_params_bytes

from .conftest import REAL_PROBES, GiB

MiB = 2**20


@pytest.fixture
def model(tiny_model):
    return load_model_info(tiny_model)


def test_model_check(tiny_model, tmp_path, model):
    assert check_model(None, None, None).status is Status.SKIP
    assert check_model(tiny_model, model, None).status is Status.PASS
    with pytest.raises(ValueError) as caught:
        load_model_info(str(tmp_path / "missing"))
    failed = check_model(str(tmp_path / "missing"), None, str(caught.value))
    assert failed.status is Status.FAIL
    assert failed.detail == f"MODEL_CONFIG {str(tmp_path / 'missing')!r} does not exist; give a config.json or a model directory"


def test_sizes_are_the_estimators(model):
    spec = RunSpec(stage=3, dtype="bf16")
    b = rank_bytes(model, spec, 2)
    e = estimate_bytes(model.counts, stage=3, world=2, dtype="bf16", optimizer="adamw", model_dtype="fp32")
    gathered = gathered_params_bytes(model.counts, world=2, dtype="bf16", model_dtype="fp32")
    assert b.device == {"params": e["params"] + gathered, "grads": e["peak_grads"],
                        "optimizer": e["optimizer_state"], "activations": 0}
    assert host_load_bytes(model) == model.counts.total * 4


def test_auto_dtype_takes_the_larger(model):
    auto = rank_bytes(model, RunSpec(stage=0), 1).device_total
    assert auto == max(rank_bytes(model, RunSpec(stage=0, dtype=d), 1).device_total for d in ("bf16", "fp32"))


def test_cpu_offload_moves_optimizer_state_to_the_host(model):
    base = rank_bytes(model, RunSpec(stage=2, dtype="bf16"), 2)
    off = rank_bytes(model, RunSpec(stage=2, dtype="bf16", offload_optimizer="cpu", pin_optimizer=True), 2)
    assert off.device["optimizer"] == 0
    host = estimate_bytes(model.counts, stage=2, world=2, dtype="bf16", optimizer="adamw", model_dtype="fp32",
                          offload_optimizer=True)["host_offload"]
    assert off.offloaded["cpu"] == host > base.device["optimizer"]  # state + masters + the host grad buffer
    assert 0 < off.pinned < off.offloaded["cpu"]
    half = rank_bytes(model, RunSpec(stage=3, dtype="bf16", offload_optimizer="cpu", offload_ratio=0.5), 2)
    full = rank_bytes(model, RunSpec(stage=3, dtype="bf16"), 2)
    assert half.device["optimizer"] == round(0.5 * full.device["optimizer"])


def test_nvme_host_share_moves_that_share_to_the_host(model, tmp_path):
    # offload_optimizer.host_share ([Note: host share]): that share of the swapped masters and state in host memory
    spec = RunSpec(stage=2, dtype="bf16", offload_optimizer="nvme")
    nvme = rank_bytes(model, spec, 2)
    split = rank_bytes(model, RunSpec(**{**spec.__dict__, "offload_host_share": 0.25}), 2)
    kept = round(0.25 * nvme.offloaded["nvme"])
    assert 0 < kept and split.offloaded == {"nvme": nvme.offloaded["nvme"] - kept, "cpu": nvme.offloaded["cpu"] + kept}
    assert split.device == nvme.device
    config = load_config({"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(tmp_path), "host_share": 0.25}}})
    assert spec_from_config(config).offload_host_share == 0.25


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_bf16_state_counts_two_bytes_per_moment(model, tmp_path, device):
    # offload_optimizer.state_dtype "bf16" ([Note: bf16 host state], [Note: bf16 swap files]): the
    # offloaded moments at 2 bytes each, where the tier keeps them (host memory, or the swap files)
    spec = RunSpec(stage=2, dtype="bf16", offload_optimizer=device)
    fp32 = rank_bytes(model, spec, 2)
    bf16 = rank_bytes(model, RunSpec(**{**spec.__dict__, "offload_state_dtype": "bf16"}), 2)
    moments = round(2 * 2 * model.counts.trainable / 2)
    assert fp32.offloaded[device] - bf16.offloaded[device] == moments
    assert {k: v for k, v in bf16.offloaded.items() if k != device} == \
        {k: v for k, v in fp32.offloaded.items() if k != device} and bf16.device == fp32.device
    split = rank_bytes(model, RunSpec(**{**spec.__dict__, "offload_state_dtype": "bf16", "offload_host_share": 0.5}), 2)
    if device == "nvme":
        assert split.offloaded["cpu"] - bf16.offloaded["cpu"] == round(0.5 * bf16.offloaded["nvme"])
    block = {"device": device} if device == "cpu" else {"device": device, "nvme_path": str(tmp_path)}
    config = load_config({"bf16": {"enabled": True, "bf16_optimizer_states": True},
                          "zero_optimization": {"stage": 2, "offload_optimizer": block}})
    assert spec_from_config(config).offload_state_dtype == "bf16"


def test_gpu_memory_pass_and_fail(model):
    spec = RunSpec(stage=1, dtype="bf16", seq_len=64)
    need = rank_bytes(model, spec, 2).device_total
    assert check_gpu_memory(model, spec, 2, [80 * GiB, 80 * GiB]).status is Status.PASS
    assert check_gpu_memory(model, spec, 2, None).status is Status.SKIP
    assert check_gpu_memory(None, spec, 2, [GiB]).status is Status.SKIP
    tight = check_gpu_memory(model, spec, 2, [80 * GiB, int(need / 0.95)])
    assert tight.status is Status.WARN and "GPU 1 has" in tight.detail
    small = check_gpu_memory(model, spec, 2, [need // 2, need // 2])
    assert small.status is Status.FAIL
    assert small.detail.startswith("needs ")
    assert "stage 1, W = 2, bf16" in small.detail
    assert "try:" in small.fix and "gradient checkpointing" in small.fix


def test_gpu_memory_says_what_ratio_auto_would_choose(model):
    # [Note: auto ratio]: sized as the first step (everything offloaded), the choice beside it
    from hf_zero.config import load_config
    from hf_zero.estimate_auto import auto_offload_ratio

    config = load_config({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 2, "reduce_bucket_size": 5000, "offload_optimizer": {"device": "cpu", "ratio": "auto"}}})
    spec = spec_from_config(config, seq_len=64)
    assert spec.offload_auto and spec.offload_ratio == 1.0
    need = rank_bytes(model, spec, 2)
    assert need.device["optimizer"] == 0
    free = need.device_total + 10 * MiB
    check = check_gpu_memory(model, spec, 2, [free, free])
    want = auto_offload_ratio(model.counts, stage=2, world=2, dtype="bf16", optimizer="adamw",
                              headroom_bytes=10 * MiB, device_bytes=free, reduce_bucket_size=5000)
    assert f"; it would choose {want.ratio:.4f} after the first step" in check.detail
    assert 'offload_optimizer.ratio "auto": the first step starts with everything offloaded (host memory unknown)' \
        in check.detail
    assert 0 < want.ratio < 1  # this tiny model's state fits the 10 MiB beyond the margin in part or whole
    plain = check_gpu_memory(model, RunSpec(stage=2, dtype="bf16", offload_optimizer="cpu"), 2, [free, free])
    assert "ratio \"auto\"" not in plain.detail


def test_ratio_auto_first_step_is_sized_as_the_engine_starts_it(model):
    # [Note: auto start sizing]: a host too small for everything offloaded gets a partial start, sized so
    from hf_zero.engine.offload.host_room import HostReading
    from hf_zero.estimate_auto import auto_offload_ratio, auto_start

    config = load_config({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 2, "reduce_bucket_size": 5000, "offload_optimizer": {"device": "cpu", "ratio": "auto"}}})
    everything = rank_bytes(model, spec_from_config(config), 2)  # no host known: everything offloaded
    host = HostReading(everything.offloaded["cpu"], everything.offloaded["cpu"], 2)  # about half fits a rank
    spec = spec_from_config(config)
    spec = RunSpec(**{**spec.__dict__, "host": host})
    start = auto_start(model.counts, stage=2, world=2, dtype="bf16", optimizer="adamw", host=host,
                       reduce_bucket_size=5000)
    assert 0 < start.ratio < 1
    need = rank_bytes(model, spec, 2)
    assert need.offloaded["cpu"] == round(start.ratio * everything.offloaded["cpu"]) < everything.offloaded["cpu"]
    assert need.device["optimizer"] > 0 == everything.device["optimizer"]  # the rest starts on the GPU
    free = need.device_total + 10 * MiB
    check = check_gpu_memory(model, spec, 2, [free, free])
    assert f"needs {fmt_bytes(need.device_total)} per rank" in check.detail
    assert f"the first step starts at ratio {start.ratio:.4f}: the first {start.offloaded} of {start.buckets} " \
           "buckets offloaded" in check.detail
    assert f"starts on the GPU ({fmt_bytes(start.gpu_bytes)} a rank" in check.detail
    want = auto_offload_ratio(model.counts, stage=2, world=2, dtype="bf16", optimizer="adamw", headroom_bytes=10 * MiB,
                              device_bytes=free, reduce_bucket_size=5000, offloaded_now=start.offloaded)
    assert f"; it would choose {want.ratio:.4f} after the first step" in check.detail
    assert "the run re-chooses from the free memory it measures at that step's peak" in check.detail
    host_check = check_host_memory(model, spec, 2, 2, 64 * GiB, cuda=True)
    assert f'offload_optimizer.ratio "auto": the first step starts at ratio {start.ratio:.4f}' in host_check.detail
    nvme = RunSpec(**{**spec.__dict__, "offload_optimizer": "nvme"})
    assert 'the first step starts with everything offloaded (device "nvme")' in \
        check_gpu_memory(model, nvme, 2, [free, free]).detail


def test_fix_names_the_stage_and_ranks_that_fit(model):
    spec = RunSpec(stage=0, dtype="fp32")
    need = rank_bytes(model, spec, 1).device_total
    budget = int(need * 0.6)
    fix = check_gpu_memory(model, spec, 1, [budget]).fix
    assert "zero_optimization.stage" in fix or "ranks in total" in fix


def test_fix_says_what_offload_exists(model, monkeypatch):
    spec = RunSpec(stage=3, dtype="bf16")
    none_built = {k: False for k in memory.offload_availability()}
    monkeypatch.setattr(memory, "offload_availability", lambda: none_built)
    fix = check_gpu_memory(model, spec, 1, [1024]).fix
    assert fix.endswith("offload (CPU/NVMe) is not implemented yet in hf_zero")
    monkeypatch.setattr(memory, "offload_availability", lambda: {**none_built, "offload_optimizer cpu": True})
    fix = check_gpu_memory(model, spec, 1, [1024]).fix
    assert 'zero_optimization.offload_optimizer.device "cpu" at stage 3' in fix


def test_host_memory_cpu_ranks(model):
    spec = RunSpec(stage=2, dtype="fp32")
    per_rank = rank_bytes(model, spec, 2).device_total
    ok = check_host_memory(model, spec, 2, 2, 64 * GiB, cuda=False)
    assert ok.status is Status.PASS and ok.detail.startswith("2 rank(s) x ")
    small = check_host_memory(model, spec, 2, 2, per_rank, cuda=False)
    assert small.status is Status.FAIL
    assert "MemAvailable" in small.detail
    assert check_host_memory(model, spec, 2, 2, None, cuda=False).status is Status.SKIP


def test_host_memory_gpu_ranks_count_the_loaded_copy(model):
    spec = RunSpec(stage=3, dtype="bf16")
    need = 8 * host_load_bytes(model)
    assert check_host_memory(model, spec, 8, 8, 10 * need, cuda=True).status is Status.PASS
    result = check_host_memory(model, spec, 8, 8, need // 2, cuda=True)
    assert result.status is Status.FAIL and "loads the model on the host" in result.detail


def test_pinned_memory(model):
    no_offload = RunSpec(stage=2)
    assert check_pinned_memory(model, no_offload, 2, 2, GiB, None, cuda=True).status is Status.SKIP
    assert check_pinned_memory(model, None, 2, 2, GiB, None, cuda=True).status is Status.SKIP
    unpinned = RunSpec(stage=2, offload_optimizer="cpu", pin_optimizer=False)
    assert check_pinned_memory(model, unpinned, 2, 2, GiB, None, cuda=True).status is Status.PASS
    pinned = RunSpec(stage=2, dtype="bf16", offload_optimizer="cpu", pin_optimizer=True)
    need = 2 * rank_bytes(model, pinned, 2).pinned
    assert check_pinned_memory(model, pinned, 2, 2, 64 * GiB, None, cuda=True).status is Status.PASS
    assert check_pinned_memory(model, pinned, 2, 2, 64 * GiB, None, cuda=False).detail == (
        "no CUDA: host buffers are not pinned")
    over_limit = check_pinned_memory(model, pinned, 2, 2, 64 * GiB, 64 * 1024, cuda=True)
    assert over_limit.status is Status.WARN and "ulimit -l" in over_limit.fix
    half = check_pinned_memory(model, pinned, 2, 2, int(need * 1.5), None, cuda=True)
    assert half.status is Status.WARN
    assert check_pinned_memory(model, pinned, 2, 2, need // 2, None, cuda=True).status is Status.FAIL
    no_model = check_pinned_memory(None, pinned, 2, 2, GiB, 64 * 1024, cuda=True)
    assert no_model.status is Status.WARN and "pass --model" in no_model.detail


def test_spec_from_config(write_config):
    from hf_zero.config import load_config

    config = load_config(write_config({
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "fp16": {"enabled": True}, "optimizer": {"type": "SGD", "params": {"momentum": 0.9}},
        "train_micro_batch_size_per_gpu": 4,
    }))
    spec = spec_from_config(config, seq_len=128)
    assert (spec.stage, spec.dtype, spec.optimizer, spec.micro_batch, spec.seq_len) == (2, "fp16", "sgd_momentum", 4, 128)
    assert (spec.offload_optimizer, spec.pin_optimizer, spec.offload_param) == ("cpu", True, "none")
    assert spec_from_config(None) == RunSpec()


def test_probes(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n")
    assert REAL_PROBES["mem_available_bytes"](str(meminfo)) == 2048 * 1024
    assert REAL_PROBES["mem_available_bytes"](str(tmp_path / "none")) is None
    assert REAL_PROBES["mem_available_bytes"]() > 0  # this machine's /proc/meminfo
    assert REAL_PROBES["mem_total_bytes"]() >= REAL_PROBES["mem_available_bytes"]()
    limit = REAL_PROBES["memlock_limit_bytes"]()
    assert limit is None or limit >= 0
