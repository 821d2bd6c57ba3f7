"""Evaluation metrics through 🤗 Evaluate: accuracy/f1/precision/recall offline from a local module, others by Hub name.

Predictions are gathered from every process with `gather_for_metrics` before they reach here, so each metric is
computed once on the whole eval set; evaluate's own multi-process mode is deliberately not used as well.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

from tuneloop.errors import UserError

LOCAL_MODULE = str(Path(__file__).parent / "metric_modules" / "classification.py")
BUILTIN = ("accuracy", "f1", "precision", "recall")
AVERAGED = ("f1", "precision", "recall")


def load_metrics(names: list[str]) -> dict[str, evaluate.EvaluationModule]:
    """Call under `accelerator.main_process_first()`: evaluate copies modules into a shared cache on load."""
    modules = {}
    for name in names:
        try:
            # keep_in_memory: every rank computes on the gathered predictions, so none may share a cache file.
            if name in BUILTIN:
                modules[name] = evaluate.load(LOCAL_MODULE, name, keep_in_memory=True)
            else:
                modules[name] = evaluate.load(name, keep_in_memory=True)
        except Exception as e:
            reason = " ".join(str(e).split())[:200]
            raise UserError(f"metric {name!r} could not be loaded ({reason}): use one of {', '.join(BUILTIN)} offline, "
                            "or a 🤗 Evaluate Hub metric with network access") from None
    return modules


def compute_metrics(modules: dict[str, evaluate.EvaluationModule], predictions, references, average: str) -> dict[str, float]:
    results = {}
    for name, module in modules.items():
        kwargs = {"average": average} if name in AVERAGED else {}
        for key, value in module.compute(predictions=predictions, references=references, **kwargs).items():
            results[key] = float(value)
    return results
