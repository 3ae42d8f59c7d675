"""Which files a sharded load reads, as transformers picks them: ``.bin`` checkpoints (one file,
or several with an index; weights only: a pickled payload is refused), a hub id's snapshot in
the local cache (offline), a ``subfolder``. Each against transformers' own load at W = 2."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_zero.testing.multiprocess import run_on_ranks
from tests.init.test_sharded_load import _llama_dir
from tests.trainer import tiny

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
REPO, COMMIT = "hf-zero-test/tiny-llama", "0123456789abcdef0123456789abcdef01234567"


def _bin_dirs(root: str) -> tuple[str, str]:
    """The tiny Llama as one pytorch_model.bin, and as two .bin files with an index."""
    src = _llama_dir(root, tied=False)
    state = load_file(os.path.join(src, "model.safetensors"))
    one, two = os.path.join(root, "bin-one"), os.path.join(root, "bin-two")
    for path in (one, two):
        os.makedirs(path, exist_ok=True)
        shutil.copy(os.path.join(src, "config.json"), path)
    torch.save(state, os.path.join(one, "pytorch_model.bin"))
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, os.path.join(two, name))
    with open(os.path.join(two, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}, f)
    return one, two


def _hub_cache(root: str) -> str:
    """A Hugging Face cache holding REPO at COMMIT (huggingface_hub's layout), with the model in it."""
    cache = os.path.join(root, "hub")
    repo = os.path.join(cache, "models--" + REPO.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    shutil.copytree(_llama_dir(root, tied=False), os.path.join(repo, "snapshots", COMMIT), dirs_exist_ok=True)
    return cache


def _compare(rank, world, cases):
    import hf_zero.init as zi
    import hf_zero.trainer as zt

    out = {}
    zt.activate(ZERO3)  # the script's own from_pretrained is served sharded
    try:
        for name, path, kwargs in cases:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            zt.deactivate()
            ref = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            zt.activate(ZERO3)
            engine = zi.engine_of(model)
            state = engine.full_state_dict(to_cpu_on=None) if engine is not None else {}
            ref_state = ref.state_dict()
            ids = (torch.arange(2 * tiny.SEQ).view(2, tiny.SEQ) * 5 + 3) % tiny.VOCAB
            with torch.no_grad():
                logits = float((model(ids).logits - ref(ids).logits).abs().max())
            out[name] = {"sharded": engine is not None, "logits": logits,
                         "differ": sorted(k for k, v in state.items() if not torch.equal(v, ref_state[k])),
                         "count": len(state), "name_or_path": model.name_or_path}
    finally:
        zt.deactivate()
    return out


def test_bin_hub_cache_and_subfolder_load_as_transformers_loads_them(tmp_path, monkeypatch):
    one, two = _bin_dirs(str(tmp_path))
    cache = _hub_cache(str(tmp_path))
    # Offline as a job without network would run (transformers looks for adapter files on the hub
    # even with local_files_only=True); the ranks start fresh and read it at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [("bin", one, {}), ("bin-index", two, {}), ("hub", REPO, {"cache_dir": cache}),
             ("subfolder", str(tmp_path), {"subfolder": "llama-untied"})]
    for rank_out in run_on_ranks(_compare, 2, cases):
        for name, out in rank_out.items():
            assert out["sharded"] and out["count"] >= 10 and out["differ"] == [], (name, out)
            assert out["logits"] == 0.0, (name, out)
        assert rank_out["hub"]["name_or_path"] == REPO


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_bin_with_a_pickled_payload_is_refused_and_runs_nothing(tmp_path):
    import hf_zero.init as zi
    from hf_zero.checkpoint.errors import CheckpointError

    one, _ = _bin_dirs(str(tmp_path))
    marker = tmp_path / "ran"
    state = torch.load(os.path.join(one, "pytorch_model.bin"), weights_only=True)
    torch.save({**state, "x": _Payload(str(marker))}, os.path.join(one, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin cannot be loaded as weights only"):
        zi.from_pretrained(one, zero_config=ZERO3)
    assert not marker.exists()
    torch.save({**state, "x": [1, 2]}, os.path.join(one, "pytorch_model.bin"))  # loads weights only, not tensors
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a state dict of tensors \('x' is not a tensor\)"):
        zi.from_pretrained(one, zero_config=ZERO3)


def test_peak_host_rss_of_a_bin_load_is_a_shard_and_a_unit(tmp_path):
    """A .bin file is mapped, not read: what a rank adds is its shard plus the mapped pages of the
    unit it is copying from (the file is let go of after each unit), far below the whole model
    that loading then sharding holds on every rank. Bound: model bytes / W + the largest tensor
    (a unit's pages, read by this rank, are at most its share of the largest unit) + 64 MiB."""
    from tests.init.test_sharded_load import _load_rss, rss_model

    model, model_bytes, largest = rss_model()
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
    del model
    world = 2
    for out in run_on_ranks(_load_rss, world, str(tmp_path)):
        assert out["held"] <= model_bytes / world + 2**20, out
        assert out["peak"] - out["base"] <= model_bytes / world + largest + 64 * 2**20, (out, model_bytes)
