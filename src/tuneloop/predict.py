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
import dataclasses
import heapq
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, send_to_device

from tuneloop import checkpoint, data, metrics, runtime
from tuneloop.errors import UserError
from tuneloop.options import DataArguments, TrainArguments
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
    if isinstance(dataloader, StreamedSet):  # a rank's part of a stream (--streaming): the ranks' row counts differ
        return gather_stream(accelerator, model, dataloader)
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
    return results_of(problem, prefix, scores, loss, len(outputs.labels))


def results_of(problem: Problem, prefix: str, scores: dict, loss: float, samples: int) -> dict:
    """A labelled split's results as `score` and ChunkedScore write them: metrics, loss, the type's extras, count."""
    return {
        **{f"{prefix}_{k}": v for k, v in scores.items()},
        f"{prefix}_loss": loss,
        **problem.extra_results(prefix),
        f"{prefix}_samples": samples,
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

    `dataloader`: the prepared loader of the tokenized test split, each example carrying its position (INDEX_COLUMN);
    or, with --streaming, this rank's StreamedSet (`split` None). Every process takes part; only the main process
    writes. `run_facts` (world size, device...) go into predict_results.json beside the metrics. Returns the results.
    """
    if isinstance(dataloader, StreamedSet):  # written as it goes, each rank its part, merged in input order
        return predict_stream(
            accelerator, model, dataloader, problem, metric_modules, t, run_facts, label_separator or ","
        )
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


def write_predictions(path: str, rows: Iterable[dict], fmt: str, label_separator: str = ",") -> None:
    """`rows` (a list, or an iterator that streams them: --streaming merges the ranks' parts into it) as JSON lines or
    CSV, one row at a time."""
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

    flat_rows = map(flat, rows)
    first = next(flat_rows, None)  # the header is the first row's columns (every row has the same ones)
    with open(path, "w", newline="") as f:
        if first is None:
            return
        writer = csv.DictWriter(f, fieldnames=list(first))
        writer.writeheader()
        writer.writerow(first)
        writer.writerows(flat_rows)


# ---------------------------------------------------------------- streamed eval and test sets (--streaming)

# In a streamed batch gathered from every rank, a row's id says what it is: a row of the stream (>= 0), padding (a
# rank with fewer rows than the batch size, or none left), or the mark of a rank that failed (its error is agreed on).
PADDING, FAILED = -1, -2
# While `predict --streaming` runs: each rank's part of the predictions, merged into the predictions file at the end.
PARTS_DIR = ".predictions-parts"
# Rows of labelled predictions scored as one numpy chunk at a time (ChunkedScore).
CHUNK_ROWS = 65536


@dataclass
class StreamBatch:
    inputs: dict  # model inputs (tensors on the CPU)
    row_ids: torch.Tensor  # the rows' ids in the stream (stream.ROW_ID)
    labels: torch.Tensor | None  # encoded as the loss takes them; None for unlabelled rows
    raw: dict  # the batch's raw columns, {column: [values]}


@dataclass
class StreamedSet:
    """This rank's part of a streamed eval or test set (`stream.for_rank`: its rows in input order, each with its
    row id), read in batches of `batch_size` that are checked, label-encoded and tokenized as they come: nothing is
    held but the current batch.

    Not a DataLoader, on purpose: `accelerator.prepare` passes it through untouched, where it would split the
    already split stream again and repeat rows to even out the ranks. Read in each rank's main process (no
    dataloader workers: they would interleave the shards and a rank's part would no longer come in order)."""

    rows: object  # datasets.IterableDataset: this rank's raw rows
    name: str  # "eval", the eval set's name, or "test": for messages
    text_column: str
    text_pair_column: str | None
    label_column: str | None  # None: unlabelled (test sets only)
    id_column: str | None
    problem: Problem
    d: DataArguments
    scored: bool  # an eval set: a row with an empty text or no label is refused, or dropped with --drop_bad_rows
    tokenizer: object = None  # the rest is set by `batched` (setup.make_dataloaders)
    batch_size: int = 1
    pad_to_multiple_of: int | None = None

    def batched(self, tokenizer, batch_size: int, pad_to_multiple_of: int | None) -> StreamedSet:
        return dataclasses.replace(
            self, tokenizer=tokenizer, batch_size=batch_size, pad_to_multiple_of=pad_to_multiple_of
        )

    def __iter__(self):
        from tuneloop.stream import ROW_ID

        for raw in self.rows.iter(batch_size=self.batch_size):
            raw = self._usable(self._joined(raw), ROW_ID)
            if not raw[ROW_ID]:
                continue
            labels = self._encoded_labels(raw[self.label_column]) if self.label_column else None
            yield StreamBatch(self._tokenized(raw), torch.tensor(raw[ROW_ID], dtype=torch.long), labels, raw)

    def idle_inputs(self) -> dict:
        """One empty text: the model input of a rank whose part is used up while others still run (DDP's buffer
        broadcast and ZeRO-3's parameter gathers make every forward a collective: every rank must run each one)."""
        return self._tokenized(
            {self.text_column: [""], **({self.text_pair_column: [""]} if self.text_pair_column else {})}
        )

    def _tokenized(self, raw: dict) -> dict:
        """As data.tokenize and the padding collator do it for a loaded set: truncated to max_length, padded to the
        batch's longest (or max_length) and to pad_to_multiple_of."""
        d = self.d
        return dict(
            self.tokenizer(
                raw[self.text_column],
                raw[self.text_pair_column] if self.text_pair_column else None,
                truncation=True,
                max_length=d.max_length,
                padding="max_length" if d.padding == "max_length" else "longest",
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
        )

    def _joined(self, raw: dict) -> dict:
        """A comma-joined --text_column ('title,body'): its columns joined with --text_column_delimiter, as
        data.py joins a loaded set's."""
        parts = self.text_column.split(",")
        if self.text_column in raw or len(parts) < 2:
            return raw
        texts = zip(*(raw[part] for part in parts))
        joined = [None if None in row else self.d.text_column_delimiter.join(row) for row in texts]
        return {**raw, self.text_column: joined}

    def _usable(self, raw: dict, row_id: str) -> dict:
        """The rows that can be used. A test row without a text is refused (as a loaded test set's: one prediction per
        input row); an eval row with an empty text or no label too, or dropped with --drop_bad_rows (as
        sources.bad_rows does for a loaded eval set)."""
        texts = [column for column in (self.text_column, self.text_pair_column) if column]

        def bad(i: int) -> str | None:
            for column in texts:
                value = raw[column][i]
                if value is not None and not isinstance(value, str):
                    raise UserError(
                        f"text column {column!r} holds {type(value).__name__} values, not text: pick a text column"
                    )
                if value is None or (self.scored and not value.strip()):
                    return f"an empty text ({column})"
            if self.scored and raw[self.label_column][i] is None:
                return f"no label ({self.label_column})"
            return None

        problems = [(i, why) for i in range(len(raw[row_id])) if (why := bad(i))]
        if not problems:
            return raw
        if not (self.scored and self.d.drop_bad_rows):
            i, why = problems[0]
            raise UserError(
                f"the {self.name} set has a row with {why}: {describe_row(raw[row_id][i])}: fill or remove it"
                + (", or pass --drop_bad_rows to drop such rows" if self.scored else "")
            )
        dropped = {i for i, _ in problems}
        return {column: [v for i, v in enumerate(values) if i not in dropped] for column, values in raw.items()}

    def _encoded_labels(self, values: list) -> torch.Tensor:
        """The batch's labels encoded by the problem type, exactly as a loaded set's are (problem.py's `encode`, on
        the batch as a small in-memory Dataset): the same ids, vectors, values and refusals."""
        from datasets import Dataset

        column = self.label_column
        encoded = self.problem.encode(
            Dataset.from_dict({column: values}), column, self.problem.names, self.name, self.d.label_separator
        )
        array = np.asarray(list(encoded[column]))
        # float32, as a loaded set's labels are (the values were float32: exact); class ids stay int64
        return torch.from_numpy(array.astype(np.float32) if array.dtype == np.float64 else array)


def describe_row(row_id: int) -> str:
    """A stream row's id as a person counts it: its row (1-based) in the source's k-th data file."""
    from tuneloop.stream import ROWS_PER_FILE

    return f"row {row_id % ROWS_PER_FILE + 1} of data file {row_id // ROWS_PER_FILE + 1} (1-based, in file order)"


def open_streamed_set(
    source: str | list[str],
    split: str,
    name: str,
    d: DataArguments,
    problem: Problem,
    accelerator: Accelerator,
    scored: bool,
) -> StreamedSet:
    """This rank's part of a streamed eval set (`scored`) or test set, its columns found and checked on the source's
    first row (before any model is loaded), as data.load_splits / load_test_split check a loaded set's."""
    from tuneloop import stream

    limit = d.max_eval_samples if scored else d.max_predict_samples
    if limit is not None:
        option = "max_eval_samples" if scored else "max_predict_samples"
        raise UserError(
            f"--{option} with --streaming: a stream's first rows per rank are not the set's first rows; cut the "
            f"data files instead, or drop --streaming to use --{option}"
        )
    whole = stream.open_stream(source, d, split)
    first = next(iter(whole), None)
    if first is None:
        raise UserError(f"the {name} set is empty: check the data source")
    columns = [column for column in first if column != stream.ROW_ID]
    text, pair = data._text_columns(d, columns)
    wanted = [pair, *(text.split(",") if text not in columns else [])]
    for column in filter(None, wanted):
        if column not in columns:
            raise UserError(
                f"column {column!r} not in the {name} set (columns: {columns}): fix --text_column/--text_pair_column"
            )
    label = d.label_column if d.label_column in columns else None
    if label and not scored and first[label] in (None, -1):  # GLUE's mark for a hidden label: an unlabelled set
        label = None
    if scored and label is None:
        raise UserError(f"column {d.label_column!r} not in the {name} set (columns: {columns}): fix --label_column")
    id_column = None
    if not scored:
        id_column = d.id_column or next((c for c in ("id", "idx") if c in columns), None)
        if id_column not in (None, *columns):
            raise UserError(f"column {id_column!r} not in the test split (columns: {columns}): fix --id_column")
    part = stream.for_rank(whole, accelerator.process_index, accelerator.num_processes)
    return StreamedSet(part, name, text, pair, label, id_column, problem, d, scored)


@torch.no_grad()
def gather_stream(accelerator: Accelerator, model: torch.nn.Module, rows: StreamedSet) -> Outputs:
    """The logits and labels of every row of a streamed eval set, from every rank, each row once, in input order.

    Each rank runs the model on its own part, whose row count differs from the others'. At every step each rank's
    batch is padded to the batch size (row id PADDING) and gathered; a rank whose part is used up sends padding only,
    and the loop ends at the first step where no rank sent a row. The padding is dropped and the rows put in row-id
    order, so the scores are those of the same rows loaded (the same order too: the same loss, to the last bit).

    Held on each rank: the gathered logits and labels of the whole set (rows x classes float32, and the labels),
    which the metrics need all at once (F1, Spearman, mean average precision and the multi-label threshold are no
    sums over batches) and the report after them, as for a loaded set; of the texts and tokens, one batch."""
    model.eval()
    device, size = accelerator.device, rows.batch_size
    batches = iter(rows)
    templates, logits, labels, row_ids = None, [], [], []
    while True:
        batch, error = None, None
        try:
            batch = next(batches, None)
        except UserError as e:  # a bad row in this rank's part: every rank stops with it below
            error = e
        inputs = batch.inputs if batch is not None else rows.idle_inputs()
        local = {"logits": model(**send_to_device(inputs, device)).logits.float()}
        if batch is not None and batch.labels is not None:
            local["labels"] = batch.labels.to(device)
        if templates is None:  # the first step: the shapes every rank pads to, from a rank that has rows
            templates = agree_on_shapes(accelerator, local if batch is not None else None, error, rows.name)
        padded = {
            key: pad_rows(local.get(key), shape, dtype, size, device) for key, (shape, dtype) in templates.items()
        }
        ids = torch.full((size,), PADDING, dtype=torch.long, device=device)
        if batch is not None:
            ids[: len(batch.row_ids)] = batch.row_ids.to(device)
        if error is not None:
            ids[0] = FAILED
        gathered = accelerator.gather({**padded, "row_id": ids})
        if (gathered["row_id"] == FAILED).any():
            runtime.agree(accelerator, error, f"reading the {rows.name} set")
        keep = gathered["row_id"] >= 0
        if not keep.any():
            break
        row_ids.append(gathered["row_id"][keep].cpu())
        logits.append(gathered["logits"][keep].cpu())
        if "labels" in gathered:
            labels.append(gathered["labels"][keep].cpu())
    position = torch.cat(row_ids).numpy()
    if len(np.unique(position)) != len(position):
        raise RuntimeError(f"gathered {len(position)} rows of the {rows.name} set, some of them twice")
    order = np.argsort(position, kind="stable")
    return Outputs(torch.cat(logits).numpy()[order], torch.cat(labels).numpy()[order] if labels else None)


def agree_on_shapes(accelerator: Accelerator, local: dict | None, error: Exception | None, name: str) -> dict:
    """{key: (shape of one row, dtype)} of the tensors to gather, the same on every rank: a rank with no row at all
    (a stream with fewer rows or shards than ranks) learns them from one that has some. One object gather."""
    mine = {key: (tuple(value.shape[1:]), value.dtype) for key, value in local.items()} if local else None
    everyone = gather_object([(mine, error is not None)])
    if any(failed for _, failed in everyone):
        runtime.agree(accelerator, error, f"reading the {name} set")
    found = next((shapes for shapes, _ in everyone if shapes), None)
    if found is None:
        raise UserError(f"the {name} set has no rows: check the data source")
    return found


def pad_rows(values: torch.Tensor | None, shape: tuple, dtype: torch.dtype, size: int, device) -> torch.Tensor:
    padded = torch.zeros((size, *shape), dtype=dtype, device=device)
    if values is not None:
        padded[: len(values)] = values
    return padded


def predict_stream(
    accelerator: Accelerator,
    model: torch.nn.Module,
    rows: StreamedSet,
    problem: Problem,
    metric_modules: dict,
    t: TrainArguments,
    run_facts: dict,
    label_separator: str,
) -> dict:
    """`predict --streaming`: the predictions file in input order, with memory that does not grow with the rows.

    Each rank writes its part of the predictions, in its order (its rows' ids increase), to
    output_dir/.predictions-parts/rank_<r>.jsonl as it goes; then the main process merges the parts by row id
    (heapq.merge reads one line of each at a time) into the predictions file, written beside its final name and
    renamed (`replacing`). Labelled rows are scored a chunk at a time as the merge passes them (ChunkedScore): the
    loss and the built-in metrics from running sums and counts, so the main process's memory does not grow with the
    rows; only a metric with no running form (mean_average_precision, pearson, spearman, a metric by name) keeps
    every row's inputs (rows x classes numbers, not the texts).

    A crash or kill mid-prediction leaves the parts folder and no new predictions file (an earlier one stays whole):
    the rerun starts over, clearing the parts first. A part is tied to the process count, and reading a stream to a
    rank's last written row costs as much as predicting it, so resuming would save little."""
    parts = os.path.join(t.output_dir, PARTS_DIR)
    if accelerator.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)  # an interrupted run's parts: this run starts over
        os.makedirs(parts)
    accelerator.wait_for_everyone()
    write_part(accelerator, model, rows, problem, os.path.join(parts, f"rank_{accelerator.process_index:05d}.jsonl"))
    accelerator.wait_for_everyone()  # every part closed before the main process reads them
    results, error = None, None
    if accelerator.is_main_process:
        try:
            results = merge_parts(
                sorted(os.path.join(parts, name) for name in os.listdir(parts)),
                problem,
                metric_modules,
                t,
                label_separator,
            )
        except UserError as e:
            error = e
    runtime.agree(accelerator, error, "writing the predictions")
    results = {**broadcast_object_list([results])[0], **run_facts}
    if accelerator.is_main_process:
        with replacing(os.path.join(t.output_dir, RESULTS_FILE)) as partial, open(partial, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        shutil.rmtree(parts, ignore_errors=True)
    return results


@torch.no_grad()
def write_part(accelerator: Accelerator, model: torch.nn.Module, rows: StreamedSet, problem: Problem, path: str):
    """This rank's predictions, one line per row: [row id, the row's columns and predictions] (+ [logits, label]
    when labelled). The ranks step together (one forward each per step, a dummy one once a rank's part is used up,
    and a one-number gather that says who still has rows), so a rank's bad row stops every rank at once."""
    model.eval()
    device = accelerator.device
    batches = iter(rows)
    with open(path, "w") as part:
        while True:
            batch, error = None, None
            try:
                batch = next(batches, None)
            except UserError as e:
                error = e
            inputs = batch.inputs if batch is not None else rows.idle_inputs()
            logits = model(**send_to_device(inputs, device)).logits.float().cpu().numpy()
            if batch is not None:
                try:
                    part.writelines(part_lines(batch, logits, rows, problem))
                    part.flush()  # a full disk found here, where every rank hears of it
                except OSError as e:
                    error = UserError(
                        f"could not write {path}: {e.strerror or e}: free space there, or choose another --output_dir"
                    )
            status = FAILED if error is not None else int(batch is not None)
            statuses = accelerator.gather(torch.tensor([status], device=device))
            if (statuses == FAILED).any():
                runtime.agree(accelerator, error, f"predicting on the {rows.name} set")
            if not statuses.any():
                return


def part_lines(batch: StreamBatch, logits: np.ndarray, rows: StreamedSet, problem: Problem):
    columns = {}
    if rows.id_column:
        columns["id"] = batch.raw[rows.id_column]
    for column in filter(None, (rows.text_column, rows.text_pair_column)):
        columns[column] = batch.raw[column]
    found = [dict(zip(columns, values)) for values in zip(*columns.values())] if columns else [{} for _ in logits]
    labels = batch.labels.numpy() if batch.labels is not None else None
    problem.add_predictions(found, logits, labels)
    for i, (row_id, row) in enumerate(zip(batch.row_ids.tolist(), found)):
        scored = [logits[i].tolist(), labels[i].tolist()] if labels is not None else []
        yield json.dumps([row_id, row, *scored], ensure_ascii=False, default=str) + "\n"


def merge_parts(paths: list[str], problem: Problem, metric_modules: dict, t: TrainArguments, separator: str) -> dict:
    """The main process: the ranks' parts merged by row id into the predictions file; the test results, scored a
    chunk at a time as the rows pass (ChunkedScore)."""
    scorer = ChunkedScore(problem, metric_modules, t.metric_average)
    count = 0

    def rows():
        nonlocal count
        for index, (_, row, *scored) in enumerate(merged(paths)):
            if scored:
                scorer.add(*scored)
            count = index + 1
            yield {"index": index, **row}

    path = os.path.join(t.output_dir, f"predictions.{t.predictions_format}")
    with checkpoint.writing(path, t.output_dir), replacing(path) as partial:  # a disk error: one line
        write_predictions(partial, rows(), t.predictions_format, separator)
    if not scorer.count:
        return {"test_samples": count}
    return scorer.results("test")


def merged(paths: list[str]):
    """[row id, row, ...] of every part, in row-id order: a k-way merge reading one line of each part at a time. Each
    part is in increasing row-id order (a rank reads its shards, or its every world-th row, in file order); a row id
    that does not increase is a row twice, or a part out of order, and stops the merge."""
    with contextlib.ExitStack() as stack:
        parts = [map(json.loads, stack.enter_context(open(path))) for path in paths]
        previous = None
        for item in heapq.merge(*parts, key=lambda item: item[0]):
            if previous is not None and item[0] <= previous:
                raise RuntimeError(f"row id {item[0]} came after row id {previous} in the merged predictions")
            previous = item[0]
            yield item


class ChunkedScore:
    """The results `score` gives, for labelled rows given one at a time: every CHUNK_ROWS rows become one numpy chunk
    whose loss sums (Problem.loss_sums) and metric statistics (metrics.Running) are added up, and the chunk is
    dropped. Held: one chunk, and what metrics.Running keeps (counts and sums; every row's inputs only for a metric
    with no running form: mean_average_precision, pearson, spearman, a metric by name)."""

    def __init__(self, problem: Problem, metric_modules: dict, average: str):
        self.problem = problem
        self.metrics = metrics.Running(metric_modules, average, problem.threshold)
        self.logits, self.labels = [], []  # the current chunk's rows
        self.loss_sum = self.loss_weight = 0.0
        self.count = 0

    def add(self, logits: list, label) -> None:
        self.logits.append(logits)
        self.labels.append(label)
        self.count += 1
        if len(self.logits) == CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.logits:
            return
        logits, labels = np.asarray(self.logits, dtype=np.float32), np.asarray(self.labels)
        # floats as the loss and the metrics get a loaded set's labels: float32 (integers stay int64 class ids)
        labels = labels.astype(np.float32) if labels.dtype == np.float64 else labels
        loss_sum, weight = self.problem.loss_sums(torch.from_numpy(logits), torch.from_numpy(labels))
        self.loss_sum, self.loss_weight = self.loss_sum + loss_sum, self.loss_weight + weight
        self.metrics.add(*self.problem.metric_inputs(logits, labels))
        self.logits, self.labels = [], []

    def results(self, prefix: str) -> dict:
        self._flush()
        return results_of(self.problem, prefix, self.metrics.compute(), self.loss_sum / self.loss_weight, self.count)
