"""Accuracy, F1, precision and recall as a local 🤗 Evaluate metric module, so they load with no Hub access.

`evaluate.load("<this file>", "f1")` picks the metric by config name; the maths is scikit-learn's, as in the Hub's
own accuracy/f1/precision/recall modules, so results match theirs.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

SCORERS = {"accuracy": accuracy_score, "f1": f1_score, "precision": precision_score, "recall": recall_score}


class Classification(evaluate.Metric):
    def _info(self):
        if self.config_name not in SCORERS:
            raise KeyError(f"unknown metric {self.config_name!r}; built in: {', '.join(SCORERS)}")
        return evaluate.MetricInfo(
            description=f"{self.config_name} for single-label classification (scikit-learn).",
            citation="",
            inputs_description="predictions and references: class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", labels=None, sample_weight=None):
        # sample_weight: each (prediction, reference) pair's count, when tuneloop scores a confusion matrix
        if self.config_name == "accuracy":
            return {"accuracy": float(accuracy_score(references, predictions, sample_weight=sample_weight))}
        scorer = SCORERS[self.config_name]
        value = scorer(
            references, predictions, average=average, labels=labels, zero_division=0, sample_weight=sample_weight
        )
        return {self.config_name: float(value)}
