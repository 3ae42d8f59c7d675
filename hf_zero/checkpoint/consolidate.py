"""``hf-zero consolidate``: a sharded checkpoint (hf_zero's, or DeepSpeed's ZeRO 1-3) to Hugging
Face safetensors that plain ``from_pretrained`` loads.

Streamed: one tensor is read (from every rank's file at once: DCP, or DeepSpeed's files opened
memory-mapped), cast and appended to the output file before the next is read, so peak memory is
about the largest tensor, whatever the model's size. No GPU and no process group are needed.
The model's config, generation config and tokenizer files are copied from the checkpoint folder
when they are there (a Trainer checkpoint has them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import torch

from hf_zero.checkpoint import safe_reader, sharded
from hf_zero.checkpoint.atomic import Swap, stale_weights
from hf_zero.checkpoint.safetensors_stream import (INDEX_NAME, StreamingWriter, TensorSpec,
                                                   file_names, file_size, plan_shards, write_index)
from hf_zero.progress import byte_bar

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "spiece.model",
          "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


class ConsolidateError(ValueError):
    """Bad input to consolidate: names the path or value and what is allowed."""


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes; at least 1 byte (0 would put every
    tensor in a file of its own)."""
    allowed = f"--max_shard_size {text!r}: allowed: a size of at least 1 byte, such as 5GB, 500MB, 2GiB or a number of bytes"
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConsolidateError(allowed)
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise ConsolidateError(allowed)
    return size


# ---- sources: name, shape, dtype of every tensor, then one tensor at a time -------------------


class HfZeroSource:
    """An hf_zero sharded checkpoint (``checkpoint-N`` or its ``hf_zero_sharded`` folder)."""

    kind = "hf_zero"

    def __init__(self, path: str) -> None:
        self.path = path if os.path.basename(os.path.normpath(path)) == sharded.DIR_NAME else os.path.join(path, sharded.DIR_NAME)
        self.meta = sharded.read_meta(self.path)
        if self.meta.get("peft"):
            raise ConsolidateError(
                f"{self.path} is the sharded state of a PEFT (LoRA) run: it holds the adapter's optimizer state, not a "
                "model. The adapter itself is in the checkpoint folder as adapter_model.safetensors (PeftModel."
                "from_pretrained loads it); consolidate is for full fine-tunes"
            )
        self.metadata = sharded.check_files(self.path)
        self.default_dtype = getattr(torch, self.meta["param_dtype"])

    def specs(self) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
        """(output name, stored key, shape, stored dtype): trainable params in layout order, then
        frozen params and buffers."""
        out = [(n, f"master/{n}", tuple(self.meta["params"][n]), torch.float32) for n in self.meta["layout"]]
        for n in self.meta["extra"]:
            info = self.metadata.state_dict_metadata[f"extra/{n}"]
            out.append((n, f"extra/{n}", tuple(info.size), info.properties.dtype))
        return out

    def load(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        safe_reader.dcp_load({key: t}, self.path, no_dist=True)  # nothing unpickled (safe_reader.py)
        return t


class DeepSpeedSource:
    """A DeepSpeed ZeRO checkpoint (the folder with ``latest``, or ``global_stepN``)."""

    kind = "deepspeed"

    def __init__(self, path: str) -> None:
        from hf_zero.checkpoint.deepspeed_format import DeepSpeedCheckpoint

        self.ckpt = DeepSpeedCheckpoint(path)
        self._extra = self.ckpt.extra_tensors()
        self.default_dtype = torch.float32

    def specs(self) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
        out = [(n, n, tuple(self.ckpt.shape(n)), torch.float32) for n in self.ckpt.names()]
        out += [(n, n, tuple(t.shape), t.dtype) for n, t in self._extra.items()]
        return out

    def load(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._extra[key] if key in self._extra else self.ckpt.load_fp32(key)


def open_source(path: str):
    """The checkpoint in ``path``, hf_zero's or DeepSpeed's; a clear error for anything else."""
    if not os.path.isdir(path):
        raise ConsolidateError(f"{path}: no such checkpoint folder")
    if os.path.isdir(os.path.join(path, sharded.DIR_NAME)) or os.path.isfile(os.path.join(path, sharded.META_NAME)):
        return HfZeroSource(path)
    from hf_zero.checkpoint.deepspeed_format import NotADeepSpeedCheckpoint

    try:
        return DeepSpeedSource(path)
    except NotADeepSpeedCheckpoint as error:
        raise ConsolidateError(
            f"{path} is neither an hf_zero checkpoint (no {sharded.DIR_NAME}/) nor a DeepSpeed ZeRO checkpoint "
            f"({error})"
        ) from error


# ---- consolidate ---------------------------------------------------------------------------------


def _config_dtype(path: str) -> torch.dtype | None:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def consolidate(checkpoint_dir: str, output_dir: str, *, dtype: str | None = None,
                max_shard_size: str = "5GB") -> list[str]:
    """Write ``checkpoint_dir``'s model as HF safetensors into ``output_dir``; returns the files."""
    if dtype is not None and dtype not in DTYPES:
        raise ConsolidateError(f"--dtype {dtype!r}: allowed values are {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    source = open_source(checkpoint_dir)
    if os.path.abspath(output_dir) == os.path.abspath(checkpoint_dir):
        raise ConsolidateError(f"{output_dir}: write the consolidated model to another folder than the checkpoint")
    # The folder with the model's config: the checkpoint itself, or the one above it when given
    # the inner folder (hf_zero_sharded/, DeepSpeed's global_stepN/).
    folder = checkpoint_dir
    if not os.path.isfile(os.path.join(folder, "config.json")):
        above = os.path.dirname(os.path.normpath(os.path.abspath(checkpoint_dir)))
        folder = above if os.path.isfile(os.path.join(above, "config.json")) else checkpoint_dir
    target = DTYPES[dtype] if dtype else (_config_dtype(folder) or source.default_dtype)

    entries = source.specs()
    out_dtype = {name: (target if stored.is_floating_point else stored) for name, _, _, stored in entries}
    specs = [TensorSpec(name, shape, out_dtype[name]) for name, _, shape, _ in entries]
    shards = plan_shards(specs, max_bytes)
    names = file_names(len(shards))
    copied = [name for name in COPIED if os.path.isfile(os.path.join(folder, name))]
    needed = sum(file_size(s) for s in shards) + sum(os.path.getsize(os.path.join(folder, n)) for n in copied)
    os.makedirs(output_dir, exist_ok=True)
    stored = {name: (key, shape, dt) for name, key, shape, dt in entries}
    # [Note: write beside, then swap] (atomic.py): an earlier output stays whole until every new file is.
    bar = byte_bar(sum(s.nbytes for s in specs), desc="Consolidating weights")  # hf_zero/progress.py
    with Swap(output_dir, needed) as swap, bar:
        for file_specs, file in zip(shards, names):
            writer = StreamingWriter(os.path.join(output_dir, file), file_specs, temp=swap.temp(file))
            try:
                for spec in file_specs:
                    key, shape, dt = stored[spec.name]
                    writer.write(spec.name, source.load(key, shape, dt).to(spec.dtype))
                    bar.update(spec.nbytes)
            except BaseException:
                writer.abort()
                raise
            writer.close()
        if len(shards) > 1:
            write_index(output_dir, shards, names, into=swap.temp(INDEX_NAME))
        for name in copied:
            shutil.copyfile(os.path.join(folder, name), swap.temp(name))
            if name == "config.json":
                _set_config_dtype(swap.temp(name), target)
        written = names + [INDEX_NAME] * (len(shards) > 1)
        return swap.commit(stale_weights(os.listdir(output_dir), written))


def _set_config_dtype(file: str, dtype: torch.dtype) -> None:
    """The copied config names the dtype written, as ``save_pretrained`` does."""
    with open(file) as f:
        config = json.load(f)
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = str(dtype).removeprefix("torch.")
    with open(file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")

