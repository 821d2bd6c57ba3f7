"""The problem a run solves: single-label classification, multi-label classification or regression.

Decided once, from `--problem_type` or else from the label column as transformers' `run_classification.py` decides it
(float labels: regression; a list of labels per row, or `--label_separator`: multi-label; anything else, including a
float column of whole numbers such as pandas writes for an integer column with a gap: single-label). From then on this
module is the one place that knows what a label is: how logits become predictions, probabilities and values, and the
loss, which training and evaluation both compute here, so that train and eval loss are the same function:

- single-label: cross-entropy, with `--class_weights` and `--label_smoothing_factor`;
- multi-label: binary cross-entropy on the logits, `pos_weight` from `--class_weights`, targets smoothed towards 0.5;
- regression: mean squared error over every target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tuneloop.errors import UserError

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION)
# What one output of the model is called in messages: a class, a label (multi-label), a regression target.
UNITS = {SINGLE: "classes", MULTI: "labels", REGRESSION: "target(s)"}

# The metrics built into tuneloop for each problem type (offline modules in metric_modules/, see metrics.py): the only
# metric names that run no code from outside tuneloop. Any other name needs --trust_remote_code.
BUILTIN_METRICS = {
    SINGLE: ("accuracy", "f1", "precision", "recall"),
    MULTI: ("micro_f1", "macro_f1", "subset_accuracy", "mean_average_precision"),
    REGRESSION: ("mse", "mae", "pearson", "spearman"),
}
BUILTIN_METRIC_NAMES = tuple(name for names in BUILTIN_METRICS.values() for name in names)
# The metrics each problem type computes when --metrics is not given (all built in, offline).
DEFAULT_METRICS = {
    SINGLE: ["accuracy", "f1"],
    MULTI: ["micro_f1", "macro_f1", "subset_accuracy", "mean_average_precision"],
    REGRESSION: ["mse", "mae", "pearson", "spearman"],
}
# Metrics where a smaller value is better (best model, early stopping): errors and losses.
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse")


def lower_is_better(metric_key: str) -> bool:
    return metric_key.removeprefix("eval_").endswith(LOWER_IS_BETTER)


def metric_names(problem_type: str, given: list[str] | None) -> list[str]:
    return list(given) if given else DEFAULT_METRICS[problem_type]


def untrusted_metrics(names: list[str] | None, trust_remote_code: bool) -> str | None:
    """What is wrong with metric names that are not built in, unless the user trusts remote code; None if nothing.
    🤗 Evaluate imports and runs the Python file behind any other name (a local .py file, a Hub module) to load it."""
    outside = [name for name in names or () if name not in BUILTIN_METRIC_NAMES]
    if not outside or trust_remote_code:
        return None
    return (f"metrics {', '.join(outside)}: not built in, and 🤗 Evaluate runs a metric's code (a local .py file or a "
            f"Hub module) to load it; add --trust_remote_code if you trust that code, or use built-in metrics "
            f"({', '.join(BUILTIN_METRIC_NAMES)})")


def infer(feature, values, given: str | None, separator: str | None) -> tuple[str, str]:
    """(problem type, why) from the label column's datasets feature; `values` is called for the column's distinct
    values only when the feature alone cannot tell (a float column of whole numbers stays classification)."""
    if given:
        return given, "given by --problem_type"
    if separator:
        return MULTI, f"--label_separator {separator!r} splits each label into several"
    inner = getattr(feature, "feature", None)
    dtype = getattr(feature, "dtype", None)
    if inner is not None:  # a list per row
        if getattr(inner, "dtype", "").startswith("float"):
            return REGRESSION, "the label column holds lists of floats (several regression targets)"
        return MULTI, "the label column holds a list of labels per row"
    if dtype in ("float32", "float64", "float16"):
        distinct = [v for v in values() if v is not None and v == v]  # v == v drops NaN
        if distinct and all(float(v).is_integer() for v in distinct):
            return SINGLE, "the float label column holds whole numbers only (class ids; pass --problem_type " \
                           "regression to fit them as values)"
        return REGRESSION, "the label column holds floats"
    return SINGLE, "the label column holds one class per row" + (" (ids)" if dtype and dtype.startswith(("int", "uint"))
                                                                  else "")


def parse_class_weights(option: str | None) -> str | list[float] | None:
    """--class_weights: None, "auto", or the list of weights; a ValueError for anything else."""
    if option is None or option == "auto":
        return option
    weights = [float(w) for w in option.split(",")]
    if any(not w > 0 for w in weights):
        raise ValueError("weights must be > 0")
    return weights


def class_weights(option: str | None, problem_type: str, train_labels: np.ndarray | None,
                  names: list[str]) -> torch.Tensor | None:
    """The per-class loss weights (single-label) or per-label positive weights (multi-label), or None.

    auto: single-label, inverse class frequency normalised as scikit-learn's "balanced" (n / (classes x count), so a
    balanced set gets all 1); multi-label, negatives / positives of each label (BCE's pos_weight, the inverse
    frequency of the positive class). A class with no training example counts as one.
    """
    weights = parse_class_weights(option)
    if weights is None:
        return None
    if problem_type == REGRESSION:
        raise UserError("--class_weights is for classification; the problem is regression: drop it")
    if weights == "auto":
        if train_labels is None:
            raise UserError("--class_weights auto counts the training labels: it needs --do_train (or give the weights)")
        if problem_type == SINGLE:
            counts = np.bincount(train_labels.astype(np.int64), minlength=len(names)).astype(np.float64)
            weights = len(train_labels) / (len(names) * np.maximum(counts, 1))
        else:
            positives = train_labels.sum(axis=0).astype(np.float64)
            weights = (len(train_labels) - positives) / np.maximum(positives, 1)
    if len(weights) != len(names):
        raise UserError(f"--class_weights has {len(weights)} weights for {len(names)} classes ({', '.join(names[:10])}): "
                        "give one per class, in this order, or auto")
    return torch.tensor(np.asarray(weights), dtype=torch.float32)


@dataclass
class Problem:
    """What the labels are and how the model's logits are read and scored."""

    problem_type: str
    names: list[str]  # classes (labels) in id order; regression: the targets' names
    reason: str = ""
    weights: torch.Tensor | None = None  # class weights (single) or pos_weight (multi)
    label_smoothing: float = 0.0
    threshold: float = 0.5  # multi-label: a label is predicted when its probability is at least this
    tune_threshold: bool = False  # multi-label --multi_label_threshold auto: re-chosen at every evaluation

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The one loss of training and evaluation, in fp32 whatever precision the logits came in."""
        logits = logits.float()
        weights = None if self.weights is None else self.weights.to(logits.device)
        if self.problem_type == SINGLE:
            return F.cross_entropy(logits, labels.long(), weight=weights, label_smoothing=self.label_smoothing)
        if self.problem_type == MULTI:
            targets = labels.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)
        return F.mse_loss(logits, labels.float().view(logits.shape))

    # Reading logits (numpy, as gathered). Probabilities: softmax or sigmoid; None for regression.
    def probabilities(self, logits: np.ndarray) -> np.ndarray | None:
        tensor = torch.from_numpy(logits).float()
        if self.problem_type == SINGLE:
            return torch.softmax(tensor, dim=-1).numpy()
        if self.problem_type == MULTI:
            return torch.sigmoid(tensor).numpy()
        return None

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Class ids (single), 0/1 per label at the threshold (multi), the values (regression, one column per target)."""
        if self.problem_type == SINGLE:
            return logits.argmax(axis=-1)
        if self.problem_type == MULTI:
            return (self.probabilities(logits) >= self.threshold).astype(np.int64)
        return logits


def best_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises micro-F1, exactly: every (example, label) probability sorted from the highest, the
    micro-F1 of predicting the top k positive is 2 TP_k / (k + positives), and only cuts between two distinct
    probabilities are thresholds. Returns the midpoint of the best cut (0.5 when there is nothing to learn from)."""
    p, y = probabilities.ravel().astype(np.float64), labels.ravel().astype(np.float64)
    positives = y.sum()
    if positives == 0 or len(p) == 0:
        return 0.5
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    k = np.arange(1, len(p) + 1)
    f1 = 2 * np.cumsum(y) / (k + positives)
    cut = np.r_[p[:-1] != p[1:], True]  # a threshold can only fall after the last of equal probabilities
    best = int(np.argmax(np.where(cut, f1, -1.0)))
    below = p[best + 1] if best + 1 < len(p) else 0.0
    return float((p[best] + below) / 2)
