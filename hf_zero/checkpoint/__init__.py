"""Checkpoint formats: hf_zero's sharded checkpoints (``sharded.py``, through
torch.distributed.checkpoint, resumable at any world size and stage), their consolidation into
Hugging Face safetensors (``consolidate.py``), and DeepSpeed's ZeRO checkpoints read for the
same consolidation (``deepspeed_format.py``)."""
