"""ZeroConfig (what is sharded, how buckets are sized) and OffloadConfig (where shards live).

Sizes are counted in *elements*, not bytes, as in DeepSpeed: a bucket of 5e8 fp32 elements
is 2 GB. Integer fields accept integral floats because JSON writers put ``5e8``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from hf_zero.config import checks
from hf_zero.config.auto import AUTO, Auto
from hf_zero.config.errors import show
from hf_zero.config.fields import setting

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
STATE_DTYPES = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """Where one kind of state (optimizer state, or parameters) lives between uses."""

    device: Literal["none", "cpu", "nvme"] = setting(
        "none",
        deepspeed="device",
        doc="""Tier that holds the state: "none" keeps it on the accelerator, "cpu" in host
        memory, "nvme" in files under `nvme_path`. Default "none": offload trades step time for
        memory and is only worth it when the model does not fit.""",
    )
    pin_memory: bool = setting(
        False,
        deepspeed="pin_memory",
        doc="""Use page-locked host buffers so host<->device copies can run asynchronously.
        Default false (as DeepSpeed): pinned memory is a scarce OS resource and large pinned
        allocations can starve the rest of the machine.""",
    )
    nvme_path: str | None = setting(
        None,
        deepspeed="nvme_path",
        doc="""Directory for the swap files when `device` is "nvme"; required then, unused
        otherwise. No default: there is no safe guess for a fast local disk.""",
    )
    buffer_count: int = setting(
        4,
        deepspeed="buffer_count",
        doc="""Number of staging buffers for NVMe transfers. For `offload_optimizer`: chunk
        buffers in host memory, each holding one chunk's masters and optimizer state; while one
        chunk is stepped, up to `buffer_count` - 2 are read ahead and one is written back.
        DeepSpeed's default is 4 for optimizer state and 5 for parameters; `zero.offload_param`
        uses 5.""",
    )
    buffer_size: int = setting(
        100_000_000,
        deepspeed="buffer_size",
        doc="""Elements per NVMe staging buffer. For `offload_optimizer`: the chunk of
        consecutive buckets stepped between a read and a write (a bucket larger than this is a
        chunk of its own); host memory for the swap is about `buffer_count` x `buffer_size` x 4
        bytes x (1 + optimizer state tensors per element). Default 1e8 (DeepSpeed's): must hold
        the largest single parameter that is swapped.""",
    )
    ratio: float | Auto = setting(
        1.0,
        deepspeed="ratio",
        doc="""Fraction of optimizer state that is offloaded, in (0, 1]; the rest stays on the
        accelerator (stepped there while the host steps the rest). Only for `offload_optimizer`;
        hf_zero allows it at stages 1-3 (DeepSpeed only at stage 3). "auto" (hf_zero only): the
        first step runs with everything offloaded (or, where the host cannot hold all of it with 10%
        of its memory left free, the first buckets it can hold), then the engine keeps on the accelerator as
        much of the optimizer state as the memory free at that step's peak holds, less a safety
        margin of 10% of the accelerator's memory, and says the ratio it chose in the log and
        the run report (`hf-zero estimate` shows what it would pick). Default 1.0: offload
        everything.""",
    )
    state_dtype: Literal["fp32", "bf16"] = setting(
        "fp32",
        deepspeed=None,  # DeepSpeed's key is bf16.bf16_optimizer_states, a boolean (config/deepspeed.py)
        doc="""Dtype of the offloaded per-element optimizer state (AdamW's two moments) between
        steps, in host memory or in the NVMe swap files; the fp32 master weights stay fp32. "bf16"
        (DeepSpeed: `bf16.bf16_optimizer_states` true with optimizer offload) holds 12 host bytes
        per offloaded element instead of 16 with device "cpu" and the host step moves 20 bytes of
        memory per element instead of 28; with device "nvme" the swap files and chunk buffers hold
        8 bytes per element instead of 12, and each step reads and writes 8 instead of 12. The
        update itself is computed in fp32 and the moments rounded to bf16 after it, which changes
        numerics (a relative error up to 2^-9 per stored moment per step); "cpu" and "nvme" give
        the same bits. Only for `offload_optimizer`. Default "fp32": exact, as without offload.""",
    )
    host_share: float | Auto = setting(
        0.0,
        deepspeed="host_share",
        doc="""With `device` "nvme": the share of the offloaded optimizer state (fp32 masters and
        optimizer state, counted in elements) that stays in host memory instead of the swap files,
        in [0, 1]; for state larger than host memory (a 13B full fine-tune holds 12 bytes per
        parameter, 156 GB). The first chunks of `buffer_size` elements go to host memory until the
        share is reached, the rest to NVMe; a chunk is never split, so the share is met to within
        a chunk. Where the state lives never changes what the step computes: results are bit for
        bit those of all-host and all-NVMe. "auto" (hf_zero only): as much as fits in the host
        memory available when the engine is built, less 10% of the host's memory and less what
        offload needs besides (host grads, NVMe chunk buffers), shared equally by the ranks of a
        host; the choice is logged. Only for `offload_optimizer` with device "nvme" (hf_zero
        only; DeepSpeed has no such key). Default 0: everything offloaded on NVMe.""",
    )
    device_share: float | Auto = setting(
        0.0,
        deepspeed="device_share",
        doc="""With `device` "cpu" and fp32 state: when the optimizer step waits for the global norm
        (clipping on and fired lately, so the host step could not run during backward), this share
        of the offloaded elements (the chunks the next forward uses first) is stepped on the
        accelerator instead of the CPU, at the same time as the CPU steps the rest: their masters
        and optimizer state are copied up, stepped there by the same optimizer, written into the
        params there and copied back, so nothing stays on the accelerator between steps (it holds
        two chunks' copies while they step). Their grads stay where backward left them when the
        step is known to wait and the accelerator has room for them (else they go down and up
        again). The copies move 24 (or 28) bytes per element over the host link, which the CPU's
        step no longer has to move through its cores. In [0, 1].
        The device step rounds as the accelerator's optimizer kernels do (as for the share that
        `ratio` keeps there), not bit for bit as the CPU's. With `offload_param` "cpu" the new
        params are copied down into its host shards; not with `offload_param` "nvme" (hf_zero
        only; DeepSpeed has no such key). "auto" (hf_zero only): each rank measures its CPU's
        time per element alone on its first waiting steps, then tries a share of 0.3 and moves it
        towards the one at which both parts end together (from their measured rates, at most
        0.75), and turns the device part off for the rest of the run when it does not make the
        step at least 3% faster per element on two waiting steps in a row; the run report gives
        the phase, share and rates. Default 0: the CPU steps every offloaded element.""",
    )

    def __post_init__(self) -> None:
        device = checks.choice(self, "device", OFFLOAD_DEVICES)
        checks.boolean(self, "pin_memory")
        nvme_path = checks.text(self, "nvme_path", none=True)
        checks.integer(self, "buffer_count", minimum=1)
        checks.integer(self, "buffer_size", minimum=1)
        checks.number(self, "ratio", minimum=0.0, maximum=1.0, min_open=True, auto=True)
        checks.choice(self, "state_dtype", STATE_DTYPES)
        checks.number(self, "host_share", minimum=0.0, maximum=1.0, auto=True)
        checks.number(self, "device_share", minimum=0.0, maximum=1.0, auto=True)
        if device == "nvme" and nvme_path is None:
            raise checks.fail(self, "nvme_path", 'required when device is "nvme"',
                              value=None, allowed="a directory path string")


def _param_offload() -> OffloadConfig:
    return OffloadConfig(buffer_count=5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    """ZeRO stage and communication sizing (DeepSpeed's ``zero_optimization`` block)."""

    stage: int = setting(
        0,
        deepspeed="stage",
        doc="""0: plain data parallel; 1: shard optimizer state; 2: also shard gradients;
        3: also shard parameters. Default 0 (DeepSpeed's): sharding is opt-in.""",
    )
    reduce_bucket_size: int | Auto = setting(
        500_000_000,
        deepspeed="reduce_bucket_size",
        doc="""Elements per gradient reduce(-scatter) bucket. Larger buckets mean fewer, more
        efficient collectives but more memory held while they are in flight. Default 5e8
        (DeepSpeed's). "auto": hidden_size * hidden_size.""",
    )
    allgather_bucket_size: int | Auto = setting(
        500_000_000,
        deepspeed="allgather_bucket_size",
        doc="""Accepted for compatibility, not applied: updated parameter shards are all-gathered
        after the optimizer step one reduce bucket at a time (`reduce_bucket_size`; at stage 3 one
        unit at a time), so the all-gathers follow the gradient buckets. Default 5e8 (DeepSpeed's);
        another value, "auto" included, is warned about.""",
    )
    overlap_comm: bool | None = setting(
        None,
        deepspeed="overlap_comm",
        doc="""Accepted for compatibility, not applied: hf_zero always overlaps gradient reduction
        with the backward pass (each bucket is reduced as it fills), so neither value is warned
        about. Left unset it reads as DeepSpeed's stage-dependent default (true for stage 3, else
        false).""",
    )
    contiguous_gradients: bool = setting(
        True,
        deepspeed="contiguous_gradients",
        doc="""Copy gradients into one contiguous buffer as they are produced. Accepted for
        compatibility; hf_zero always uses contiguous gradient buffers. Default true.""",
    )
    reduce_scatter: bool = setting(
        True,
        deepspeed="reduce_scatter",
        doc="""Average gradients with reduce-scatter (each rank receives only its shard) rather
        than all-reduce. Default true (DeepSpeed's): it moves half the bytes.""",
    )
    prefetch_bucket_size: int | Auto = setting(
        50_000_000,
        deepspeed="stage3_prefetch_bucket_size",
        doc="""Stage 3: elements of upcoming parameters gathered ahead of use, on a side
        stream, while the current unit computes: whole units (blocks) in the order the previous
        forward used them (its reverse in backward), at least one when > 0; 0 turns prefetch
        off. Default 5e7 (DeepSpeed's). "auto": int(0.9 * hidden_size * hidden_size).""",
    )
    param_persistence_threshold: int | Auto = setting(
        100_000,
        deepspeed="stage3_param_persistence_threshold",
        doc="""Stage 3: trainable parameters with fewer elements stay unsharded (biases,
        norms), since gathering them costs more latency than they save memory: they are whole on
        every rank, their gradients are reduce-scattered and their updated shards all-gathered
        after each optimizer step. 0: every parameter is sharded. Default 1e5 (DeepSpeed's).
        "auto": 10 * hidden_size.""",
    )
    max_live_parameters: int = setting(
        1_000_000_000,
        deepspeed="stage3_max_live_parameters",
        doc="""Stage 3: upper bound on gathered (full) parameter elements resident at once,
        units in flight included; a prefetch that would pass it is not started (a unit needed
        now is always gathered). Lower it to trade overlap for memory. Default 1e9
        (DeepSpeed's).""",
    )
    max_reuse_distance: int = setting(
        1_000_000_000,
        deepspeed="stage3_max_reuse_distance",
        doc="""Stage 3: keep a gathered parameter if it is used again within this many
        parameter elements. Default 1e9 (DeepSpeed's).""",
    )
    gather_16bit_weights_on_model_save: bool | Auto = setting(
        False,
        deepspeed="stage3_gather_16bit_weights_on_model_save",
        doc="""Accepted for compatibility, not applied: at stage 3 `save_model` always writes the
        full weights as a normal Hugging Face model, streamed unit by unit so that no rank holds
        the whole model (DeepSpeed with false writes none; nothing is lost, so no warning).
        Default false (DeepSpeed's). "auto": true.""",
    )
    sub_group_size: int = setting(
        1_000_000_000,
        deepspeed="sub_group_size",
        doc="""Elements per optimizer-step tile with offload (DeepSpeed ZeRO-Infinity).
        Default 1e9 (DeepSpeed's).""",
    )
    round_robin_gradients: bool = setting(
        False,
        deepspeed="round_robin_gradients",
        doc="""DeepSpeed stage 1/2 CPU-offload gradient copy scheduling. Default false
        (DeepSpeed's).""",
    )
    zero3_init_flag: bool | None = setting(
        None,
        deepspeed="zero3_init_flag",
        doc="""Stage 3 (accelerate's name for DeepSpeed's `zero.Init`): while hf_zero is active
        (`hf_zero.run`, `hf-zero launch`, `activate()`), the script's `from_pretrained` of a
        local directory (safetensors, or `.bin` read with `weights_only`), or of a hub id served
        from the local cache when offline, loads the model sharded (`hf_zero.init.from_pretrained`:
        each rank reads only its slices, no rank holds the whole model; keys transformers renames
        or fuses on load are converted as it converts them). Loads it cannot serve (a hub id
        online, `device_map`, quantization, torch's legacy non-zip `.bin`, other keyword
        arguments) load whole as before, with a warning that names the reason once per job. Unset: true at stage 3, false below (accelerate's
        default; transformers likewise loads with `zero.Init` whenever a stage-3 DeepSpeed
        config is active); `false`: models load whole and are sharded when the optimizer is
        created. With `tensor_parallel.autotp_size` > 1 at stage 3 write `false` (the tp split
        needs the whole model; true is refused before any rank starts).""",
    )
    offload_optimizer: OffloadConfig = setting(
        default_factory=OffloadConfig,
        deepspeed="offload_optimizer",
        nested=OffloadConfig,
        doc="""Where fp32 master weights and optimizer state live, and where the optimizer
        step runs (stages 1-3). Default: on the accelerator.""",
    )
    offload_param: OffloadConfig = setting(
        default_factory=_param_offload,
        deepspeed="offload_param",
        nested=OffloadConfig,
        defaults={"buffer_count": 5},
        doc="""Stage 3: where parameter shards live between uses. Default: on the
        accelerator (with DeepSpeed's `buffer_count` 5).""",
    )

    def __post_init__(self) -> None:
        stage = checks.integer(self, "stage", minimum=0, maximum=3)
        for name in ("reduce_bucket_size", "allgather_bucket_size"):  # a bucket holds at least an element
            checks.integer(self, name, minimum=1, auto=True)
        for name in ("prefetch_bucket_size", "param_persistence_threshold"):  # 0: no prefetch, shard all
            checks.integer(self, name, minimum=0, auto=True)
        checks.integer(self, "sub_group_size", minimum=1)
        for name in ("max_live_parameters", "max_reuse_distance"):  # 0: nothing beyond the unit in use
            checks.integer(self, name, minimum=0)
        if checks.boolean(self, "overlap_comm", none=True) is None:
            object.__setattr__(self, "overlap_comm", stage == 3)
        for name in ("contiguous_gradients", "reduce_scatter", "round_robin_gradients"):
            checks.boolean(self, name)
        if checks.boolean(self, "zero3_init_flag", none=True) is None:  # accelerate's default
            object.__setattr__(self, "zero3_init_flag", stage == 3)
        checks.boolean(self, "gather_16bit_weights_on_model_save", auto=True)
        for name in ("offload_optimizer", "offload_param"):
            if not isinstance(getattr(self, name), OffloadConfig):
                raise checks.fail(self, name, "not an OffloadConfig", value=getattr(self, name),
                                  allowed="an object with device, pin_memory, nvme_path, ...")
        self._check_offload(stage)

    def _check_offload(self, stage: int) -> None:
        if self.offload_optimizer.device != "none" and stage == 0:
            raise checks.fail(self, "offload_optimizer.device", "optimizer offload needs ZeRO stage 1, 2 or 3",
                              value=self.offload_optimizer.device, allowed='"none" with stage 0')
        ratio = self.offload_optimizer.ratio
        if (ratio is AUTO or ratio < 1.0) and self.offload_optimizer.device == "none":
            raise checks.fail(self, "offload_optimizer.ratio", "partial offload needs an offload device",
                              value=ratio, allowed='1.0, or set offload_optimizer.device to "cpu"')
        if self.offload_optimizer.state_dtype != "fp32" and self.offload_optimizer.device == "none":
            raise checks.fail(self, "offload_optimizer.state_dtype", "applies to offloaded optimizer state only",
                              value=self.offload_optimizer.state_dtype,
                              allowed='"fp32", or set offload_optimizer.device to "cpu"')
        share = self.offload_optimizer.host_share
        if (share is AUTO or share > 0.0) and self.offload_optimizer.device != "nvme":
            raise checks.fail(self, "offload_optimizer.host_share",
                              'the share of NVMe-offloaded state kept in host memory: needs device "nvme"',
                              value=share, allowed=f'0, or set offload_optimizer.device to "nvme" (it is '
                                                   f'{show(self.offload_optimizer.device)})')
        leg = self.offload_optimizer.device_share
        if (leg is AUTO or leg > 0.0) and (self.offload_optimizer.device != "cpu" or self.offload_optimizer.state_dtype != "fp32"
                          or self.offload_param.device == "nvme"):
            raise checks.fail(self, "offload_optimizer.device_share",
                              'steps offloaded fp32 state from host memory on the accelerator: needs device "cpu", '
                              'state_dtype "fp32" and offload_param not on "nvme"', value=leg,
                              allowed=f'0 with offload_optimizer.device {show(self.offload_optimizer.device)}, '
                                      f'state_dtype {show(self.offload_optimizer.state_dtype)} and offload_param.device '
                                      f'{show(self.offload_param.device)}')
        if self.offload_param.device_share is AUTO or self.offload_param.device_share != 0.0:
            raise checks.fail(self, "offload_param.device_share", "device_share applies to offload_optimizer only",
                              value=self.offload_param.device_share, allowed="0")
        if self.offload_param.host_share != 0.0:
            raise checks.fail(self, "offload_param.host_share", "host_share applies to offload_optimizer only",
                              value=self.offload_param.host_share, allowed="0")
        if self.offload_param.device != "none" and stage != 3:
            raise checks.fail(self, "offload_param.device", "parameter offload needs ZeRO stage 3",
                              value=self.offload_param.device, allowed='"none" with stage 0-2')
        if self.offload_param.ratio != 1.0:
            raise checks.fail(self, "offload_param.ratio", "ratio applies to offload_optimizer only",
                              value=self.offload_param.ratio, allowed="1.0")
        if self.offload_param.state_dtype != "fp32":
            raise checks.fail(self, "offload_param.state_dtype", "state_dtype applies to offload_optimizer only",
                              value=self.offload_param.state_dtype, allowed='"fp32"')
        if self.offload_param.device != "none" and self.offload_optimizer.device == "none":
            raise checks.fail(self, "offload_param.device", "parameter offload needs optimizer offload in hf_zero",
                              value=self.offload_param.device,
                              allowed='offload_optimizer.device "cpu" or "nvme" with it, or "none"')


__all__ = ["OFFLOAD_DEVICES", "OffloadConfig", "ZeroConfig"]
