"""Predictions: run a model over a split on every process, bring its outputs back in dataset order, score them, and
write them out (`predictions.jsonl` or `.csv`) with the input and the prediction: the predicted class and every class's
probability (single-label), every label at or above the threshold and every label's probability (multi-label), or the
predicted value(s) (regression).

How the order comes back: Accelerate's prepared dataloader deals batches round-robin (batch i to rank i % world size),
filling the last round with examples repeated from the start so that every rank gets full batches, and
`gather_for_metrics` concatenates one batch per rank in rank order and drops the repeats after the last one. That is
dataset order already; a predictions file checks it rather than trusting it: each test example carries its position
through the batch, and the gathered positions must be 0..n-1, each exactly once.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from tuneloop import data, metrics
from tuneloop.options import TrainArguments
from tuneloop.problem import Problem

INDEX_COLUMN = "example_index"
RESULTS_FILE = "predict_results.json"


@dataclass
class Outputs:
    """One row per example of the split, in dataset order (when positions were carried), gathered from every rank."""

    logits: np.ndarray  # (examples, classes), float32
    labels: np.ndarray | None  # as encoded (class ids, 0/1 vectors, values); None for an unlabelled split

    @property
    def predictions(self) -> np.ndarray:
        """Single-label class ids (other problem types: Problem.predictions)."""
        return self.logits.argmax(axis=-1)

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits), dim=-1).numpy()


@torch.no_grad()
def gather(accelerator: Accelerator, model: torch.nn.Module, dataloader) -> Outputs:
    """Logits (and labels, if the batches have them) of every example, from every process, each example once."""
    model.eval()
    logits, labels, positions = [], [], []
    for batch in dataloader:
        position = batch.pop(INDEX_COLUMN, None)  # not a model input
        batch_labels = batch.pop("labels", None)  # the loss is problem.py's, on everything gathered
        batch_logits = model(**batch).logits.float()
        tensors = {"logits": batch_logits}
        if batch_labels is not None:
            tensors["labels"] = batch_labels
        if position is not None:
            tensors["position"] = position
        gathered = accelerator.gather_for_metrics(tensors)
        logits.append(gathered["logits"].cpu())
        if "labels" in gathered:
            labels.append(gathered["labels"].cpu())
        if "position" in gathered:
            positions.append(gathered["position"].cpu())
    outputs = Outputs(torch.cat(logits).numpy(), torch.cat(labels).numpy() if labels else None)
    if not positions:
        return outputs
    position = torch.cat(positions).numpy()
    if not np.array_equal(np.sort(position), np.arange(len(dataloader.dataset))):
        raise RuntimeError(f"gathered {len(position)} predictions for {len(dataloader.dataset)} examples, not one each")
    order = np.argsort(position)
    return Outputs(outputs.logits[order], outputs.labels[order] if outputs.labels is not None else None)


def score(outputs: Outputs, problem: Problem, metric_modules: dict, average: str, prefix: str) -> dict:
    """The metrics of a labelled split, computed once on everything gathered, as `{prefix}_accuracy`, ... . The loss is
    the training loss's function (class weights, smoothing) on the whole split; multi-label adds the threshold used."""
    predictions, labels, probabilities = problem.metric_inputs(outputs.logits, outputs.labels)
    scores = metrics.compute_metrics(
        metric_modules, predictions, labels, average, probabilities=probabilities, threshold=problem.threshold
    )
    loss = problem.loss(torch.from_numpy(outputs.logits), torch.from_numpy(outputs.labels)).item()
    extra = problem.extra_results(prefix)
    return {
        **{f"{prefix}_{k}": v for k, v in scores.items()},
        f"{prefix}_loss": loss,
        **extra,
        f"{prefix}_samples": len(outputs.labels),
    }


def predict_test_split(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader,
    split: data.Splits,
    problem: Problem,
    metric_modules: dict,
    t: TrainArguments,
    run_facts: dict,
    label_separator: str | None = None,
) -> dict:
    """Predict on `--test_file` / `--test_split`: write the predictions file, and the test metrics if it has labels.

    `dataloader`: the prepared loader of the tokenized test split, each example carrying its position (INDEX_COLUMN).
    Every process takes part; only the main process writes. `run_facts` (world size, device...) go into
    predict_results.json beside the metrics. Returns the results.
    """
    outputs = gather(accelerator, model, dataloader)
    labelled = outputs.labels is not None
    results = (
        score(outputs, problem, metric_modules, t.metric_average, "test")
        if labelled
        else {"test_samples": len(outputs.logits)}
    )
    results |= run_facts
    if accelerator.is_main_process:
        # Each file is written beside its final name and renamed: a kill mid-write leaves the previous one whole.
        path = os.path.join(t.output_dir, f"predictions.{t.predictions_format}")
        with replacing(path) as partial:
            write_predictions(
                partial, prediction_rows(split, outputs, problem), t.predictions_format, label_separator or ","
            )
        with replacing(os.path.join(t.output_dir, RESULTS_FILE)) as partial, open(partial, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return results


@contextlib.contextmanager
def replacing(path: str):
    """Yields a temporary name beside `path`; what was written there replaces `path` in one rename at the end."""
    partial = os.path.join(os.path.dirname(path), f".partial-{os.path.basename(path)}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def prediction_rows(split: data.Splits, outputs: Outputs, problem: Problem) -> list[dict]:
    """One dict per input row: index, id, the text(s), the true label if known, the prediction, its probabilities.

    Single-label: `label`, `predicted_label`, `probabilities` {class: p}. Multi-label: `labels` and `predicted_labels`
    (lists: every label at or above the threshold, most probable first), `probabilities` {label: p}. Regression:
    `label` and `predicted_value`, a number (several targets: {target: value} each)."""
    columns = _input_columns(split)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    problem.add_predictions(rows, outputs.logits, outputs.labels)
    return rows


def _input_columns(split: data.Splits) -> dict:
    test = split.test
    columns = {"index": range(len(test))}
    if split.id_column:
        columns["id"] = list(test[split.id_column])
    for column in filter(None, (split.text_column, split.text_pair_column)):
        columns[column] = list(test[column])
    return columns


def write_predictions(path: str, rows: list[dict], fmt: str, label_separator: str = ",") -> None:
    if fmt == "jsonl":
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return

    # CSV has no nested values: one prob_<class> column per class, label lists joined by the label separator, one
    # <column>_<target> column per regression target.
    def flat(row: dict) -> dict:
        out = {}
        for key, value in row.items():
            if key == "probabilities":
                out |= {f"prob_{name}": p for name, p in value.items()}
            elif isinstance(value, list):
                out[key] = label_separator.join(value)
            elif isinstance(value, dict):
                out |= {f"{key}_{name}": v for name, v in value.items()}
            else:
                out[key] = value
        return out

    flat = [flat(row) for row in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
