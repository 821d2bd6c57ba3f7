"""The problem a run solves: single-label classification, multi-label classification or regression.

Decided once, here (`decide`): `--problem_type`, else the saved model's, else from the label column as transformers'
`run_classification.py` decides it (float labels: regression; a list of labels per row, or `--label_separator`:
multi-label; anything else, including a float column of whole numbers such as pandas writes for an integer column
with a gap: single-label). Each type is one class, looked up by its name (the model config's `problem_type`), that
knows what its labels are: how they are named and encoded, the loss (training and evaluation both compute it here,
so train and eval loss are the same function), its metrics, how logits become predictions, probabilities and
values, its prediction columns, report sections and model-card lines:

- single-label: cross-entropy, with `--class_weights` and `--label_smoothing_factor`;
- multi-label: binary cross-entropy on the logits, `pos_weight` from `--class_weights`, targets smoothed towards 0.5;
- regression: mean squared error over every target.

`--loss focal` (Lin et al. 2017, "Focal Loss for Dense Object Detection") scales each example's cross-entropy by
(1 - p_t)^gamma, p_t the probability given to the true class (single-label, softmax) or to each label's true value
(multi-label, sigmoid: torchvision's `sigmoid_focal_loss`): confident, easy examples count less. `--class_weights`
weigh it as they weigh cross-entropy (the paper's alpha per class; multi-label: pos_weight); gamma 0 is cross-entropy.

torch is imported here; `datasets` and `pyarrow` only where labels are encoded, as config and runtime import this
module and the doctor's probe must not load the data stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from tuneloop.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

    from tuneloop.options import DataArguments, TrainArguments

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
# The options that shape the loss: a resumed run keeps them (checkpoint.RESUME_SETTINGS).
LOSS_OPTIONS = ("class_weights", "label_smoothing_factor", "loss", "focal_gamma")
# Metrics where a smaller value is better (best model, early stopping): errors and losses.
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse")


@dataclass
class Problem:
    """What the labels are and how the model's logits are read and scored: one subclass per problem type, whose class
    attributes say what the type is and whose instance is the run's (its classes, loss weights, threshold)."""

    names: list[str]  # classes (labels) in id order; regression: the targets' names
    reason: str = ""  # why this problem type: printed at start
    weights: torch.Tensor | None = None  # class weights (single) or pos_weight (multi)
    label_smoothing: float = 0.0
    threshold: float = 0.5  # multi-label: a label is predicted when its probability is at least this
    tune_threshold: bool = False  # multi-label --multi_label_threshold auto: re-chosen at every evaluation
    loss_name: str | None = None  # --loss; None: the type's usual loss, losses[0]
    focal_gamma: float = 2.0

    problem_type: ClassVar[str]  # the name: --problem_type, the model config's problem_type
    unit: ClassVar[str]  # what one output of the model is called: a class, a label, a target
    units: ClassVar[str]
    losses: ClassVar[tuple[str, ...]]  # the --loss values it takes, its usual one first
    builtin_metrics: ClassVar[tuple[str, ...]]  # computed offline by metric_modules/<metric_module>
    default_metrics: ClassVar[tuple[str, ...]]  # computed when --metrics is not given
    metric_module: ClassVar[str]
    metrics_read_probabilities: ClassVar[bool] = False  # its built-in metrics score probabilities at the threshold
    weights_kind: ClassVar[str | None] = None  # what --class_weights are for it (None: not a classification)
    has_threshold: ClassVar[bool] = False  # --multi_label_threshold applies
    report_sections: ClassVar[tuple[str, ...]]  # report.SECTIONS drawn from the final evaluation, in this order
    pipeline_arguments: ClassVar[str] = ")"  # how the model card's `pipeline(...)` call ends

    # ------------------------------------------------------------ the options, checked against the type

    @classmethod
    def options_problem(cls, t: TrainArguments, reason: str | None) -> str | None:
        """What is wrong with the loss options for this type, or None. `reason`: why the type, once it is decided;
        None while checking the options before anything is loaded (then the type was given by --problem_type)."""
        if t.loss and t.loss not in cls.losses:
            if reason is None:
                return f"loss {t.loss} does not apply to problem_type {cls.problem_type}: use {' or '.join(cls.losses)}"
            return (
                f"--loss {t.loss} does not apply to {cls.problem_type} ({reason}): use {' or '.join(cls.losses)}, "
                "or pass --problem_type"
            )
        return None

    def average_problem(self, average: str) -> str | None:
        """What is wrong with --metric_average for these classes, or None."""
        return None

    # ------------------------------------------------------------ labels (datasets.Dataset columns)

    @classmethod
    def label_names(
        cls,
        reference: Dataset,
        evaluation: Dataset | None,
        column: str,
        num_labels: int | None,
        separator: str | None,
        path: str | None,
        row_name: Callable[[int], str],
    ) -> list[str]:
        """Class names, labels or targets, in id order. `evaluation`: the eval sets' labels (they must be covered);
        `path`: the file `reference` came from and `row_name(i)` its i-th row as a person counts it, for messages."""
        raise NotImplementedError

    @classmethod
    def encode(cls, split: Dataset, column: str, names: list[str], split_name: str, separator: str | None) -> Dataset:
        """The label column as the loss takes it."""
        raise NotImplementedError

    # ------------------------------------------------------------ logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The one loss of training and evaluation, in fp32 whatever precision the logits came in."""
        raise NotImplementedError

    def loss_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """`loss` in running form, for a set scored a chunk at a time (a streamed prediction's test loss): (the sum of
        the chunk's weighted terms, the sum of their weights), in float64. `loss` of the whole set is the sum of every
        chunk's first number over the sum of their second ones, as `loss` itself reduces (tests/test_problem_types.py
        checks this for each type and option)."""
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray) -> np.ndarray | None:
        """From logits as gathered (numpy): softmax or sigmoid; None for regression."""
        return None

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def metric_inputs(self, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(predictions, references, probabilities) as metrics.compute_metrics takes them."""
        return self.predictions(logits), labels, None

    def extra_results(self, prefix: str) -> dict:
        """Results beside the metrics of an evaluation."""
        return {}

    def choose_threshold(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """At an evaluation, from the eval set's gathered outputs: re-choose the threshold, where that is asked for."""

    def record_in(self, model_config) -> None:
        """Write what predictions need beyond the problem type into the saved model's config."""

    def note(self) -> str:
        """What the start line says after the number of classes."""
        return ""

    # ------------------------------------------------------------ outputs for people

    def add_predictions(self, rows: list[dict], logits: np.ndarray, labels: np.ndarray | None) -> None:
        """The prediction columns of each row of the predictions file (and the true label, when known)."""
        raise NotImplementedError

    def card_task(self) -> str:
        """The model card's first sentence, after "fine-tuned with tuneloop for "."""
        raise NotImplementedError


class SingleLabel(Problem):
    problem_type, unit, units = SINGLE, "class", "classes"
    losses = ("cross_entropy", "focal")
    builtin_metrics = ("accuracy", "f1", "precision", "recall")
    default_metrics = ("accuracy", "f1")
    metric_module = "classification.py"
    weights_kind = "class weights"
    report_sections = ("per_class", "confusion_matrix")

    @classmethod
    def auto_weights(cls, train_labels: np.ndarray, names: list[str]) -> np.ndarray:
        """scikit-learn's "balanced": n / (classes x count), so a balanced set gets all 1."""
        counts = np.bincount(train_labels.astype(np.int64), minlength=len(names)).astype(np.float64)
        return len(train_labels) / (len(names) * np.maximum(counts, 1))

    def average_problem(self, average: str) -> str | None:
        if average == "binary" and len(self.names) != 2:
            return f"metric_average=binary needs 2 classes, the data has {len(self.names)}: use macro"
        return None

    @classmethod
    def label_names(cls, reference, evaluation, column, num_labels, separator, path, row_name):
        """From a ClassLabel feature, sorted strings, or the ids 0..n-1 themselves (every one used, or --num_labels
        given: _check_class_ids)."""
        from datasets import ClassLabel

        feature = reference.features[column]
        # whole floats: an integer column with gaps, as pandas writes it
        whole_floats = getattr(feature, "dtype", "").startswith("float")
        plain_ids = not isinstance(feature, ClassLabel) and (
            getattr(feature, "dtype", "").startswith(("int", "uint")) or whole_floats
        )
        if isinstance(feature, ClassLabel):
            names = list(feature.names)
        elif getattr(feature, "dtype", None) in ("string", "large_string"):
            values = set(reference.unique(column))
            if evaluation is not None and evaluation is not reference:
                values |= set(evaluation.unique(column))
            if None in values:
                raise UserError(f"label column {column!r} has empty values: drop or fill those rows")
            names = sorted(values)
        elif plain_ids:
            top = int(max(v for v in reference.unique(column) if v is not None))
            if num_labels is None:
                _check_class_ids(reference, evaluation, column, top, path, row_name)
            names = [str(i) for i in range(num_labels or top + 1)]
        else:
            raise UserError(
                f"label column {column!r} holds {feature}, not class ids or names: fix --label_column, or pass "
                "--problem_type"
            )
        if num_labels is not None and num_labels != len(names) and not plain_ids:
            raise UserError(
                f"--num_labels {num_labels} but the data has {len(names)} classes {names[:10]}: drop --num_labels"
            )
        if len(names) < 2:
            raise UserError(f"label column {column!r} has {len(names)} class(es); classification needs at least 2")
        return names

    @classmethod
    def encode(cls, split, column, names, split_name, separator):
        """Labels as ids in [0, len(names)), typed ClassLabel so splits can be stratified and names travel with them."""
        from datasets import ClassLabel

        feature = split.features[column]
        typed = split.features.copy()
        typed[column] = ClassLabel(names=names)
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            ids = {name: i for i, name in enumerate(names)}
            unknown = sorted({v for v in split.unique(column) if v not in ids}, key=str)
            if unknown:  # only possible for a split scored by an already trained model
                raise UserError(
                    f"labels {unknown[:5]} in the {split_name} split are not classes of the model "
                    f"({', '.join(names[:10])}): fix the data or --label_column"
                )
            return split.map(lambda batch: {column: [ids[v] for v in batch[column]]}, batched=True, features=typed)
        bad = sorted({v for v in split.unique(column) if v is None or not 0 <= v < len(names)}, key=str)
        if bad:
            fix = "; or pass --num_labels above the largest label" if any(v is not None and v > 0 for v in bad) else ""
            raise UserError(
                f"labels {bad[:5]} in the {split_name} split are outside 0..{len(names) - 1}: fix the data{fix}"
            )
        return split if feature == typed[column] else split.cast(typed)

    def loss(self, logits, labels):
        """Cross-entropy, or softmax focal loss: each example's cross-entropy times (1 - p_true)^gamma. With class
        weights both are the weighted mean (sum of w_y x loss over the sum of w_y), as torch's cross_entropy."""
        logits = logits.float()
        weights = None if self.weights is None else self.weights.to(logits.device)
        if self.loss_name != "focal":
            return F.cross_entropy(logits, labels.long(), weight=weights, label_smoothing=self.label_smoothing)
        labels = labels.long()
        cross_entropy = F.cross_entropy(logits, labels, reduction="none")
        focal = (1 - torch.exp(-cross_entropy)) ** self.focal_gamma * cross_entropy
        if weights is None:
            return focal.mean()
        return (weights[labels] * focal).sum() / weights[labels].sum()

    def loss_sums(self, logits, labels):
        """torch's weighted mean: each row's (smoothed, weighted) cross-entropy or focal term summed, over the sum of
        the rows' class weights (the row count without weights)."""
        logits, labels = logits.float(), labels.long()
        weights = None if self.weights is None else self.weights.to(logits.device)
        row_weights = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights[labels].double()
        if self.loss_name != "focal":
            terms = F.cross_entropy(
                logits, labels, weight=weights, label_smoothing=self.label_smoothing, reduction="none"
            )
        else:
            cross_entropy = F.cross_entropy(logits, labels, reduction="none")
            terms = (1 - torch.exp(-cross_entropy)) ** self.focal_gamma * cross_entropy
            if weights is not None:
                terms = weights[labels] * terms
        return terms.double().sum().item(), row_weights.sum().item()

    def probabilities(self, logits):
        return torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()

    def predictions(self, logits):
        """Class ids."""
        return logits.argmax(axis=-1)

    def add_predictions(self, rows, logits, labels):
        """`label`, `predicted_label`, `probabilities` {class: p}."""
        names = self.names
        for i, (row, predicted, probabilities) in enumerate(
            zip(rows, self.predictions(logits), self.probabilities(logits).tolist())
        ):
            if labels is not None:
                row["label"] = names[labels[i]]
            row["predicted_label"] = names[predicted]
            row["probabilities"] = {name: round(p, 6) for name, p in zip(names, probabilities)}

    def card_task(self):
        return f"text classification: {len(self.names)} classes ({', '.join(self.names)})."


class MultiLabel(Problem):
    problem_type, unit, units = MULTI, "label", "labels"
    losses = ("cross_entropy", "focal")
    builtin_metrics = ("micro_f1", "macro_f1", "subset_accuracy", "mean_average_precision")
    default_metrics = builtin_metrics
    metric_module = "multi_label.py"
    metrics_read_probabilities = True
    weights_kind = "pos_weight"
    has_threshold = True
    report_sections = ("per_class", "threshold")
    pipeline_arguments = ", top_k=None)  # every label's probability"

    @classmethod
    def auto_weights(cls, train_labels: np.ndarray, names: list[str]) -> np.ndarray:
        """Negatives / positives of each label: BCE's pos_weight, the inverse frequency of the positive class."""
        positives = train_labels.sum(axis=0).astype(np.float64)
        return (len(train_labels) - positives) / np.maximum(positives, 1)

    @classmethod
    def label_names(cls, reference, evaluation, column, num_labels, separator, path, row_name):
        """Every label seen in either split, sorted (ids in numeric order)."""
        names = sorted(
            _multi_label_values(reference, column, separator)
            | (_multi_label_values(evaluation, column, separator) if evaluation is not None else set())
        )
        if all(name.isdigit() for name in names):  # label ids: in numeric order
            names.sort(key=int)
        if num_labels is not None and num_labels != len(names):
            raise UserError(
                f"--num_labels {num_labels} but the data has {len(names)} labels {names[:10]}: drop --num_labels"
            )
        if len(names) < 2:
            raise UserError(f"label column {column!r} has {len(names)} label(s); multi-label needs at least 2")
        return names

    @classmethod
    def encode(cls, split, column, names, split_name, separator):
        """A 0/1 float32 vector over `names` per row (what BCE takes)."""
        import datasets

        ids = {name: i for i, name in enumerate(names)}
        unknown = sorted(_multi_label_values(split, column, separator) - set(ids))
        if unknown:
            raise UserError(
                f"labels {unknown[:5]} in the {split_name} split are not labels of the model "
                f"({', '.join(names[:10])}): fix the data or --label_column"
            )

        def multi_hot(batch):
            rows = []
            for row in batch[column]:
                vector = [0.0] * len(names)
                for label in _split_labels(row, separator):
                    vector[ids[label]] = 1.0
                rows.append(vector)
            return {column: rows}

        typed = split.features.copy()
        typed[column] = datasets.List(datasets.Value("float32"), length=len(names))
        return split.map(multi_hot, batched=True, features=typed, desc="Encoding labels")

    def loss(self, logits, labels):
        """Binary cross-entropy on each label, or sigmoid focal loss (torchvision's `sigmoid_focal_loss` without
        alpha: each term times (1 - p_t)^gamma); `pos_weight` in both, the mean over every (example, label)."""
        logits = logits.float()
        weights = None if self.weights is None else self.weights.to(logits.device)
        targets = labels.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.loss_name != "focal":
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)
        cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights, reduction="none")
        p = torch.sigmoid(logits)
        p_true = p * targets + (1 - p) * (1 - targets)
        return (cross_entropy * (1 - p_true) ** self.focal_gamma).mean()

    def loss_sums(self, logits, labels):
        """The mean over every (example, label): the terms' sum and their count."""
        logits = logits.float()
        weights = None if self.weights is None else self.weights.to(logits.device)
        targets = labels.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        terms = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights, reduction="none")
        if self.loss_name == "focal":
            p = torch.sigmoid(logits)
            p_true = p * targets + (1 - p) * (1 - targets)
            terms = terms * (1 - p_true) ** self.focal_gamma
        return terms.double().sum().item(), float(terms.numel())

    def probabilities(self, logits):
        return torch.sigmoid(torch.from_numpy(logits).float()).numpy()

    def predictions(self, logits):
        """0/1 per label at the threshold."""
        return (self.probabilities(logits) >= self.threshold).astype(np.int64)

    def metric_inputs(self, logits, labels):
        return self.predictions(logits), labels, self.probabilities(logits)

    def extra_results(self, prefix):
        return {f"{prefix}_threshold": self.threshold}

    def choose_threshold(self, logits, labels):
        """--multi_label_threshold auto: the threshold that maximises micro-F1 on these outputs."""
        if self.tune_threshold:
            self.threshold = best_threshold(self.probabilities(logits), labels)

    def record_in(self, model_config):
        """The threshold the final evaluation chose: predictions use it."""
        model_config.multi_label_threshold = self.threshold

    def note(self):
        return f"; threshold {'auto (max micro-F1 on the eval set)' if self.tune_threshold else self.threshold}"

    def add_predictions(self, rows, logits, labels):
        """`labels` and `predicted_labels` (lists: every label at or above the threshold, most probable first),
        `probabilities` {label: p}."""
        names, probabilities = self.names, self.probabilities(logits)
        for i, (row, p) in enumerate(zip(rows, probabilities.tolist())):
            if labels is not None:
                row["labels"] = [name for name, on in zip(names, labels[i]) if on]
            ranked = sorted(range(len(names)), key=lambda j: -p[j])
            row["predicted_labels"] = [names[j] for j in ranked if p[j] >= self.threshold]
            row["probabilities"] = {name: round(value, 6) for name, value in zip(names, p)}

    def card_task(self):
        return (
            f"multi-label text classification: {len(self.names)} labels ({', '.join(self.names)}), each predicted "
            f"when its probability reaches {self.threshold:.4g}"
            + (" (chosen to maximise micro-F1 on the evaluation set)." if self.tune_threshold else ".")
        )


class Regression(Problem):
    problem_type, unit, units = REGRESSION, "target", "target(s)"
    losses = ("mse",)
    builtin_metrics = ("mse", "mae", "pearson", "spearman")
    default_metrics = builtin_metrics
    metric_module = "regression.py"
    report_sections = ("scatter", "per_target")
    pipeline_arguments = ", function_to_apply='none')  # the predicted value"

    @classmethod
    def options_problem(cls, t, reason):
        if t.class_weights or t.label_smoothing_factor:
            if reason is None:
                return "class_weights and label_smoothing_factor are for classification, the problem_type is regression"
            return (
                "--class_weights and --label_smoothing_factor are for classification; the problem is regression "
                f"({reason}): drop them, or pass --problem_type"
            )
        return super().options_problem(t, reason)

    @classmethod
    def label_names(cls, reference, evaluation, column, num_labels, separator, path, row_name):
        """The targets' names: the column's, numbered if several."""
        width = _regression_width(reference, column)
        return [column] if width is None else [f"{column}_{i}" for i in range(width)]

    @classmethod
    def encode(cls, split, column, names, split_name, separator):
        """float32 value(s)."""
        import datasets

        width = _regression_width(split, column)
        if (width or 1) != len(names):
            raise UserError(
                f"the {split_name} split has {width or 1} regression target(s), the model {len(names)} "
                f"({', '.join(names)}): fix the data or --label_column"
            )
        values = split[column]
        missing = next((i for i, v in enumerate(values) if v is None or (width and any(x is None for x in v))), None)
        if missing is not None:
            raise UserError(
                f"label column {column!r} is empty in row {missing} of the {split_name} split: drop or fill that row"
            )
        typed = split.features.copy()
        typed[column] = (
            datasets.Value("float32") if width is None else datasets.List(datasets.Value("float32"), length=width)
        )
        try:
            return split.cast(typed)
        except (TypeError, ValueError) as e:
            raise UserError(
                f"label column {column!r} of the {split_name} split is not numeric "
                f"({' '.join(str(e).split())[:200]}): regression needs numbers; fix --label_column or "
                "--problem_type"
            ) from None

    def loss(self, logits, labels):
        """Mean squared error over every target."""
        logits = logits.float()
        return F.mse_loss(logits, labels.float().view(logits.shape))

    def loss_sums(self, logits, labels):
        """The mean over every target of every example: the squared errors' sum and their count."""
        logits = logits.float()
        terms = F.mse_loss(logits, labels.float().view(logits.shape), reduction="none")
        return terms.double().sum().item(), float(terms.numel())

    def predictions(self, logits):
        """The values, one column per target."""
        return logits

    def metric_inputs(self, logits, labels):
        """One column per target."""
        return logits.reshape(len(labels), -1), labels.reshape(len(labels), -1), None

    def add_predictions(self, rows, logits, labels):
        """`label` and `predicted_value`, a number (several targets: {target: value} each)."""
        names = self.names

        def value(vector):
            vector = np.asarray(vector, dtype=np.float64).reshape(-1)
            if len(names) == 1:
                return round(float(vector[0]), 6)
            return {n: round(float(v), 6) for n, v in zip(names, vector)}

        for i, row in enumerate(rows):
            if labels is not None:
                row["label"] = value(labels[i])
            row["predicted_value"] = value(logits[i])

    def card_task(self):
        return f"regression from text: {len(self.names)} target(s) ({', '.join(self.names)})."


TYPES = {kind.problem_type: kind for kind in (SingleLabel, MultiLabel, Regression)}
PROBLEM_TYPES = tuple(TYPES)
DEFAULT = SingleLabel  # without labels, a --problem_type or a saved one
# The metrics built into tuneloop (offline modules in metric_modules/, see metrics.py): the only metric names that run
# no code from outside tuneloop. Any other name needs --trust_remote_code.
BUILTIN_METRIC_NAMES = tuple(name for kind in TYPES.values() for name in kind.builtin_metrics)


def of(problem_type: str) -> type[Problem]:
    """The class of a problem type, by its name (--problem_type, the model config's problem_type)."""
    return TYPES[problem_type]


def decide(
    given: str | None, saved: str | None, feature=None, values=None, separator: str | None = None
) -> tuple[type[Problem], str]:
    """(problem type, why): --problem_type, else the saved model's, else from the label column's datasets `feature`
    (`values` is called for the column's distinct values only when the feature alone cannot tell: a float column of
    whole numbers stays classification); with no labels to read, single-label."""
    if given:
        return of(given), "given by --problem_type"
    if saved:
        return of(saved), "the model's saved problem_type"
    if feature is None:
        return DEFAULT, "the default"
    if separator:
        return MultiLabel, f"--label_separator {separator!r} splits each label into several"
    inner = getattr(feature, "feature", None)
    dtype = getattr(feature, "dtype", None)
    if inner is not None:  # a list per row
        if getattr(inner, "dtype", "").startswith("float"):
            return Regression, "the label column holds lists of floats (several regression targets)"
        return MultiLabel, "the label column holds a list of labels per row"
    if dtype in ("float32", "float64", "float16"):
        distinct = [v for v in values() if v is not None and v == v]  # v == v drops NaN
        if distinct and all(float(v).is_integer() for v in distinct):
            return (
                SingleLabel,
                "the float label column holds whole numbers only (class ids; pass --problem_type "
                "regression to fit them as values)",
            )
        return Regression, "the label column holds floats"
    return SingleLabel, "the label column holds one class per row" + (
        " (ids)" if dtype and dtype.startswith(("int", "uint")) else ""
    )


def make_problem(
    d: DataArguments, t: TrainArguments, eval_names: list[str], splits, model_config, names: list[str]
) -> tuple[Problem, list[str]]:
    """The run's problem: its type (decided by data.load_splits from the labels, or else here from --problem_type or
    the saved model), the loss and its weights, the multi-label threshold; and the lines that say which and why.
    Checks what could not be checked before the labels were read. `eval_names`: the eval sets --validation_file or
    --validation_split name."""
    if splits is not None:
        kind, reason = of(splits.problem_type), splits.problem_reason
    else:
        kind, reason = decide(d.problem_type, getattr(model_config, "problem_type", None))
    if problem := kind.options_problem(t, reason):
        raise UserError(problem)
    if problem := best_metric_problem(t.metric_for_best_model, t.metrics, eval_names, kind.problem_type):
        raise UserError(problem)
    train_labels = (
        np.asarray(list(splits.train[splits.label_column]))
        if splits is not None and splits.train is not None and t.class_weights == "auto"
        else None
    )
    weights = class_weights(t.class_weights, kind.problem_type, train_labels, names)
    saved_threshold = getattr(model_config, "multi_label_threshold", None) if not t.do_train else None
    threshold = t.multi_label_threshold
    problem = kind(
        names,
        reason,
        weights,
        t.label_smoothing_factor,
        threshold=float(threshold) if threshold not in (None, "auto") else saved_threshold or 0.5,
        tune_threshold=threshold == "auto" and kind.has_threshold,
        loss_name=t.loss,
        focal_gamma=t.focal_gamma,
    )
    lines = []
    if problem.tune_threshold and not t.do_eval:
        lines.append("warning: --multi_label_threshold auto is chosen on the eval set, and --do_eval is off: using 0.5")
        problem.tune_threshold = False
    lines.append(f"tuneloop: problem type {kind.problem_type} ({reason}); {len(names)} {kind.units}" + problem.note())
    if weights is not None:
        how = "auto: inverse frequency of the training labels" if t.class_weights == "auto" else "given"
        lines.append(
            f"tuneloop: {kind.weights_kind} ({how}): "
            + ", ".join(f"{name}={w:.4g}" for name, w in zip(names, weights.tolist()))
        )
    return problem, lines


def lower_is_better(metric_key: str) -> bool:
    return metric_key.removeprefix("eval_").endswith(LOWER_IS_BETTER)


def metric_names(problem_type: str, given: list[str] | None) -> list[str]:
    return list(given) if given else list(of(problem_type).default_metrics)


def untrusted_metrics(names: list[str] | None, trust_remote_code: bool) -> str | None:
    """What is wrong with metric names that are not built in, unless the user trusts remote code; None if nothing.
    🤗 Evaluate imports and runs the Python file behind any other name (a local .py file, a Hub module) to load it."""
    outside = [name for name in names or () if name not in BUILTIN_METRIC_NAMES]
    if not outside or trust_remote_code:
        return None
    return (
        f"metrics {', '.join(outside)}: not built in, and 🤗 Evaluate runs a metric's code (a local .py file or a "
        f"Hub module) to load it; add --trust_remote_code if you trust that code, or use built-in metrics "
        f"({', '.join(BUILTIN_METRIC_NAMES)})"
    )


def split_best_metric(name: str | None, eval_names: list[str]) -> tuple[str | None, str]:
    """--metric_for_best_model as (eval set, metric): with several eval sets, 'eval_<set>_<metric>' names one of them;
    with one set, or none named, the set is None. ('' for no metric.)"""
    metric = (name or "").removeprefix("eval_")
    named = next((n for n in eval_names if len(eval_names) > 1 and metric.startswith(n + "_")), None)
    return named, metric.removeprefix(named + "_") if named else metric


def best_metric_key(name: str, eval_names: list[str]) -> str:
    """The results key of metric `name` (written as --metric_for_best_model): eval_<metric> with one eval set, else
    eval_<set>_<metric> of the set it names, or of the first set."""
    named, metric = split_best_metric(name, eval_names)
    return f"eval_{metric}" if len(eval_names) <= 1 else f"eval_{named or eval_names[0]}_{metric}"


def best_metric_problem(
    name: str | None, metrics: list[str] | None, eval_names: list[str], problem_type: str | None, decided: bool = True
) -> str | None:
    """What is wrong with --metric_for_best_model, or None: it must be the loss or a computed metric. Before the
    labels are read (`decided` False) an unknown problem type may compute any type's default metrics."""
    _, metric = split_best_metric(name, eval_names)
    if problem_type is not None:
        computed = metric_names(problem_type, metrics)
    else:
        computed = list(metrics or dict.fromkeys(m for kind in TYPES.values() for m in kind.default_metrics))
    if not metric or metric == "loss" or metric in computed:
        return None
    if decided:
        return (
            f"metric_for_best_model {name!r} is not computed for {problem_type}: use loss or one of "
            f"{', '.join(computed)}"
        )
    several = eval_names if len(eval_names) > 1 else []
    return f"metric_for_best_model {name!r} is not computed: use loss or one of --metrics {computed}" + (
        f", as eval_<set>_<metric> for one of the eval sets {several} (default: the first)" if several else ""
    )


def threshold_problem(value: str | None) -> str | None:
    """What is wrong with --multi_label_threshold, or None."""
    if value is None or value == "auto":
        return None
    try:
        ok = 0 < float(value) < 1
    except ValueError:
        ok = False
    return None if ok else f"multi_label_threshold must be auto or a number in (0, 1) (got {value!r})"


def option_problems(t: TrainArguments) -> list[str]:
    """What is wrong with the options of this module whatever the problem type (the type's own checks:
    `Problem.options_problem`)."""
    problems = []
    try:
        parse_class_weights(t.class_weights)
    except ValueError:
        problems.append(f"class_weights must be auto or positive numbers 'w1,w2,...' (got {t.class_weights!r})")
    if not 0 <= t.label_smoothing_factor < 1:
        problems.append(f"label_smoothing_factor must be in [0, 1) (got {t.label_smoothing_factor})")
    if problem := threshold_problem(t.multi_label_threshold):
        problems.append(problem)
    if t.focal_gamma < 0:
        problems.append(f"focal_gamma must be >= 0, 0 is cross-entropy (got {t.focal_gamma})")
    if t.loss == "focal" and t.label_smoothing_factor:
        problems.append(
            "loss focal with label_smoothing_factor: focal loss already discounts confident predictions; "
            "give one of them"
        )
    return problems


def parse_class_weights(option: str | None) -> str | list[float] | None:
    """--class_weights: None, "auto", or the list of weights; a ValueError for anything else."""
    if option is None or option == "auto":
        return option
    weights = [float(w) for w in option.split(",")]
    if any(not w > 0 for w in weights):
        raise ValueError("weights must be > 0")
    return weights


def class_weights(
    option: str | None, problem_type: str, train_labels: np.ndarray | None, names: list[str]
) -> torch.Tensor | None:
    """The per-class loss weights (single-label) or per-label positive weights (multi-label), or None; auto: the
    type's `auto_weights` of the training labels, a class with no training example counting as one."""
    weights = parse_class_weights(option)
    if weights is None:
        return None
    kind = of(problem_type)
    if kind.weights_kind is None:
        raise UserError(f"--class_weights is for classification; the problem is {problem_type}: drop it")
    if weights == "auto":
        if train_labels is None:
            raise UserError(
                "--class_weights auto counts the training labels: it needs --do_train (or give the weights)"
            )
        weights = kind.auto_weights(train_labels, names)
    if len(weights) != len(names):
        raise UserError(
            f"--class_weights has {len(weights)} weights for {len(names)} classes ({', '.join(names[:10])}): "
            "give one per class, in this order, or auto"
        )
    return torch.tensor(np.asarray(weights), dtype=torch.float32)


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


# ---------------------------------------------------------------- reading label columns


def _check_class_ids(
    reference: Dataset,
    evaluation: Dataset | None,
    column: str,
    top: int,
    path: str | None,
    row_name: Callable[[int], str],
) -> None:
    """Integer labels are class ids 0..N-1, and without --num_labels N is the largest id + 1: so every id up to the
    largest must occur in the data (train and eval together), or one stray value (a 10**9 typed into a 0..4 column)
    would build a head of a billion classes and stall casting the column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = set(reference.unique(column))
    if evaluation is not None and evaluation is not reference:
        values |= set(evaluation.unique(column))  # ints, whole floats (a column with an empty cell), or not ids
    present = {
        int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 <= v <= top
    }
    if len(present) == top + 1:
        return
    missing = next(i for i in range(top + 1) if i not in present)  # at most len(present) + 1 steps
    labels = reference.with_format("arrow")[column]
    row = row_name(pc.index(labels, pa.scalar(top).cast(labels.type)).as_py())
    raise UserError(
        f"label {top} at {row} of {repr(path) if path else 'the training data'} makes {top + 1} classes, "
        f"but only {len(present)} of the ids 0..{top} occur (the first missing is {missing}): fix the "
        f"data, or pass --num_labels {top + 1} if the model really has {top + 1} classes"
    )


def _multi_label_values(split: Dataset, column: str, separator: str | None) -> set[str]:
    """The distinct labels of a multi-label column: lists of names or ids, or strings cut at `separator`."""
    values = set()
    for row in split.unique(column) if separator else split[column]:
        if row is None and separator is None:
            raise UserError(
                f"label column {column!r} has empty values: drop or fill those rows (an empty list means no label)"
            )
        values.update(_split_labels(row, separator))
    return values


def _split_labels(row, separator: str | None) -> list[str]:
    """One row's labels. With a separator an empty cell (None, as CSV readers give it) is a row with no label."""
    if row is None:
        return []
    if separator is not None and isinstance(row, str):
        return [part.strip() for part in row.split(separator) if part.strip()]
    if isinstance(row, str):
        return [row]
    return [str(value) for value in row]


def _regression_width(split: Dataset, column: str) -> int | None:
    """None for one float per row; the number of targets for a list of floats per row (the same in every row)."""
    if getattr(split.features[column], "feature", None) is None:
        return None
    widths = {len(row) for row in split[column] if row is not None}
    if len(widths) != 1:
        raise UserError(
            f"label column {column!r} has lists of {sorted(widths)[:5]} values: every row needs the same "
            "number of regression targets"
        )
    return widths.pop()
