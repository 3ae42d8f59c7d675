"""Every offload tier meets its interface in tiers.py, and the factories pick by ``device``.

Why: the tiers are duck-typed; a method renamed in one of them (or a parameter) is found only by
the run that uses that tier. Checked from the classes, nothing is built on disk.
"""

import inspect

import torch

from hf_zero.engine.offload.host_memory import HostMemory
from hf_zero.engine.offload.nvme_params import NvmeParamMemory
from hf_zero.engine.offload.nvme_swap import NvmeTier
from hf_zero.engine.offload.settings import ParamOffload
from hf_zero.engine.offload.split_tier import SplitTier
from hf_zero.engine.offload.tiers import HostTier, OffGpu, ShardMemory, StateTier, param_memory, state_tier


def _members(protocol) -> dict[str, object]:
    """The protocol's attributes and methods, its bases' included."""
    out = {}
    for cls in reversed(protocol.__mro__):
        if cls is object or not getattr(cls, "_is_protocol", False) or cls.__module__ == "typing":
            continue
        out.update({name: None for name in getattr(cls, "__annotations__", {})})
        out.update({name: fn for name, fn in vars(cls).items()
                    if inspect.isfunction(fn) and not name.startswith("__")})
    return out


def _missing(cls, protocol) -> list[str]:
    problems = []
    for name, fn in _members(protocol).items():
        if not hasattr(cls, name):
            problems.append(f"{cls.__name__} has no {name}")
        elif fn is not None:
            want = list(inspect.signature(fn).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            if got != want:
                problems.append(f"{cls.__name__}.{name}{got} != {protocol.__name__}.{name}{want}")
    return problems


def test_every_tier_meets_its_interface():
    assert set(_members(OffGpu)) == {"on_disk", "close"}
    assert {"on_disk", "close", "empty", "like"} <= set(_members(ShardMemory))
    problems = (_missing(HostMemory, ShardMemory) + _missing(NvmeParamMemory, ShardMemory)
                + _missing(HostTier, StateTier) + _missing(NvmeTier, StateTier) + _missing(SplitTier, StateTier))
    assert problems == []


def test_the_checker_sees_a_missing_method():
    class Partial:
        on_disk = False

        def close(self):
            pass

        def empty(self, numel):  # no dtype
            pass

    assert _missing(Partial, ShardMemory) == [
        "Partial.empty['self', 'numel'] != ShardMemory.empty['self', 'numel', 'dtype']",
        "Partial has no like",
        "Partial has no stage",
        "Partial has no done_with",
        "Partial has no read_ahead",
        "Partial has no drop_read_ahead",
        "Partial has no write",
        "Partial has no write_back",
        "Partial has no staging_bytes",
    ]


def test_factories_pick_host_memory_for_cpu():
    memory = param_memory(ParamOffload(device="cpu", pin_memory=False), torch.nn.Linear(2, 2), None)
    assert type(memory) is HostMemory and not memory.on_disk
    tier = state_tier(None, [[0]], [4], memory)
    assert type(tier) is HostTier and tier.fetch(0, [torch.ones(4)])[0].tolist() == [1.0] * 4
