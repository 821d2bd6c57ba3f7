"""The report in output_dir/report/: files, figures that are real images, counts that add up, trackers, the summary.

Most tests read conftest's `tracked` run (both trackers on, 2 epochs), shared with test_train's tracker test."""

import csv

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import read_json
from tuneloop.report import confusion_figure, summary_table

FIGURES = ("loss", "learning_rate", "eval_metrics", "confusion_matrix")


def test_figures_are_real_images_of_a_sensible_size(tracked):
    output_dir, _ = tracked
    for name in FIGURES:
        image = imread(output_dir / "report" / f"{name}.png")  # raises on a file that is not a PNG
        height, width = image.shape[:2]
        assert 300 <= height <= 2000 and 400 <= width <= 2500, (name, image.shape)
        assert image[..., :3].std() > 0.05, name  # something is drawn, not a blank canvas


def test_confusion_matrix_counts_add_up_to_the_eval_set(tracked):
    output_dir, results = tracked
    report = read_json(output_dir / "report" / "metrics.json")
    matrix = np.array(report["confusion_matrix"]["counts"])
    assert report["confusion_matrix"]["labels"] == ["music", "sports", "tech"]
    assert matrix.sum() == results["eval_samples"] == 45
    assert np.trace(matrix) / matrix.sum() == pytest.approx(results["eval_accuracy"])
    with open(output_dir / "report" / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", "music", "sports", "tech"]
    assert np.array([[int(x) for x in row[1:]] for row in rows[1:]]).tolist() == matrix.tolist()
    # Per class: supports are the rows of the matrix; macro-F1 is the eval_f1 the run reported.
    per_class = report["per_class"]
    assert [c["support"] for c in per_class] == matrix.sum(axis=1).tolist()
    assert np.mean([c["f1"] for c in per_class]) == pytest.approx(results["eval_f1"])
    table = (output_dir / "report" / "per_class.md").read_text().splitlines()
    assert table[0] == "| class | precision | recall | F1 | support |" and len(table) == 2 + 3


def test_confusion_matrix_figure_names_the_classes():
    figure = confusion_figure(np.array([[5, 1], [0, 4]]), ["negative", "positive"])
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["negative", "positive"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["negative", "positive"]
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "4", "5"]
    assert "10 examples" in ax.get_title()


def test_metrics_json_has_the_final_metrics_and_every_evaluation(tracked):
    output_dir, results = tracked
    report = read_json(output_dir / "report" / "metrics.json")
    assert report["final"]["eval_accuracy"] == results["eval_accuracy"]
    assert [e["epoch"] for e in report["evaluations"]] == [1, 2]
    assert report["evaluations"][-1]["eval_accuracy"] == results["eval_accuracy"]


def test_model_card(tracked):
    output_dir, results = tracked
    card = (output_dir / "report" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-classification" in front
    for fact in (
        "3 classes (music, sports, tech)",
        "240 training examples, 45 evaluation examples",
        f"| eval_accuracy | {results['eval_accuracy']:.4f} |",
        "- learning rate: 0.003",
        f"- optimizer steps: {results['global_step']}",
        "1 process(es) on cpu",
        f"{results['train_samples_per_second']} samples/s",
        f'model="{output_dir.name}"',
    ):
        assert fact in card, fact


def test_figures_are_logged_to_the_trackers(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, results = tracked
    tags = set()
    for event_file in (output_dir / "toy").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"])
        for tag in accumulator.Tags()["images"]:
            image = accumulator.Images(tag)[-1]
            assert image.step == results["global_step"] and image.width >= 400
    assert {f"report/{name}" for name in FIGURES} <= tags
    # wandb keeps each logged image as a PNG file of the offline run, named after its key and step.
    run = next((output_dir / "wandb").glob("offline-run-*"))
    for name in FIGURES:
        logged = list(run.glob(f"files/media/images/report/{name}_{results['global_step']}_*.png"))
        assert len(logged) == 1 and imread(logged[0]).shape[1] >= 400, name


def test_summary_table():
    results = {
        "eval_accuracy": 0.9111,
        "eval_f1": 0.9,
        "train_loss": 0.25,
        "global_step": 180,
        "train_runtime": 12.5,
        "train_samples_per_second": 115.2,
        "num_processes": 2,
        "device": "cpu",
        "distributed_type": "MULTI_CPU",
        "mixed_precision": "no",
        "final_learning_rate": 0.0,
    }
    table = summary_table(results, "outputs/x")
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # a box: every line the same width
    for text in ("| eval_accuracy", "0.9111", "optimizer steps", "180", "2 x cpu (MULTI_CPU, no)", "outputs/x"):
        assert text in table, text
    assert "final_learning_rate" not in table  # key figures only
