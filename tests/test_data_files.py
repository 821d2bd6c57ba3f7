"""Data files as users bring them (issue 17, items 3-4): several eval sets, compressed and tab-separated files, a CSV
that is not UTF-8, rows with an empty text or a missing label, texts shared by train and eval."""

import bz2
import gzip
import lzma

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import make_rows, read_json, run_in_process, tiny_args, write_rows
from tuneloop.config import parse_args
from tuneloop.data import load_splits
from tuneloop.errors import UserError
from tuneloop.options import DataArguments


def splits_of(**options):
    return load_splits(DataArguments(**options), seed=0, num_labels=None, need_train=True)


def rows_of(split, names):
    return [(text, names[label]) for text, label in zip(split["text"], split["label"])]


@pytest.mark.trains
def test_several_eval_sets_are_scored_apart(tiny_model_dir, toy_files, tmp_path):
    """Two eval sets, in two formats: each scored on its own examples under eval_<name>_<metric> (equal to a hand
    computation with the saved model), the best model picked on the one --metric_for_best_model names, training
    texts found in an eval set counted and reported. Guards sets merged into one score, the wrong set picking the best
    model, and a leak going unreported. The out-of-domain set is in-domain texts with every label moved to the next
    class, so the two sets score differently."""
    in_domain = make_rows(45, seed=2)
    names = sorted({r["label"] for r in in_domain})
    shifted = [{"text": r["text"], "label": names[(names.index(r["label"]) + 1) % 3]} for r in in_domain[:30]]
    train_rows = make_rows(240, seed=1)
    sets = {"in_domain": in_domain[:40] + train_rows[:5], "out_of_domain": shifted}  # 5 training texts in in_domain
    files = {
        "in_domain": write_rows(tmp_path / "in_domain.csv", sets["in_domain"]),
        "out_of_domain": write_rows(tmp_path / "out.jsonl", sets["out_of_domain"]),
    }
    output_dir = tmp_path / "run"
    results = run_in_process(
        tiny_args(
            tiny_model_dir,
            {"train_file": toy_files["train_file"]},
            output_dir,
            max_steps=30,
            eval_strategy="steps",
            eval_steps=10,
            validation_file=[f"{name}={path}" for name, path in files.items()],
            metric_for_best_model="eval_out_of_domain_accuracy",
        )
    )
    assert "eval_accuracy" not in results
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    for name, rows in sets.items():
        with torch.no_grad():
            logits = model(
                **tokenizer(
                    [r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt"
                )
            ).logits
        predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
        accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
        assert results[f"eval_{name}_samples"] == len(rows)
        assert results[f"eval_{name}_accuracy"] == pytest.approx(accuracy)
    assert results["eval_in_domain_accuracy"] != results["eval_out_of_domain_accuracy"]
    history = read_json(output_dir / "log_history.json")
    out_scores = [h["eval_out_of_domain_accuracy"] for h in history if "eval_out_of_domain_accuracy" in h]
    assert len(out_scores) == 3 and results["best_eval_out_of_domain_accuracy"] == max(out_scores)
    assert results["texts_in_train_and_eval"] == {"in_domain": 5, "out_of_domain": 0}
    card = (output_dir / "report" / "README.md").read_text()
    assert "| eval_in_domain_accuracy |" in card and "| eval_out_of_domain_f1 |" in card
    assert "5 texts of the in_domain set also appear in the training data" in card
    with pytest.raises(
        UserError,
        match=r"metric_for_best_model 'eval_elsewhere_accuracy' is not computed.*"
        r"eval_<set>_<metric>.*\['in_domain', 'out_of_domain'\]",
    ):
        parse_args(
            [
                "--train_file",
                toy_files["train_file"],
                "--validation_file",
                *(f"{name}={path}" for name, path in files.items()),
                "--metric_for_best_model",
                "eval_elsewhere_accuracy",
            ]
        )


def test_compressed_and_tab_separated_files_read_like_plain_ones(tmp_path):
    """.csv.gz, .jsonl.xz, .tsv.bz2 and a ;-separated .csv give the rows of the plain files, in order. Guards a
    compressed file read as raw bytes (or refused by extension) and a delimiter that is not passed on."""
    train, valid = make_rows(30, seed=0), make_rows(12, seed=1)
    plain = splits_of(
        train_file=write_rows(tmp_path / "train.csv", train), validation_file=write_rows(tmp_path / "valid.csv", valid)
    )
    csv_text = (tmp_path / "train.csv").read_text()
    with gzip.open(tmp_path / "train.csv.gz", "wt") as f:
        f.write(csv_text)
    with lzma.open(tmp_path / "valid.jsonl.xz", "wt") as f:
        f.write(open(write_rows(tmp_path / "valid.jsonl", valid)).read())
    with bz2.open(tmp_path / "train.tsv.bz2", "wt") as f:
        f.write(csv_text.replace(",", "\t"))
    (tmp_path / "semicolons.csv").write_text(csv_text.replace(",", ";"))
    for train_file in ("train.csv.gz", "train.tsv.bz2"):
        loaded = splits_of(train_file=str(tmp_path / train_file), validation_file=str(tmp_path / "valid.jsonl.xz"))
        assert rows_of(loaded.train, loaded.label_names) == rows_of(plain.train, plain.label_names)
        assert rows_of(loaded.eval, loaded.label_names) == rows_of(plain.eval, plain.label_names)
    loaded = splits_of(
        train_file=str(tmp_path / "semicolons.csv"), validation_file=str(tmp_path / "valid.jsonl.xz"), csv_delimiter=";"
    )
    assert rows_of(loaded.train, loaded.label_names) == rows_of(plain.train, plain.label_names)
    with pytest.raises(UserError, match=r"train_file '.*train.parquet.gz' must end in one of .*parquet files compress"):
        parse_args(["--train_file", str(tmp_path / "train.parquet.gz")])


def test_a_csv_that_is_not_utf8_names_the_file_the_offset_and_the_fix(tmp_path):
    """A latin-1 CSV whose first non-UTF-8 byte lies far past the CSV reader's first chunk: one line with the file,
    the byte's offset in the file (not in a chunk), the line, and --file_encoding latin-1, which then reads it. Guards
    the old message that blamed the Hub and network, and an offset counted within a chunk."""
    rows = make_rows(6000, seed=0)
    rows[4321]["text"] = "caf\u00e9 " + rows[4321]["text"]  # é: one byte 0xe9 in latin-1, invalid alone in UTF-8
    path = tmp_path / "tweets.csv"
    write_rows(tmp_path / "utf8.csv", rows)
    path.write_bytes((tmp_path / "utf8.csv").read_text().encode("latin-1"))
    offset = path.read_bytes().index(b"\xe9")
    assert offset > 150_000  # beyond the CSV reader's first chunk
    with pytest.raises(UserError) as info:
        splits_of(train_file=str(path))
    message = str(info.value)
    assert "\n" not in message and "Hub" not in message and "network" not in message
    assert f"{str(path)!r} is not utf-8: byte 0xe9 at offset {offset} (line 4323)" in message
    assert "--file_encoding latin-1" in message
    loaded = splits_of(train_file=str(path), file_encoding="latin-1", validation_split_percentage=10)
    texts = set(loaded.train["text"]) | set(loaded.eval["text"])
    assert rows[4321]["text"] in texts and len(texts) == len({r["text"] for r in rows})


def test_rows_with_an_empty_text_or_a_missing_label_are_refused_or_dropped(tmp_path):
    """Refused by default with the count and the first bad row as the file counts it; dropped with --drop_bad_rows,
    and said. Guards bad rows reaching the tokenizer (a traceback) or being dropped silently."""
    rows = make_rows(20, seed=0)
    rows[6]["text"] = ""  # file row 7
    rows[11]["label"] = ""  # file row 12
    rows[15]["text"] = "   "  # whitespace only: no text either
    path = write_rows(tmp_path / "train.csv", rows)
    with pytest.raises(
        UserError,
        match=r"train.csv' has 3 row\(s\) with an empty text \(text\) or missing label "
        r"\(label\), the first at row 7 \(1-based, not counting the header line\).*"
        r"--drop_bad_rows",
    ):
        splits_of(train_file=path)
    loaded = splits_of(train_file=path, drop_bad_rows=True, validation_split_percentage=25)
    assert len(loaded.train) + len(loaded.eval) == 17
    assert any("dropped 3 of 20 rows" in note and "first was row 7" in note for note in loaded.notes)
    kept = set(loaded.train["text"]) | set(loaded.eval["text"])
    assert kept == {r["text"] for i, r in enumerate(rows) if i not in (6, 11, 15)}


def pair_rows(n: int, seed: int) -> list[dict]:
    """Sentence pairs of the toy task: the premise is a toy text, the hypothesis the same words in reverse order."""
    return [
        {"premise": r["text"], "hypothesis": " ".join(reversed(r["text"].split())), "label": r["label"]}
        for r in make_rows(n, seed=seed)
    ]


def write_large_string_parquet(path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.large_string()) for name in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
    return str(path)


def test_sentence_pairs_load_from_every_file_format(tmp_path):
    """Pairs from CSV, TSV, JSONL, JSON and Parquet (`string` and `large_string` columns), the eval set in another
    format than the training file: the rows arrive as written, and the train/eval overlap counts exactly the pairs
    that are in both (not pairs sharing only one side). Guards the crash of issue 24 item 1: Arrow's
    binary_join_element_wise had no kernel for the `large_string` columns datasets reads from a CSV."""
    train, valid = pair_rows(30, seed=0), pair_rows(12, seed=1)
    valid[:3] = train[:3]  # 3 pairs also in training
    valid[3] = dict(valid[3], premise=train[5]["premise"])  # one side only: not the same pair
    files = {
        suffix: write_rows(tmp_path / f"train{suffix}", train) for suffix in (".csv", ".jsonl", ".json", ".parquet")
    }
    files[".tsv"] = str(tmp_path / "train.tsv")
    (tmp_path / "train.tsv").write_text((tmp_path / "train.csv").read_text().replace(",", "\t"))
    files["large.parquet"] = write_large_string_parquet(tmp_path / "large.parquet", train)
    evals = {"csv": write_rows(tmp_path / "valid.csv", valid), "jsonl": write_rows(tmp_path / "valid.jsonl", valid)}
    for kind, train_file in files.items():
        for eval_kind, eval_file in evals.items():
            loaded = splits_of(
                train_file=train_file, validation_file=eval_file, text_column="premise", text_pair_column="hypothesis"
            )
            assert (loaded.text_column, loaded.text_pair_column) == ("premise", "hypothesis")
            got = [
                (p, h, loaded.label_names[y])
                for p, h, y in zip(loaded.train["premise"], loaded.train["hypothesis"], loaded.train["label"])
            ]
            assert got == [(r["premise"], r["hypothesis"], r["label"]) for r in train], (kind, eval_kind)
            assert len(loaded.eval) == 12 and loaded.texts_in_train == {"validation": 3}, (kind, eval_kind)


@pytest.mark.trains
def test_a_sentence_pair_task_trains_from_a_csv(tiny_model_dir, tmp_path):
    """`--train_file pairs.csv --text_column premise --text_pair_column hypothesis`, as a GLUE-style user runs it:
    trains, evaluates every pair and counts the pairs shared with training. Guards the start-up crash of issue 24
    item 1 (ArrowNotImplementedError from the overlap count on the CSV's `large_string` columns)."""
    train, valid = pair_rows(48, seed=0), pair_rows(10, seed=1)
    valid[0] = train[0]
    files = {
        "train_file": write_rows(tmp_path / "train.csv", train),
        "validation_file": write_rows(tmp_path / "valid.csv", valid),
    }
    results = run_in_process(
        tiny_args(
            tiny_model_dir,
            files,
            tmp_path / "run",
            max_steps=4,
            num_train_epochs=1,
            text_column="premise",
            text_pair_column="hypothesis",
        )
    )
    assert results["eval_samples"] == 10 and results["texts_in_train_and_eval"] == {"validation": 1}


def test_drop_bad_rows_that_empties_a_split_names_the_split_and_the_file(tmp_path):
    """--drop_bad_rows that leaves a split (train, the eval set, one of several, or a train split to hold eval out of)
    with no row stops in one line: the split, the file, how many rows and why, the fix. Guards issue 24 item 9: the
    empty split went on into training and ended in a library's ValueError traceback."""
    good = write_rows(tmp_path / "good.csv", make_rows(20, seed=0))
    blank = write_rows(tmp_path / "blank.csv", [dict(r, text=" ") for r in make_rows(20, seed=1)])
    no_labels = tmp_path / "no_labels.jsonl"
    no_labels.write_text("".join(f'{{"text": "{r["text"]}", "label": null}}\n' for r in make_rows(7, seed=2)))
    cases = [
        (dict(train_file=blank, validation_file=good), r"all 20 rows of the train split \('.*blank.csv'\)"),
        (dict(train_file=blank), r"all 20 rows of the train split \('.*blank.csv'\)"),
        (
            dict(train_file=good, validation_file=str(no_labels)),
            r"all 7 rows of the eval split \('.*no_labels.jsonl'\)",
        ),
        (
            dict(train_file=good, validation_file=[f"a={good}", f"b={blank}"]),
            r"all 20 rows of the b split \('.*blank.csv'\)",
        ),
    ]
    for options, where in cases:
        with pytest.raises(
            UserError,
            match=rf"--drop_bad_rows dropped {where}: every row has an empty text \(text\) "
            r"or missing label \(label\): check --text_column/--label_column",
        ) as info:
            splits_of(drop_bad_rows=True, **options)
        assert "\n" not in str(info.value)


def test_a_text_column_empty_in_every_row_says_so(tmp_path):
    """A CSV text column with no value in any row is read as numbers: the message says the column is empty, not that it
    "holds float64" (which sent the user looking for another column type)."""
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f",{label}\n" for label in ("a", "b") * 5))
    with pytest.raises(UserError, match=r"text column 'text' is empty in every row of the train split: fill it"):
        splits_of(train_file=str(path), drop_bad_rows=True)


def test_a_stray_label_id_is_refused_not_made_a_class(tmp_path):
    """One stray integer label among ids 0..2 (a typo, a sentinel) is refused naming the value, its row and file, and
    --num_labels; as is an id never used below the largest. Guards issue 24 item 9: the head got largest + 1 classes
    (10**9 allocated a billion class names), silently. --num_labels N accepts ids 0..N-1 with gaps."""
    rows = make_rows(30, seed=0, label_as="id")
    rows[7]["label"] = 100_000  # kept small enough that the old behaviour fails fast instead of eating the memory
    path = write_rows(tmp_path / "stray.csv", rows)
    with pytest.raises(
        UserError,
        match=r"label 100000 at row 8 \(1-based, not counting the header line\) of "
        r"'.*stray.csv' makes 100001 classes, but only 4 of the ids 0..100000 occur "
        r"\(the first missing is 3\): fix the data, or pass --num_labels 100001",
    ):
        splits_of(train_file=path)
    gap = write_rows(tmp_path / "gap.jsonl", [r for r in make_rows(30, seed=0, label_as="id") if r["label"] != 1])
    with pytest.raises(
        UserError,
        match=r"label 2 at row \d+ \(1-based\) of '.*gap.jsonl' makes 3 classes, but only 2"
        r" .*first missing is 1\)",
    ):
        splits_of(train_file=gap)
    declared = load_splits(DataArguments(train_file=gap), seed=0, num_labels=3, need_train=True)
    assert declared.label_names == ["0", "1", "2"]
    # An eval set may hold the id the training file lacks: together they use every id.
    rows = make_rows(30, seed=0, label_as="id")
    eval_only = write_rows(tmp_path / "eval_only.csv", [r for r in rows if r["label"] == 1][:2] + rows[:4])
    assert splits_of(train_file=gap, validation_file=eval_only).label_names == ["0", "1", "2"]


@pytest.mark.parametrize("name, header", [("dup.csv", "text,label,text"), ("dup.tsv.gz", "\ufefftext\ttext\tlabel")])
def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path, name, header):
    """Two columns of one name (also after a UTF-8 BOM, in a compressed TSV) stop in one line naming the column and the
    file. Guards issue 24 item 9: pandas renamed the second 'text.1', silently, and the run trained on one of them."""
    body = header + "\n" + "a b\tc d\tx\ne f\tg h\ty\n".replace("\t", "," if name.endswith(".csv") else "\t") * 4
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(body)
    else:
        path.write_text(body)
    with pytest.raises(UserError, match=rf"data file '.*{name}' names column 'text' 2 times in its header: rename"):
        splits_of(train_file=str(path))


def test_csv_cells_that_read_like_missing_values_or_booleans_stay_text(tmp_path):
    """Texts and label names such as "NA", "None", "null", "nan", "true" and "1" come back as written; only an empty
    cell is missing. Guards pandas' defaults, which read those cells as missing values (the rows were refused or, with
    --drop_bad_rows, dropped) and a text column of "true"/"1" as booleans or numbers ("holds bool, not text").
    Found by tests/test_data_properties.py."""
    train = [
        {"text": text, "label": label}
        for text, label in [
            ("NA", "None"),
            ("None", "NA"),
            ("null", "None"),
            ("nan", "NA"),
            ("true", "None"),
            ("1", "NA"),
        ]
    ]
    path = write_rows(tmp_path / "train.csv", train)
    valid = tmp_path / "valid.tsv"
    valid.write_text("text\tlabel\nfalse\tNA\n0.5\tNone\n")
    loaded = splits_of(train_file=path, validation_file=str(valid))
    assert loaded.label_names == ["NA", "None"]
    assert rows_of(loaded.train, loaded.label_names) == [(r["text"], r["label"]) for r in train]
    assert rows_of(loaded.eval, loaded.label_names) == [("false", "NA"), ("0.5", "None")]


def test_a_tsv_row_of_empty_cells_is_a_row_not_an_empty_file(tmp_path):
    """A TSV line of tab delimiters only is a row whose cells are empty (a tab is white space, and TSV's delimiter):
    it is a bad row (refused, or dropped with --drop_bad_rows), not "the file has no rows". Found by
    tests/test_data_properties.py."""
    train = write_rows(tmp_path / "train.csv", make_rows(12, seed=0))
    valid = tmp_path / "valid.tsv"
    valid.write_text("text\tlabel\n\t\n")
    with pytest.raises(UserError, match=r"text column 'text' is empty in every row of the eval split"):
        splits_of(train_file=train, validation_file=str(valid))
    valid.write_text("text\tlabel\n\t\nthe goal\tsports\n")
    with pytest.raises(UserError, match=r"valid.tsv' has 1 row\(s\) with an empty text .* the first at row 1 "):
        splits_of(train_file=train, validation_file=str(valid))
    dropped = splits_of(train_file=train, validation_file=str(valid), drop_bad_rows=True)
    assert list(dropped.eval["text"]) == ["the goal"]


def test_a_nan_label_is_a_missing_label(tmp_path):
    """Whole-number float labels with a NaN (how pandas writes an integer column with a gap into Parquet or JSON):
    the NaN row is a missing label, refused naming its row or dropped with --drop_bad_rows, not a class id. Guards
    int(NaN) raising a ValueError traceback while the classes are counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [0.0, 1.0, float("nan"), 2.0, 1.0, 0.0, 2.0, 1.0]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": [f"text {i}" for i in range(8)], "label": labels}), str(path))
    with pytest.raises(
        UserError,
        match=r"1 row\(s\) with an empty text \(text\) or missing label \(label\), the "
        r"first at row 3 \(1-based\)",
    ):
        splits_of(train_file=str(path), validation_split_percentage=25)
    loaded = splits_of(train_file=str(path), validation_split_percentage=25, drop_bad_rows=True)
    assert loaded.label_names == ["0", "1", "2"] and len(loaded.train) + len(loaded.eval) == 7


def test_a_held_out_share_that_leaves_no_training_row_is_refused(tmp_path):
    """--validation_split_percentage 90 of 3 rows would hold out all 3 (the share is rounded up): one line with the
    count and both fixes, not the ValueError datasets' train_test_split raises. Found by test_data_properties.py."""
    path = write_rows(tmp_path / "train.csv", make_rows(3, seed=0))
    with pytest.raises(
        UserError,
        match=r"the train split has 3 row\(s\): holding out 90% for evaluation leaves none "
        r"to train on: lower --validation_split_percentage, or pass --validation_file",
    ):
        splits_of(train_file=path, validation_split_percentage=90)
    loaded = splits_of(train_file=path, validation_split_percentage=60)
    assert (len(loaded.train), len(loaded.eval)) == (1, 2)
