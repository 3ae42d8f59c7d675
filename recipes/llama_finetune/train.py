"""Supervised fine-tuning (SFT) of a causal LM (Llama-style) on a local prompt/response dataset.

An ordinary Hugging Face Trainer script: it imports nothing of hf_zero. Run it with plain
``torchrun`` for DDP, or through ``hf-zero launch ... --zero_config configs/zeroN.json`` for ZeRO.

Data: a JSON or JSONL file of ``{"prompt": ..., "response": ...}`` records, loaded with
``datasets.load_dataset("json", ...)``. Each record becomes

    <bos><|user|>\\n{prompt}\\n<|assistant|>\\n{response}<eos>

and the labels are -100 on everything up to and including ``<|assistant|>\\n``, so the loss
covers only the response (and its end-of-sequence token).

Model: ``--model_name_or_path DIR`` (a local checkpoint directory with its tokenizer), or
``--tiny``: a small Llama built from a config, with a byte-level BPE tokenizer trained on the
dataset itself (no downloads).
"""

import gc
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from datasets import load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

HERE = os.path.dirname(os.path.abspath(__file__))
USER, ASSISTANT = "<|user|>", "<|assistant|>"


@dataclass
class SftArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Local directory of a causal-LM checkpoint and its tokenizer."})
    tiny: bool = field(default=False, metadata={"help": "Build a tiny Llama from a config and train a BPE "
                                                         "tokenizer on the data instead of loading a checkpoint."})
    data_file: str = field(default=os.path.join(HERE, "data", "sft_sample.jsonl"),
                           metadata={"help": "JSON/JSONL file of {'prompt', 'response'} records."})
    max_seq_length: int = field(default=64, metadata={"help": "Truncate prompt+response to this many tokens."})
    tiny_vocab_size: int = field(default=400)
    tiny_hidden_size: int = field(default=64)
    tiny_num_layers: int = field(default=2)


def prompt_text(prompt: str) -> str:
    return f"{USER}\n{prompt}\n{ASSISTANT}\n"


def train_tiny_tokenizer(records, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [prompt_text(r["prompt"]) + r["response"] for r in records]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size,
                            special_tokens=["<unk>", "<pad>", "<s>", "</s>", USER, ASSISTANT],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=[USER, ASSISTANT])


def build_tiny_model(tokenizer, args: SftArguments):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.tiny_hidden_size, intermediate_size=4 * args.tiny_hidden_size,
        num_hidden_layers=args.tiny_num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(args.max_seq_length, 64), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config)


def tokenize_fn(tokenizer, max_len: int):
    """Prompt and response are tokenized separately so the mask boundary is exact."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]

    def fn(record):
        p = bos + tokenizer(prompt_text(record["prompt"]), add_special_tokens=False)["input_ids"]
        r = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + eos
        ids = (p + r)[:max_len]
        labels = ([-100] * len(p) + r)[:max_len]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return fn


class PadCollator:
    """Right-pads a batch to its longest row; padded labels are -100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows):
        n = max(len(r["input_ids"]) for r in rows)

        def pad(key, value):
            return torch.tensor([r[key] + [value] * (n - len(r[key])) for r in rows], dtype=torch.long)

        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", -100)}


def main() -> None:
    sft_args, training_args = HfArgumentParser((SftArguments, TrainingArguments)).parse_args_into_dataclasses()
    if sft_args.tiny == (sft_args.model_name_or_path is not None):
        raise SystemExit("pass exactly one of --model_name_or_path DIR and --tiny")

    raw = load_dataset("json", data_files=sft_args.data_file, split="train")

    if sft_args.tiny:
        tokenizer = train_tiny_tokenizer(raw, sft_args.tiny_vocab_size)
        torch.manual_seed(training_args.seed)
        model = build_tiny_model(tokenizer, sft_args)
    else:
        tokenizer = AutoTokenizer.from_pretrained(sft_args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(sft_args.model_name_or_path, dtype="auto")

    with training_args.main_process_first(desc="tokenize"):
        train_dataset = raw.map(tokenize_fn(tokenizer, sft_args.max_seq_length), remove_columns=raw.column_names)

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset,
                      data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
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
