"""Starting hf_zero jobs: `hf-zero launch` and the per-rank entry `python -m hf_zero.run`.

One concept per module:

- `args`: the `hf-zero launch` flags (DeepSpeed-launcher compatible) -> `LaunchOptions`.
- `resources`: hostfile, `--include`/`--exclude`, `--num_nodes`/`--num_gpus` -> hosts and device ids.
- `plan`: which launcher runs, and the command each node runs.
- `commands`: pure builders for one torchrun / ssh / srun command line.
- `multinode`: environment exported to remote nodes, and running commands in parallel.
- `slurm`: SLURM node lists and SLURM_* -> RANK/WORLD_SIZE/... for ranks started by srun.
- `zero_config_arg`: finding and removing `--zero_config FILE` in a script's arguments.
- `preflight`: the cheap `hf-zero doctor` checks run before any rank starts (`--skip_doctor`).
- `error_file`: a failed rank's one line in torchrun's `TORCHELASTIC_ERROR_FILE` (written by
  `hf_zero.run` and the watchdog; `launch` prints the first failure's line last).
- `launch`: `hf-zero launch` itself, gluing the above.

Nothing here imports torch at module level, so a bad flag or config fails in well under a second.
"""
