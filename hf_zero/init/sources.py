"""Where the values of a model built on the meta device come from (``materialize.ParamSource``).

- ``SafetensorsSource``: a checkpoint directory in HF's layout (``model.safetensors``, or shards
  and ``model.safetensors.index.json``). A safetensors tensor is stored row-major and whole, so
  the rank's run of one tensor's flat elements is one contiguous byte range of the file: it is
  read with ``preadv`` straight into the shard (CPU, same dtype) or into a buffer of the run's
  size. Not ``safe_open(...).get_slice``: that maps the file, and the mapped pages it touches
  count in the process's RSS until the file is closed, and it returns a new tensor to copy from,
  so a rank would hold its slices two or three times over at the peak.
- ``InitSource``: random init (``from_config``). Each module's own params are initialized on
  the CPU, in a copy of the module, by the model's ``_init_weights``, under a seed derived from
  the run's seed and the module's name. Every rank and every world size gets the same model,
  whichever slices it reads, and at most one module's params exist in full at once.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import zlib
from typing import NamedTuple

import torch
from torch import nn

from hf_zero.engine.offload.nvme_files import read_exactly


INDEX_NAME, SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"
STAGING_BYTES = 64 << 20  # each pinned staging buffer of a load onto the GPU


class MissingParams(KeyError):
    """The checkpoint lacks params of the model (under the model's own names): transformers' own
    load would convert its keys (renamed keys, fused experts) or initialize them (a new head)."""

    def __init__(self, missing: list[str], directory: str) -> None:
        more = f" (and {len(missing) - 1} more of the model's params)" if len(missing) > 1 else ""
        self.reason = f"the checkpoint lacks {missing[0]}{more}: transformers converts its keys or initializes them"
        super().__init__(f"{missing[0]}: not in the checkpoint {directory}{more}; hf_zero's sharded load reads every "
                         "param under the model's own name: checkpoints that need transformers' weight conversions "
                         "(renamed keys, fused experts) or leave params to initialize (a new head) load with "
                         "transformers' from_pretrained")


class SafetensorsSource:
    """Reads param slices from the safetensors files of ``directory``; ``prefix`` is the model's
    ``base_model_prefix`` (a checkpoint of the base model loads into a model with a head)."""

    def __init__(self, directory: str, device: torch.device, prefix: str = "") -> None:
        self.directory, self.device, self.prefix = directory, torch.device(device), prefix
        index = os.path.join(directory, INDEX_NAME)
        single = os.path.join(directory, SINGLE_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object; not a safetensors index")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = [SINGLE_NAME]
        else:
            raise FileNotFoundError(
                f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}; hf_zero loads sharded from safetensors "
                "checkpoints only (save the model with save_pretrained(safe_serialization=True))")
        self.tensors: dict[str, StoredTensor] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{directory}: the index names {name}, which is not there")
            self.tensors.update(read_header(path))
        self._fds: dict[str, int] = {}

    def key(self, name: str) -> str | None:
        """The checkpoint's key for the model's param or buffer ``name``, or None."""
        candidates = [name]
        if self.prefix:
            head = self.prefix + "."
            candidates.append(name[len(head):] if name.startswith(head) else head + name)
        return next((k for k in candidates if k in self.tensors), None)

    def has(self, name: str) -> bool:
        return self.key(name) is not None

    def check_covers(self, model: nn.Module) -> None:
        """Raise ``MissingParams`` unless every param of ``model`` is in the checkpoint (before any read)."""
        missing = [name for name, _ in model.named_parameters() if not self.has(name)]
        if missing:
            raise MissingParams(missing, self.directory)

    def unit_start(self, params: list) -> None:
        pass  # every read is this rank's own byte ranges

    def read_into(self, name: str, shape: torch.Size, start: int, end: int, out: torch.Tensor) -> None:
        key = self.key(name)
        if key is None:
            raise KeyError(f"{name}: not in the checkpoint {self.directory} (hf_zero's sharded load needs every "
                           "param there under the model's own name; checkpoints that need transformers' weight "
                           "conversions load with from_pretrained instead)")
        t = self.tensors[key]
        if t.shape != tuple(shape):
            raise ValueError(f"{t.path}: tensor {key} has shape {list(t.shape)}, the model's {name} has {list(shape)}")
        if t.path not in self._fds:
            self._fds[t.path] = os.open(t.path, os.O_RDONLY)
        fd, size = self._fds[t.path], torch.empty(0, dtype=t.dtype).element_size()
        if out.device.type == "cuda":  # through pinned staging buffers, the copies queued behind the reads
            step = self._staging.nbytes // size
            for a in range(0, end - start, step):
                b = min(end - start, a + step)
                buf = self._staging.next()[: (b - a) * size].view(t.dtype)
                _pread_into(fd, buf, t.offset + (start + a) * size, t.path)
                out[a:b].copy_(buf, non_blocking=True)
                self._staging.queued()
            return
        direct = out.dtype == t.dtype and out.is_contiguous()
        dest = out if direct else torch.empty(end - start, dtype=t.dtype)
        _pread_into(fd, dest, t.offset + start * size, t.path)
        if not direct:
            out.copy_(dest)

    @functools.cached_property
    def _staging(self) -> "_PinnedStaging":
        return _PinnedStaging()

    def unit_done(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if "_staging" in self.__dict__:
            self._staging.drain()


class _PinnedStaging:
    """A few pinned host buffers that file reads land in before their copy to the GPU: the next
    read fills one buffer while the copy out of the previous one runs (each buffer is reused only
    once its copy is done)."""

    def __init__(self, count: int = 3) -> None:
        self.nbytes = STAGING_BYTES
        self._buffers = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        self._events: list = [None] * count
        self._i = -1

    def next(self) -> torch.Tensor:
        self._i = (self._i + 1) % len(self._buffers)
        if self._events[self._i] is not None:
            self._events[self._i].synchronize()
        return self._buffers[self._i]

    def queued(self) -> None:
        """The copy out of the current buffer is queued on the current stream."""
        event = torch.cuda.Event()
        event.record()
        self._events[self._i] = event

    def drain(self) -> None:
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._events = [None] * len(self._buffers)


class StoredTensor(NamedTuple):
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path: str) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file: an 8-byte little-endian header length, a JSON header
    (name -> dtype, shape, data_offsets relative to the data after the header), then the data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {entry.get('dtype')!r}, which hf_zero's sharded load "
                             f"does not read (one of {sorted(_DTYPES)})")
        out[key] = StoredTensor(path, _DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + entry["data_offsets"][0])
    return out


def _pread_into(fd: int, dest: torch.Tensor, offset: int, path: str) -> None:
    """Fill ``dest`` (contiguous, CPU) with the file's bytes from ``offset``: straight into its
    memory, through the page cache, no mapping (mapped pages would count in the RSS)."""
    view = memoryview(dest.view(torch.uint8).numpy()) if dest.numel() else memoryview(b"")
    if read_exactly(fd, view, offset) < len(view):
        raise ValueError(f"{path}: ends before byte {offset + len(view)} (cut short?)")


class InitSource:
    """Random init of ``model`` (built on meta) module by module, seeded by ``seed`` and module name."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int) -> None:
        if not callable(getattr(model, "_init_weights", None)):
            raise TypeError(f"{type(model).__name__} has no _init_weights: hf_zero can random-init only "
                            "transformers models built on the meta device")
        self.model, self.device, self.seed = model, torch.device(device), seed
        # Shapes now: the engine points sharded params at empty tensors before it reads them all.
        self._shapes = {id(p): (p.shape, p.dtype) for p in model.parameters()}
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def has(self, name: str) -> bool:
        return False  # buffers keep the values their modules computed

    def unit_start(self, params: list) -> None:
        pass  # each module is initialized where it is first read

    def read_into(self, name: str, shape: torch.Size, start: int, end: int, out: torch.Tensor) -> None:
        path, _, attr = name.rpartition(".")
        if self._cached is None or self._cached[0] != path:
            self._cached = (path, self._init_module(path))
        out.copy_(self._cached[1][attr].reshape(-1)[start:end])

    def _init_module(self, path: str) -> dict[str, torch.Tensor]:
        module = self.model.get_submodule(path)
        clone = copy.copy(module)  # its attributes (padding_idx, eps, ...), fresh params, no children
        clone._parameters = {k: None if p is None else nn.Parameter(_empty(*self._shapes[id(p)]), p.requires_grad)
                             for k, p in module._parameters.items()}
        clone._modules = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed((self.seed + zlib.crc32(path.encode())) % (1 << 63))
            self.model._init_weights(clone)
        return {k: p.detach() for k, p in clone._parameters.items() if p is not None}

    def unit_done(self) -> None:
        self._cached = None


def _empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def fill_whole(model: nn.Module, source) -> None:
    """After the units are filled: params they do not hold (kept whole: quantized, or below the
    persistence threshold) are still on meta, read whole on every rank; buffers go to the source's
    device, with the checkpoint's values where it has them."""
    with torch.no_grad():
        left = [(name, p) for name, p in model.named_parameters() if p.device.type == "meta"]
        source.unit_start([p for _, p in left])
        for name, p in left:
            value = torch.empty(p.numel(), dtype=p.dtype, device=source.device)
            source.read_into(name, p.shape, 0, p.numel(), value)
            torch.utils.swap_tensors(p, nn.Parameter(value.view(p.shape), p.requires_grad))
        for module_name, module in model.named_modules():
            for key, b in list(module._buffers.items()):
                if b is None:
                    continue
                name = f"{module_name}.{key}" if module_name else key
                b = b.to(source.device)
                if source.has(name):
                    source.read_into(name, b.shape, 0, b.numel(), b.view(-1))
                module._buffers[key] = b
    source.unit_done()
