"""hf_zero: ZeRO sharding and offload for transformers.Trainer."""
