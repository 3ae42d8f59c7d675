"""The top-level keys of an accelerate config file (``accelerate config``'s ``ClusterConfig``).

Most are launcher settings: they become flags of the suggested ``hf-zero launch`` command, not
zero-config keys. ``mixed_precision`` is converted last (:func:`precision`), once the section has
said what the config holds, as accelerate's ``DeepSpeedPlugin.set_mixed_precision`` does.
"""

from __future__ import annotations

from typing import Any

from hf_zero.accelerate_config import parallelism_section
from hf_zero.accelerate_config.conversion import Conversion, Note, Rule

SECTIONS = {"DEEPSPEED": "deepspeed_config", "FSDP": "fsdp_config"}


def _note(text: str, launch_flag: str | None = None):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        launch = [launch_flag, str(value)] if launch_flag and value not in (None, "") else []
        conv.not_needed(key, value, text + (f": hf-zero launch {launch_flag} {value}" if launch else ""),
                        launch=launch)
    return convert


def _compute_environment(conv: Conversion, key: str, value: Any) -> None:
    if value == "AMAZON_SAGEMAKER":
        conv.refuse(key, value, "hf-zero launch starts jobs on machines reached directly, over ssh or with SLURM, "
                                "not on SageMaker")
    conv.choice(key, value, ("LOCAL_MACHINE",))
    conv.not_needed(key, value, "the job runs on these machines")


def _distributed_type(conv: Conversion, key: str, value: Any) -> None:
    """Checked by convert_mapping, which picks the section from it."""


def _num_processes(conv: Conversion, key: str, value: Any) -> None:
    total = conv.integer(key, value, minimum=-1)
    if total in (-1, 0):
        conv.not_needed(key, value, "not set: hf-zero launch uses every visible GPU")
        return
    nodes = conv.num_machines
    if total % nodes:
        conv.refuse(key, value, f"not divisible by num_machines = {nodes}; hf-zero launch starts the same number of "
                                "processes on every node")
    conv.not_needed(key, value, f"processes in all; per node: hf-zero launch --num_gpus {total // nodes}",
                    launch=["--num_gpus", str(total // nodes)])


def _num_machines(conv: Conversion, key: str, value: Any) -> None:
    conv.num_machines = conv.integer(key, value, minimum=1)
    if conv.num_machines == 1:
        conv.not_needed(key, value, "one node")
    else:
        conv.not_needed(key, value, f"hf-zero launch --num_nodes {value}", launch=["--num_nodes", str(value)])


def _machine_rank(conv: Conversion, key: str, value: Any) -> None:
    rank = conv.integer(key, value, minimum=0)
    if conv.num_machines == 1:
        conv.not_needed(key, value, "one node")
    else:
        conv.not_needed(key, value, f"this node's index: hf-zero launch --node_rank {rank} (torchrun launcher; "
                                    "with a hostfile, --launcher ssh starts every node)", launch=["--node_rank", str(rank)])


def _gpu_ids(conv: Conversion, key: str, value: Any) -> None:
    ids = str(value).replace(" ", "")
    if ids in ("all", "None", ""):
        conv.not_needed(key, value, "every visible GPU")
    elif conv.num_machines > 1:
        conv.not_needed(key, value, "on several nodes choose GPUs per host with hf-zero launch --include "
                                    "HOST:IDS@HOST:IDS (with --hostfile)")
    else:
        conv.not_needed(key, value, f"hf-zero launch --include localhost:{ids}", launch=["--include", f"localhost:{ids}"])


def _rdzv(conv: Conversion, key: str, value: Any) -> None:
    conv.not_needed(key, value, "hf-zero launch uses torchrun's static rendezvous at --master_addr/--master_port"
                    + ("" if str(value) == "static" else f" (not {value})"))


def _use_cpu(conv: Conversion, key: str, value: Any) -> None:
    if conv.boolean(key, value):
        conv.not_needed(key, value, "the script's --use_cpu (TrainingArguments.use_cpu)", script=("--use_cpu",))
    else:
        conv.not_needed(key, value, "GPUs where there are any")


def _empty_or_refused(why: str):
    def convert(conv: Conversion, key: str, value: Any) -> None:
        if value in (None, {}, []) or (isinstance(value, dict) and not any(v not in (None, False, 1, 0, "")
                                                                          for v in value.values())):
            conv.not_needed(key, value, "empty")
        else:
            conv.refuse(key, value, why)
    return convert


def _dynamo(conv: Conversion, key: str, value: Any) -> None:
    backend = value.get("dynamo_backend", "NO") if isinstance(value, dict) else value
    if backend in (None, "NO", "no", False):
        conv.not_needed(key, value, "no torch.compile")
        return
    name = str(backend).lower()
    conv.not_needed(key, value, f"the script's --torch_compile --torch_compile_backend {name} (TrainingArguments)",
                    script=("--torch_compile", "--torch_compile_backend", name))


def _section(conv: Conversion, key: str, value: Any) -> None:
    """Converted by convert_mapping when distributed_type names it; else it must be empty."""
    if value not in (None, {}):
        conv.not_needed(key, value, "accelerate ignores it, since distributed_type names the other section")


def _mpirun(conv: Conversion, key: str, value: Any) -> None:
    if value in (None, {}):
        conv.not_needed(key, value, "empty")
    else:
        conv.not_needed(key, value, "hf-zero launch has no mpirun launcher; use --launcher ssh (with --hostfile) or "
                                    "--launcher slurm")


_UNUSED = "not used by hf-zero launch (TPU, notebook or SageMaker settings)"

RULES: dict[str, Rule] = {
    "compute_environment": Rule("not needed (LOCAL_MACHINE); AMAZON_SAGEMAKER refused", _compute_environment),
    "distributed_type": Rule("picks the section to convert: DEEPSPEED `deepspeed_config`, FSDP `fsdp_config`; any "
                             "other refused (nothing sharded to convert)", _distributed_type),
    "mixed_precision": Rule("bf16/fp16: `bf16.enabled`/`fp16.enabled` true and the script's `--bf16`/`--fp16`; "
                            "no: left to the script's flags (`\"auto\"`); fp8 refused", lambda conv, key, value: None),
    "num_machines": Rule("not needed: `hf-zero launch --num_nodes`", _num_machines),
    "num_processes": Rule("not needed: `hf-zero launch --num_gpus` (num_processes / num_machines per node)",
                          _num_processes),
    "machine_rank": Rule("not needed: `hf-zero launch --node_rank`", _machine_rank),
    "main_process_ip": Rule("not needed: `hf-zero launch --master_addr`", _note("rank 0's address", "--master_addr")),
    "main_process_port": Rule("not needed: `hf-zero launch --master_port`", _note("rank 0's port", "--master_port")),
    "gpu_ids": Rule("not needed: `hf-zero launch --include localhost:IDS`", _gpu_ids),
    "rdzv_backend": Rule("not needed: torchrun's static rendezvous", _rdzv),
    "same_network": Rule("not needed", _note("not used by hf-zero launch")),
    "use_cpu": Rule("not needed: the script's `--use_cpu`", _use_cpu),
    "debug": Rule("not needed: hf_zero's watchdog reports hangs (`comm_timeout_s`)",
                  _note("hf_zero's watchdog names the ranks and collectives of a hang (comm_timeout_s); "
                        "TORCH_DISTRIBUTED_DEBUG=DETAIL for more")),
    "dynamo_config": Rule("not needed: the script's `--torch_compile --torch_compile_backend`", _dynamo),
    "enable_cpu_affinity": Rule("not needed", _note("hf-zero launch does not pin CPU affinity")),
    "deepspeed_config": Rule("converted with distributed_type DEEPSPEED (below)", _section),
    "fsdp_config": Rule("converted with distributed_type FSDP (below)", _section),
    "fp8_config": Rule("refused unless empty: fp8 training is not implemented",
                       _empty_or_refused("fp8 training is not implemented in hf_zero; use bf16")),
    "parallelism_config": Rule("each of its keys as in the `parallelism_config.*` rows below (tp and sp sizes "
                               "mapped, hybrid sharding and context parallelism refused)", parallelism_section.convert),
    "megatron_lm_config": Rule("refused unless empty",
                               _empty_or_refused("Megatron-LM parallelism is not implemented in hf_zero")),
    "mpirun_config": Rule("not needed: no mpirun launcher (`--launcher ssh` or `slurm`)", _mpirun),
    "ipex_config": Rule("not needed", _note("Intel extension settings are not used by hf_zero")),
    "main_training_function": Rule("not needed", _note("for notebook_launcher; hf-zero launch runs the script")),
    "downcast_bf16": Rule("not needed (TPU)", _note(_UNUSED)),
    "tpu_name": Rule("not needed (TPU)", _note(_UNUSED)),
    "tpu_zone": Rule("not needed (TPU)", _note(_UNUSED)),
    "tpu_use_cluster": Rule("not needed (TPU)", _note(_UNUSED)),
    "tpu_use_sudo": Rule("not needed (TPU)", _note(_UNUSED)),
    "tpu_vm": Rule("not needed (TPU)", _note(_UNUSED)),
    "tpu_env": Rule("not needed (TPU)", _note(_UNUSED)),
    "command_file": Rule("not needed (TPU)", _note(_UNUSED)),
    "commands": Rule("not needed (TPU)", _note(_UNUSED)),
}
"""Every top-level key of accelerate's config file, in the order they are converted."""


def precision(conv: Conversion, value: Any) -> None:
    """``mixed_precision`` onto the zero config, as accelerate's set_mixed_precision fills it.

    bf16/fp16: that switch true (an "auto" or absent one filled), the other false, and the script
    flag added; the run then stops at the start if the script trains in another dtype. "no": left
    to the script's flags, since under accelerate a script's --bf16/--fp16 overrides "no" too."""
    key = "mixed_precision"
    if value in (None, False, "no", "NO"):  # YAML 1.1 reads an unquoted no as false
        conv.not_needed(key, value, 'the dtype is left to the script\'s --bf16/--fp16 ("auto")')
        return
    dtype = conv.choice(key, value, ("no", "fp16", "bf16", "fp8"))
    if dtype == "fp8":
        conv.refuse(key, value, "fp8 training is not implemented in hf_zero; use bf16")
    other = "fp16" if dtype == "bf16" else "bf16"
    for name, enabled in ((dtype, True), (other, False)):
        block = conv.config.get(name)
        written = block.get("enabled") if isinstance(block, dict) else None
        if written not in (None, "auto") and written is not enabled:
            conv.refuse(key, value, f"the DeepSpeed config says {name}.enabled = {str(written).lower()}; make them "
                                    "agree (accelerate refuses this too)")
        conv.put(f"{name}.enabled", enabled)
    conv.script_flags.append(f"--{dtype}")
    conv.notes.append(Note("mapped", key, value, f"{dtype}.enabled = true, {other}.enabled = false; the script "
                                                 f"must train with --{dtype}, or it stops at the start"))
