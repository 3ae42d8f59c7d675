"""``materialize_units`` and a source that leaves reads running across units (``unit_done(more_units=True)``,
as hf_zero/init's checkpoint reads do: [Note: parallel reads]): every unit but the last says more
follow, the last waits for all, so every shard is whole when the engine is built."""

from __future__ import annotations

import torch

from hf_zero.engine import ZeroEngine
from tests.engine.models import tiny_llama


class _LateSource:
    """Writes each unit's values only when ``unit_done`` lets it: with ``more_units``, those of the
    units before the current one (the most a source may leave outstanding), else all."""

    device = torch.device("cpu")

    def __init__(self, state):
        self.state, self.queued, self.calls, self.most_outstanding = state, [], [], 0

    def unit_start(self, params):
        self.queued.append([])

    def read_into(self, name, shape, start, end, out):
        self.queued[-1].append((out, self.state[name].reshape(-1)[start:end]))

    def unit_done(self, more_units=False):
        self.calls.append(more_units)
        self.most_outstanding = max(self.most_outstanding, sum(1 for unit in self.queued if unit))
        done, self.queued = (self.queued[:-1], self.queued[-1:]) if more_units else (self.queued, [])
        for unit in done:
            for out, value in unit:
                out.copy_(value)


def test_every_shard_is_whole_when_the_units_are_filled():
    ref = tiny_llama(0, tied=False)
    with torch.device("meta"):
        model = tiny_llama(0, tied=False)
    source = _LateSource(ref.state_dict())
    engine = ZeroEngine(model, None, stage=3, bucket_numel=3000, source=source)
    units = len(engine.units)
    assert units >= 3 and source.calls == [True] * (units - 1) + [False]
    assert source.most_outstanding == 2
    for module, ref_module in zip(model.modules(), ref.modules()):  # buffers: hf_zero/init's job
        module._buffers.update({k: b.clone() for k, b in ref_module._buffers.items()})
    state = engine.full_state_dict(to_cpu_on=None)
    assert sorted(n for n, t in ref.state_dict().items() if not torch.equal(state[n], t)) == []
