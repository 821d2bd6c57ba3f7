"""Regression metrics as a local 🤗 Evaluate module, so they load with no Hub access: mean squared and absolute error
(over every target), Pearson and Spearman correlation (per target, then averaged), by scikit-learn and SciPy.

Inputs: `predictions` and `references`, one list of target values per example (one value for a single target).
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error

METRICS = ("mse", "mae", "pearson", "spearman")


class Regression(evaluate.Metric):
    def _info(self):
        if self.config_name not in METRICS:
            raise KeyError(f"unknown regression metric {self.config_name!r}; built in: {', '.join(METRICS)}")
        return evaluate.MetricInfo(
            description=f"{self.config_name} for regression (scikit-learn, SciPy).",
            citation="",
            inputs_description="predictions and references: the target values of each example",
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("float32")),
                    "references": datasets.List(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, predictions, references):
        predicted, truth = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        if self.config_name == "mse":
            return {"mse": float(mean_squared_error(truth, predicted))}
        if self.config_name == "mae":
            return {"mae": float(mean_absolute_error(truth, predicted))}
        correlate = pearsonr if self.config_name == "pearson" else spearmanr
        # A constant column (a model that predicts one value) has no correlation: scipy says nan, we say 0.
        values = [
            correlate(truth[:, i], predicted[:, i])[0] if np.ptp(predicted[:, i]) and np.ptp(truth[:, i]) else 0.0
            for i in range(truth.shape[1])
        ]
        return {self.config_name: float(np.mean(values))}
