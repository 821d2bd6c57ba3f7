"""Multi-label metrics as a local 🤗 Evaluate module, so they load with no Hub access: micro and macro F1 and subset
accuracy at a threshold, and the threshold-free mean average precision (scikit-learn's maths).

Inputs: `predictions`, each example's probability of every label; `references`, its 0/1 vector; `threshold` (a label
is predicted when its probability reaches it). Mean average precision ranks the probabilities and needs no threshold:
with many rare labels a model can predict no label at all at 0.5 and still rank them well; that shows here.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

METRICS = ("micro_f1", "macro_f1", "subset_accuracy", "mean_average_precision")


class MultiLabel(evaluate.Metric):
    def _info(self):
        if self.config_name not in METRICS:
            raise KeyError(f"unknown multi-label metric {self.config_name!r}; built in: {', '.join(METRICS)}")
        return evaluate.MetricInfo(
            description=f"{self.config_name} for multi-label classification (scikit-learn).",
            citation="",
            inputs_description="predictions: probabilities per label; references: 0/1 per label",
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("float32")),
                    "references": datasets.List(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, threshold=0.5, sample_weight=None):
        # sample_weight: each row's count, when tuneloop scores per-label counts as weighted rows (metrics.Running)
        probabilities, truth = np.asarray(predictions, dtype=np.float32), np.asarray(references)
        if self.config_name == "mean_average_precision":
            present = truth.sum(axis=0) > 0  # a label with no positive example has no average precision
            value = (
                average_precision_score(truth[:, present], probabilities[:, present], average="macro")
                if present.any()
                else 0.0
            )
            return {self.config_name: float(value)}
        predicted = (probabilities >= threshold).astype(np.int64)
        if self.config_name == "subset_accuracy":  # every label of the example right
            return {self.config_name: float(accuracy_score(truth, predicted, sample_weight=sample_weight))}
        average = self.config_name.removesuffix("_f1")
        value = f1_score(truth, predicted, average=average, zero_division=0, sample_weight=sample_weight)
        return {self.config_name: float(value)}
