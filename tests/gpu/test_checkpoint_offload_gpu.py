"""CPU checkpointing and tiled compute on one GPU (bf16): the CUDA paths the CPU tests cannot reach.

* ``CheckpointOffload`` with pinned buffers and its two side streams (copies to the host during forward,
  back one layer ahead during backward): losses and every grad bit for bit equal to plain checkpointing,
  both reentrant modes, over several steps (a reused buffer read before its copy landed, or a prefetched
  input used before its event, shows as a difference); the checkpoints' device memory is gone after
  forward (layers x batch x sequence x hidden x 2 bytes, less one layer's in flight).
* ``TiledLoss``: the step's peak memory without the full logits (batch x sequence x vocabulary in bf16 and
  fp32), the loss within bf16's rounding of the untiled one.

    pytest tests/gpu/test_checkpoint_offload_gpu.py
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_zero.activations.checkpoint_layers import wrap_layers
from hf_zero.activations.checkpoint_offload import CheckpointOffload
from hf_zero.activations.host_buffers import HostBuffers
from hf_zero.activations.tiled_loss import TiledLoss, causal_lm

pytestmark = [pytest.mark.gpu]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

LAYERS, HIDDEN, BATCH, SEQ = 8, 512, 2, 2048

# CUDA's embedding backward (and some cuBLAS paths) sum with atomics: two plain runs of the same steps can
# differ in the last bit of the embedding grad (seen on an H100: model.embed_tokens.weight at step 0), so the
# bit-for-bit comparison runs under torch's deterministic algorithms (cuBLAS reads this variable per call).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _model(vocab: int = 1000) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=1376, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16).cuda().train()


def _steps(model, offload: CheckpointOffload | None, reentrant: bool, steps: int = 3):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if offload is not None:
        # every decoder layer, and LlamaModel: transformers (5.17, 5.25) sets the checkpoint function and
        # gradient_checkpointing=True on it too; it never calls it (its layers checkpoint themselves), but a
        # model whose forward checkpoints its layers from the parent does, so wrap_layers wraps it as well
        assert wrap_layers(model, offload) == LAYERS + 1
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (BATCH, SEQ), generator=g).cuda()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_offload_is_plain_checkpointing_bit_for_bit(reentrant, deterministic):
    base = _model()
    ref = _steps(copy.deepcopy(base), None, reentrant)
    offload = CheckpointOffload("cuda", HostBuffers(pin=True, slots=None, contiguous=False))
    got = _steps(copy.deepcopy(base), offload, reentrant)
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, ref)):
        assert torch.equal(loss, ref_loss), step
        for name, grad in grads.items():
            assert torch.equal(grad, ref_grads[name]), (step, name)
    assert offload.counts.packed == offload.counts.unpacked == 3 * LAYERS
    assert offload.counts.prefetched == 3 * (LAYERS - 1)  # all but the first a backward needs came ahead
    assert offload.buffers.allocations == LAYERS and offload.buffers.pin  # pinned, reused from step 2 on


def test_checkpoints_leave_the_device_during_forward():
    base = _model()
    held = {}
    for name, offload in (("plain", None),
                          ("offload", CheckpointOffload("cuda", HostBuffers(pin=True, slots=None, contiguous=False)))):
        model = copy.deepcopy(base)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if offload is not None:
            assert wrap_layers(model, offload) == LAYERS + 1  # the layers and LlamaModel (_steps)
        ids = torch.randint(0, 1000, (BATCH, SEQ)).cuda()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator frees blocks kept for the d2h stream (record_stream) on its next call
        held[name] = torch.cuda.memory_allocated() - before
        loss.backward()
        del model, loss
    checkpoint_bytes = BATCH * SEQ * HIDDEN * 2  # one layer's input (bf16)
    # every layer's input but (at most) the one whose copy was still in flight is off the device
    assert held["plain"] - held["offload"] >= (LAYERS - 1) * checkpoint_bytes, held


def test_tiled_loss_never_holds_full_logits():
    vocab = 32000
    base = _model(vocab)
    peaks, losses = {}, {}
    for name in ("untiled", "tiled"):
        model = copy.deepcopy(base)
        tiled = TiledLoss(causal_lm(model), 8) if name == "tiled" else None
        ids = torch.randint(0, vocab, (BATCH, SEQ)).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if tiled is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with tiled.armed():
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - start
        losses[name] = loss.item()
        del model, loss
    logits_fp32 = BATCH * SEQ * vocab * 4
    assert peaks["untiled"] - peaks["tiled"] >= logits_fp32, peaks  # at least the fp32 logits are never whole
    assert abs(losses["tiled"] - losses["untiled"]) <= 1e-2 * abs(losses["untiled"]), losses
