"""bench/lazy_load.py at the tiny preset on the CPU: the checkpoint written in several shards, the
rows' loads (transformers', hf_zero's with and without reads overlapped across units, and the
Trainer script's under ``torchrun -m hf_zero.run``, loaded sharded) give the same logits, the
DeepSpeed row says why it did not run, the page cache is emptied of the checkpoint before a row
and the record says so (bench/page_cache.py). The loads of rows ``plain``, ``hf_zero`` and
``hf_zero_drain`` run in this process (the driver runs each in a fresh one: only their peaks
differ); the Trainer row runs as on the GPU, through torchrun."""

from __future__ import annotations

import os
import sys

from tests.test_bench_scaling import _load


page_cache = _load("page_cache", register=True)
lazy_load = _load("lazy_load", register=True)


def test_page_cache_residency_and_dropping_a_files_pages(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(4 << 20))
    assert page_cache.resident_pages(str(path))[1] == (4 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert page_cache.resident_fraction([str(path)]) == 1.0  # just written
    dropped = page_cache.drop([str(path)], whole_cache=False)  # never the shared machine's whole cache
    assert dropped["how"] == "fadvise" and dropped["resident_after"] == 0.0
    with open(path, "rb") as f:
        f.read(1 << 20)
    assert 0.0 < page_cache.resident_fraction([str(path)]) < 1.0 or os.sysconf("SC_PAGE_SIZE") > (1 << 20)


def test_rows_load_the_same_model_and_the_record_says_how(tmp_path, monkeypatch):
    from hf_zero.init import parallel_reads

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["lazy_load.py", "--out", out, "--preset", "tiny", "--device", "cpu",
                                      "--ckpt", ckpt, "--drop_caches", "files", "--timeout_s", "120"])
    opts = lazy_load.parse()
    written = lazy_load.write(ckpt, lazy_load.PRESETS["tiny"], "cpu", max_shard_mb=0.1)
    assert len(written["files"]) >= 2 and written["params"] == 139_584  # 2 x 512 x 64 + 2 x 36,992 + 64
    files = [os.path.join(ckpt, f) for f in written["files"]]
    assert written["file_bytes"] > written["model_bytes"] == 2 * written["params"]  # + the files' headers

    monkeypatch.setattr(parallel_reads, "READ_THREADS", parallel_reads.READ_THREADS)  # load() sets both
    monkeypatch.setattr(parallel_reads, "PIECE_BYTES", parallel_reads.PIECE_BYTES)
    monkeypatch.setattr(parallel_reads, "OVERLAP_UNITS", parallel_reads.OVERLAP_UNITS)
    rows = [{"row": how, "world_size": 1, "cached_before": 1.0, "cache_drop": None,
             **lazy_load.load(ckpt, how, "cpu", read_threads=2, piece_mb=1)} for how in ("plain", "hf_zero", "hf_zero_drain")]
    rows = [{**r, "peak_rss_max": r["peak_rss"]} for r in rows]
    rows.append(lazy_load.measure("trainer_hf_zero", 1, opts, files))
    rows.append(lazy_load.measure("deepspeed", 1, opts, files))
    trainer, ds = rows[3], rows[4]
    assert "failed" not in trainer, trainer.get("output_tail")
    assert trainer["sharded"] is True and trainer["how"] == "hf_zero_trainer"  # zero3_init_flag served it
    assert trainer["cache_drop"]["how"] == "fadvise" and trainer["cached_before"] == 0.0
    assert ds["not_run"] == "DeepSpeed's zero.Init load is measured on CUDA only"

    record = {"checkpoint": written, "device": "CPU", "rows": rows}
    lazy_load.compare(record)
    assert [r.get("logits_vs_plain") for r in rows] == [None, "equal", "equal", "equal", None]
    text = lazy_load.table(record, opts)
    assert "| script's from_pretrained under hf_zero.run, stage 3 (cpu) | 1 | 0% |" in text
    assert "not run: DeepSpeed's zero.Init load is measured on CUDA only" in text
    assert "emptied before each row (--drop_caches)" in text and "Page cache emptied with: fadvise." in text
