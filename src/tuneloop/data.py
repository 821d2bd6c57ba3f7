"""Data: the train, eval and test splits from a source, their columns checked and labels encoded, tokenized once.

Reading the source is sources.py's (files, dataset folders, the Hub, the built-in corpus), and batching the tokenized
splits batches.py's. Whatever the source, every problem a user can fix (missing column, label out of range, empty
split) is raised as a one-line `UserError` before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from tuneloop import problem
from tuneloop.errors import UserError
from tuneloop.options import DataArguments
from tuneloop.sources import bad_rows, eval_sources, load_files, load_source, row_name

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
    problem_type: str = problem.DEFAULT.problem_type
    problem_reason: str = ""  # why this problem type: printed at start


def load_splits(
    d: DataArguments,
    seed: int,
    num_labels: int | None,
    need_train: bool,
    model_classes: list[str] | None = None,
    model_problem_type: str | None = None,
) -> Splits:
    """Train and eval splits with labels as ids. `model_classes`: the classes of an already fine-tuned model being
    evaluated, which the data's labels must be encoded against (its own sorted names could differ, e.g. a subset);
    `model_problem_type` its saved problem type, which --problem_type alone overrides."""
    raw = load_source(d, text_column_names(d))
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
        train = bad_rows(train, "train", sources.get("train"), required, d.drop_bad_rows, notes)
    evals = {
        name: bad_rows(split, shown[name], sources.get(name), required, d.drop_bad_rows, notes)
        for name, split in evals.items()
    }
    reference = train if train is not None else next(iter(evals.values()))

    kind, reason = problem.decide(
        d.problem_type,
        model_problem_type,
        reference.features[d.label_column],
        lambda: reference.unique(d.label_column),
        d.label_separator,
    )
    path = sources.get("train" if train is not None else next(iter(evals)))
    label_names = model_classes or kind.label_names(
        reference,
        _label_source(evals, d.label_column),
        d.label_column,
        num_labels,
        d.label_separator,
        path,
        lambda i: row_name(i, path),
    )
    encode = dict(column=d.label_column, names=label_names, separator=d.label_separator)
    train = kind.encode(train, split_name="train", **encode) if train is not None else None
    evals = {name: kind.encode(split, split_name=shown[name], **encode) for name, split in evals.items()}
    if not evals:
        train, evals["validation"] = _hold_out(train, d.label_column, d.validation_split_percentage, seed)

    # The tutorial's subsetting: shuffle with the seed, keep the first N.
    if d.max_train_samples is not None and train is not None:
        train = train.shuffle(seed=seed).select(range(min(d.max_train_samples, len(train))))
    if d.max_eval_samples is not None:
        evals = {
            name: split.shuffle(seed=seed).select(range(min(d.max_eval_samples, len(split))))
            for name, split in evals.items()
        }
    overlap = _texts_in_train(train, evals, text_column, text_pair_column) if train is not None else {}
    for name, count in overlap.items():
        if count:
            notes.append(
                f"warning: {count} of {len(evals[name])} texts of the {shown.get(name, 'eval')} set also appear in the "
                "training data: its scores overstate how the model does on new texts; deduplicate the files"
            )
    return Splits(
        train,
        next(iter(evals.values())),
        text_column,
        text_pair_column,
        d.label_column,
        label_names,
        eval_sets=evals,
        notes=notes,
        texts_in_train=overlap,
        problem_type=kind.problem_type,
        problem_reason=reason,
    )


def _label_source(evals: dict[str, Dataset], column: str) -> Dataset | None:
    """One dataset holding the labels of every eval set (the class names must cover them all)."""
    if len(evals) <= 1:
        return next(iter(evals.values()), None)
    try:
        return datasets.concatenate_datasets([split.select_columns([column]) for split in evals.values()])
    except ValueError:  # label types differ between the sets: encoding each against the names will say which
        return next(iter(evals.values()))


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


def load_test_split(
    d: DataArguments, label_names: list[str] | None, problem_type: str = problem.DEFAULT.problem_type
) -> Splits:
    """The split `--do_predict` and `tuneloop predict` run on: `--test_file`, else `--test_split` of the dataset.

    Labels are optional. When the label column is there (and not all -1, GLUE's mark for "hidden"), its values must be
    classes of the model, `label_names`, and they are encoded to the model's ids so that test metrics can be computed.
    With `label_names` None (before training has decided the classes) only the source and the columns are checked.
    """
    if d.test_file:
        test = load_files({"test": d.test_file}, d, text_column_names(d))["test"]
    else:
        raw = load_source(d, text_column_names(d))
        if d.test_split not in raw:
            raise UserError(
                f"split {d.test_split!r} not found (available: {', '.join(raw.keys()) or 'none'}): fix "
                "--test_split, or pass --test_file"
            )
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
        test = problem.of(problem_type).encode(test, label_column, label_names, "test", d.label_separator)
    return Splits(
        None,
        None,
        text_column,
        text_pair_column,
        label_column,
        label_names,
        test=test,
        id_column=id_column,
        problem_type=problem_type,
    )


# The text columns _text_columns finds without --text_column (run_classification.py's and GLUE's names).
GUESSED_TEXT_COLUMNS = ("text", "sentence1", "sentence2", "sentence")


def text_column_names(d: DataArguments) -> list[str]:
    """Every column name that may hold text, which sources.load_files reads from CSV as strings: the options' (a
    comma-joined --text_column and its parts), else the names _text_columns looks for."""
    given = [d.text_column, *(d.text_column or "").split(","), d.text_pair_column]
    return (
        [name for name in given if name]
        if d.text_column
        else [*GUESSED_TEXT_COLUMNS, *filter(None, [d.text_pair_column])]
    )


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
    return split.map(
        lambda batch: {
            d.text_column: [
                None if None in texts else d.text_column_delimiter.join(texts)
                for texts in zip(*(batch[part] for part in parts))
            ]
        },
        batched=True,
        desc="Joining text columns",
    )


def _check_columns(split: Dataset, name: str, wanted: list[str | None]) -> None:
    for column in filter(None, wanted):
        if column not in split.column_names:
            option = "--label_column" if column == wanted[-1] else "--text_column/--text_pair_column"
            raise UserError(f"column {column!r} not in the {name} split (columns: {split.column_names}): fix {option}")
    for column in filter(None, wanted[:-1]):
        dtype = getattr(split.features[column], "dtype", None)
        if dtype not in ("string", "large_string") and split.with_format("arrow")[column].null_count == len(split):
            # A CSV column with no value in any row is read as numbers (or null), not text.
            raise UserError(
                f"text column {column!r} is empty in every row of the {name} split: fill it, or pick the "
                "text column with --text_column/--text_pair_column"
            )
        if dtype not in ("string", "large_string"):
            raise UserError(
                f"text column {column!r} holds {dtype or split.features[column]}, not text: pick a text column"
            )


def _hold_out(train: Dataset, column: str, percentage: int, seed: int) -> tuple[Dataset, Dataset]:
    held_out = -(-len(train) * percentage // 100)  # datasets rounds the eval share up
    if held_out >= len(train):
        raise UserError(
            f"the train split has {len(train)} row(s): holding out {percentage}% for evaluation leaves "
            "none to train on: lower --validation_split_percentage, or pass --validation_file"
        )
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
