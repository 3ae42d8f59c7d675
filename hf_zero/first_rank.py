"""Which process speaks for the job: its rank 0.

Messages that every rank would print alike (a warning about the config, a progress bar, the run
summary) come from rank 0 alone, so a job of 8 ranks says each thing once, not 8 times. Before
the process group is joined (a config read as a rank starts under ``hf-zero launch``, torchrun or
``hf_zero.run``), the launcher's ``RANK`` says which rank this is; a process started alone is rank 0.
"""

from __future__ import annotations

import os


def is_first_rank() -> bool:
    """True in the job's rank 0: the process group's rank once joined, else ``RANK`` (unset: 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("", "0")
