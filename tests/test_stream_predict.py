"""Streamed evaluation and prediction (--streaming): `tuneloop evaluate --streaming` scores exactly the rows a loaded
evaluation scores, with the same results, on 1 and 2 processes; `tuneloop predict --streaming` writes one row per
input row, in input order, with its id, equal to the loaded set's predictions.

The model is the tiny BERT with a random 3-class head, saved untrained: the comparisons hold for any weights, and
per-row probabilities of random weights differ from row to row, so a row out of place shows. The eval file has 45
rows: one file is one shard, so on 2 processes each rank reads every other row (23 and 22), in batches of 8: the
ranks' last batches differ in size and rank 1 runs out first. The test set is a folder of 4 files of 13, 5, 20 and 7
rows: each rank reads whole files (the shard count divides by 2), rank 0 files 1 and 3 (33 rows), rank 1 files 2 and
4 (12 rows, used up long before rank 0's), and only a merge by row id puts the rows back in file order.
"""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import launch, make_rows, read_json, write_rows
from tuneloop.cli import console

CLASSES = ["music", "sports", "tech"]
COMMON = ["--max_length", "32", "--per_device_eval_batch_size", "8"]


@pytest.fixture(scope="module")
def classifier(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT with a 3-class head (seeded random weights), saved as a fine-tuned classifier is."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        tiny_model_dir,
        num_labels=3,
        id2label=dict(enumerate(CLASSES)),
        label2id={name: i for i, name in enumerate(CLASSES)},
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def test_shards(tmp_path_factory) -> dict:
    """A folder of 4 labelled JSONL files with ids (13, 5, 20 and 7 rows), and the same 45 rows in one file."""
    out = tmp_path_factory.mktemp("shards")
    rows = [{"id": f"r{i:03d}", **row} for i, row in enumerate(make_rows(45, seed=7))]
    for number, (start, end) in enumerate([(0, 13), (13, 18), (18, 38), (38, 45)]):
        write_rows(out / "folder" / f"part-{number}.jsonl", rows[start:end])
    return {"folder": str(out / "folder"), "whole": write_rows(out / "whole.jsonl", rows), "rows": rows}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.mark.multiprocess
def test_streamed_evaluation_equals_loaded_evaluation_on_1_and_2_processes(classifier, toy_files, tmp_path):
    """Guards a row dropped or scored twice when the ranks' row counts differ (the padding not dropped, the loop
    ending with the first rank to run out, a rank's rows sent twice), and a 2-process run that is two 1-process
    runs."""
    evaluate = ["evaluate", "--model", classifier, "--data", toy_files["validation_file"], *COMMON]
    assert console([*evaluate, "--output_dir", str(tmp_path / "loaded")]) == 0
    assert console([*evaluate, "--streaming", "--output_dir", str(tmp_path / "one")]) == 0
    launch([*evaluate, "--streaming", "--output_dir", str(tmp_path / "two")], module=True)
    loaded, one, two = (read_json(tmp_path / name / "all_results.json") for name in ("loaded", "one", "two"))
    assert (two["num_processes"], two["distributed_type"]) == (2, "MULTI_CPU")
    for streamed in (one, two):
        assert streamed["eval_samples"] == loaded["eval_samples"] == 45
        assert streamed["eval_accuracy"] == loaded["eval_accuracy"]
        assert streamed["eval_f1"] == loaded["eval_f1"]
        assert streamed["eval_loss"] == pytest.approx(loaded["eval_loss"], rel=1e-5)
    matrices = [
        read_json(tmp_path / name / "report" / "metrics.json")["confusion_matrix"]["counts"]
        for name in ("loaded", "one", "two")
    ]
    assert matrices[0] == matrices[1] == matrices[2] and np.sum(matrices[0]) == 45


@pytest.mark.multiprocess
def test_streamed_predictions_on_2_processes_are_the_loaded_ones_in_input_order(classifier, test_shards, tmp_path):
    """One row per input row, in the files' order, with its id and label, equal to the loaded set's predictions;
    test metrics of the same rows; no parts left behind. Guards the k-way merge (rank 0's file first, though both
    ranks wrote at once), rows of a rank lost when it runs out early, and the CSV writer fed one row at a time."""
    predict = ["predict", "--model", classifier, *COMMON]
    assert console([*predict, "--data", test_shards["whole"], "--output_dir", str(tmp_path / "loaded")]) == 0
    launch(
        [*predict, "--data", test_shards["folder"], "--streaming", "--output_dir", str(tmp_path / "two")], module=True
    )
    loaded, two = (
        read_jsonl(tmp_path / "loaded" / "predictions.jsonl"),
        read_jsonl(tmp_path / "two" / "predictions.jsonl"),
    )
    assert [row["index"] for row in two] == list(range(45))
    assert [(r["id"], r["text"], r["label"]) for r in two] == [
        (r["id"], r["text"], r["label"]) for r in test_shards["rows"]
    ]
    assert [r["predicted_label"] for r in two] == [r["predicted_label"] for r in loaded]
    for streamed, row in zip(two, loaded):
        assert streamed.keys() == row.keys()
        assert streamed["probabilities"] == pytest.approx(row["probabilities"], abs=2e-6)
    facts, reference = (
        read_json(tmp_path / "two" / "predict_results.json"),
        read_json(tmp_path / "loaded" / "predict_results.json"),
    )
    assert (facts["num_processes"], facts["distributed_type"]) == (2, "MULTI_CPU")
    assert facts["test_samples"] == 45 and facts["test_accuracy"] == reference["test_accuracy"]
    scores = {key for key in reference if key.startswith("test_")}  # loss, accuracy, f1, samples
    assert scores == {key for key in facts if key.startswith("test_")} and len(scores) >= 4
    for key in scores:  # scored chunk by chunk from counts and sums (predict.ChunkedScore): the loaded set's results
        assert facts[key] == pytest.approx(reference[key], rel=1e-5), key
    assert not (tmp_path / "two" / ".predictions-parts").exists()

    # The same on 1 process, as CSV (the writer streams rows): the columns and values of the loaded JSON lines.
    one = tmp_path / "one"
    streamed = [*predict, "--data", test_shards["folder"], "--streaming", "--predictions_format", "csv"]
    assert console([*streamed, "--output_dir", str(one)]) == 0
    table = pd.read_csv(one / "predictions.csv")
    assert list(table.columns) == ["index", "id", "text", "label", "predicted_label", *(f"prob_{c}" for c in CLASSES)]
    assert list(table["id"]) == [r["id"] for r in loaded] and list(table["predicted_label"]) == [
        r["predicted_label"] for r in loaded
    ]


def test_streamed_sets_refuse_what_they_cannot_do_in_one_line(classifier, test_shards, tmp_path, capsys):
    """A subset by count (a stream's first rows per rank are not the set's first rows) and a test row without text
    (one prediction per input row): each one line naming the fix, no traceback, no predictions file."""
    bad = [{"id": "a", "text": "a goal"}, {"id": "b", "text": None}, {"id": "c", "text": "a song"}]
    bad_folder = tmp_path / "bad"
    write_rows(bad_folder / "part-0.jsonl", bad)
    cases = [
        (test_shards["folder"], ["--max_predict_samples", "5"], "--max_predict_samples with --streaming"),
        (str(bad_folder), [], "the test set has a row with an empty text (text): row 2 of data file 1"),
    ]
    for data, flags, message in cases:
        out = tmp_path / "out"
        code = console(
            ["predict", "--model", classifier, "--data", data, "--streaming", "--output_dir", str(out), *flags]
        )
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert code == 2 and len(errors) == 1 and message in errors[0], err
        assert "Traceback" not in err and not (out / "predictions.jsonl").exists()


def test_a_streamed_training_run_takes_a_folder_or_glob_as_its_test_file(tiny_model_dir, test_shards, tmp_path):
    """With --streaming the test set is streamed (--do_predict), so --test_file may be a folder or a glob of data
    files, as --train_file may; a path that matches no file is still refused in one line. Guards the file check that
    took every --test_file for one file and refused the folder a streamed prediction reads."""
    from conftest import tiny_args
    from tuneloop.config import parse_args
    from tuneloop.errors import UserError

    def args(test_file: str) -> list[str]:
        files = {"train_file": test_shards["folder"], "validation_file": test_shards["whole"], "test_file": test_file}
        return tiny_args(tiny_model_dir, files, tmp_path / "run", streaming="true", max_steps=4, do_predict="true")

    for test_file in (test_shards["folder"], test_shards["folder"] + "/*.jsonl", test_shards["whole"]):
        assert parse_args(args(test_file)).data.test_file == test_file
    with pytest.raises(UserError, match="invalid configuration") as refused:
        parse_args(args(str(tmp_path / "nothing" / "*.jsonl")))
    assert "test_file" in str(refused.value) and "matches no data file" in str(refused.value)


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_streamed_evaluation_of_the_other_problem_types_equals_loaded(tiny_model_dir, tmp_path, problem_type):
    """Multi-label (label lists: 0/1 vectors gathered) and regression (float values): the streamed set's labels are
    encoded as a loaded set's, and every metric, the loss and the multi-label threshold come out the same. Guards a
    label encoding or a gathered label shape that only single-label exercises."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    names = CLASSES if problem_type != "regression" else ["label"]
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=len(names), id2label=dict(enumerate(names)), problem_type=problem_type
    )
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    rows = make_rows(29, seed=8)
    for i, row in enumerate(rows):  # every label somewhere; some rows with none (multi-label)
        row["label"] = [name for j, name in enumerate(CLASSES) if (i >> j) & 1] if len(names) > 1 else i / 7
    path = write_rows(tmp_path / "eval.jsonl", rows)
    evaluate = ["evaluate", "--model", str(tmp_path / "model"), "--data", path, *COMMON]
    assert console([*evaluate, "--output_dir", str(tmp_path / "loaded")]) == 0
    assert console([*evaluate, "--streaming", "--output_dir", str(tmp_path / "streamed")]) == 0
    loaded, streamed = (read_json(tmp_path / name / "all_results.json") for name in ("loaded", "streamed"))
    assert loaded["eval_samples"] == streamed["eval_samples"] == 29
    scores = {key for key in loaded if key.startswith("eval_")}
    assert scores == {key for key in streamed if key.startswith("eval_")} and len(scores) >= 5
    for key in scores:
        assert streamed[key] == pytest.approx(loaded[key], rel=1e-5, abs=1e-7), key

    # predict --streaming scores its test set a chunk at a time (loss sums, label counts, error sums; mean average
    # precision, pearson and spearman from the rows they keep): the loaded prediction's results.
    predict = ["predict", "--model", str(tmp_path / "model"), "--data", path, *COMMON]
    assert console([*predict, "--output_dir", str(tmp_path / "predicted")]) == 0
    assert console([*predict, "--streaming", "--output_dir", str(tmp_path / "predicted_streamed")]) == 0
    loaded, streamed = (
        read_json(tmp_path / name / "predict_results.json") for name in ("predicted", "predicted_streamed")
    )
    scores = {key for key in loaded if key.startswith("test_")}
    assert scores == {key for key in streamed if key.startswith("test_")} and len(scores) >= 6
    for key in scores:
        assert streamed[key] == pytest.approx(loaded[key], rel=1e-5, abs=1e-7), key


def test_a_labelled_stream_is_scored_a_chunk_at_a_time_keeping_no_rows(monkeypatch):
    """predict.ChunkedScore, given rows one at a time as the merge of the parts passes them: it holds at most one
    chunk of rows, keeps none past it when every metric has a running form (the built-in single-label and the
    multi-label metrics at the threshold), keeps rows only for a metric with none (mean_average_precision), and its
    results are `score`'s on the whole set. Guards the defect measured at 10M rows: every row's logits and label
    kept to the end, memory growing with the rows."""
    import torch

    from tuneloop import metrics, predict
    from tuneloop.problem import MultiLabel, SingleLabel

    monkeypatch.setattr(predict, "CHUNK_ROWS", 16)
    rng = np.random.default_rng(5)
    rows = 200
    logits = rng.normal(size=(rows, 3)).astype(np.float32)
    cases = [
        (SingleLabel(CLASSES, weights=torch.tensor([1.0, 2.0, 0.5])), rng.integers(0, 3, rows), SingleLabel),
        (MultiLabel(CLASSES, threshold=0.4), (rng.random((rows, 3)) < 0.4).astype(np.float32), MultiLabel),
    ]
    for problem, labels, kind in cases:
        for names in (kind.builtin_metrics[:3], kind.builtin_metrics):
            modules = metrics.load_metrics(list(names))
            scorer = predict.ChunkedScore(problem, modules, "macro")
            for row_logits, label in zip(logits.tolist(), labels.tolist()):
                scorer.add(row_logits, label)
                assert len(scorer.logits) < 16
            keeps = "mean_average_precision" in names
            assert bool(scorer.metrics.kept) == keeps and scorer.metrics.kept_names == (
                ["mean_average_precision"] if keeps else []
            )
            whole = predict.score(predict.Outputs(logits, labels), problem, modules, "macro", "test")
            assert scorer.results("test") == pytest.approx(whole, rel=1e-6), names
