"""One run of transformers' Trainer on a benchmark workload: the peer tuneloop is measured against.

Called by `benchmarks/speed.py` and `benchmarks/gpu_check.py` in a fresh process per run. The data, split, tokenizer,
truncation, model, optimizer settings and schedule are tuneloop's (the same `load_splits`), so only the training loop
differs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from tuneloop import data, runtime, throughput
from tuneloop import model as models
from tuneloop.batches import LengthGroupedSampler, token_lengths
from tuneloop.options import DataArguments, ModelArguments


def main() -> None:
    p = argparse.ArgumentParser()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_name")
    source.add_argument("--train_file", help="a local .csv/.json/.jsonl file (held-out split as tuneloop makes it)")
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--max_length", type=int, required=True)
    p.add_argument("--max_train_samples", type=int)
    p.add_argument("--max_eval_samples", type=int)
    p.add_argument("--max_steps", type=int, default=-1, help="cap the run (throughput only; no accuracy then)")
    p.add_argument("--padding", choices=["max_length", "longest"], required=True)
    p.add_argument("--group_by_length", action="store_true")
    p.add_argument(
        "--tuneloop_grouping",
        action="store_true",
        help="Trainer's loop with tuneloop's length-grouped order (batches.LengthGroupedSampler) instead of its own",
    )
    p.add_argument(
        "--log_batches", action="store_true", help="add each training batch's labels and lengths to the output"
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--torch_compile", action="store_true")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()

    d = DataArguments(
        dataset_name=a.dataset_name,
        train_file=a.train_file,
        max_length=a.max_length,
        padding=a.padding,
        max_train_samples=a.max_train_samples,
        max_eval_samples=a.max_eval_samples,
    )
    m = ModelArguments(model_name_or_path=a.model_name_or_path)
    splits = data.load_splits(d, a.seed, None, need_train=True)
    tokenizer = models.load_tokenizer(m, a.max_length)
    train_set = data.tokenize(splits.train, splits, tokenizer, d)
    eval_set = data.tokenize(splits.eval, splits, tokenizer, d)
    set_seed(a.seed)  # before the classifier head is initialised, as tuneloop seeds before loading the model
    model = models.load_model(m, splits.label_names, tokenizer.pad_token_id)
    # Under `accelerate launch` with N processes Trainer deals each rank its own batches: a step is N batches.
    world = runtime.launched_processes()
    steps = a.max_steps if a.max_steps > 0 else int(np.ceil(len(train_set) / (a.batch_size * world)) * a.epochs)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=a.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=a.learning_rate,
            weight_decay=0.01,
            warmup_steps=math.ceil(0.1 * steps),
            lr_scheduler_type="linear",
            num_train_epochs=a.epochs,
            max_steps=a.max_steps,
            seed=a.seed,
            bf16=a.bf16,
            use_cpu=not torch.cuda.is_available(),
            train_sampling_strategy="group_by_length" if a.group_by_length else "random",
            torch_compile=a.torch_compile,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_steps=10**6,
            disable_tqdm=True,
        )
        batches = []  # with --log_batches: (labels, lengths) of every training batch, in the order trained
        training = [True]  # the collator serves train() first, then predict(); model.training is False for the
        # first batches (Trainer fetches them before its first training_step switches the model to train mode)

        def collate(features):
            batch = DataCollatorWithPadding(tokenizer)(features)
            if a.log_batches and training[0]:
                batches.append((batch["labels"].tolist(), batch["attention_mask"].sum(1).tolist()))
            return batch

        trainer_class = TunedOrderTrainer if a.tuneloop_grouping else Trainer
        trainer = trainer_class(
            model=model, args=args, train_dataset=train_set, processing_class=tokenizer, data_collator=collate
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        training[0] = False
        accuracy = None
        if a.max_steps <= 0:
            prediction = trainer.predict(eval_set)
            accuracy = float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
    samples = steps * a.batch_size * world if a.max_steps > 0 else len(train_set) * a.epochs
    if not trainer.is_world_process_zero():
        return
    lengths = np.array(
        [
            len(ids) if a.padding == "longest" else int(sum(mask))
            for ids, mask in zip(train_set["input_ids"], train_set["attention_mask"])
        ]
    )
    real_tokens = lengths.sum() * samples / len(train_set)  # the share of the epoch that was run
    flops = throughput.training_flops(
        throughput.non_embedding_parameters(model),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        real_tokens,
        (lengths**2).sum() * samples / len(train_set),
    )
    print(
        json.dumps(
            {
                "train_samples_per_second": samples / seconds,  # train()'s wall clock, like tuneloop's loop time
                "train_tokens_per_second": real_tokens / seconds,
                "model_tflops_per_second": flops / seconds / 1e12,
                # As tuneloop measures it: the most CUDA memory tensors held, or on CPU the process's peak resident set.
                "peak_memory_gib": throughput.peak_memory_gib(
                    torch.device("cuda" if torch.cuda.is_available() else "cpu")
                ),
                "eval_accuracy": accuracy,
                # What the run really was: several processes must be real data parallelism (ranks in one gloo/nccl
                # group).
                "num_processes": trainer.accelerator.num_processes,
                "distributed_type": trainer.accelerator.distributed_type.value,
                "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                **({"batches": batches} if a.log_batches else {}),
            }
        )
    )


class TunedOrderTrainer(Trainer):
    """Trainer whose length grouping is tuneloop's: windows of 50 batches sorted by length, the batches shuffled."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(token_lengths(dataset), self.args.train_batch_size, 50, self.args.seed)


if __name__ == "__main__":
    main()
