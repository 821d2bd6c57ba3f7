"""The combination matrix (issue 24, item 10): data source x text shape x labels x run x after, generated as an
all-pairs design (allpairspy) rather than picked by hand, so every pair of values meets in at least one case.

Each case writes the keyword task of conftest in its source and shape (train 96 rows, eval 27: odd, so 2 ranks x
batch 8 repeat some at the end; test 21 rows with ids), trains the tiny BERT its way, then asserts what a user relies
on whatever the combination:
- it trains: the logged training loss falls;
- the eval count is exact: eval_samples is the eval split's row count (no example lost or counted twice);
- the predictions file has one row per test row, in file order, ids kept;
- the saved model in transformers' `pipeline("text-classification", top_k=None)` gives the predictions file's
  probabilities (softmax; sigmoid for multi-label) or values (regression), pairs passed as {"text", "text_pair"}.

One-process runs train in this process; only DDP and DeepSpeed ZeRO-2 are launched. The design is generated at
collection time and is deterministic (allpairspy is greedy, no randomness): the case ids name the five values.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import OrderedDict
from pathlib import Path

import pytest
from allpairspy import AllPairs

from conftest import FILLER, KEYWORDS, launch, read_json, reset_accelerate_state, run_in_process, tiny_args

pytestmark = pytest.mark.matrix

TOPICS = sorted(KEYWORDS)  # music, sports, tech
VALUES = {"music": 2.0, "sports": -1.0, "tech": 0.5}  # the regression target of each topic
SIZES = {"train": 96, "validation": 27, "test": 21}

PARAMETERS = OrderedDict(
    source=["csv", "tsv", "jsonl.gz", "parquet", "folder", "saved"],  # folder: data files; saved: save_to_disk
    shape=["one", "joined", "pair"],  # one text column; two joined by --text_column a,b; a sentence pair
    labels=["ids", "names", "floats", "lists", "sep"],  # single-label (ids, names), regression, multi-label (2 ways)
    run=["single", "ddp", "zero2", "lora", "budget", "resume"],
    after=["do_predict", "predict", "evaluate"],  # --do_predict; `tuneloop predict`; `tuneloop evaluate` + do_predict
)
# A CSV cell holds a string, not a list: lists of labels in CSV/TSV cannot be written (--label_separator is the CSV
# way, and is its own value). The folder holds JSON Lines files, so lists go there.
NO_LISTS = {"csv", "tsv"}
LAUNCHED = {"ddp": ("cpu_2proc.yaml", "MULTI_CPU"), "zero2": ("deepspeed_zero2_cpu.yaml", "DEEPSPEED")}
# 12 optimizer steps an epoch at batch 8. The random tiny BERT stays at chance for a few dozen steps before it picks
# up the keywords; a constant learning rate over 48 steps gets every problem type's loss down (measured: by a fifth
# for multi-label, whose loss starts near its floor, by a third or more for the others).
TRAIN = dict(
    per_device_train_batch_size=8,
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    max_steps=48,
    logging_steps=4,
    eval_strategy="no",
    save_strategy="no",
)
# LoRA trains on the backbone of `pretrained_dir` (a random frozen backbone barely moves in 48 steps: test_peft.py).
RUNS = {
    "single": {},
    "ddp": {},
    "zero2": {},
    "lora": dict(use_peft="true", learning_rate=3e-3, lora_dropout=0.0),
    "budget": dict(max_tokens_per_batch=96),
    "resume": {},
}


# allpairspy's order of generation: with the filter, other orders leave pairs uncovered (source=jsonl.gz with
# run=single, for one); the largest parameters first covers every pair (test_the_design_covers_every_pair checks).
GENERATION_ORDER = ["run", "source", "labels", "shape", "after"]


def meaningful(values: list, order: tuple[str, ...] | list[str] = tuple(PARAMETERS)) -> bool:
    named = dict(zip(order, values))
    return not (named.get("source") in NO_LISTS and named.get("labels") == "lists")


def cases() -> list[tuple]:
    """The all-pairs design, each case as (source, shape, labels, run, after)."""
    design = AllPairs(
        [PARAMETERS[name] for name in GENERATION_ORDER], filter_func=lambda values: meaningful(values, GENERATION_ORDER)
    )
    return [tuple(dict(zip(GENERATION_ORDER, case))[name] for name in PARAMETERS) for case in design]


CASES = cases()


# ---------------------------------------------------------------- the data, in every shape and source


def topics_of(rng: random.Random, labels: str) -> list[str]:
    if labels in ("lists", "sep"):
        return sorted(rng.sample(TOPICS, rng.choice([0, 1, 1, 2])))
    return [rng.choice(TOPICS)]


def label_of(topics: list[str], labels: str, rng: random.Random):
    return {
        "ids": lambda: TOPICS.index(topics[0]),
        "names": lambda: topics[0],
        "floats": lambda: round(VALUES[topics[0]] + rng.gauss(0, 0.1), 4),
        "lists": lambda: topics,
        "sep": lambda: "|".join(topics),
    }[labels]()


def make_split(n: int, seed: int, shape: str, labels: str, prefix: str) -> list[dict]:
    """n rows of the keyword task: each row holds a keyword of each of its topics among filler words; a joined or
    paired row is that text cut in two (so the joined text is the whole text again)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topics = topics_of(rng, labels)
        words = rng.choices(FILLER, k=rng.randint(2 - min(len(topics), 1), 2))  # short: the keyword stands out
        for topic in topics:
            words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[topic]))
        cut = len(words) // 2  # at least one word each side
        first, second = " ".join(words[:cut]), " ".join(words[cut:])
        text = {
            "one": {"text": " ".join(words)},
            "joined": {"title": first, "body": second},
            "pair": {"premise": first, "hypothesis": second},
        }[shape]
        rows.append({"id": f"{prefix}{i:03d}", **text, "label": label_of(topics, labels, rng)})
    return rows


def write(path: Path, rows: list[dict]) -> str:
    import csv

    import datasets

    if path.name.endswith((".csv", ".tsv")):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def write_source(folder: Path, source: str, splits: dict[str, list[dict]]) -> dict:
    """The data as the source holds it; returns the data options of a run, and `--data` for evaluate / predict."""
    import datasets

    if source == "saved":
        path = folder / "saved"
        datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
            str(path)
        )
        return {"options": {"dataset_name": str(path)}, "eval_data": str(path), "test_data": str(path)}
    if source == "folder":
        path = folder / "dataset"
        path.mkdir()
        for name, rows in splits.items():
            write(path / f"{name}.jsonl", rows)
        return {"options": {"dataset_name": str(path)}, "eval_data": str(path), "test_data": str(path)}
    paths = {name: write(folder / f"{name}.{source}", rows) for name, rows in splits.items()}
    return {
        "options": {"train_file": paths["train"], "validation_file": paths["validation"]},
        "test_file": paths.get("test"),
        "eval_data": paths["validation"],
        "test_data": paths.get("test"),
    }


SHAPE_OPTIONS = {
    "one": {},
    "joined": dict(text_column="title,body"),
    "pair": dict(text_column="premise", text_pair_column="hypothesis"),
}
LABEL_OPTIONS = {"ids": {}, "names": {}, "floats": {}, "lists": {}, "sep": dict(label_separator="|")}


def pipeline_input(row: dict, shape: str):
    if shape == "pair":
        return {"text": row["premise"], "text_pair": row["hypothesis"]}
    return row["text"] if shape == "one" else f"{row['title']} {row['body']}"


def predictions_text(prediction: dict, shape: str):
    if shape == "pair":
        return {"text": prediction["premise"], "text_pair": prediction["hypothesis"]}
    return prediction["text" if shape == "one" else "title,body"]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def train_losses(output_dir: Path) -> list[float]:
    return [h["train/loss"] for h in read_json(output_dir / "log_history.json") if "train/loss" in h]


@pytest.fixture(scope="module")
def pretrained_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT's backbone after a full fine-tuning on the keyword task (its head dropped): what LoRA is for, a
    backbone whose features already tell the topics apart. Without it the frozen random backbone keeps LoRA's loss
    near chance, and a LoRA case could not show that it trains."""
    folder = tmp_path_factory.mktemp("pretrained")
    data = write_source(
        folder,
        "jsonl.gz",
        {"train": make_split(96, 7, "one", "names", "p"), "validation": make_split(9, 8, "one", "names", "q")},
    )
    run_in_process(tiny_args(tiny_model_dir, {}, folder / "run", **data["options"], **TRAIN))
    reset_accelerate_state()
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(folder / "run").save_pretrained(folder / "backbone")
    AutoTokenizer.from_pretrained(folder / "run").save_pretrained(folder / "backbone")
    return str(folder / "backbone")


# ---------------------------------------------------------------- the matrix


def test_the_design_covers_every_pair(capsys):
    """The generated design holds every pair of values of two parameters (bar lists of labels in CSV/TSV), and is the
    same at every collection. Guards a filter or library change that silently drops pairs."""
    names = list(PARAMETERS)
    seen = {
        (a, b, x, y)
        for case in CASES
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        for x, y in [(case[i], case[names.index(b)])]
    }
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for x in PARAMETERS[a]:
                for y in PARAMETERS[b]:
                    if meaningful([x if n == a else y if n == b else None for n in names]):
                        assert (a, b, x, y) in seen, (a, x, b, y)
    assert cases() == CASES
    print("\n".join("-".join(case) for case in CASES))


@pytest.mark.parametrize("source, shape, labels, run, after", CASES, ids=["-".join(case) for case in CASES])
def test_combination(source, shape, labels, run, after, tiny_model_dir, tmp_path, capsys, request):
    """One combination, end to end. Guards a combination that crashes (pairs from a CSV: issue 24 item 1), trains
    nothing, loses or repeats eval examples (2 ranks pad the last batches), reorders or drops predictions, or saves a
    model whose config (labels, problem type, merged adapter) makes transformers score it otherwise than tuneloop."""
    from transformers import pipeline

    from tuneloop.cli import console

    model_dir = request.getfixturevalue("pretrained_dir") if run == "lora" else tiny_model_dir

    splits = {name: make_split(n, seed, shape, labels, name[0]) for (name, n), seed in zip(SIZES.items(), (1, 2, 3))}
    data = write_source(tmp_path, source, splits)
    output_dir = tmp_path / "run"
    do_predict = after in ("do_predict", "evaluate")
    options = {**data["options"], **SHAPE_OPTIONS[shape], **LABEL_OPTIONS[labels], **TRAIN, **RUNS[run]}
    if do_predict:
        options |= {"do_predict": "true"} | ({"test_file": data["test_file"]} if "test_file" in data else {})
    args = tiny_args(model_dir, {}, output_dir, **options)

    if run in LAUNCHED:
        config, kind = LAUNCHED[run]
        launch(args, config=config, timeout=600)
        results = read_json(output_dir / "all_results.json")
        assert (results["distributed_type"], results["num_processes"]) == (kind, 2), results
    elif run == "resume":  # the uninterrupted run, checkpointed at step 12, then resumed from there in another folder
        whole = tmp_path / "whole"
        run_in_process(
            tiny_args(
                model_dir, {}, whole, **{**options, "do_predict": "false", "save_strategy": "steps", "save_steps": 12}
            )
        )
        reset_accelerate_state()
        capsys.readouterr()
        step_12 = whole / "checkpoints" / "step_0000012"
        results = run_in_process([*args, "--resume_from_checkpoint", str(step_12)])
        assert "resuming at step 12" in capsys.readouterr().out
        # The resumed run continues the uninterrupted one, step for step.
        assert train_losses(output_dir) == pytest.approx(train_losses(whole), rel=1e-5)
    else:
        results = run_in_process(args)
    reset_accelerate_state()

    # It trains.
    losses = train_losses(output_dir)
    assert len(losses) == TRAIN["max_steps"] // TRAIN["logging_steps"], losses
    assert sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses
    # The eval count is exact.
    assert results["eval_samples"] == SIZES["validation"], results

    if after == "evaluate":  # the saved model, scored again by `tuneloop evaluate` in this process
        assert (
            console(
                [
                    "evaluate",
                    "--model",
                    str(output_dir),
                    "--data",
                    data["eval_data"],
                    "--output_dir",
                    str(tmp_path / "evaluated"),
                ]
            )
            == 0
        )
        again = read_json(tmp_path / "evaluated" / "all_results.json")
        scores = [key for key in results if key.startswith("eval_") and isinstance(results[key], (int, float))]
        assert len(scores) >= 4 and {key: again[key] for key in scores} == pytest.approx(
            {key: results[key] for key in scores}, rel=1e-4, abs=1e-6
        )
    if after == "predict":
        predicted_in = tmp_path / "predicted"
        flags = ["--test_split", "test"] if "test_file" not in data else []
        assert (
            console(
                [
                    "predict",
                    "--model",
                    str(output_dir),
                    "--data",
                    data["test_data"],
                    *flags,
                    "--output_dir",
                    str(predicted_in),
                ]
            )
            == 0
        )
    else:
        predicted_in = output_dir
    reset_accelerate_state()

    # One row per test row, in order, ids kept; the test metrics count every row once.
    assert read_json(predicted_in / "predict_results.json")["test_samples"] == SIZES["test"]
    predictions = read_jsonl(predicted_in / "predictions.jsonl")
    test = splits["test"]
    assert [(p["index"], p["id"]) for p in predictions] == [(i, row["id"]) for i, row in enumerate(test)]
    assert [predictions_text(p, shape) for p in predictions] == [pipeline_input(row, shape) for row in test]

    # The saved model in a plain transformers pipeline gives the predictions file's numbers.
    classify = pipeline("text-classification", model=str(output_dir), device="cpu", top_k=None)
    scored = classify([pipeline_input(row, shape) for row in test])
    for prediction, scores in zip(predictions, scored):
        by_label = {s["label"]: s["score"] for s in scores}
        if labels == "floats":
            assert by_label == {"label": pytest.approx(prediction["predicted_value"], abs=1e-4)}
        else:
            assert by_label == pytest.approx(prediction["probabilities"], abs=1e-4)
