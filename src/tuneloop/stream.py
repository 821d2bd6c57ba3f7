"""Streamed data (--streaming): data larger than memory, read while training runs. The one home of streams: opening
one from local shard files or a dataset name, each row's id, the split between ranks, the labels and the count of a
training stream, each rank's training batches (shuffled, tokenized on the fly, a step at a time, agreed between the
ranks), its position for an exact resume, and what streaming refuses.

A stream is a 🤗 Datasets `IterableDataset` of raw rows, each with a stable integer `row_id`: file number x 2**32 +
row number in that file, so ids sort in the source's file order (and for a single file equal the row's position).
Every file is one shard: datasets shuffles the shards' order with the seed each epoch and, between ranks,
`split_dataset_by_node` gives each rank whole shards when their count divides by the world size, else every
world-th row.

`datasets` and data.py are imported inside the functions: config's validation imports this module for
`stream_problems`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tuneloop import problem, sources
from tuneloop.errors import UserError

if TYPE_CHECKING:
    import datasets

    from tuneloop import data
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
    # The columns' types where the files say them (Parquet, a Hub dataset's own: a ClassLabel keeps its names); JSON
    # and CSV rows are typed as they are read, as a loaded file's are.
    features = datasets.load_dataset(builder, data_files=[files[0]], split="train", streaming=True, **options).features
    return datasets.IterableDataset.from_generator(
        _file_rows,
        features=None if features is None else datasets.Features({**features, ROW_ID: datasets.Value("int64")}),
        gen_kwargs=dict(
            files=list(files),
            first_ids=[number * ROWS_PER_FILE for number in range(len(files))],
            builder=builder,
            options={**options, **_piece_options(builder, features)},
        ),
    )


# What a file's reader holds at a time. datasets' shuffle reads up to 10 shards at once (IterableDataset.shuffle's
# max_buffer_input_shards, one thread each), so each reader's piece is paid up to 10 times: with datasets' own pieces
# (10 MB of JSON lines; a Parquet row group, often the whole file) the peak memory grew with the shard count.
READ_JSON_BYTES = 1 << 20
READ_PARQUET_ROWS = 10_000  # (CSV: datasets reads 10,000 rows at a time already)


def _piece_options(builder: str, features: datasets.Features | None) -> dict:
    """The options that read each file of a stream in small pieces. A JSON file is also read with the stream's types
    (its first file's, read once by open_stream): without them datasets parses each file's first 10 MB again to infer
    its own (0.5 s a file here, 10 files at once when the shuffle starts)."""
    if builder == "json":
        return {"chunksize": READ_JSON_BYTES, **({"features": features} if features is not None else {})}
    return {"batch_size": READ_PARQUET_ROWS} if builder == "parquet" else {}


def for_rank(stream: datasets.IterableDataset, rank: int, world: int) -> datasets.IterableDataset:
    """This rank's part of `stream`, in order: whole shards (files) when their count divides by `world`, else every
    world-th row (datasets' `split_dataset_by_node`, strategy "auto")."""
    from datasets.distributed import split_dataset_by_node

    return stream if world == 1 else split_dataset_by_node(stream, rank=rank, world_size=world)


def _file_rows(files: list[str], first_ids: list[int], builder: str, options: dict):
    """The rows of `files` (this shard's), each with its row id. Each file is read by datasets' own builder for its
    type, streamed: the same reader, options and decompression as a loaded file, in small pieces (_piece_options)."""
    import datasets
    import pyarrow
    from datasets.table import CastError

    for path, first in zip(files, first_ids):
        number = first
        try:
            part = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **options)
            # Read in batches, the rows cut out here: datasets' row-by-row iteration formats each row (5x slower).
            for batch in part.iter(batch_size=1000):
                columns = list(batch)
                for values in zip(*batch.values()):
                    yield {**dict(zip(columns, values)), ROW_ID: number}
                    number += 1
        except (pyarrow.ArrowException, CastError) as e:
            raise UserError(_unreadable(path, options.get("features"), e)) from None


def _unreadable(path: str, features: datasets.Features | None, e: Exception) -> str:
    """One line: a stream's file that its reader refused (a JSON line that does not parse, or a file whose columns or
    types are not those of the stream's first file), and the fix."""
    reason = " ".join(str(e).split())[:300]
    kinds = (f"{name} {getattr(kind, 'dtype', type(kind).__name__)}" for name, kind in (features or {}).items())
    rule = (
        f"; a stream reads every file with its first file's columns and types ({', '.join(kinds)})" if features else ""
    )
    return f"could not read data file {path!r} of the stream: {type(e).__name__}: {reason}{rule}: fix or convert it"


def _is_local_files(source: str) -> bool:
    """A file, a glob, or a folder of plain data files (not a dataset folder saved by `save_to_disk`)."""
    import os

    if os.path.isfile(source) or any(char in source for char in "*?["):
        return True
    return os.path.isdir(source) and not sources.is_saved_dataset(source)


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


# ---- A training stream: its splits, labels and count ----

# Distinct labels the counting pass keeps, beyond which the column is taken for values (regression), not classes.
MAX_DISTINCT_LABELS = 100_000


def load_splits(
    accelerator, d: DataArguments, seed: int, num_labels: int | None, model_classes: list[str] | None
) -> data.Splits:
    """The splits of a streamed training run: the training stream; a peek at its first --shuffle_buffer_size rows,
    which stands in for the training split where data.load_splits checks the columns, decides the problem type and
    reads the classes; the counting pass (--count_rows: the rows and every label); and the eval sets, loaded in memory
    (--validation_file or --validation_split). The classes: the model's own when it is fine-tuned already, else every
    label the counting pass saw, else the peek's (said in one line)."""
    import datasets
    from datasets import DatasetDict

    from tuneloop import data

    stream = open_stream(d.train_file or d.dataset_name, d, d.train_split)
    peek = list(stream.take(d.shuffle_buffer_size))
    if not peek:
        raise UserError(f"the training stream {d.train_file or d.dataset_name!r} has no rows: check the data source")
    peek = datasets.Dataset.from_list(peek, features=stream.features).remove_columns(ROW_ID)
    notes, label_reference, rows = [], None, d.train_rows
    if d.count_rows and d.label_column in peek.column_names:
        rows, labels, seconds = count_rows(accelerator, stream, d)
        label_reference = _label_dataset(labels, peek, d.label_column)
        notes.append(
            f"tuneloop: --count_rows read the training stream in {seconds:.1f} s: {rows} rows "
            f"({rows / max(seconds, 1e-9):.0f} rows/s), "
            + (f"{len(labels)} distinct labels" if labels is not None else "labels taken for values")
        )
    if d.validation_file:
        evals = sources.load_files(sources.eval_sources(d), d, data.text_column_names(d))
    else:  # --validation_split of the dataset, loaded (stream_problems asks for one of the two when evaluating)
        evals = {
            split: sources.load_split(d, split)
            for split in (sources.eval_sources(d).values() if d.validation_split else ())
        }
    splits = data.load_splits(
        d,
        seed,
        num_labels,
        need_train=True,
        model_classes=model_classes,
        raw=DatasetDict({d.train_split: peek, **evals}),
        label_reference=label_reference,
        streamed=True,
    )
    kind = problem.of(splits.problem_type)
    labels_from_peek = not model_classes and label_reference is None and kind.weights_kind is not None
    if labels_from_peek:  # (a classification: regression has no classes to miss)
        notes.append(
            f"tuneloop: the {kind.units} are those of the training stream's first {len(peek)} rows "
            "(--count_rows reads every row first)"
        )
    splits.notes[:0] = notes
    splits.stream = TrainingStream(stream, rows, len(peek) if labels_from_peek else None)
    return splits


@dataclass
class TrainingStream:
    """What load_splits found out about the training stream."""

    rows: datasets.IterableDataset  # raw rows, each with its ROW_ID, in file order
    count: int | None  # its row count (--train_rows, --count_rows), None when unknown
    peeked: int | None  # the classes were read from this many first rows (None: from the model or every row)


def count_rows(accelerator, stream: datasets.IterableDataset, d: DataArguments) -> tuple[int, list | None, float]:
    """--count_rows: every rank reads its part of the stream's label column once. Returns the stream's row count,
    its distinct labels (None past MAX_DISTINCT_LABELS: values, not classes) and the seconds it took."""
    import time

    from accelerate.utils import gather_object

    started = time.perf_counter()
    rows, labels = 0, set()
    part = for_rank(stream, accelerator.process_index, accelerator.num_processes)
    for batch in part.select_columns([d.label_column]).iter(batch_size=1000):
        values = batch[d.label_column]
        rows += len(values)
        if labels is not None:
            labels.update(tuple(value) if isinstance(value, list) else value for value in values)
            labels = labels if len(labels) <= MAX_DISTINCT_LABELS else None
    parts = gather_object([(rows, labels)]) if accelerator.num_processes > 1 else [(rows, labels)]
    total = sum(count for count, _ in parts)
    seen = None if any(found is None for _, found in parts) else set().union(*(found for _, found in parts))
    if seen is not None and d.drop_bad_rows:
        seen.discard(None)  # the rows that have it are dropped as they are read
    found = None if seen is None else [list(value) if isinstance(value, tuple) else value for value in seen]
    return total, found, time.perf_counter() - started


def _label_dataset(labels: list | None, peek: datasets.Dataset, column: str) -> datasets.Dataset | None:
    """The distinct labels as a one-column dataset typed as the peek's label column, for problem.py's label_names."""
    import datasets

    if labels is None:
        return None
    try:
        return datasets.Dataset.from_dict({column: labels}, features=datasets.Features({column: peek.features[column]}))
    except (TypeError, ValueError, OverflowError):  # labels of another type than the peek's: as they come
        return datasets.Dataset.from_dict({column: labels})


# ---- Each rank's training batches ----

POSITION = "stream_position"  # on each example: the raw rows of its reader's stream read up to and including it
PART = "stream_part"  # on each example: the number of the reader's part it comes from (Examples.parts)
CHUNK_ROWS = 1000  # rows prepared (joined, checked, encoded, tokenized) at a time: datasets' batched-map size


def train_examples(accelerator, splits: data.Splits, tokenizer, d: DataArguments, t: TrainArguments, kind) -> Examples:
    """This rank's training examples: its part (for_rank) of the stream shuffled with the data seed in a buffer of
    --shuffle_buffer_size rows (the shards' order and the buffer's draws change with the epoch), prepared a chunk of
    rows at a time as data.py prepares a loaded split; with dataloader workers, in one part per worker (reader_parts).
    """
    seed = t.seed if t.data_seed is None else t.data_seed
    shuffled = splits.stream.rows.shuffle(seed=seed, buffer_size=d.shuffle_buffer_size)
    parts = reader_parts(shuffled, accelerator.process_index, accelerator.num_processes, t.dataloader_num_workers)
    return Examples(parts, _preparer(splits, tokenizer, d, kind))


@dataclass
class Part:
    """What one reader (the training process, or one dataloader worker) reads of a rank's stream: the rows of `rows`
    whose index in it is `offset` modulo `every`. Its position is counted in rows of `rows` read."""

    rows: datasets.IterableDataset
    every: int = 1
    offset: int = 0


def reader_parts(shuffled: datasets.IterableDataset, rank: int, world: int, workers: int) -> list[Part]:
    """The parts of rank `rank`'s stream that its readers read: the rank's whole part with no worker or one; else one
    part per worker: whole shards when the shard count divides by world x workers (split_dataset_by_node over that
    many nodes: each worker reads only its shards, with its own shuffle buffer), else every workers-th row of the
    rank's part (each worker reads and shuffles the rank's whole part, and prepares only its rows: the reading is
    done `workers` times over, the tokenizing once)."""
    if workers <= 1:
        return [Part(for_rank(shuffled, rank, world))]
    if shuffled.num_shards % (world * workers) == 0:
        return [Part(for_rank(shuffled, rank * workers + k, world * workers)) for k in range(workers)]
    rows = for_rank(shuffled, rank, world)
    return [Part(rows, workers, k) for k in range(workers)]


def _preparer(splits: data.Splits, tokenizer, d: DataArguments, kind):
    """The function that prepares a chunk of raw rows as data.py prepares a loaded training split: text columns
    joined, bad rows refused or dropped (sources.bad_rows), labels encoded by the problem type (problem.py), texts
    tokenized (data.text_encoder). Returns each kept row's offset in the chunk and its example."""
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from tuneloop import data

    text, pair, label = splits.text_column, splits.text_pair_column, splits.label_column
    required = [text, pair, None if d.label_separator is not None else label]
    encode_texts = data.text_encoder(text, pair, tokenizer, d)
    features = splits.stream.rows.features  # the files' types, where they say them (open_stream)
    offset_column = "__tuneloop_offset__"

    def prepare(chunk: dict) -> list[tuple[int, dict]]:
        quiet = are_progress_bars_disabled()
        disable_progress_bars()  # a chunk is no job to show a bar for
        try:
            rows = datasets.Dataset.from_dict(chunk, features=features).remove_columns(ROW_ID)
            rows = rows.add_column(offset_column, list(range(len(rows))))
            where = f"training stream (the chunk from row_id {chunk[ROW_ID][0]})"
            rows = data.join_text_columns(rows, where, d)
            rows = sources.bad_rows(rows, where, None, required, d.drop_bad_rows, [], part=True)
            try:
                rows = kind.encode(rows, label, splits.label_names, where, d.label_separator)
            except UserError as e:
                if splits.stream.peeked is None:
                    raise
                raise UserError(
                    f"{e} (the classes were read from the stream's first {splits.stream.peeked} rows: pass "
                    "--count_rows to read every label before training)"
                ) from None
        finally:
            if not quiet:
                enable_progress_bars()
        if not len(rows):  # every row of the chunk dropped (--drop_bad_rows)
            return []
        encoded = encode_texts({text: list(rows[text]), **({pair: list(rows[pair])} if pair else {})})
        labels, offsets = list(rows[label]), list(rows[offset_column])
        names = list(encoded.keys())
        return [
            (offsets[i], {**{name: encoded[name][i] for name in names}, "labels": labels[i]}) for i in range(len(rows))
        ]

    return prepare


class Examples(torch.utils.data.IterableDataset):
    """This rank's training examples for one epoch, read from its `parts` (one, or one per dataloader worker). Set by
    the loader before each iteration: `epoch`; `starts`, each part's raw rows of that epoch's stream to skip when
    resuming; `first_part`, the part that dataloader worker 0 reads (worker k reads part first_part + k, modulo). The
    rows skipped are read and shuffled as before, so the ones after them come in the same order as in the
    uninterrupted run, but not prepared: a resume replays reading, not tokenizing. Each example carries its part's
    number (PART) and its position in that part (POSITION).

    The rows are iterated with datasets' `.iter()`, which never splits a stream between dataloader workers (its
    `__iter__` does, in a worker: `_iter_pytorch`): each worker reads exactly the part given here."""

    def __init__(self, rows: datasets.IterableDataset | list[Part], prepare):
        self.parts = rows if isinstance(rows, list) else [Part(rows)]
        self.prepare = prepare
        self.epoch, self.starts, self.first_part = 0, [0] * len(self.parts), 0
        self.sample_column = None  # batches.SampleIdLog's column, given each row's id when the log is on

    def tag_samples(self, column: str) -> Examples:
        self.sample_column = column
        return self

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        number = (self.first_part + (worker.id if worker else 0)) % len(self.parts)
        part, start = self.parts[number], self.starts[number]
        part.rows.set_epoch(self.epoch)
        read = 0
        for chunk in part.rows.iter(batch_size=CHUNK_ROWS):
            first, size = read, len(chunk[ROW_ID])
            read += size
            # This part's rows of the chunk (index = offset modulo every) at or after `start`, as offsets in it.
            begin = max(start, first)
            begin += (part.offset - begin) % part.every
            kept = range(begin - first, size, part.every)
            if not kept:
                continue
            if len(kept) < size:
                chunk = {column: [values[i] for i in kept] for column, values in chunk.items()}
            for offset, example in self.prepare(chunk):
                example[POSITION] = first + kept[offset] + 1
                example[PART] = number
                if self.sample_column:
                    example[self.sample_column] = chunk[ROW_ID][offset]
                yield example


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A dataloader worker's start: SIGINT and SIGUSR1 (a terminal's Ctrl-C, SLURM's warning: both sent to every
    process of the job) are ignored, so the training process finishes its step and saves while its workers still
    serve it. SIGTERM keeps its default, ending the worker: it is how multiprocessing ends a worker that is left at
    exit (a worker that ignored it would hang the exit), and the forked worker would otherwise keep the training
    process's handler (preemption.StopRequest)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class StreamLoader:
    """This rank's training batches, a step at a time.

    A plain DataLoader cuts the Examples into full batches (drop_last); before each optimizer step the ranks agree,
    in one all-reduce, that every one of them has its `accumulation` batches. When one has not (its part of the stream
    ended first), the epoch ends there on every rank: no rank waits in a gradient all-reduce the others never join,
    and each step is the mean over full batches on every rank. What that leaves out each epoch: every rank's rows
    after the epoch's last full step (the README's "Streaming data larger than memory").

    With `workers` dataloader workers, worker k reads part k of the rank's stream (reader_parts) and cuts its own
    batches; the DataLoader takes them from the workers in turn (batch i from worker i mod workers: torch's
    `_try_put_index` cycles over the workers, from worker 0 at every iterator). When a worker's part has no full batch
    left, the DataLoader skips its turns and goes on with the others, an order no resume could rebuild: so the rank's
    data ends at the first batch that is not from the part whose turn it is (`_in_turn`), and the ranks' agreement
    ends the epoch there. The position is then each part's rows read and the part whose turn is next; a resume gives
    that part to worker 0 (Examples.first_part), the next to worker 1, and so on.

    Accelerate does not prepare this loader. Its prepare_data_loader would, for an IterableDataset, dispatch batches
    (rank 0 reads the whole stream and sends each rank its part) or shard it again (IterableDatasetShard: every rank
    reads everything, keeps its slice), where each rank here reads only its own part (for_rank); and its
    DataLoaderShard looks one batch ahead to flag the end of the data to GradientState, which would make
    `accumulate` step the optimizer early on a step's earlier micro-batches, which this loader holds before they
    train. Without a prepared loader GradientState never sees an end of data, and `accumulate` syncs every
    `accumulation` micro-batches, which full steps keep aligned. Batches go to the device here (send_to_device).
    """

    def __init__(self, examples: Examples, collate, batch_size: int, accumulation: int, accelerator, workers: int = 0):
        from torch.utils.data import DataLoader

        self.examples, self.batch_size, self.accumulation = examples, batch_size, accumulation
        self.parts = len(examples.parts)
        # Its own generator, as batches.make_dataloaders' loaders have: without one, each `iter()` draws a seed from
        # the global RNG, which a resume restores, so the resumed run's dropout masks would shift by that draw.
        # (The workers' seeds come from it too; what a worker draws stays in the worker.)
        generator = torch.Generator().manual_seed(0)
        self.loader = DataLoader(
            examples,
            batch_size=batch_size,
            collate_fn=collate,
            drop_last=True,
            generator=generator,
            num_workers=workers,
            worker_init_fn=_leave_stop_signals_to_the_trainer if workers else None,
        )
        self.device, self.processes = accelerator.device, accelerator.num_processes
        self.epoch, self.rows, self.next_part, self.ended = 0, [0] * self.parts, 0, False
        self._resume_at = None  # this rank's position() from a checkpoint, for the first epoch that is its epoch
        from tuneloop.runtime import CpuVote

        self._vote = CpuVote(self.processes, self.device)  # collective: every rank builds its loader in set-up

    def set_epoch(self, epoch: int) -> None:
        saved = self._resume_at if self._resume_at and self._resume_at["stream_epoch"] == epoch else None
        self._resume_at = None
        self.rows = saved_rows(saved) if saved else [0] * self.parts
        self.next_part = saved.get("stream_next_part", 0) if saved else 0
        self.epoch, self.ended = epoch, False
        self.examples.epoch, self.examples.starts, self.examples.first_part = epoch, list(self.rows), self.next_part

    def position(self) -> dict:
        """This rank's place in the stream, for its checkpoint: the epoch and the raw rows of its part of that epoch's
        stream that the steps so far have read; with several readers (workers) each part's, and the part whose turn
        is next."""
        # Not datasets' own IterableDataset.state_dict: with a shuffle buffer it records the shards' positions but not
        # the buffer's rows, which BufferShuffledExamplesIterable.load_state_dict refills from the shards ("The shuffle
        # buffer will be refilled before starting to yield new examples"), so the rows after a resume differ from the
        # uninterrupted run's. Nor `.skip(n)`: it fixes the shards' order (DataSourcesShufflingDisallowed), which the
        # later epochs would then not reshuffle. Rebuilding the epoch's stream and skipping its first rows is exact by
        # construction (Examples).
        if self.parts == 1:
            return {"stream_epoch": self.epoch, "stream_rows": self.rows[0]}
        return {"stream_epoch": self.epoch, "stream_rows": list(self.rows), "stream_next_part": self.next_part}

    def resume_at(self, saved: dict) -> None:
        """Continue from a checkpoint's `position()` (this rank's): its epoch's stream starts after those rows. Its
        count of parts is this loader's (check_resume_workers refused another before anything loaded)."""
        if "stream_rows" in saved:
            self._resume_at = saved

    def __iter__(self):
        import itertools

        from accelerate.utils import send_to_device

        resumed_at, steps = any(self.rows), 0
        batches = self._in_turn(iter(self.loader))
        while True:
            step = list(itertools.islice(batches, self.accumulation))
            if not self._all_ranks(len(step) == self.accumulation):
                break
            steps += 1
            for batch in step:
                part = int(batch.pop(PART)[0])
                self.rows[part] = int(batch.pop(POSITION)[-1])
                self.next_part = (part + 1) % self.parts
                yield send_to_device(batch, self.device)
        self.ended = True
        if not steps and not resumed_at:
            raise UserError(
                f"a process's part of the training stream holds fewer rows than one optimizer step takes "
                f"({self.accumulation} batch(es) of {self.batch_size}"
                + (f", each cut from one worker's part of {self.parts}" if self.parts > 1 else "")
                + "): lower --per_device_train_batch_size or --gradient_accumulation_steps, or stream more rows"
            )

    def _in_turn(self, batches):
        """The loader's batches while each comes from the part whose turn it is (from `next_part` on, each part in
        turn): a batch from another part means a worker's part ended, and the DataLoader skipped its turn."""
        expected = self.next_part
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UserError as e:  # a bad row or an unknown label, met in a worker
                raise _from_worker(e) from None
            if int(batch[PART][0]) != expected:
                return
            yield batch
            expected = (expected + 1) % self.parts

    def _all_ranks(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank: the same answer on each."""
        return bool(self._vote.reduce(int(ok), "MIN"))


def _from_worker(error: UserError) -> UserError:
    """A UserError raised in a dataloader worker, as its one line. torch re-raises it in the training process with
    the worker's traceback as its message ("Caught UserError in DataLoader worker process 0.\\nOriginal Traceback
    ...\\ntuneloop.errors.UserError: <the line>", torch's ExceptionWrapper.reraise); raised here, it is the line."""
    text = str(error)
    if not (text.startswith("Caught ") and " in DataLoader worker process " in text.split("\n", 1)[0]):
        return error
    last = text.rstrip().rsplit("\n", 1)[-1]
    return type(error)(last.split(": ", 1)[1] if ": " in last else last)


def saved_rows(saved: dict) -> list[int]:
    """A checkpoint's rows read, one count per part: `stream_rows` is a count with one reader, a list with several."""
    rows = saved["stream_rows"]
    return [int(count) for count in rows] if isinstance(rows, list) else [int(rows)]


def check_resume_workers(path: str, workers: int) -> None:
    """Refuse, before anything loads, to resume a training stream with another number of readers than its checkpoint
    was written with: each worker's part of the stream, and where each stopped, are that count's (reader_parts).
    No worker and one worker read the same single part, in the same order."""
    import json
    import os

    from tuneloop.checkpoint import RANK_STATE_FILE

    try:
        with open(os.path.join(path, RANK_STATE_FILE.format(rank=0))) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # (no position to continue from: the loader starts the epoch, as before)
    if "stream_rows" not in saved:
        return
    parts = len(saved_rows(saved))
    if parts != max(workers, 1):
        written = f"{parts} dataloader workers" if parts > 1 else "no dataloader worker (or one)"
        counts = f"--dataloader_num_workers {parts}" if parts > 1 else "--dataloader_num_workers 0 (or 1)"
        raise UserError(
            f"checkpoint {path} was written with {written} reading each process's part of the training stream, each "
            f"stopped at its own place, which --dataloader_num_workers {workers} cannot continue exactly: resume "
            f"with {counts} (or start a new --output_dir)"
        )


def position(loader) -> dict:
    """A training loader's position for this rank's checkpoint: a stream's (StreamLoader.position); nothing for a
    loaded split, whose position is the state's batches_in_epoch."""
    return loader.position() if isinstance(loader, StreamLoader) else {}


def stream_problems(d: DataArguments, t: TrainArguments) -> list[str]:
    """What --streaming cannot work with, each with its fix; nothing when it is off."""
    from tuneloop.options import BUILTIN_DATASET, BUILTIN_HEADLINES

    if not d.streaming:
        given = [name for name in ("train_rows", "count_rows") if getattr(d, name)]
        return [f"{' and '.join(given)} size(s) a training stream: add --streaming, or drop it"] if given else []
    problems = []

    def need(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    need(d.shuffle_buffer_size >= 1, f"shuffle_buffer_size must be >= 1 (got {d.shuffle_buffer_size})")
    need(d.train_rows is None or d.train_rows >= 1, f"train_rows must be >= 1 (got {d.train_rows})")
    if not t.do_train:  # (evaluation and predictions of a streamed set are predict.py's)
        return problems
    need(
        d.train_file is not None or d.dataset_name not in (BUILTIN_DATASET, BUILTIN_HEADLINES),
        f"streaming reads data files, and {d.dataset_name} is built in and loaded in memory: drop --streaming, "
        "or pass --train_file",
    )
    need(
        d.train_file is not None or d.dataset_name is None or not sources.is_saved_dataset(d.dataset_name),
        f"dataset folder {d.dataset_name!r} was written by save_to_disk, which streaming does not read: drop "
        "--streaming, or write it as data files (Dataset.to_parquet) and pass them as --train_file",
    )
    need(
        t.max_steps > 0 or d.train_rows is not None or d.count_rows,
        "streaming training needs the schedule's length: pass --max_steps N, or --train_rows N (the stream's row "
        "count), or --count_rows (one pass over the stream before training)",
    )
    need(
        not t.max_tokens_per_batch,
        "max_tokens_per_batch cuts batches from every text's length, known only for loaded data: drop --streaming "
        "or --max_tokens_per_batch",
    )
    need(
        d.train_sampling_strategy != "group_by_length",
        "train_sampling_strategy group_by_length sorts the whole training set by length, which a stream does not "
        "hold: drop --streaming or use --train_sampling_strategy random",
    )
    need(
        d.max_train_samples is None,
        "max_train_samples draws a random subset of the whole training set, which a stream does not hold: use "
        "--max_steps to train on fewer rows",
    )
    need(
        not t.do_eval or bool(d.validation_file or d.validation_split),
        "streaming cannot hold out --validation_split_percentage of a stream it does not hold: pass "
        "--validation_file (or --validation_split), or --do_eval false",
    )
    need(
        t.class_weights != "auto",
        "class_weights auto counts every training label, which a stream does not hold: give the weights "
        "(--class_weights w1,w2,...)",
    )
    return problems
