"""Evaluation metrics through 🤗 Evaluate: the built-in ones offline from local modules (single-label accuracy/f1/
precision/recall, multi-label and regression metrics), others by Hub name.

Predictions are gathered from every process with `gather_for_metrics` before they reach here, so each metric is
computed once on the whole eval set; evaluate's own multi-process mode is deliberately not used as well.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

from tuneloop.errors import UserError

MODULES = Path(__file__).parent / "metric_modules"
# Built-in metric name -> the local module that computes it (config name = metric name).
LOCAL = {
    **{name: MODULES / "classification.py" for name in ("accuracy", "f1", "precision", "recall")},
    **{name: MODULES / "multi_label.py" for name in ("micro_f1", "macro_f1", "subset_accuracy", "mean_average_precision")},
    **{name: MODULES / "regression.py" for name in ("mse", "mae", "pearson", "spearman")},
}
BUILTIN = tuple(LOCAL)
AVERAGED = ("f1", "precision", "recall")


def load_metrics(names: list[str]) -> dict[str, evaluate.EvaluationModule]:
    """Call under `accelerator.main_process_first()`: evaluate copies modules into a shared cache on load."""
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
            raise UserError(f"metric {name!r} could not be loaded ({reason}): use one of {', '.join(BUILTIN)} offline, "
                            "or a 🤗 Evaluate Hub metric with network access") from None
    return modules


def compute_metrics(modules: dict[str, evaluate.EvaluationModule], predictions, references, average: str,
                    probabilities=None, threshold: float | None = None) -> dict[str, float]:
    """`predictions`: class ids (single-label), 0/1 per label (multi-label) or values (regression, 2-D: one column per
    target). The local multi-label modules take the `probabilities` and the `threshold` instead (mean average
    precision ranks them); a Hub module always gets `predictions`."""
    results = {}
    for name, module in modules.items():
        kwargs = {"average": average} if name in AVERAGED else {}
        given = predictions
        if probabilities is not None and LOCAL.get(name, Path()).name == "multi_label.py":
            given, kwargs = probabilities, {"threshold": threshold}
        for key, value in module.compute(predictions=given, references=references, **kwargs).items():
            results[key] = float(value)
    return results
