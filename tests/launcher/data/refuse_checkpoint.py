"""A 2-rank job whose rank 1 refuses a checkpoint, for the launcher's failure summary test.

    refuse_checkpoint.py [--watchdog]

Every rank joins a gloo process group; rank 1 raises the CheckpointError a resume from a damaged
shard raises, while rank 0 waits in a barrier. With --watchdog, hf_zero's hang watchdog runs on
both ranks, so rank 0 is stopped by it (``os._exit``, usually before rank 1 has finished its
report) instead of being ended by torchrun.
"""

import sys

import torch.distributed as dist

from hf_zero.checkpoint.errors import CheckpointError

MESSAGE = ("checkpoint-4/hf_zero_sharded/__1_0.distcp: sha256 differs from the digest recorded at save "
           "(hf_zero_digest_rank1.json): the file was changed after the save")


def main() -> None:
    dist.init_process_group("gloo")
    if "--watchdog" in sys.argv:
        from hf_zero.engine.diagnostics import watchdog

        watchdog.configure(60)  # far away: the job stops because rank 1 raised, not on a timeout
        watchdog.ensure_running()
    if dist.get_rank() == 1:
        raise CheckpointError(MESSAGE)
    dist.barrier()


if __name__ == "__main__":
    main()
