"""Evaluation metrics through 🤗 Evaluate: the built-in ones offline from local modules (single-label accuracy/f1/
precision/recall, multi-label and regression metrics), others by Hub name or path with --trust_remote_code only.

`evaluate.load` imports and runs the Python file of any other name (a local .py file, or a module from the Hub): such
a name is code, and runs only when the user asked for it (config.validate refuses it earlier, naming the flag; the
guard here is the one at the point where the code would run). A saved run's run_config.json never supplies one
(cli.inherited_settings drops it).

Predictions are gathered from every process with `gather_for_metrics` before they reach here, so each metric is
computed once on the whole eval set; evaluate's own multi-process mode is deliberately not used as well.

A set too large to hold (`predict --streaming`'s test set) is scored a chunk at a time by `Running`: each built-in
metric with a running form (RUNNING) from counts or sums, the others from the rows they keep.
"""

from __future__ import annotations

from pathlib import Path

import evaluate
import numpy as np

from tuneloop.errors import UserError
from tuneloop.problem import TYPES, untrusted_metrics

MODULES = Path(__file__).parent / "metric_modules"
# Built-in metric name -> the local module that computes it (config name = metric name).
LOCAL = {name: MODULES / kind.metric_module for kind in TYPES.values() for name in kind.builtin_metrics}
# The built-in metrics that score probabilities at a threshold (multi-label's) rather than predictions.
ON_PROBABILITIES = tuple(
    name for kind in TYPES.values() if kind.metrics_read_probabilities for name in kind.builtin_metrics
)
BUILTIN = tuple(LOCAL)
AVERAGED = ("f1", "precision", "recall")
# The built-in metrics with a running form (counts or sums that chunks add up to): single-label's from the confusion
# matrix, multi-label's at the threshold from per-label counts, regression's errors from their sums. The rest need
# every row: mean_average_precision ranks every probability, spearman ranks every value, pearson is kept with it
# (its running sums lose digits that scipy's two-pass form keeps), and a metric loaded by name is code we cannot see.
CONFUSION = ("accuracy", "f1", "precision", "recall")
LABEL_COUNTS = ("micro_f1", "macro_f1", "subset_accuracy")
ERROR_SUMS = ("mse", "mae")
RUNNING = CONFUSION + LABEL_COUNTS + ERROR_SUMS


def load_metrics(names: list[str], trust_remote_code: bool = False) -> dict[str, evaluate.EvaluationModule]:
    """Call under `accelerator.main_process_first()`: evaluate copies modules into a shared cache on load. A name that
    is not built in is loaded only with `trust_remote_code`."""
    if problem := untrusted_metrics(names, trust_remote_code):
        raise UserError(problem)
    modules = {}
    for name in names:
        try:
            # keep_in_memory: every rank computes on the gathered predictions, so none may share a cache file.
            if name in LOCAL:
                modules[name] = evaluate.load(str(LOCAL[name]), name, keep_in_memory=True)
            else:
                modules[name] = evaluate.load(name, keep_in_memory=True)
        except Exception as e:
            reason = " ".join(str(e).split())[:200]
            raise UserError(
                f"metric {name!r} could not be loaded ({reason}): use one of {', '.join(BUILTIN)} offline, "
                "or (with --trust_remote_code) a 🤗 Evaluate Hub metric, with network access"
            ) from None
    return modules


def compute_metrics(
    modules: dict[str, evaluate.EvaluationModule],
    predictions,
    references,
    average: str,
    probabilities=None,
    threshold: float | None = None,
) -> dict[str, float]:
    """`predictions`: class ids (single-label), 0/1 per label (multi-label) or values (regression, 2-D: one column per
    target). The local multi-label modules take the `probabilities` and the `threshold` instead (mean average
    precision ranks them); a Hub module always gets `predictions`."""
    results = {}
    for name, module in modules.items():
        kwargs = {"average": average} if name in AVERAGED else {}
        given = predictions
        if probabilities is not None and name in ON_PROBABILITIES:
            given, kwargs = probabilities, {"threshold": threshold}
        for key, value in module.compute(predictions=given, references=references, **kwargs).items():
            results[key] = float(value)
    return results


class Running:
    """The metrics of a labelled set given a chunk at a time (`add`, with a chunk's `Problem.metric_inputs`), scored
    at the end (`compute`) equal to compute_metrics on the whole set, with memory that does not grow with the rows
    for the metrics in RUNNING:

    - single-label: the confusion matrix, {(reference, prediction): count}; each metric's own module scores its
      pairs weighted by their counts (scikit-learn's sample_weight), so the formula stays scikit-learn's alone;
    - multi-label, at the threshold (fixed while predicting): per-label true positives, false positives and false
      negatives, and the count of rows with every label right, scored by the module the same way, as weighted rows
      that hold exactly those counts (a row with no label predicted or true adds nothing to an F1);
    - regression: the sums of squared and of absolute errors over every target, and their count (mse, mae: the mean).

    The other metrics (mean_average_precision, pearson, spearman, a metric by name) keep their inputs, chunk by chunk
    as numpy arrays, and only those: `kept` is empty when every metric has a running form."""

    def __init__(self, modules: dict[str, evaluate.EvaluationModule], average: str, threshold: float | None = None):
        self.modules, self.average, self.threshold = modules, average, threshold
        self.kept_names = [name for name in modules if name not in RUNNING]
        self.kept: list[tuple] = []  # (predictions, references, probabilities) of each chunk, for kept_names
        self.confusion: dict[tuple[int, int], int] = {}
        self.label_counts: np.ndarray | None = None  # (3, labels): true positives, false positives, false negatives
        self.exact = 0  # multi-label rows with every label right
        self.errors = np.zeros(2)  # regression: sum of squared errors, sum of absolute errors
        self.values = 0  # regression: how many (example, target) errors the sums hold
        self.rows = 0

    def add(self, predictions: np.ndarray, references: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        names = set(self.modules)
        self.rows += len(references)
        if names & set(CONFUSION):
            pairs, counts = np.unique(np.stack([references, predictions], axis=1), axis=0, return_counts=True)
            for (reference, prediction), count in zip(pairs.tolist(), counts.tolist()):
                self.confusion[reference, prediction] = self.confusion.get((reference, prediction), 0) + count
        if names & set(LABEL_COUNTS):
            truth, predicted = references.astype(bool), predictions.astype(bool)
            counts = np.stack([(truth & predicted).sum(0), (~truth & predicted).sum(0), (truth & ~predicted).sum(0)])
            self.label_counts = counts if self.label_counts is None else self.label_counts + counts
            self.exact += int((truth == predicted).all(axis=1).sum())
        if names & set(ERROR_SUMS):
            error = predictions.astype(np.float64) - references.astype(np.float64)
            self.errors += [np.square(error).sum(), np.abs(error).sum()]
            self.values += error.size
        if self.kept_names:
            keep_probabilities = any(name in ON_PROBABILITIES for name in self.kept_names)
            self.kept.append((predictions, references, probabilities if keep_probabilities else None))

    def compute(self) -> dict[str, float]:
        results = {}
        for name, module in self.modules.items():
            if name in CONFUSION:
                (references, predictions), counts = zip(*self.confusion), list(self.confusion.values())
                kwargs = {"average": self.average} if name in AVERAGED else {}
                scores = module.compute(predictions=predictions, references=references, sample_weight=counts, **kwargs)
            elif name in LABEL_COUNTS:
                truth, predicted, counts = self._weighted_label_rows(name)
                scores = module.compute(predictions=predicted, references=truth, threshold=0.5, sample_weight=counts)
            elif name in ERROR_SUMS:
                scores = {name: self.errors[ERROR_SUMS.index(name)] / self.values}
            else:
                continue
            results |= {key: float(value) for key, value in scores.items()}
        if self.kept_names:
            predictions, references, probabilities = (
                None if parts[0] is None else np.concatenate(parts) for parts in zip(*self.kept)
            )
            kept = {name: self.modules[name] for name in self.kept_names}
            results |= compute_metrics(kept, predictions, references, self.average, probabilities, self.threshold)
        return results

    def _weighted_label_rows(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(references, predictions as 0/1 probabilities, counts): rows whose weighted sums are the counts kept.
        F1: for label j, a row true and predicted in j alone weighted by its true positives, one predicted only by its
        false positives, one true only by its false negatives, and an empty row (no effect) so that none is empty.
        Subset accuracy: an empty row weighted by the rows right, a wrong one by the others."""
        labels = self.label_counts.shape[1]
        one = np.eye(labels, dtype=np.int64)
        none = np.zeros((1, labels), dtype=np.int64)
        if name == "subset_accuracy":
            truth, predicted, counts = np.r_[none, none], np.r_[none, one[:1]], [self.exact, self.rows - self.exact]
        else:
            truth = np.r_[one, 0 * one, one, none]
            predicted = np.r_[one, one, 0 * one, none]
            counts = [*self.label_counts.reshape(-1).tolist(), 1]
        return truth, predicted.astype(np.float32), np.asarray(counts, dtype=np.float64)
