"""``ZeroModule``: what the Trainer trains when hf_zero runs stage 1, 2 or 3.

It stands where DDP would: the Trainer (through accelerate) calls ``no_sync()`` on it between
gradient-accumulation boundaries, exactly as it does for ``DistributedDataParallel``. Forward is
the wrapped model's; attribute reads fall through to it.
"""

from __future__ import annotations

import contextlib

from torch import nn

from hf_zero.engine.engine import ZeroEngine


class ZeroModule(nn.Module):
    def __init__(self, module: nn.Module, engine: ZeroEngine) -> None:
        super().__init__()
        self.module = module
        self._engine = engine  # not an nn.Module: kept out of the module tree

    @property
    def engine(self) -> ZeroEngine:
        return self._engine

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self._engine.set_gradient_sync(False)
        try:
            yield
        finally:
            self._engine.set_gradient_sync(True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop this step's gradients, also those of a step the fp16 scaler skipped."""
        self.module.zero_grad(set_to_none)
        self._engine.zero_grad()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # an instance not built by __init__ (accelerate's compile_regions copies): none to ask
                raise
            return getattr(self.module, name)
