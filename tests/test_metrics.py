import numpy as np
import pytest

from tuneloop.errors import UserError
from tuneloop.metrics import compute_metrics, load_metrics


def test_builtin_metrics_offline_match_a_hand_count():
    predictions = np.array([0, 1, 2, 2, 1, 0, 2])
    references = np.array([0, 1, 1, 2, 1, 2, 2])
    scores = compute_metrics(load_metrics(["accuracy", "f1", "precision", "recall"]), predictions, references, "macro")
    assert scores["accuracy"] == pytest.approx(5 / 7)
    # per class (tp, fp, fn): 0 -> (1, 1, 0), 1 -> (2, 0, 1), 2 -> (2, 1, 1)
    precision = [1 / 2, 2 / 2, 2 / 3]
    recall = [1 / 1, 2 / 3, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert scores["precision"] == pytest.approx(np.mean(precision))
    assert scores["recall"] == pytest.approx(np.mean(recall))
    assert scores["f1"] == pytest.approx(np.mean(f1))
    micro = compute_metrics(load_metrics(["f1"]), predictions, references, "micro")
    assert micro["f1"] == pytest.approx(5 / 7)  # micro-F1 equals accuracy for single-label classification


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(
        UserError, match=r"metric 'no_such_metric_xyz' could not be loaded .*accuracy, f1, precision, recall"
    ):
        load_metrics(["no_such_metric_xyz"], trust_remote_code=True)


def test_load_metrics_runs_no_code_it_was_not_allowed_to(tmp_path):
    """Guards load_metrics handing any name to evaluate.load, which imports (runs) a local .py file or a Hub module:
    the last guard before that code runs, whoever calls it."""
    marker = tmp_path / "ran"
    script = tmp_path / "sneaky_metric.py"
    script.write_text(f"import pathlib\n\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(UserError, match=rf"metrics {script}: not built in.*--trust_remote_code"):
        load_metrics(["accuracy", str(script)])
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["single_label_classification", "multi_label_classification", "regression"])
def test_running_metrics_of_chunks_equal_the_whole_set_metrics(kind):
    """metrics.Running (predict --streaming's test metrics, a chunk at a time) gives what compute_metrics gives on the
    whole set, for every built-in metric, every --metric_average, and chunk sizes that do and do not divide the rows;
    and keeps rows only for the metrics with no running form. Guards a count formed wrong (a label's false negatives
    as false positives), a weighted-row encoding sklearn reads differently, and a chunk dropped or counted twice."""
    from tuneloop import problem as problems
    from tuneloop.metrics import RUNNING, Running

    rng = np.random.default_rng(3)
    rows, outputs = 503, 4
    problem = problems.of(kind)(names=[f"c{i}" for i in range(outputs)], threshold=0.4)
    logits = rng.normal(size=(rows, outputs)).astype(np.float32)
    if kind == "regression":
        problem.names, logits = ["y"], logits[:, :1]
        labels = rng.normal(size=rows).astype(np.float32)
    elif kind == "multi_label_classification":
        labels = (rng.random((rows, outputs)) < 0.3).astype(np.float32)
        labels[:, 3] = 0  # a label never true: macro-F1 counts it as 0 when predicted, as sklearn does
    else:
        labels = rng.integers(0, outputs - 1, rows)  # a class never true (but predicted): zero_division paths
    modules = load_metrics(list(problem.builtin_metrics))
    averages = ["macro", "micro", "weighted"] if kind == "single_label_classification" else ["macro"]
    for average in averages:
        predictions, references, probabilities = problem.metric_inputs(logits, labels)
        whole = compute_metrics(modules, predictions, references, average, probabilities, problem.threshold)
        for size in (1, 64, 500, rows):
            running = Running(modules, average, problem.threshold)
            for start in range(0, rows, size):
                running.add(*problem.metric_inputs(logits[start : start + size], labels[start : start + size]))
            assert running.compute() == pytest.approx(whole, rel=1e-12, abs=1e-12), (average, size)
            assert running.kept_names == [name for name in modules if name not in RUNNING]
            assert bool(running.kept) == bool(running.kept_names)
