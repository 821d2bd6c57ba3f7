"""Batches: the order of the training examples (a seeded shuffle, length-grouped windows, or token-budget batches),
the check of the token budget's options, the padding collator and the dataloaders, and a debugging log of which
examples each step used.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

    from tuneloop.options import DataArguments, TrainArguments


def make_dataloaders(
    train: Dataset | None,
    evaluation: Dataset | None,
    tokenizer,
    t: TrainArguments,
    pad_to_multiple_of: int | None,
    pin_memory: bool,
    length_window: int | None = None,
    length_group_batch_size: int | None = None,
) -> tuple[DataLoader | None, DataLoader | None]:
    """Training order: a seeded shuffle, or with `length_window` batches of similar length (see LengthGroupedSampler),
    grouped by `length_group_batch_size` (default: the per-device batch; an elastic resume keeps the run's first), or
    with --max_tokens_per_batch batches cut by a token budget (TokenBudgetBatchSampler)."""
    collate = collator(tokenizer, pad_to_multiple_of)
    common = dict(collate_fn=collate, num_workers=t.dataloader_num_workers, pin_memory=pin_memory)
    # Each loader draws its per-epoch worker seed from its own generator: with none, every `iter()` takes a number
    # from the global RNG, so where an epoch starts (or an evaluation runs) would shift dropout, and a resumed run
    # would not replay the uninterrupted one.
    train_dl = None
    if train is not None:
        order = dict(batch_size=t.per_device_train_batch_size, shuffle=True)
        data_seed = t.seed if t.data_seed is None else t.data_seed
        if length_window or t.max_tokens_per_batch:
            lengths = token_lengths(train)
        if t.max_tokens_per_batch:
            order = dict(
                batch_sampler=TokenBudgetBatchSampler(lengths, t.max_tokens_per_batch, data_seed, pad_to_multiple_of)
            )
        elif length_window:
            order = dict(
                batch_size=t.per_device_train_batch_size,
                sampler=LengthGroupedSampler(
                    lengths, length_group_batch_size or t.per_device_train_batch_size, length_window, data_seed
                ),
            )
        train_dl = DataLoader(train, generator=torch.Generator().manual_seed(t.seed), **order, **common)
    eval_dl = None
    if evaluation is not None:
        eval_dl = DataLoader(
            evaluation,
            batch_size=t.per_device_eval_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(t.seed),
            **common,
        )
    return train_dl, eval_dl


def collator(tokenizer, pad_to_multiple_of: int | None) -> DataCollatorWithPadding:
    """The padding collator of every loader: each batch padded to its longest text (rounded up to the multiple)."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def token_lengths(tokenized: Dataset) -> np.ndarray:
    """Each example's token count, from the Arrow list offsets into one numpy array: no Python list of every
    example's token ids (107 s for a million headlines, against 0.03 s: benchmarks/RESULTS.md)."""
    return pc.list_value_length(tokenized.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)


class LengthGroupedSampler(Sampler[int]):
    """Batches of similar length, so dynamic padding pads little, in an order that is still random.

    Each epoch: a permutation seeded by (seed, epoch); cut into windows of `window` batches; each window sorted by
    length and cut into batches; the full batches shuffled (the one short batch, if any, stays last so that every
    batch boundary stays where the DataLoader cuts). Every index appears exactly once per epoch, the same on every
    process, so Accelerate's sharding deals whole batches to the ranks and `skip_first_batches` resumes it exactly.
    A larger window pads less and mixes less; transformers' Trainer uses 50 batches.
    """

    def __init__(self, lengths, batch_size: int, window: int, seed: int):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.window, self.seed, self.epoch = batch_size, window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.window * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            group = np.asarray(order[start : start + span])
            # Longest first; a stable sort keeps equal lengths in their random order (as sorted(reverse=True) does).
            group = group[np.argsort(-self.lengths[group], kind="stable")].tolist()
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        short = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
        for batch in shuffled + short:
            yield from batch


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches cut by a token budget: as many texts as fit in `max_tokens` padded tokens (the batch's longest text,
    rounded up to `pad_to_multiple_of` as the collator pads it, times the number of texts). A batch sampler: it yields
    lists of indices, for `DataLoader(batch_sampler=...)`.

    Each epoch: a permutation seeded by (seed, epoch); a stable sort by padded length, longest first (equal lengths
    stay in their random order); a greedy cut in that order; the batches' order shuffled with the same generator. The
    sorted lengths are the same every epoch, so the batch sizes (and their number, `len`) are too; which equal-length
    texts share a batch changes. Every index appears exactly once per epoch, the same on every process: Accelerate
    deals whole batches to the ranks in turn (BatchSamplerShard; without a `batch_size` attribute it keeps the
    batches' varying sizes, and with even_batches a rank left without a last batch gets the epoch's first batch
    again), and `skip_first_batches` skips exactly a rank's first batches.
    """

    def __init__(self, lengths, max_tokens: int, seed: int, pad_to_multiple_of: int | None = None):
        multiple = pad_to_multiple_of or 1
        self.padded = -(-np.asarray(lengths, dtype=np.int64) // multiple) * multiple  # what the collator pads each to
        self.max_tokens, self.seed, self.epoch = max_tokens, seed, 0
        if len(self.padded) and self.padded.max() > max_tokens:
            raise UserError(
                f"max_tokens_per_batch {max_tokens} is below the longest text padded to a multiple of "
                f"{multiple} ({int(self.padded.max())} tokens): raise --max_tokens_per_batch"
            )
        self.sizes = self._cut(np.sort(self.padded)[::-1])

    def _cut(self, padded_longest_first: np.ndarray) -> list[int]:
        """The greedy cut's batch sizes: in longest-first order a batch's first text is its longest, so a batch
        costs first x count."""
        sizes, start = [], 0
        while start < len(padded_longest_first):
            count = max(1, self.max_tokens // int(padded_longest_first[start]))
            count = min(count, len(padded_longest_first) - start)
            sizes.append(count)
            start += count
        return sizes

    @property
    def sampler(self):
        # Accelerate's DataLoaderShard.set_epoch reaches a batch sampler it wrapped in BatchSamplerShard (which has
        # no set_epoch of its own) only through `.batch_sampler.sampler.set_epoch`: this is that path.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.padded), generator=generator).numpy()
        order = order[np.argsort(-self.padded[order], kind="stable")].tolist()
        ends = np.cumsum(self.sizes).tolist()
        batches = [order[end - size : end] for size, end in zip(self.sizes, ends)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


def token_budget_problems(d: DataArguments, t: TrainArguments) -> list[str]:
    """What --max_tokens_per_batch cannot work with."""
    if t.max_tokens_per_batch <= 0:
        return (
            []
            if t.max_tokens_per_batch == 0
            else [f"max_tokens_per_batch must be >= 0, 0 is off (got {t.max_tokens_per_batch})"]
        )
    problems = []
    if d.padding == "max_length":
        problems.append(
            "max_tokens_per_batch with --padding max_length only counts texts (every text is max_length "
            "tokens): use --padding longest, or --per_device_train_batch_size instead of a token budget"
        )
    if t.gradient_accumulation_steps != 1:
        problems.append(
            "max_tokens_per_batch needs gradient_accumulation_steps 1 (got "
            f"{t.gradient_accumulation_steps}): the loss weighting must know each step's sample count "
            "before backward; raise --max_tokens_per_batch for larger steps instead"
        )
    return problems


class SampleIdLog:
    """A debugging record of which training examples (row numbers of the train split; a stream's row ids) each
    optimizer step used: with TUNELOOP_LOG_SAMPLE_IDS=1 every process appends a line {"step", "ids"} per micro-batch
    to output_dir/sample_ids/rank_<r>.jsonl. The elastic-resume and streaming tests compare it between runs. Off (the
    default), it adds no column and writes nothing."""

    COLUMN = "sample_id"

    def __init__(self, output_dir: str, rank: int):
        on = os.environ.get("TUNELOOP_LOG_SAMPLE_IDS") == "1"
        self.path = os.path.join(output_dir, "sample_ids", f"rank_{rank}.jsonl") if on else None

    def tag(self, train):
        """The training examples, each with its id when the log is on: a loaded split's row numbers, a stream's row
        ids (stream.Examples.tag_samples)."""
        if not self.path:
            return train
        if hasattr(train, "tag_samples"):
            return train.tag_samples(self.COLUMN)
        return train.add_column(self.COLUMN, list(range(len(train))))

    def record(self, step: int, batch: dict) -> None:
        """Take the ids out of `batch` (they are no model input) and log them as used by optimizer step `step`."""
        ids = batch.pop(self.COLUMN, None)
        if self.path and ids is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")
