"""The demo's training script: an ordinary Hugging Face Trainer script (no hf_zero import).

It trains a byte-level BPE tokenizer on the bundled sentences, builds a tiny Llama-shaped model
from a config, fine-tunes it with ``Trainer`` and saves model + tokenizer with
``trainer.save_model()``. hf_zero reaches it only through ``--zero_config`` on the command line.
"""

import os
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sentences.txt")


@dataclass
class DemoArguments:
    seq_len: int = field(default=24)
    vocab_size: int = field(default=320)
    hidden_size: int = field(default=64)
    num_layers: int = field(default=2)


def build_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


class SentenceDataset(Dataset):
    def __init__(self, lines: list[str], tokenizer, seq_len: int) -> None:
        enc = tokenizer([f"<s>{line}</s>" for line in lines], padding="max_length", truncation=True,
                        max_length=seq_len, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def main() -> None:
    demo_args, args = HfArgumentParser((DemoArguments, TrainingArguments)).parse_args_into_dataclasses()
    with open(DATA) as f:
        lines = [line.strip() for line in f if line.strip()]
    tokenizer = build_tokenizer(lines, demo_args.vocab_size)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=demo_args.hidden_size, intermediate_size=4 * demo_args.hidden_size,
        num_hidden_layers=demo_args.num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=demo_args.seq_len, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    trainer = Trainer(model=model, args=args, train_dataset=SentenceDataset(lines, tokenizer, demo_args.seq_len),
                      processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    main()
