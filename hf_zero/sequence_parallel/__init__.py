"""Ulysses sequence parallelism for Hugging Face decoder models (DeepSpeed ALST's design).

[Note: Ulysses]
With ``sequence_parallel_size`` P, the W ranks form W / P groups of P neighbours (layout.py). The
P ranks of a group train on the same batch, each on its slice of every sequence (batch_split.py):
the embedding, norms, MLPs and the LM head work token by token, so a slice is all they need.
Attention needs every token: around it, an all-to-all trades the slice of all heads for all of the
sequence of 1/P of the heads, the model's own attention (or a ``sparse_attention`` block's: inner.py)
runs on that, and a second all-to-all trades back (all_to_all.py, ulysses.py, registered through
transformers' attention interface). The loss is the whole sequence's mean over its real tokens (loss.py).

Every rank holds the whole model, so ZeRO shards over all W ranks as without SP: each rank's
gradient is its slice's share, the shares of a group sum to the group's gradient (the all-to-alls'
backward carries each slice's share to the ranks whose activations it used), and the loss scaling
of loss.py makes the engine's average over W ranks the average over the W / P groups, what DDP over
W / P ranks of the unsplit model computes.

| file | what it holds |
|---|---|
| ``layout.py`` | ``SpLayout`` (sp and dp rank, the SP group), ``check_size``, ``build_layout`` |
| ``all_to_all.py`` | the differentiable all-to-all |
| ``ulysses.py`` | the attention wrapper, ``enable``, ``wrap``, ``check_heads`` |
| ``inner.py`` | which attention runs inside it (sdpa, eager, sparse attention) and what it is handed ([Note: sparse attention inside Ulysses]) |
| ``batch_split.py`` | ``split_batch`` and the Trainer data loader's changes |
| ``loss.py`` | the loss over the group |
| ``training.py`` | what the Trainer seams call |
"""

from hf_zero.sequence_parallel.all_to_all import all_to_all
from hf_zero.sequence_parallel.batch_split import split_batch
from hf_zero.sequence_parallel.layout import SpLayout, build_layout, check_size
from hf_zero.sequence_parallel.loss import group_count, token_mean
from hf_zero.sequence_parallel.ulysses import check_heads, enable

__all__ = ["SpLayout", "all_to_all", "build_layout", "check_heads", "check_size", "enable", "group_count",
           "split_batch", "token_mean"]
