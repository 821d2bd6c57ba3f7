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
