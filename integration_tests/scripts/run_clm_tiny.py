"""A run_clm-style Trainer script, as a user would write it: it imports nothing of hf_zero.

Trains a tiny random-init Llama on synthetic, learnable sequences (each row counts up from a
random start, modulo the vocabulary), and writes the Trainer's log history to
OUTPUT_DIR/log_history.json on rank 0.
"""

import gc
import json
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    vocab_size: int = field(default=97)
    hidden_size: int = field(default=36)
    num_layers: int = field(default=2)
    seq_len: int = field(default=16)
    num_rows: int = field(default=256)
    tie_word_embeddings: bool = field(default=True)


class CountingDataset(Dataset):
    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (rows, 1), generator=g)
        self.ids = (starts + torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(training_args.seed)
    config = LlamaConfig(
        vocab_size=script_args.vocab_size,
        hidden_size=script_args.hidden_size,
        intermediate_size=2 * script_args.hidden_size + 2,
        num_hidden_layers=script_args.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=10,
        max_position_embeddings=script_args.seq_len,
        tie_word_embeddings=script_args.tie_word_embeddings,
    )
    model = AutoModelForCausalLM.from_config(config)
    data = CountingDataset(script_args.num_rows, script_args.seq_len, script_args.vocab_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=data)
    trainer.train()
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
    # Close the process group while the interpreter is alive (gloo can abort at exit otherwise), and
    # only after the Trainer (and its DDP wrapper, which holds the group) is gone: the wrapper's
    # teardown would otherwise join gloo's threads while holding the GIL they may need (a hang).
    del trainer, model
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
