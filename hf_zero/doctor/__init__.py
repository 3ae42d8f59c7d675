"""``hf-zero doctor``: a preflight that runs in seconds, before any model loads.

Every check is one function returning a ``CheckResult`` (name, ``Status``, detail, fix);
``runner`` collects them, ``render`` prints them. Module map:

- ``result``: Status, CheckResult.
- ``config_checks``: the --zero_config file loads as hf_zero would; train_batch_size against W.
- ``versions``: torch/transformers/accelerate against hf-zero's declared ranges.
- ``environment``: ranks vs GPUs, master address/port, RANK/WORLD_SIZE/LOCAL_RANK.
- ``sizing``, ``memory``: bytes from the estimator against free GPU memory, MemAvailable, ulimit -l.
- ``nvme``: the offload directory, its free space and speed.
- ``probes``: measurements of this machine (replaced in tests).
- ``runner``: ``run_doctor`` (all checks) and ``preflight`` (the cheap ones ``hf-zero launch`` runs).
- ``render``: the table, and the launcher's failures-only message.
- ``command``: the ``doctor`` subcommand's flags and handler.

Importing ``hf_zero.doctor``, ``command``, ``runner`` or ``config_checks`` does not import torch
(``hf-zero --help`` and a bad flag stay fast); the memory checks import it when they run.
"""
