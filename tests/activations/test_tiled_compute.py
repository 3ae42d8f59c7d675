"""Tiled MLP and tiled loss against the untiled forward and backward.

[Note: the tiling bound] A tile changes only the order of additions: each output and gradient is the
same sum of products. fp32 summation of n terms t_i has error at most n * u * sum |t_i| (u = 2**-24), so
the tiled and untiled results differ by at most 2 * n * u * sum |t_i|. For a Linear weight's gradient
(the only values summed across tiles: tokens) sum |t_i| is (|dY|^T |X|) over the tokens, which the
tests measure on the untiled run with hooks; for the loss, the per-token cross entropies are >= 0, so it
is n * loss-sum. Everything else is computed row by row and must agree to fp32 rounding of a row (rtol
1e-6; in practice bitwise).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from hf_zero.activations.tiled_loss import Capture, TiledLoss, causal_lm
from hf_zero.activations.tiled_loss import tile_count as loss_tiles
from hf_zero.activations.tiled_mlp import TiledMLP, decoder_mlps, tile_count, tile_mlps, untile_mlps
from hf_zero.config.auto import AUTO

U = 2.0 ** -24
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def _model(kind: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[kind](vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def _batch(tokens: int = 37):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (2, tokens), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # some ignored positions, so mean and num_items_in_batch differ
    return ids, labels


class _LinearTermSums:
    """For every nn.Linear of a model, sum over tokens of |dY| x |X| (the [Note: the tiling bound]'s
    sum |t_i| of each weight-gradient element), accumulated over calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, list] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self._handles.append(module.register_forward_hook(self._forward(name)))
                self._handles.append(module.register_full_backward_hook(self._backward(name)))

    def _forward(self, name):
        def hook(module, args, out):
            self._inputs.setdefault(name, []).append(args[0].detach().abs().reshape(-1, args[0].shape[-1]))
        return hook

    def _backward(self, name):
        def hook(module, grad_in, grad_out):
            x = self._inputs[name].pop()
            g = grad_out[0].detach().abs().reshape(-1, grad_out[0].shape[-1])
            self.sums[f"{name}.weight"] = self.sums.get(f"{name}.weight", 0) + g.t().double() @ x.double()
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_within_tiling_bound(got: dict, ref: dict, sums: dict, tokens: int) -> None:
    for name, r in ref.items():
        g = got[name]
        if name in sums:
            bound = 2 * tokens * U * sums[name].float()
            excess = ((g - r).abs() - bound).max().item()
            assert excess <= 0, f"{name}: exceeds the tiling bound by {excess}"
        else:
            torch.testing.assert_close(g, r, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_tiled_mlp_matches_untiled(kind):
    ref = _model(kind)
    tiled = copy.deepcopy(ref)
    assert tile_mlps(tiled, 4) == 2
    ids, labels = _batch()
    sums = _LinearTermSums(ref)
    out_ref = ref(input_ids=ids, labels=labels)
    out_ref.loss.backward()
    sums.remove()
    out = tiled(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-6, atol=0)
    _assert_within_tiling_bound(_grads(tiled), _grads(ref), sums.sums, ids.numel())
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in ref.named_parameters()]  # names unchanged
    untile_mlps(tiled)
    assert all("forward" not in m.__dict__ for m in decoder_mlps(tiled))


def test_tiled_mlp_keeps_one_tiles_intermediate():
    """Each tile's gate/up/act live only inside its checkpoint: the largest tensor the MLP saves for
    backward is a tile's input, never an intermediate (sequence x intermediate_size)."""
    model = _model()
    mlp = decoder_mlps(model)[0]
    x = torch.randn(2, 40, 32, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        TiledMLP(mlp, 4)(x).sum().backward()
    assert shapes and all(s[-1] != 80 for s in shapes), shapes  # no intermediate (last dim 80) kept
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x).sum()
    assert any(s[-1] == 80 for s in shapes)  # untiled, it is


@pytest.mark.parametrize("num_items", [None, 60])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_tiled_loss_matches_untiled(kind, num_items):
    ref = _model(kind)
    tiled_model = copy.deepcopy(ref)
    tiled = TiledLoss(causal_lm(tiled_model), 5)
    ids, labels = _batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    sums = _LinearTermSums(ref)
    out_ref = ref(input_ids=ids, labels=labels, **kwargs)
    out_ref.loss.backward()
    sums.remove()
    with tiled.armed():
        out = tiled_model(input_ids=ids, labels=labels, **kwargs)
    assert tiled.state is Capture.IDLE and tiled.calls == 1
    assert out.logits.shape == (2, 0, 96)  # no full logits
    out.loss.backward()
    tokens = ids.numel()
    # loss = S / d (S: the per-token cross entropies' sum, each >= 0; d: the divisor): |dS| <= 2 n u S, plus
    # the division's rounding on either side
    assert abs(out.loss.item() - out_ref.loss.item()) <= (2 * tokens + 2) * U * out_ref.loss.item()
    _assert_within_tiling_bound(_grads(tiled_model), _grads(ref), sums.sums, tokens)
    # not armed: the model's own loss, with full logits
    plain = tiled_model(input_ids=ids, labels=labels)
    assert plain.logits.shape == (2, ids.shape[1], 96) and tiled.calls == 1
    tiled.remove()
    assert "_loss_function" not in tiled_model.__dict__


def test_tiled_loss_takes_shift_labels():
    """Sequence parallelism passes labels already shifted (shift_labels); the tiled loss takes them as given."""
    ref = _model()
    tiled_model = copy.deepcopy(ref)
    tiled = TiledLoss(causal_lm(tiled_model), 3)
    ids, labels = _batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    want = ref(input_ids=ids, labels=labels).loss
    with tiled.armed():
        got = tiled_model(input_ids=ids, labels=torch.full_like(labels, -100), shift_labels=shifted).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_tile_counts():
    assert tile_count(AUTO, 4096, 4096) == 1 and tile_count(AUTO, 4097, 4096) == 2  # ceil(seq / hidden)
    assert tile_count(AUTO, 131072, 4096) == 32
    assert tile_count(8, 3, 4096) == 3  # never more tiles than tokens
    assert loss_tiles(AUTO, 2048, 128256) == 1  # 2048 x 128256 x 4 B = 0.98 GiB
    assert loss_tiles(AUTO, 131072, 128256) == 63  # 62.6 GiB of fp32 logits, 1 GiB a tile
    assert loss_tiles(4, 10, 100) == 4


def test_models_without_a_tileable_mlp_or_head_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="tiled_mlp: no decoder MLP to tile in a 'gpt2' model"):
        tile_mlps(gpt2, 2)
    with pytest.raises(ValueError, match="tiled_loss: no causal LM head to tile in a 'gpt2' model"):
        causal_lm(gpt2)
