"""Models sharded as they load (ZeRO-3 init): ``from_pretrained`` and ``from_config`` (sharded_load.py)."""

from hf_zero.init.sharded_load import engine_of, from_config, from_pretrained

__all__ = ["from_pretrained", "from_config", "engine_of"]
