"""Offload: state that lives off the GPU, and the optimizer step that runs on the host.

- ``settings.py``: ``OptimizerOffload`` and ``ParamOffload``, the two settings read from the config.
- ``tiers.py``: the one tier interface (``OffGpu``; ``StateTier`` for optimizer state,
  ``ShardMemory`` for stage-3 param shards) and its two factories (``state_tier``,
  ``param_memory``): a new tier is a new module here plus one branch in a factory.
- ``host_memory.py`` (pinned host RAM), ``nvme_swap.py`` (optimizer state in swap files),
  ``nvme_params.py`` (param shards in swap files), ``nvme_files.py`` (the swap files themselves);
  ``host_room.py``: the host part of an optimizer offload checked against the host's memory first.
- ``host_step.py``: the chunked host optimizer step, pipelined with the copies;
  ``step_overlap.py``: overlapping that step with backward and the next forward;
  ``speculation.py``: with clipping, that step run before the global norm and validated against it;
  ``state_dtype.py``: that step with bf16 optimizer state kept between steps;
  ``auto_ratio.py``: ``ratio: "auto"``, the share kept on the device chosen after the first step.
"""
