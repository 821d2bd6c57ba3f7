"""Predictions (--do_predict, `tuneloop predict`) and evaluation of saved models (`tuneloop evaluate`).

The 2-process runs are real `accelerate launch -m tuneloop ...` launches on the 45-row validation file: 45 is not a
multiple of 2 processes x batch 8, so Accelerate repeats examples to even out the last batches, and they must not
show up twice, nor out of order. The model is conftest's `trained` run (6 epochs, then --do_predict on the labelled
test file), shared with test_train.py.
"""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, launch, make_rows, read_json, run_in_process, tiny_args, write_rows
from tuneloop.cli import COMMANDS, console


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_do_predict_writes_every_test_row_in_order_with_probabilities(trained, test_files):
    output_dir, results = trained
    rows = read_jsonl(output_dir / "predictions.jsonl")
    source = read_jsonl(test_files["labelled"])
    assert [r["index"] for r in rows] == list(range(30))
    assert [(r["id"], r["text"], r["label"]) for r in rows] == [(s["id"], s["text"], s["label"]) for s in source]
    for row in rows:
        assert set(row["probabilities"]) == {"music", "sports", "tech"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted_label"] == max(row["probabilities"], key=row["probabilities"].get)
    # The test metrics are those of the file's own rows.
    test = read_json(output_dir / "predict_results.json")
    assert test["test_samples"] == 30
    assert test["test_accuracy"] == np.mean([r["predicted_label"] == r["label"] for r in rows])
    assert test["test_accuracy"] >= 0.9 and 0 < test["test_loss"] < 1
    assert results["eval_accuracy"] >= 0.9  # training itself was not disturbed


@pytest.mark.multiprocess
def test_predictions_on_two_processes_equal_one_process(trained, test_files, tmp_path):
    """Unlabelled data, CSV output: same rows, same order, no duplicates, on 1 and on 2 real processes."""
    model_dir, _ = trained
    common = [
        "predict",
        "--model",
        str(model_dir),
        "--data",
        test_files["unlabelled"],
        "--predictions_format",
        "csv",
        "--per_device_eval_batch_size",
        "8",
    ]
    assert console([*common, "--output_dir", str(tmp_path / "one")]) == 0
    launch([*common, "--output_dir", str(tmp_path / "two")], module=True)
    one, two = pd.read_csv(tmp_path / "one" / "predictions.csv"), pd.read_csv(tmp_path / "two" / "predictions.csv")
    facts = read_json(tmp_path / "two" / "predict_results.json")
    assert (facts["num_processes"], facts["distributed_type"]) == (2, "MULTI_CPU")
    assert facts["test_samples"] == 45 and "test_accuracy" not in facts  # no labels, no metrics
    assert list(two.columns) == ["index", "id", "text", "predicted_label", "prob_music", "prob_sports", "prob_tech"]
    source = pd.read_csv(test_files["unlabelled"])
    assert list(two["id"]) == list(source["id"]) and list(two["text"]) == list(source["text"])  # file order, each once
    assert list(two["predicted_label"]) == list(one["predicted_label"])
    probabilities = ["prob_music", "prob_sports", "prob_tech"]
    np.testing.assert_allclose(two[probabilities].to_numpy(), one[probabilities].to_numpy(), atol=1e-5)


@pytest.mark.multiprocess
def test_evaluate_a_saved_model_reproduces_the_training_metrics(trained, toy_files, tmp_path, capsys):
    model_dir, _ = trained
    at_training = read_json(model_dir / "all_results.json")
    # max_length 32 and the metrics come from the saved run_config.json; the results go to MODEL/evaluate.
    assert console(["evaluate", "--model", str(model_dir), "--data", toy_files["validation_file"]]) == 0
    out = capsys.readouterr().out
    assert "max_length=32" in out and "tuneloop summary" in out and f"{at_training['eval_accuracy']:.4f}" in out
    one = read_json(model_dir / "evaluate" / "all_results.json")
    launch(
        [
            "evaluate",
            "--model",
            str(model_dir),
            "--data",
            toy_files["validation_file"],
            "--output_dir",
            str(tmp_path / "two"),
            "--per_device_eval_batch_size",
            "8",
        ],
        module=True,
    )
    two = read_json(tmp_path / "two" / "all_results.json")
    assert (two["num_processes"], two["distributed_type"]) == (2, "MULTI_CPU")
    for results in (one, two):
        assert results["eval_samples"] == at_training["eval_samples"] == 45
        assert results["eval_accuracy"] == at_training["eval_accuracy"]
        assert results["eval_f1"] == at_training["eval_f1"]
        assert results["eval_loss"] == pytest.approx(at_training["eval_loss"], rel=1e-5)
    matrix = read_json(model_dir / "evaluate" / "report" / "metrics.json")["confusion_matrix"]["counts"]
    assert np.trace(matrix) == round(at_training["eval_accuracy"] * 45) and np.sum(matrix) == 45


def test_train_py_with_only_do_predict_uses_the_model_as_loaded(trained, test_files, tmp_path):
    model_dir, _ = trained
    assert (
        console(
            [
                "train",
                "--model_name_or_path",
                str(model_dir),
                "--do_train",
                "false",
                "--do_eval",
                "false",
                "--do_predict",
                "--test_file",
                test_files["labelled"],
                "--max_length",
                "32",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (
        read_json(tmp_path / "predict_results.json")["test_accuracy"]
        == read_json(model_dir / "predict_results.json")["test_accuracy"]
    )
    assert not (tmp_path / "model.safetensors").exists()


def test_the_command_table(capsys):
    assert console(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert console(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    for target, _ in COMMANDS.values():  # every entry points at a function that exists
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        (
            [{"text": "a goal", "label": "politics"}],
            [],
            "labels ['politics'] in the test split are not classes of the model",
        ),
        ([{"body": "a goal"}], [], "no text column found among ['body']"),
        ([{"text": "a goal", "ref": 1}], ["--id_column", "key"], "column 'key' not in the test split"),
    ],
)
def test_bad_test_data_is_one_line(trained, tmp_path, capsys, rows, flags, message):
    model_dir, _ = trained
    path = write_rows(tmp_path / "bad.csv", rows)
    assert (
        console(["predict", "--model", str(model_dir), "--data", path, "--output_dir", str(tmp_path / "out"), *flags])
        == 2
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # progress bars may precede it
    assert len(errors) == 1 and errors[0].startswith("tuneloop: error: ") and message in errors[0], err
    assert "Traceback" not in err and "Loading weights" not in err  # stopped before the model was loaded


def test_evaluate_refuses_data_with_other_classes(trained, tmp_path, capsys):
    model_dir, _ = trained
    rows = [{"text": r["text"], "label": {"music": "jazz"}.get(r["label"], r["label"])} for r in make_rows(12, seed=5)]
    path = write_rows(tmp_path / "other.csv", rows)
    assert console(["evaluate", "--model", str(model_dir), "--data", path, "--output_dir", str(tmp_path / "out")]) == 2
    assert (
        "labels ['jazz'] in the eval split are not classes of the model (music, sports, tech)"
        in capsys.readouterr().err
    )


def test_evaluate_on_data_with_some_of_the_model_classes(trained, tmp_path):
    """Labels are encoded against the model's classes, not re-derived from the data (which has only two here)."""
    model_dir, _ = trained
    rows = [r for r in make_rows(30, seed=6) if r["label"] != "music"]
    path = write_rows(tmp_path / "two.csv", rows)
    out = tmp_path / "out"
    assert console(["evaluate", "--model", str(model_dir), "--data", path, "--output_dir", str(out)]) == 0
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == len(rows) and results["eval_accuracy"] > 0.8


def test_do_predict_checks_the_test_split_before_training(tiny_model_dir, toy_files, tmp_path, capsys):
    path = write_rows(tmp_path / "bad.csv", [{"body": "a goal"}])
    assert (
        console(["train", *tiny_args(tiny_model_dir, toy_files, tmp_path / "out", do_predict="true", test_file=path)])
        == 2
    )
    assert "no text column found among ['body']" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_gather_refuses_duplicated_or_missing_examples():
    """The position check is what guarantees one row per example: fed a repeat, it must fail, not write the file."""
    import torch

    from tuneloop.predict import INDEX_COLUMN, gather

    class OneProcess:  # gather_for_metrics on a single process returns its input as is
        def gather_for_metrics(self, tensors):
            return tensors

    class Model(torch.nn.Module):
        def forward(self, input_ids):
            return type("Output", (), {"logits": torch.nn.functional.one_hot(input_ids, 3).float()})

    class Batches(list):
        dataset = range(3)

    def batches(*positions):
        return Batches({"input_ids": torch.tensor(p) % 3, INDEX_COLUMN: torch.tensor(p)} for p in positions)

    outputs = gather(OneProcess(), Model(), batches([2, 0], [1]))  # out of order: put back in order
    assert outputs.predictions.tolist() == [0, 1, 2] and outputs.labels is None
    with pytest.raises(RuntimeError, match="not one each"):
        gather(OneProcess(), Model(), batches([0, 1], [1, 2]))


@pytest.mark.trains
def test_evaluate_rescores_the_examples_training_held_out(tiny_model_dir, tmp_path):
    """A dataset with only a train split: evaluate --data takes the seed and hold-out share of the saved run, so it
    scores the same held-out examples (this is what `--data builtin:bbc_news` relies on)."""
    import datasets

    folder = str(tmp_path / "dataset")
    datasets.DatasetDict(train=datasets.Dataset.from_list(make_rows(200, seed=4))).save_to_disk(folder)
    files = {"dataset_name": folder}
    run_in_process(
        tiny_args(tiny_model_dir, files, tmp_path / "run", num_train_epochs=4, seed=7, validation_split_percentage=30)
    )
    at_training = read_json(tmp_path / "run" / "all_results.json")
    assert console(["evaluate", "--model", str(tmp_path / "run"), "--data", folder]) == 0
    again = read_json(tmp_path / "run" / "evaluate" / "all_results.json")
    assert again["eval_samples"] == at_training["eval_samples"] == 60
    assert again["eval_loss"] == pytest.approx(at_training["eval_loss"], rel=1e-5)
    assert again["eval_accuracy"] == at_training["eval_accuracy"]


def test_predict_on_a_named_split_of_a_dataset(trained, tmp_path, capsys):
    """--data a dataset (here a save_to_disk folder, as a Hub id would be): --test_split picks the split."""
    import datasets

    model_dir, _ = trained
    folder = str(tmp_path / "dataset")
    rows = [{"text": r["text"], "label": -1} for r in make_rows(20, seed=6)]  # GLUE's way of hiding test labels
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(make_rows(10, seed=5)), heldout=datasets.Dataset.from_list(rows)
    ).save_to_disk(folder)
    common = ["predict", "--model", str(model_dir), "--data", folder, "--output_dir", str(tmp_path / "out")]
    assert console([*common, "--test_split", "heldout"]) == 0
    predictions = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [p["text"] for p in predictions] == [r["text"] for r in rows]
    assert all("label" not in p for p in predictions)  # -1 everywhere: no labels, no metrics
    assert console(common) == 2  # the default, "test", is not there
    assert "split 'test' not found (available: train, heldout)" in capsys.readouterr().err


def test_doctor_is_a_tuneloop_command(capsys):
    assert (
        console(["doctor", "--config_file", str(ROOT / "accelerate_configs" / "gpu.yaml"), "--skip_accelerate_test"])
        != 0
    )
    out = capsys.readouterr()
    assert (
        "torch" in out.out and "needs GPUs and this machine has none" in out.out + out.err
    )  # environment, then refusal
