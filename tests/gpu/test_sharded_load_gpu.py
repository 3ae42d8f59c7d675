"""``hf_zero.init.from_pretrained`` onto a GPU (W = 1): the pinned path of ``ParallelReader``
(pieces read on several threads into pinned buffers, their copies on the load stream behind the
shard's zero fill) gives exactly the checkpoint, in its own dtype and cast to another, also with
pieces far smaller than the tensors and fewer pinned buffers than pieces in flight. Skipped
without CUDA; run on the lent GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("stored,loaded", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_gpu_load_is_the_checkpoint(tmp_path, monkeypatch, stored, loaded):
    import hf_zero.init as zi
    from hf_zero.init import parallel_reads

    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=stored).save_pretrained(str(tmp_path))
    monkeypatch.setattr(parallel_reads, "PIECE_BYTES", 1 << 16)  # small pieces: most tensors are several
    model = zi.from_pretrained(str(tmp_path), zero_config={"zero_optimization": {"stage": 3}}, dtype=loaded)
    state = zi.engine_of(model).full_state_dict(to_cpu_on=0)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=stored).state_dict()
    for name, value in state.items():
        assert value.dtype == loaded, name
        assert torch.equal(value.to(stored), ref[name]), name
    assert next(model.parameters()).device.type == "cuda"
