"""What tuneloop reads from files a user did not write runs no code, and what it writes for others to read does not
carry the training machine's home paths.

- A saved model folder's run_config.json may come from anyone: its metric names are never code (evaluate.load runs
  the .py file of any name that is not built in); the metrics the user names need --trust_remote_code for that.
- A checkpoint's RNG file (read by tuneloop itself on an elastic resume) is loaded weights-only, as Accelerate does.
- `--project` is a folder inside output_dir, never a path out of it.
- The model card and run_config.json, which travel with the model folder, show no absolute home paths.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import make_rows, read_json, tiny_args, write_rows
from tuneloop import elastic, outputs
from tuneloop.cli import console, inherited_settings
from tuneloop.config import parse_args
from tuneloop.errors import UserError
from tuneloop.problem import SingleLabel
from tuneloop.report import model_card
from tuneloop.tracking import flat_hparams

CLASSES = ["music", "sports", "tech"]  # conftest's topics, in id order


def marker_metric(folder, marker) -> str:
    """A metric module whose import writes `marker`: proof that something ran the file."""
    script = folder / "sneaky_metric.py"
    script.write_text(f"import pathlib\n\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    return str(script)


def saved_classifier(tiny_model_dir, folder):
    """A classifier folder of the three toy classes, as a training run leaves it (untrained: enough to evaluate)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label=dict(enumerate(CLASSES)), label2id={n: i for i, n in enumerate(CLASSES)}
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.mark.trains
def test_evaluate_never_runs_a_metric_named_by_the_model_folder(tiny_model_dir, toy_files, tmp_path, capsys):
    """Guards a downloaded model folder running code: its run_config.json named a local metric script, and
    `tuneloop evaluate --model DIR` inherited the name and evaluate.load imported (ran) the file. Now the name is
    dropped with a note, and the evaluation runs with the built-in metrics."""
    model_dir = saved_classifier(tiny_model_dir, tmp_path / "downloaded")
    marker = tmp_path / "the-metric-ran"
    script = marker_metric(tmp_path, marker)
    (model_dir / "run_config.json").write_text(
        json.dumps({"model": {}, "data": {"max_length": 32}, "train": {"metrics": ["accuracy", script], "seed": 0}})
    )
    status = console(["evaluate", "--model", str(model_dir), "--data", toy_files["validation_file"]])
    assert not marker.exists(), "the model folder's metric script was executed"
    out = capsys.readouterr().out
    assert status == 0
    assert f"metrics {script} of " in out and "--trust_remote_code" in out
    results = read_json(model_dir / "evaluate" / "all_results.json")
    assert "eval_accuracy" in results and results["eval_samples"] == 45


def test_a_metric_that_is_not_built_in_needs_trust_remote_code(tmp_path):
    """Guards `--metrics path.py` (or a Hub name) running code nobody opted into: refused at parse time, in one line,
    before any data or model loads; --trust_remote_code (transformers' flag, which also allows custom model code)
    lets it through, from the command line or the user's own recipe."""
    script = marker_metric(tmp_path, tmp_path / "ran")
    with pytest.raises(UserError, match=rf"metrics {script}: not built in.*add --trust_remote_code"):
        parse_args(["--metrics", "accuracy", script])
    assert parse_args(["--metrics", script, "--trust_remote_code"]).train.metrics == [script]
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"metrics: [{script}]\ntrust_remote_code: true\n")
    assert parse_args([str(recipe)]).train.metrics == [script]
    assert not (tmp_path / "ran").exists()


def test_inherited_settings_are_checked_like_flags(tmp_path):
    """Guards a saved run_config.json feeding values no flag could give: a choice that does not exist, or one
    metric name as a string (then iterated as characters)."""
    (tmp_path / "run_config.json").write_text(json.dumps({"data": {"padding": "everywhere"}, "train": {}}))
    with pytest.raises(UserError, match=r"run_config.json: padding 'everywhere' is not one of longest, max_length"):
        inherited_settings(str(tmp_path))
    (tmp_path / "run_config.json").write_text(json.dumps({"train": {"metrics": "f1"}}))
    assert inherited_settings(str(tmp_path))["metrics"] == ["f1"]
    (tmp_path / "run_config.json").write_text(
        json.dumps({"model": {"trust_remote_code": True}, "train": {"metrics": ["glue"]}})
    )
    assert inherited_settings(str(tmp_path)) == {"metrics": None}  # neither the opt-in nor the name is inherited
    (tmp_path / "run_config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a tuneloop run_config.json"):
        inherited_settings(str(tmp_path))


def accelerate_rng_file(folder) -> str:
    """An RNG file as Accelerator.save_state writes it (python, numpy and torch streams), for process 0."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.save_state(str(folder))
    return str(folder / "random_states_0.pkl")


def test_rng_states_load_weights_only_and_restore_the_streams(tmp_path):
    """Guards the elastic-resume RNG load (a new rank reads another rank's file) against a weights-only load that
    cannot read Accelerate's file (numpy's state is an ndarray): the streams must come back exactly."""
    import random

    import numpy as np

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    file = accelerate_rng_file(tmp_path / "state")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    elastic._load_rng_states(file)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class Payload:
    """Unpickling this calls open(path, "w"): any pickled object can run code when torch.load unpickles fully."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoints_rng_file_cannot_run_code(tmp_path):
    """Guards torch.load(weights_only=False) on the RNG file of an elastic resume: a checkpoint folder from anyone
    could run code through it. A weights-only load refuses the object, in one line naming the file."""
    marker = tmp_path / "unpickled"
    file = tmp_path / "random_states_0.pkl"
    torch.save({"random_state": Payload(str(marker))}, file)
    with pytest.raises(UserError, match="random_states_0.pkl"):
        elastic._load_rng_states(str(file))
    assert not marker.exists(), "unpickling the checkpoint ran code"


@pytest.mark.parametrize("project", ["../..", "../escaped", "/tmp/elsewhere", "a/b", "..", ""])
def test_project_must_be_a_plain_name(project, tmp_path):
    """Guards --project joining output_dir unchecked: TensorBoard writes to output_dir/<project>, so '../..' wrote
    outside the output folder (an absolute path anywhere)."""
    with pytest.raises(UserError, match="project must be a plain name"):
        parse_args(["--project", project])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"project_name: {json.dumps(project)}\n")  # the alias, from a recipe
    with pytest.raises(UserError, match="project must be a plain name"):
        parse_args([str(recipe)])
    assert parse_args(["--project", "my-experiments.v2"]).train.project == "my-experiments.v2"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home directory holding the model, the data and the output folder, as on a user's machine."""
    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    files = {
        "train_file": write_rows(home / "data" / "train.csv", make_rows(12, seed=1)),
        "validation_file": write_rows(home / "data" / "dev.csv", make_rows(6, seed=2)),
    }
    (home / "models" / "tiny-bert").mkdir(parents=True)
    return home, files


def test_the_model_card_shows_no_local_paths(home):
    """Guards the published card carrying the training machine's paths (/home/alice/...): a Hub id is shown as is,
    a local model, data file or output folder by its last component."""
    home, files = home
    config = parse_args(tiny_args(str(home / "models" / "tiny-bert"), files, home / "runs" / "bbc"))
    card = model_card(
        config, {"global_step": 3, "eval_accuracy": 0.5}, SingleLabel(CLASSES), None, None, 12, "1 process(es) on cpu"
    )
    assert str(home) not in card and "/alice" not in card
    assert "`tiny-bert` fine-tuned" in card and "source: train.csv, dev.csv" in card and 'model="bbc"' in card
    assert "base_model" not in card  # a local folder means nothing on the Hub
    config.model.model_name_or_path = "google-bert/bert-base-cased"  # a Hub id: shown, and linked, as it is
    card = model_card(config, {}, SingleLabel(CLASSES), None, None, 12, "cpu")
    assert "base_model: google-bert/bert-base-cased" in card and "`google-bert/bert-base-cased` fine-tuned" in card


def test_run_config_json_and_tracker_hparams_write_home_as_tilde(home):
    """Guards run_config.json (which goes wherever the model folder goes) and the trackers' hyperparameters
    (TensorBoard's event files in output_dir, wandb's uploaded config) carrying the home directory. Paths stay
    as given otherwise, so the file still says what reproduces the run; evaluate/predict still read it back."""
    home, files = home
    output_dir = home / "runs" / "bbc"
    named = [f"dev={files['validation_file']}", f"again={files['validation_file']}"]
    config = parse_args(tiny_args(str(home / "models" / "tiny-bert"), {**files, "validation_file": named}, output_dir))
    accelerator = types.SimpleNamespace(is_main_process=True, num_processes=1)
    output_dir.mkdir(parents=True)
    outputs.save_results(accelerator, config, {"eval_accuracy": 0.5})
    text = (output_dir / "run_config.json").read_text()
    assert str(home) not in text
    saved = json.loads(text)
    assert saved["model"]["model_name_or_path"] == "~/models/tiny-bert"
    assert saved["data"]["train_file"] == "~/data/train.csv"
    assert saved["data"]["validation_file"] == ["dev=~/data/dev.csv", "again=~/data/dev.csv"]
    assert saved["train"]["output_dir"] == "~/runs/bbc"
    assert inherited_settings(str(output_dir))["max_length"] == 32
    assert not any(str(home) in str(value) for value in flat_hparams(config).values())
    assert config.data.train_file == files["train_file"]  # the run itself keeps the real paths
    # Only where a path starts, and only the home folder itself: other absolute paths are what reproduces the run.
    from tuneloop.options import without_home

    assert without_home("/data/shared/train.csv") == "/data/shared/train.csv"
    assert without_home(f"{home}x/train.csv") == f"{home}x/train.csv"
    assert without_home(f"copy of {home}/a.csv") == f"copy of {home}/a.csv"


@pytest.mark.trains
def test_a_runs_output_folder_names_no_home_path(home, tiny_model_dir):
    """Guards every file of an output folder (the model, run_config.json, the report and model card, checkpoints,
    TensorBoard's event files and hparams.yml) against carrying the home path of the machine that trained it."""
    import shutil

    from conftest import run_in_process

    home, files = home
    model = shutil.copytree(tiny_model_dir, home / "models" / "tiny-bert", dirs_exist_ok=True)
    output_dir = home / "runs" / "r1"
    run_in_process(
        tiny_args(
            str(model),
            files,
            output_dir,
            num_train_epochs=1,
            report_to="tensorboard",
            save_strategy="epoch",
            do_predict="true",
            test_file=files["validation_file"],
        )
    )
    leaks = [
        str(path.relative_to(output_dir))
        for path in output_dir.rglob("*")
        if path.is_file() and str(home).encode() in path.read_bytes()
    ]
    assert not leaks, f"files naming {home}: {leaks}"
    assert (output_dir / "report" / "README.md").is_file() and (output_dir / "run_config.json").is_file()
