"""Streamed data (--streaming): data larger than memory, read while training runs. The one home of streams: opening
one from local shard files or a dataset name, each row's id, the split between ranks, and the refusals.

A stream is a 🤗 Datasets `IterableDataset` of raw rows, each with a stable integer `row_id`: file number x 2**32 +
row number in that file, so ids sort in the source's file order (and for a single file equal the row's position).
Every file is one shard: datasets shuffles the shards' order with the seed each epoch and, between ranks,
`split_dataset_by_node` gives each rank whole shards when their count divides by the world size, else every
world-th row.

`datasets` is imported inside the functions: config's validation imports this module for `stream_problems`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneloop import sources
from tuneloop.errors import UserError

if TYPE_CHECKING:
    import datasets

    from tuneloop.options import DataArguments, TrainArguments

ROW_ID = "row_id"
# Row ids: file number in the high bits, row number in that file in the low ones.
ROWS_PER_FILE = 1 << 32


def open_stream(source: str | list[str], d: DataArguments, split: str = "train") -> datasets.IterableDataset:
    """The raw rows of `source`, in file order, each with its `row_id`: no shuffle, no split between ranks.

    `source`: a data file, a folder of them, a glob, a list of files (sources.py's file types, compressed or not, one
    format), or a dataset name (a Hub id or a local dataset folder made of data files), of which `split` is read.
    Files are read with --file_encoding and --csv_delimiter as loaded files are (sources.read_options)."""
    import datasets

    if isinstance(source, str) and not _is_local_files(source):
        files, builder, options = _dataset_files(source, d, split)
    else:
        files = sources.stream_files(source)
        if problems := sources.stream_file_problems("data", source):
            raise UserError(problems[0])
        from tuneloop.data import text_column_names

        builder, options = sources.read_options(files[0], d, text_column_names(d))
    return datasets.IterableDataset.from_generator(
        _file_rows,
        gen_kwargs=dict(
            files=list(files),
            first_ids=[number * ROWS_PER_FILE for number in range(len(files))],
            builder=builder,
            options=options,
        ),
    )


def for_rank(stream: datasets.IterableDataset, rank: int, world: int) -> datasets.IterableDataset:
    """This rank's part of `stream`, in order: whole shards (files) when their count divides by `world`, else every
    world-th row (datasets' `split_dataset_by_node`, strategy "auto")."""
    from datasets.distributed import split_dataset_by_node

    return stream if world == 1 else split_dataset_by_node(stream, rank=rank, world_size=world)


def _file_rows(files: list[str], first_ids: list[int], builder: str, options: dict):
    """The rows of `files` (this shard's), each with its row id. Each file is read by datasets' own builder for its
    type, streamed: the same reader, options and decompression as a loaded file."""
    import datasets

    for path, first in zip(files, first_ids):
        part = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **options)
        for number, row in enumerate(part):
            row[ROW_ID] = first + number
            yield row


def _is_local_files(source: str) -> bool:
    """A file, a glob, or a folder of plain data files (not a dataset folder saved by `save_to_disk`)."""
    import os

    if os.path.isfile(source) or any(char in source for char in "*?["):
        return True
    return os.path.isdir(source) and not any(
        os.path.exists(os.path.join(source, marker)) for marker in ("dataset_dict.json", "state.json")
    )


def _dataset_files(name: str, d: DataArguments, split: str) -> tuple[list[str], str, dict]:
    """A dataset name's data files of `split`, with the builder that reads them (parquet, json, csv...)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(name, d.dataset_config_name)
    except Exception as e:  # datasets raises many types here (FileNotFoundError, DatasetNotFoundError...)
        raise UserError(
            f"could not open dataset {name!r} to stream it: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
            "(check the name or path; Hub datasets need network access)"
        ) from None
    files = (builder.config.data_files or {}).get(split)
    if not files:
        raise UserError(
            f"dataset {name!r} has no data files for split {split!r} to stream (available: "
            f"{', '.join(builder.config.data_files or {}) or 'none'}): streaming reads datasets made of data files; "
            "fix --train_split, or load it without --streaming"
        )
    return list(files), builder.name, {}


def stream_problems(d: DataArguments, t: TrainArguments) -> list[str]:
    """What --streaming cannot work with, each with its fix; nothing when it is off."""
    if not d.streaming:
        return [] if d.train_rows is None and not d.count_rows else ["train_rows and count_rows need --streaming"]
    return []
