"""Data files as users bring them (issue 17, items 3-4): several eval sets, compressed and tab-separated files, a CSV
that is not UTF-8, rows with an empty text or a missing label, texts shared by train and eval."""

import bz2
import gzip
import lzma

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tuneloop.config import DataArguments, parse_args
from tuneloop.data import load_splits
from tuneloop.errors import UserError

from conftest import make_rows, read_json, run_in_process, tiny_args, write_rows


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
    files = {"in_domain": write_rows(tmp_path / "in_domain.csv", sets["in_domain"]),
             "out_of_domain": write_rows(tmp_path / "out.jsonl", sets["out_of_domain"])}
    output_dir = tmp_path / "run"
    results = run_in_process(tiny_args(
        tiny_model_dir, {"train_file": toy_files["train_file"]}, output_dir, max_steps=30, eval_strategy="steps",
        eval_steps=10, validation_file=[f"{name}={path}" for name, path in files.items()],
        metric_for_best_model="eval_out_of_domain_accuracy"))
    assert "eval_accuracy" not in results
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    for name, rows in sets.items():
        with torch.no_grad():
            logits = model(**tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True,
                                       return_tensors="pt")).logits
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
    with pytest.raises(UserError, match=r"metric_for_best_model 'eval_elsewhere_accuracy' is not computed.*"
                                        r"eval_<set>_<metric>.*\['in_domain', 'out_of_domain'\]"):
        parse_args(["--train_file", toy_files["train_file"], "--validation_file",
                    *(f"{name}={path}" for name, path in files.items()), "--metric_for_best_model",
                    "eval_elsewhere_accuracy"])


def test_compressed_and_tab_separated_files_read_like_plain_ones(tmp_path):
    """.csv.gz, .jsonl.xz, .tsv.bz2 and a ;-separated .csv give the rows of the plain files, in order. Guards a
    compressed file read as raw bytes (or refused by extension) and a delimiter that is not passed on."""
    train, valid = make_rows(30, seed=0), make_rows(12, seed=1)
    plain = splits_of(train_file=write_rows(tmp_path / "train.csv", train),
                      validation_file=write_rows(tmp_path / "valid.csv", valid))
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
    loaded = splits_of(train_file=str(tmp_path / "semicolons.csv"), validation_file=str(tmp_path / "valid.jsonl.xz"),
                       csv_delimiter=";")
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
    with pytest.raises(UserError, match=r"train.csv' has 3 row\(s\) with an empty text \(text\) or missing label "
                                        r"\(label\), the first at row 7 \(1-based, not counting the header line\).*"
                                        r"--drop_bad_rows"):
        splits_of(train_file=path)
    loaded = splits_of(train_file=path, drop_bad_rows=True, validation_split_percentage=25)
    assert len(loaded.train) + len(loaded.eval) == 17
    assert any("dropped 3 of 20 rows" in note and "first was row 7" in note for note in loaded.notes)
    kept = set(loaded.train["text"]) | set(loaded.eval["text"])
    assert kept == {r["text"] for i, r in enumerate(rows) if i not in (6, 11, 15)}


def pair_rows(n: int, seed: int) -> list[dict]:
    """Sentence pairs of the toy task: the premise is a toy text, the hypothesis the same words in reverse order."""
    return [{"premise": r["text"], "hypothesis": " ".join(reversed(r["text"].split())), "label": r["label"]}
            for r in make_rows(n, seed=seed)]


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
    files = {suffix: write_rows(tmp_path / f"train{suffix}", train) for suffix in (".csv", ".jsonl", ".json", ".parquet")}
    files[".tsv"] = str(tmp_path / "train.tsv")
    (tmp_path / "train.tsv").write_text((tmp_path / "train.csv").read_text().replace(",", "\t"))
    files["large.parquet"] = write_large_string_parquet(tmp_path / "large.parquet", train)
    evals = {"csv": write_rows(tmp_path / "valid.csv", valid), "jsonl": write_rows(tmp_path / "valid.jsonl", valid)}
    for kind, train_file in files.items():
        for eval_kind, eval_file in evals.items():
            loaded = splits_of(train_file=train_file, validation_file=eval_file, text_column="premise",
                               text_pair_column="hypothesis")
            assert (loaded.text_column, loaded.text_pair_column) == ("premise", "hypothesis")
            got = [(p, h, loaded.label_names[y]) for p, h, y in
                   zip(loaded.train["premise"], loaded.train["hypothesis"], loaded.train["label"])]
            assert got == [(r["premise"], r["hypothesis"], r["label"]) for r in train], (kind, eval_kind)
            assert len(loaded.eval) == 12 and loaded.texts_in_train == {"validation": 3}, (kind, eval_kind)


@pytest.mark.trains
def test_a_sentence_pair_task_trains_from_a_csv(tiny_model_dir, tmp_path):
    """`--train_file pairs.csv --text_column premise --text_pair_column hypothesis`, as a GLUE-style user runs it:
    trains, evaluates every pair and counts the pairs shared with training. Guards the start-up crash of issue 24
    item 1 (ArrowNotImplementedError from the overlap count on the CSV's `large_string` columns)."""
    train, valid = pair_rows(48, seed=0), pair_rows(10, seed=1)
    valid[0] = train[0]
    files = {"train_file": write_rows(tmp_path / "train.csv", train),
             "validation_file": write_rows(tmp_path / "valid.csv", valid)}
    results = run_in_process(tiny_args(tiny_model_dir, files, tmp_path / "run", max_steps=4, num_train_epochs=1,
                                       text_column="premise", text_pair_column="hypothesis"))
    assert results["eval_samples"] == 10 and results["texts_in_train_and_eval"] == {"validation": 1}
