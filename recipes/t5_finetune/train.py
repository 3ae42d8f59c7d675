"""Summarization fine-tuning of a T5-style encoder-decoder with ``Seq2SeqTrainer``.

An ordinary Hugging Face script: it imports nothing of hf_zero. Run it with plain ``torchrun``
for DDP, or through ``hf-zero launch ... --zero_config configs/zeroN.json`` for ZeRO.

Data: a JSON or JSONL file of ``{"document": ..., "summary": ...}`` records, loaded with
``datasets.load_dataset("json", ...)``. The last ``--num_eval`` records are held out for
evaluation. Inputs are ``"summarize: " + document``.

Evaluation runs with ``predict_with_generate`` and reports ``rougeL``: a ROUGE-L F1 (x100)
computed here, from the longest common subsequence of lower-cased word tokens of each
prediction and its reference, averaged over examples (no ``evaluate``/``rouge_score`` needed).

Model: ``--model_name_or_path DIR`` (a local T5 checkpoint directory with its tokenizer), or
``--tiny``: a small T5 built from ``T5Config`` with a BPE tokenizer trained on the dataset
(pad id 0, eos id 1, unk id 2 as in T5; ``decoder_start_token_id`` = pad). No downloads.
"""

import gc
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from datasets import load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "summarize: "


@dataclass
class SummarizationArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Local directory of a T5-style checkpoint and its tokenizer."})
    tiny: bool = field(default=False, metadata={"help": "Build a tiny T5 from T5Config and train a BPE tokenizer "
                                                         "on the data instead of loading a checkpoint."})
    data_file: str = field(default=os.path.join(HERE, "data", "summaries.jsonl"),
                           metadata={"help": "JSON/JSONL file of {'document', 'summary'} records."})
    num_eval: int = field(default=8, metadata={"help": "Hold out the last N records for evaluation."})
    max_source_length: int = field(default=128)
    max_target_length: int = field(default=32)
    tiny_vocab_size: int = field(default=400)
    tiny_d_model: int = field(default=64)
    tiny_num_layers: int = field(default=2)


def train_tiny_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with T5's special-token ids: <pad>=0, </s>=1, <unk>=2; appends </s>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    assert (tok.token_to_id("<pad>"), tok.token_to_id("</s>"), tok.token_to_id("<unk>")) == (0, 1, 2)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_model(tokenizer, args: SummarizationArguments) -> T5ForConditionalGeneration:
    d = args.tiny_d_model
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=args.tiny_num_layers,
        num_decoder_layers=args.tiny_num_layers, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return T5ForConditionalGeneration(config)


# ---- ROUGE-L F1, computed locally ----------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    p, r = _words(prediction), _words(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def make_compute_metrics(tokenizer):
    def compute_metrics(eval_pred):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)    # -100 pads from gathering across ranks
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        decoded_preds = tokenizer.batch_decode(preds, skip_special_tokens=True)
        decoded_labels = tokenizer.batch_decode(labels, skip_special_tokens=True)
        scores = [rouge_l_f1(p, r) for p, r in zip(decoded_preds, decoded_labels)]
        lengths = [len(_words(p)) for p in decoded_preds]
        return {"rougeL": 100.0 * float(np.mean(scores)), "gen_len": float(np.mean(lengths))}

    return compute_metrics


def main() -> None:
    sum_args, training_args = HfArgumentParser(
        (SummarizationArguments, Seq2SeqTrainingArguments)).parse_args_into_dataclasses()
    if sum_args.tiny == (sum_args.model_name_or_path is not None):
        raise SystemExit("pass exactly one of --model_name_or_path DIR and --tiny")
    training_args.predict_with_generate = True
    # T5's forward takes **kwargs, so the Trainer passes it num_items_in_batch and, with
    # average_tokens_across_devices, multiplies the returned loss by the world size. T5 ignores
    # num_items_in_batch and returns a per-rank mean, so that would scale loss and gradients by W.
    training_args.average_tokens_across_devices = False
    if training_args.generation_max_length is None:
        training_args.generation_max_length = sum_args.max_target_length

    raw = load_dataset("json", data_files=sum_args.data_file, split="train")
    n_train = len(raw) - sum_args.num_eval
    train_raw, eval_raw = raw.select(range(n_train)), raw.select(range(n_train, len(raw)))

    if sum_args.tiny:
        tokenizer = train_tiny_tokenizer([PREFIX + r["document"] for r in train_raw] +
                                         [r["summary"] for r in train_raw], sum_args.tiny_vocab_size)
        torch.manual_seed(training_args.seed)
        model = build_tiny_model(tokenizer, sum_args)
    else:
        tokenizer = AutoTokenizer.from_pretrained(sum_args.model_name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(sum_args.model_name_or_path, dtype="auto")

    def preprocess(batch):
        enc = tokenizer([PREFIX + d for d in batch["document"]], max_length=sum_args.max_source_length,
                        truncation=True)
        enc["labels"] = tokenizer(text_target=batch["summary"], max_length=sum_args.max_target_length,
                                  truncation=True)["input_ids"]
        return enc

    with training_args.main_process_first(desc="tokenize"):
        train_dataset = train_raw.map(preprocess, batched=True, remove_columns=raw.column_names)
        eval_dataset = eval_raw.map(preprocess, batched=True, remove_columns=raw.column_names)

    trainer = Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer, compute_metrics=make_compute_metrics(tokenizer),
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    metrics = trainer.evaluate(metric_key_prefix="eval")
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
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
