"""Problem types (problem.py): single-label, multi-label and regression, inferred from the labels or given, each with
its loss, metrics, threshold, predictions file, report and model card; class weights and label smoothing.

The generated tasks are conftest's keyword task turned into the other two problems: a multi-label row holds the
keywords of zero to two topics and is labelled with those topics; a regression row holds one topic's keyword and its
value is that topic's number plus noise. The tiny model learns each in a few seconds; each run then predicts on a
labelled test file, and `tuneloop evaluate` on 2 real processes must give the 1-process figures of the training run.
"""

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from conftest import (
    FILLER,
    KEYWORDS,
    launch,
    make_rows,
    read_json,
    reset_accelerate_state,
    run_in_process,
    tiny_args,
    write_rows,
)
from tuneloop import checkpoint, metrics, report
from tuneloop.config import parse_args
from tuneloop.data import load_splits
from tuneloop.errors import UserError
from tuneloop.options import DataArguments, TrainArguments
from tuneloop.problem import (
    MULTI,
    REGRESSION,
    SINGLE,
    TYPES,
    MultiLabel,
    Regression,
    SingleLabel,
    best_threshold,
    class_weights,
    make_problem,
)

TOPICS = sorted(KEYWORDS)  # music, sports, tech
VALUES = {"music": 2.0, "sports": -1.0, "tech": 0.5}  # the regression task's value of each topic


def multi_label_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = sorted(rng.sample(TOPICS, rng.choice([0, 1, 1, 2, 2])))
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        for topic in topics:
            words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[topic]))
        rows.append({"text": " ".join(words), "label": topics})
    return rows


def regression_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"text": row["text"], "label": round(VALUES[row["label"]] + rng.gauss(0, 0.1), 4)} for row in make_rows(n, seed)
    ]


# 90 optimizer steps: the tiny model learns each task well beyond chance (multi-label micro-F1 about 0.85).
FAST = dict(per_device_train_batch_size=16, learning_rate=5e-3, num_train_epochs=6)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def train_problem(tiny_model_dir, folder, rows, suffix: str, **options):
    """Train on generated rows (240 train, 45 eval, 30 labelled test), then --do_predict; returns (dir, results)."""
    files = {
        "train_file": write_rows(folder / f"train{suffix}", rows(240, 11)),
        "validation_file": write_rows(folder / f"validation{suffix}", rows(45, 12)),
    }
    test_file = write_rows(folder / f"test{suffix}", rows(30, 13))
    output_dir = folder / "run"
    results = run_in_process(
        tiny_args(tiny_model_dir, files, output_dir, do_predict="true", test_file=test_file, **{**FAST, **options})
    )
    reset_accelerate_state()
    return output_dir, results, files, test_file


@pytest.fixture(scope="module")
def multi_label_run(tiny_model_dir, tmp_path_factory):
    """Lists of labels in JSONL (inferred multi-label), the threshold chosen on the eval set."""
    return train_problem(
        tiny_model_dir, tmp_path_factory.mktemp("multi-label"), multi_label_rows, ".jsonl", multi_label_threshold="auto"
    )


@pytest.fixture(scope="module")
def regression_run(tiny_model_dir, tmp_path_factory):
    """Float labels in CSV (inferred regression); the best model by the lowest eval MSE."""
    return train_problem(
        tiny_model_dir,
        tmp_path_factory.mktemp("regression"),
        regression_rows,
        ".csv",
        metric_for_best_model="mse",
        load_best_model_at_end="true",
    )


def losses(output_dir) -> list[float]:
    return [h["train/loss"] for h in read_json(output_dir / "log_history.json") if "train/loss" in h]


# ---------------------------------------------------------------- inference and encoding (no training)


@pytest.mark.parametrize(
    "suffix, rows, flags, problem_type, names",
    [
        (
            ".csv",
            [{"text": "a", "label": 1.0}, {"text": "b", "label": 2.0}, {"text": "c", "label": 0.0}],
            {},
            SINGLE,
            ["0", "1", "2"],
        ),  # whole-number floats: class ids, as pandas writes an integer column with a gap
        (".csv", [{"text": "a", "label": 1.5}, {"text": "b", "label": 2.0}], {}, REGRESSION, ["label"]),
        (
            ".jsonl",
            [{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": []}, {"text": "c", "label": ["z"]}],
            {},
            MULTI,
            ["x", "y", "z"],
        ),
        (
            ".csv",
            [{"text": "a", "label": "x|y"}, {"text": "b", "label": ""}, {"text": "c", "label": "z"}],
            {"label_separator": "|"},
            MULTI,
            ["x", "y", "z"],
        ),
        (
            ".jsonl",
            [{"text": "a", "label": [0.5, 1.0]}, {"text": "b", "label": [1.5, 2.0]}],
            {},
            REGRESSION,
            ["label_0", "label_1"],
        ),
        (
            ".csv",
            [{"text": "a", "label": 1.0}, {"text": "b", "label": 2.0}],
            {"problem_type": REGRESSION},
            REGRESSION,
            ["label"],
        ),
    ],
)
def test_problem_type_is_inferred_from_the_labels_or_given(tmp_path, suffix, rows, flags, problem_type, names):
    """run_classification.py's rules, plus whole-number floats staying classes. Guards a float id column trained as
    regression, multi-label rows encoded as one class, and a --problem_type that is not obeyed."""
    path = write_rows(tmp_path / f"data{suffix}", rows)
    splits = load_splits(DataArguments(train_file=path, validation_file=path, **flags), 0, None, True)
    assert (splits.problem_type, splits.label_names) == (problem_type, names), splits.problem_reason
    labels = list(splits.train["label"])
    if problem_type == MULTI:  # multi-hot over the sorted labels; an empty cell is a row with no label
        assert labels == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    elif problem_type == REGRESSION:
        np.testing.assert_allclose(
            np.asarray(labels, dtype=np.float32).ravel(),
            np.asarray([r["label"] for r in rows], dtype=np.float32).ravel(),
        )
    else:
        assert labels == [1, 2, 0]


def test_bad_options_for_the_problem_are_one_line(tmp_path):
    with pytest.raises(UserError, match="class_weights must be auto or positive numbers"):
        parse_args(["--class_weights", "1,-2"])
    with pytest.raises(UserError, match="multi_label_threshold must be auto or a number in"):
        parse_args(["--multi_label_threshold", "1.5"])
    with pytest.raises(UserError, match="are for classification, the problem_type is regression"):
        parse_args(["--problem_type", "regression", "--label_smoothing_factor", "0.1"])
    with pytest.raises(UserError, match="metric_for_best_model 'accuracy' is not computed"):
        parse_args(["--problem_type", "regression", "--metric_for_best_model", "accuracy"])
    with pytest.raises(UserError, match="3 weights for 2 classes"):
        class_weights("1,2,3", SINGLE, None, ["a", "b"])


def test_each_problem_type_names_what_exists():
    """A problem type's class names its report sections, metric module and losses; the options offer exactly the
    types and losses the classes have. Guards a type added to problem.py that the report, the metrics or the flags
    do not know (or a choice left in the flags for a type or loss that is gone)."""
    from typing import get_args, get_type_hints

    for kind in TYPES.values():
        assert set(kind.report_sections) <= set(report.SECTIONS), kind
        assert (metrics.MODULES / kind.metric_module).is_file()
        assert set(kind.default_metrics) <= set(kind.builtin_metrics)

    def choices(options, name: str) -> set[str]:  # Optional[Literal[...]]
        return set(get_args(get_args(get_type_hints(options)[name])[0]))

    assert choices(DataArguments, "problem_type") == set(TYPES) == {SINGLE, MULTI, REGRESSION}
    assert choices(TrainArguments, "loss") == {loss for kind in TYPES.values() for loss in kind.losses}


# ---------------------------------------------------------------- the loss, by hand


def test_weighted_smoothed_loss_equals_a_hand_computation():
    """Cross-entropy with auto class weights and label smoothing, and BCE with auto pos_weight, against the formulas
    written out on a fixed batch. Guards weights in the wrong order, a plain mean instead of the weighted one, and
    smoothing that is not applied."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, -1.0, 2.0]])
    labels = torch.tensor([0, 2, 1, 0])
    weights = class_weights("auto", SINGLE, labels.numpy(), ["a", "b", "c"])
    # auto = n / (classes x count): class 0 twice, 1 and 2 once, of 4 examples.
    assert weights.tolist() == pytest.approx([4 / (3 * 2), 4 / 3, 4 / 3])
    eps = 0.1
    total, weight_sum = 0.0, 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_p = [x - math.log(sum(math.exp(v) for v in row)) for x in row]
        w = [4 / 6, 4 / 3, 4 / 3]
        # torch's (and the usual) smoothing: (1 - eps) x the weighted NLL
        # + eps x the mean over classes of w_c x -log p_c
        total += (1 - eps) * -w[y] * log_p[y] + eps * sum(-w[c] * log_p[c] for c in range(3)) / 3
        weight_sum += w[y]
    expected = total / weight_sum
    problem = SingleLabel(["a", "b", "c"], weights=weights, label_smoothing=eps)
    assert problem.loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert SingleLabel(["a", "b", "c"]).loss(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item()
    )

    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    pos_weight = class_weights("auto", MULTI, targets.numpy(), ["a", "b", "c"])
    assert pos_weight.tolist() == pytest.approx([1 / 3, 3.0, 3.0])  # negatives / positives
    expected = 0.0
    for row, y_row in zip(logits.tolist(), targets.tolist()):
        for x, y, pw in zip(row, y_row, [1 / 3, 3.0, 3.0]):
            sig = 1 / (1 + math.exp(-x))
            expected += -(pw * y * math.log(sig) + (1 - y) * math.log(1 - sig))
    expected /= targets.numel()
    assert MultiLabel(["a", "b", "c"], weights=pos_weight).loss(logits, targets).item() == pytest.approx(
        expected, rel=1e-6
    )
    values = torch.tensor([1.0, 2.0, 0.0, -1.0])
    assert Regression(["v"]).loss(logits[:, :1], values).item() == pytest.approx(
        ((logits[:, 0] - values) ** 2).mean().item()
    )


def test_best_threshold_maximises_micro_f1():
    """Against a brute force over every candidate threshold. Guards an off-by-one at the cut and ties."""
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 5)) < 0.3).astype(int)
    probabilities = np.clip(labels * 0.3 + rng.random((40, 5)) * 0.7, 0, 1).round(2)  # rounded: many ties

    def micro_f1(t):
        predicted = probabilities >= t
        tp = (predicted & (labels == 1)).sum()
        return 2 * tp / (predicted.sum() + labels.sum())

    chosen = best_threshold(probabilities, labels)
    best = max(micro_f1(t) for t in np.unique(probabilities))
    assert micro_f1(chosen) == pytest.approx(best)


# ---------------------------------------------------------------- multi-label, trained


@pytest.mark.trains
def test_multi_label_learns_and_predicts_every_label_above_the_threshold(multi_label_run):
    """Loss falls, micro-F1 beats predicting every label (the best constant guess for micro-F1 here), the threshold
    chosen on the eval set is saved and used by the predictions file, whose rows list the labels at or above it."""
    output_dir, results, _, test_file = multi_label_run
    assert losses(output_dir)[-1] < 0.6 * losses(output_dir)[0]
    truth = np.array([[t in row["label"] for t in TOPICS] for row in multi_label_rows(45, 12)])
    p = truth.mean()  # chance: micro-F1 2p / (1 + p) by predicting every label, average precision p by random ranking
    assert results["eval_micro_f1"] > 2 * p / (1 + p) + 0.15, results
    assert results["eval_mean_average_precision"] > p + 0.3 and results["eval_samples"] == 45
    threshold = results["eval_threshold"]
    assert read_json(output_dir / "config.json")["multi_label_threshold"] == threshold
    assert read_json(output_dir / "config.json")["problem_type"] == MULTI

    rows = read_jsonl(output_dir / "predictions.jsonl")
    source = read_jsonl(test_file)
    assert [(r["index"], r["text"], r["labels"]) for r in rows] == [
        (i, s["text"], s["label"]) for i, s in enumerate(source)
    ]
    for row in rows:
        assert set(row["probabilities"]) == set(TOPICS)
        assert set(row["predicted_labels"]) == {t for t, q in row["probabilities"].items() if q >= threshold}
    test = read_json(output_dir / "predict_results.json")
    exact = np.mean([set(r["predicted_labels"]) == set(r["labels"]) for r in rows])
    assert test["test_subset_accuracy"] == pytest.approx(exact) and test["test_threshold"] == threshold

    # The saved model in a pipeline: one sigmoid score per label, the predictions file's probabilities.
    scores = pipeline("text-classification", model=str(output_dir), device="cpu", top_k=None)([rows[0]["text"]])[0]
    assert {s["label"]: pytest.approx(s["score"], abs=1e-5) for s in scores} == rows[0]["probabilities"]

    per_label = pd.read_csv(output_dir / "report" / "per_class.csv")
    assert list(per_label["class"]) == TOPICS and per_label["support"].sum() == truth.sum()
    card = (output_dir / "report" / "README.md").read_text()
    assert "multi-label text classification: 3 labels" in card and "Per label, on the evaluation set" in card
    assert "top_k=None" in card and "eval_micro_f1" in card


# ---------------------------------------------------------------- regression, trained


@pytest.mark.trains
def test_regression_learns_and_predicts_values(regression_run):
    """Loss falls, the eval MSE beats predicting the mean (the labels' variance), Pearson and Spearman are high; the
    best model is picked by the lowest MSE; predictions carry the value, which the pipeline gives too; the report has
    the scatter plot and the per-target table."""
    output_dir, results, files, test_file = regression_run
    assert losses(output_dir)[-1] < 0.25 * losses(output_dir)[0]
    truth = np.array([r["label"] for r in regression_rows(45, 12)])
    assert results["eval_mse"] < 0.2 * truth.var(), results
    assert results["eval_pearson"] > 0.9 and results["eval_spearman"] > 0.8 and results["eval_mae"] < 0.5
    history = [h["eval_mse"] for h in read_json(output_dir / "log_history.json") if "eval_mse" in h]
    assert results["best_eval_mse"] == min(history)  # lower is better for an error
    assert read_json(output_dir / "config.json")["problem_type"] == REGRESSION

    rows = read_jsonl(output_dir / "predictions.jsonl")
    source = pd.read_csv(test_file)
    assert [r["text"] for r in rows] == list(source["text"])
    assert [r["label"] for r in rows] == pytest.approx(list(source["label"]), abs=1e-4)
    test = read_json(output_dir / "predict_results.json")
    assert test["test_mse"] == pytest.approx(
        np.mean([(r["predicted_value"] - r["label"]) ** 2 for r in rows]), rel=1e-3
    )
    value = pipeline("text-classification", model=str(output_dir), device="cpu", function_to_apply="none")(
        rows[0]["text"]
    )[0]
    assert (value["label"], value["score"]) == ("label", pytest.approx(rows[0]["predicted_value"], abs=1e-5))

    report = output_dir / "report"
    assert (report / "scatter.png").stat().st_size > 5000
    per_target = pd.read_csv(report / "per_target.csv")
    assert per_target["mse"][0] == pytest.approx(results["eval_mse"], rel=1e-4)
    card = (report / "README.md").read_text()
    assert "regression from text: 1 target(s) (label)" in card and "Per target" in card and "`scatter.png`" in card


# ---------------------------------------------------------------- single-label with class weights, trained


def saved_model_outputs(model_dir, validation_file: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved model's logits on the validation file, loaded as plain transformers would, and its class ids."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    validation = pd.read_csv(validation_file)
    with torch.no_grad():
        logits = model(
            **tokenizer(list(validation["text"]), truncation=True, max_length=32, padding=True, return_tensors="pt")
        ).logits
    return logits, torch.tensor([TOPICS.index(name) for name in validation["label"]])


@pytest.mark.trains
def test_class_weights_train_and_score_with_the_same_loss(tiny_model_dir, tmp_path, capsys):
    """Imbalanced data (music is a fifth of the others) with --class_weights auto and smoothing: the weights are
    printed, the model learns, and the eval loss is the weighted, smoothed loss of the saved model's logits (the
    function training used), not the plain cross-entropy."""
    rows = [r for r in make_rows(300, seed=21) if r["label"] != "music" or random.Random(r["text"]).random() < 0.2]
    files = {
        "train_file": write_rows(tmp_path / "train.csv", rows),
        "validation_file": write_rows(tmp_path / "validation.csv", make_rows(45, seed=2)),
    }
    results = run_in_process(
        tiny_args(tiny_model_dir, files, tmp_path / "run", class_weights="auto", label_smoothing_factor=0.1, **FAST)
    )
    out = capsys.readouterr().out
    assert "single_label_classification (the label column holds one class per row)" in out
    counts = pd.Series([r["label"] for r in rows]).value_counts()
    expected = {name: len(rows) / (3 * counts[name]) for name in TOPICS}
    printed = out.split("class weights (auto: inverse frequency of the training labels): ")[1].splitlines()[0]
    weights = {k: float(v) for k, v in (item.split("=") for item in printed.split(", "))}
    # The weights count the training labels (the whole train file: the eval set is its own file).
    assert weights == pytest.approx(expected, rel=1e-3)
    assert results["eval_accuracy"] >= 0.7  # chance: 1/3

    logits, labels = saved_model_outputs(tmp_path / "run", files["validation_file"])
    weighted = F.cross_entropy(
        logits, labels, weight=torch.tensor([expected[t] for t in TOPICS], dtype=torch.float32), label_smoothing=0.1
    )
    assert results["eval_loss"] == pytest.approx(weighted.item(), rel=1e-4)
    assert results["eval_loss"] != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)


# ---------------------------------------------------------------- 1 process against 2


@pytest.mark.multiprocess
@pytest.mark.parametrize("run", ["multi_label_run", "regression_run"])
def test_evaluation_on_two_processes_equals_one(run, request, tmp_path):
    """`tuneloop evaluate` of the saved model on 2 real processes (45 examples: Accelerate repeats some to even the
    last batches) gives the 1-process figures of the training run's final evaluation. (Single-label:
    test_predict.py.)"""
    output_dir, at_training, files, _ = request.getfixturevalue(run)
    launch(
        [
            "evaluate",
            "--model",
            str(output_dir),
            "--data",
            files["validation_file"],
            "--output_dir",
            str(tmp_path / "two"),
            "--per_device_eval_batch_size",
            "8",
        ],
        module=True,
    )
    two = read_json(tmp_path / "two" / "all_results.json")
    assert (two["num_processes"], two["distributed_type"]) == (2, "MULTI_CPU")
    scored = [k for k in at_training if k.startswith("eval_") and k not in ("eval_loss",)]
    assert len(scored) >= 5
    for key in scored:
        assert two[key] == pytest.approx(at_training[key], rel=1e-5), key
    assert two["eval_loss"] == pytest.approx(at_training["eval_loss"], rel=1e-5)


# ---------------------------------------------------------------- focal loss (--loss focal)


def test_focal_loss_equals_the_papers_formula():
    """Softmax focal loss -(1 - p_y)^gamma log p_y (alpha: the class weights, a weighted mean as cross-entropy's) and
    sigmoid focal loss -(1 - p_t)^gamma log p_t per label (torchvision's sigmoid_focal_loss without alpha; pos_weight
    on the positive term), written out on random logits; gamma 0 is cross-entropy. Guards the modulating factor on
    the wrong probability, weights applied twice or not at all, and a plain mean where cross-entropy's weighted one
    is."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=generator) * 3
    labels = torch.randint(0, 4, (16,), generator=generator)
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    names = ["a", "b", "c", "d"]
    for w in (None, weights):
        plain = F.cross_entropy(logits, labels, weight=w)
        assert SingleLabel(names, weights=w, loss_name="focal", focal_gamma=0.0).loss(
            logits, labels
        ).item() == pytest.approx(plain.item(), rel=1e-6)
        total, weight_sum = 0.0, 0.0
        for row, y in zip(logits.double().tolist(), labels.tolist()):
            p_y = math.exp(row[y]) / sum(math.exp(v) for v in row)
            alpha = 1.0 if w is None else w[y].item()
            total += alpha * -((1 - p_y) ** 2) * math.log(p_y)
            weight_sum += alpha
        focal = SingleLabel(names, weights=w, loss_name="focal", focal_gamma=2.0).loss(logits, labels).item()
        assert focal == pytest.approx(total / weight_sum, rel=1e-5)
        assert focal < plain.item()  # every example's loss shrinks by (1 - p_y)^2 < 1

    targets = (torch.rand(16, 4, generator=generator) < 0.3).float()
    pos_weight = torch.tensor([1.0, 3.0, 0.5, 2.0])
    for pw in (None, pos_weight):
        plain = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pw)
        assert MultiLabel(names, weights=pw, loss_name="focal", focal_gamma=0.0).loss(
            logits, targets
        ).item() == pytest.approx(plain.item(), rel=1e-6)
        expected = 0.0
        for row, t_row in zip(logits.double().tolist(), targets.tolist()):
            for j, (x, t) in enumerate(zip(row, t_row)):
                p = 1 / (1 + math.exp(-x))
                p_t = p if t else 1 - p
                scale = 1.0 if pw is None or not t else pw[j].item()
                expected += scale * -((1 - p_t) ** 2) * math.log(p_t)
        expected /= targets.numel()
        focal = MultiLabel(names, weights=pw, loss_name="focal").loss(logits, targets).item()  # gamma 2: the default
        assert focal == pytest.approx(expected, rel=1e-5)


def test_loss_sums_of_chunks_give_the_whole_set_loss():
    """Problem.loss_sums (predict --streaming's test loss, a chunk at a time): the chunks' summed terms over their
    summed weights equal `loss` on the whole set, for each type with class weights or pos_weight, label smoothing
    and focal loss, at chunk sizes that do and do not divide the rows. Guards a plain mean where the loss is a
    weighted one (a weighted chunked mean is not the mean of chunk means) and a weight, smoothing or focal factor
    the running form forgets."""
    generator = torch.Generator().manual_seed(1)
    rows, names = 97, ["a", "b", "c", "d"]
    logits = torch.randn(rows, 4, generator=generator) * 3
    cases = []
    for weights in (None, torch.tensor([0.5, 2.0, 1.0, 3.0])):
        for options in ({}, {"label_smoothing": 0.1}, {"loss_name": "focal"}):
            cases.append(
                (SingleLabel(names, weights=weights, **options), torch.randint(0, 4, (rows,), generator=generator))
            )
            targets = (torch.rand(rows, 4, generator=generator) < 0.3).float()
            cases.append((MultiLabel(names, weights=weights, **options), targets))
    cases.append((Regression(["x", "y"]), torch.randn(rows, 2, generator=generator)))
    for problem, labels in cases:
        whole = problem.loss(logits[:, : 2 if isinstance(problem, Regression) else 4], labels).item()
        for size in (1, 10, rows):
            total = weight = 0.0
            for start in range(0, rows, size):
                chunk = logits[start : start + size, : 2 if isinstance(problem, Regression) else 4]
                chunk_total, chunk_weight = problem.loss_sums(chunk, labels[start : start + size])
                total, weight = total + chunk_total, weight + chunk_weight
            assert total / weight == pytest.approx(whole, rel=1e-5), (problem, size)


def test_focal_loss_is_refused_where_it_does_not_apply(tmp_path):
    """Regression (given, or read from float labels) and focal with label smoothing are one line each; a negative
    gamma too. Guards focal loss silently falling back to MSE, and a combination whose maths is not defined here."""
    with pytest.raises(UserError, match="loss focal does not apply to problem_type regression: use mse"):
        parse_args(["--problem_type", "regression", "--loss", "focal"])
    with pytest.raises(UserError, match="loss focal with label_smoothing_factor"):
        parse_args(["--loss", "focal", "--label_smoothing_factor", "0.1"])
    with pytest.raises(UserError, match=r"focal_gamma must be >= 0"):
        parse_args(["--loss", "focal", "--focal_gamma", "-1"])
    path = write_rows(tmp_path / "values.csv", [{"text": "a", "label": 1.5}, {"text": "b", "label": 2.0}])
    config = parse_args(["--train_file", path, "--validation_file", path, "--loss", "focal"])
    splits = load_splits(config.data, 0, None, True)
    refused = r"^--loss focal does not apply to regression \(the label column holds floats\): use mse, or pass"
    with pytest.raises(UserError, match=refused + " --problem_type$"):
        make_problem(config.data, config.train, [], splits, None, splits.label_names)


def test_the_loss_options_are_kept_on_resume():
    """--loss and --focal_gamma are recorded in each checkpoint like --class_weights: resuming with another is refused
    (the optimizer state was shaped by the old loss). Guards a loss option left out of the resume record."""
    written = checkpoint.resume_settings(parse_args(["--loss", "focal", "--focal_gamma", "1"]))
    for flags, refused in (
        (["--loss", "focal", "--focal_gamma", "3"], "focal_gamma 1.0 -> 3.0"),
        (["--focal_gamma", "1"], "loss focal -> None"),
    ):
        with pytest.raises(UserError, match=rf"other settings \({refused}\)"):
            checkpoint.check_settings(
                checkpoint.TrainerState(settings=written), checkpoint.resume_settings(parse_args(flags)), "step_1"
            )


@pytest.mark.trains
def test_focal_loss_trains_and_scores_with_the_same_loss(tiny_model_dir, tmp_path):
    """--loss focal with auto class weights on imbalanced data: the model learns, and the eval loss is the weighted
    focal loss of the saved model's logits (the function training used), below the weighted cross-entropy. 10 epochs:
    focal loss shrinks the easy examples' gradients, and 6 left the model at 0.67 accuracy."""
    rows = [r for r in make_rows(300, seed=21) if r["label"] != "music" or random.Random(r["text"]).random() < 0.2]
    files = {
        "train_file": write_rows(tmp_path / "train.csv", rows),
        "validation_file": write_rows(tmp_path / "validation.csv", make_rows(45, seed=2)),
    }
    results = run_in_process(
        tiny_args(
            tiny_model_dir,
            files,
            tmp_path / "run",
            class_weights="auto",
            loss="focal",
            **{**FAST, "num_train_epochs": 10},
        )
    )
    assert losses(tmp_path / "run")[-1] < 0.5 * losses(tmp_path / "run")[0]
    assert results["eval_accuracy"] >= 0.7  # chance: 1/3
    assert read_json(tmp_path / "run" / "run_config.json")["train"]["loss"] == "focal"

    logits, labels = saved_model_outputs(tmp_path / "run", files["validation_file"])
    counts = pd.Series([r["label"] for r in rows]).value_counts()
    weights = torch.tensor([len(rows) / (3 * counts[t]) for t in TOPICS], dtype=torch.float32)
    cross_entropy = F.cross_entropy(logits, labels, reduction="none")
    focal = (weights[labels] * (1 - torch.exp(-cross_entropy)) ** 2 * cross_entropy).sum() / weights[labels].sum()
    assert results["eval_loss"] == pytest.approx(focal.item(), rel=1e-4)
    assert results["eval_loss"] < F.cross_entropy(logits, labels, weight=weights).item()
