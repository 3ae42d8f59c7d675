"""Stage 3: params kept as shards in units and gathered around each unit's forward and backward.

- ``units.py``: ``ParamUnit`` (one block of the model: its shard, its gathered full params, its
  lifecycle ``UnitState``) and ``UnitHooks`` (the forward/backward hooks, prefetch).
- ``unit_buffer.py``: the flat buffers of one unit (trainable and frozen), sharded and gathered.
- ``unit_plan.py``: which modules become units, and their order.
- ``unit_strategy.py``: ``UnitStrategy``, the stage-3 ``StageBehaviour`` the engine calls.

Nothing here imports the offload tiers except through ``hf_zero.engine.offload.tiers``.
"""
