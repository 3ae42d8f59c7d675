"""A Trainer script for test_launch.py, as a user would write it: it imports nothing of hf_zero.

Trains a tiny random-init Llama (large initial weights, so attention patterns matter to the loss) on
learnable sequences (each row counts up from a random start, modulo the vocabulary), and writes on
rank 0 ``OUTPUT_DIR/result.json``: the Trainer's log history and the attention implementation the
trained model ran (``model.config._attn_implementation``).

``--attention reference`` trains the same model through an attention registered here, independently of
hf_zero: dense SDPA under the boolean mask of DeepSpeed's fixed layout (``--layout``, a JSON
``sparse_attention`` block; the layout from tests/sparse_attention/deepspeed_layouts.py, a
transcription of DeepSpeed's builder) expanded with ``torch.kron``, and the causal rule.
"""

import gc
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import (AttentionInterface, AutoModelForCausalLM, HfArgumentParser, LlamaConfig, Trainer,
                          TrainingArguments)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.sparse_attention import deepspeed_layouts  # noqa: E402

REFERENCE = "fixed_layout_reference"
# DeepSpeed's defaults for the fixed layout's keys the block leaves out
FIXED_DEFAULTS = {"different_layout_per_head": False, "num_global_blocks": 1, "num_different_global_patterns": 1,
                  "horizontal_global_attention": False, "attention": "bidirectional", "num_local_blocks": 4}


@dataclass
class ScriptArguments:
    vocab_size: int = field(default=64)
    seq_len: int = field(default=32)
    num_rows: int = field(default=128)
    attention: str = field(default="sdpa", metadata={"help": "sdpa, or 'reference' (module docstring)"})
    layout: str = field(default="{}", metadata={"help": "the sparse_attention block, JSON (--attention reference)"})


class CountingDataset(Dataset):
    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (rows, 1), generator=g)
        self.ids = (starts + torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def register_reference(block: dict, heads: int) -> None:
    cfg = {**FIXED_DEFAULTS, **block, "num_heads": heads}
    assert cfg.get("mode", "fixed") == "fixed", cfg

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        seq = query.shape[2]
        padded = -(-seq // cfg["block"]) * cfg["block"]
        layout = deepspeed_layouts.fixed(cfg, padded)[0].float()
        mask = torch.kron(layout, torch.ones(cfg["block"], cfg["block"])).bool()[:seq, :seq]
        mask = (mask & torch.ones(seq, seq, dtype=torch.bool).tril())[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(REFERENCE, attention)
    AttentionMaskInterface.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(training_args.seed)
    config = LlamaConfig(vocab_size=script_args.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=script_args.seq_len,
                         initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if script_args.attention == "reference":
        register_reference(json.loads(script_args.layout), config.num_attention_heads)
        model.set_attn_implementation(REFERENCE)
    data = CountingDataset(script_args.num_rows, script_args.seq_len, script_args.vocab_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=data)
    trainer.train()
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "result.json"), "w") as f:
            json.dump({"log_history": trainer.state.log_history,
                       "attn_implementation": trainer.model.config._attn_implementation}, f, indent=1)
    del trainer, model  # as run_clm_tiny.py: the process group closed while the interpreter is alive
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
