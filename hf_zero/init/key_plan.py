"""Which checkpoint tensors make each param of the model, by transformers' own weight conversions.

transformers 5 renames checkpoint keys and converts tensors as it loads (``conversion_mapping.py``,
``core_model_loading.py``): legacy names (``LayerNorm.gamma`` -> ``LayerNorm.weight``), a model's
renamings (Mixtral's ``block_sparse_moe`` -> ``mlp``), the base-model prefix added or dropped, and
converters that build one param from several tensors (Mixtral's and Qwen2-MoE's per-expert
``w1``/``w3`` -> one fused ``experts.gate_up_proj``) or several from one (a fused ``qkv`` chunked).
``KeyPlan`` runs the same steps as ``convert_and_load_state_dict_in_model`` on the checkpoint's
keys: ``get_model_conversion_mapping(model)``, then ``rename_source_key`` for every key (renamings,
at most one converter, the prefix), in transformers' key order. So:

- a param whose key is only renamed is ``direct``: read by byte range, each rank its own slice;
- a param a converter makes is ``converted``: its converter (a copy of transformers' own, as
  transformers copies it for each target) is given the source tensors read whole, cast to the
  param's dtype as transformers casts them, and its ``convert`` makes every target of the group;
  the rank copies its slice out. Only ranks whose shard meets the param read its sources. The
  values are transformers' own by construction; the price is that the group's sources and its
  converted params are held whole, one group at a time (``CheckpointSource`` keeps a group until
  the unit is done). Slicing the sources instead would mean re-deriving each operation's index
  arithmetic by hand, which is what this module avoids.

Every converter is run first on meta tensors of the stored shapes (nothing read): that names
every param a group makes and checks its shape before any shard is made; a group transformers
cannot convert so makes the load ``NotServed`` (it loads whole, as transformers' own).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hf_zero.init.checkpoint_files import NotServed


class KeyPlan:
    """For ``model`` (built on the meta device) and ``stored`` (checkpoint key -> stored tensor with
    ``dtype`` and ``shape``): ``direct`` (model name -> checkpoint key), ``converted`` (model name ->
    its group's first name), and ``convert(group, read)`` for the values of a group."""

    def __init__(self, model: nn.Module, stored: dict) -> None:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        mapping = get_model_conversion_mapping(model) if isinstance(model, PreTrainedModel) else []
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in converters for p in c.source_patterns}
        self._meta = model.state_dict()  # names, shapes and dtypes (params on meta)
        prefix = getattr(model, "base_model_prefix", None) or ""
        self.direct: dict[str, str] = {}
        self.groups: dict[str, list[tuple[str, str]]] = {}  # first name -> [(checkpoint key, source pattern)]
        for key in sorted(stored, key=lambda k: dot_natural_key(k)):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, self._meta)
            if renamed not in self._meta and key in self._meta:  # as transformers: the key under its own name
                renamed, pattern = rename_source_key(key, [], [], prefix, self._meta)
            if renamed not in self._meta:
                continue  # a key the model does not have: transformers ignores it too (unexpected keys)
            if pattern is None:
                self.direct.setdefault(renamed, key)
            else:
                self.groups.setdefault(renamed, []).append((key, pattern))
        # What transformers keeps on the model to revert on save (``revert_weight_conversion``).
        self.used = [t for t in mapping if t.was_used()]
        self.converted: dict[str, str] = {}
        for first in self.groups:
            for name, value in self._checked(first, stored).items():
                self.converted[name] = first

    def _checked(self, first: str, stored: dict) -> dict[str, torch.Tensor]:
        def meta(key: str) -> torch.Tensor:
            return torch.empty(stored[key].shape, dtype=self._meta[first].dtype, device="meta")

        try:
            made = self.convert(first, meta)
        except Exception as e:  # noqa: BLE001 - any op failing on meta: transformers' own load decides
            raise NotServed(f"transformers' conversion of {self.groups[first][0][0]} into {first} cannot be "
                            f"planned before reading ({type(e).__name__}: {e})") from None
        for name, value in made.items():
            want = self._meta.get(name)
            if want is None or tuple(value.shape) != tuple(want.shape):
                raise NotServed(f"transformers' conversion of {self.groups[first][0][0]} makes {name} of shape "
                                f"{list(value.shape)}, the model's is "
                                f"{list(want.shape) if want is not None else 'not a param of the model'}")
        return made

    def convert(self, first: str, read) -> dict[str, torch.Tensor]:
        """Every param group ``first`` makes (model name -> tensor), from ``read(checkpoint key)`` of
        each source tensor, through a fresh copy of transformers' converter."""
        sources = self.groups[first]
        converter = copy.deepcopy(self._by_pattern[sources[0][1]])
        dtype = self._meta[first].dtype
        for key, pattern in sources:
            converter.add_tensor(first, key, pattern, lambda key=key: read(key).to(dtype))
        made = converter.convert(first, model=self.model, config=getattr(self.model, "config", None))
        return {name: (value[0] if isinstance(value, list) else value) for name, value in made.items()}

    def has(self, name: str) -> bool:
        return name in self.direct or name in self.converted
