"""Evaluation metrics through 🤗 Evaluate: the built-in ones offline from local modules (single-label accuracy/f1/
precision/recall, multi-label and regression metrics), others by Hub name or path with --trust_remote_code only.

`evaluate.load` imports and runs the Python file of any other name (a local .py file, or a module from the Hub): such
a name is code, and runs only when the user asked for it (config.validate refuses it earlier, naming the flag; the
guard here is the one at the point where the code would run). A saved run's run_config.json never supplies one
(cli.inherited_settings drops it).

Predictions are gathered from every process with `gather_for_metrics` before they reach here, so each metric is
computed once on the whole eval set; evaluate's own multi-process mode is deliberately not used as well.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

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
