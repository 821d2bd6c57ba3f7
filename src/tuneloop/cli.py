"""Command line: the `tuneloop` command (`tuneloop train|evaluate|predict ...`); train.py is `tuneloop train`.

Each command is a function `f(argv) -> exit status`, named in COMMANDS and imported only when it runs. A `UserError`
from any of them becomes one line on stderr and exit status 2; a stop signal, once its checkpoint is saved, exits with
REQUEUE_EXIT_CODE (75) so a job script can requeue the run. `evaluate` and `predict` load a saved model and run on
any process count: `accelerate launch -m tuneloop evaluate --model DIR --data SOURCE`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from typing import NoReturn

from tuneloop.errors import UserError, is_main_launched_process
from tuneloop.preemption import REQUEUE_EXIT_CODE, Preempted

COMMANDS = {
    # name: ("module:function", one line of help)
    "train": (
        "tuneloop.cli:train_command",
        "fine-tune a model (what train.py runs); `tuneloop train --help` lists every option",
    ),
    "evaluate": (
        "tuneloop.cli:evaluate_command",
        "score a saved model on labelled data: metrics table, confusion matrix",
    ),
    "predict": ("tuneloop.cli:predict_command", "write a saved model's predictions for new data (labels optional)"),
    "doctor": (
        "tuneloop.doctor:main",
        "print the environment, check an accelerate config on this machine, run `accelerate test`",
    ),
}

# What `evaluate` and `predict` take from the saved run's run_config.json unless given as flags: the weights' dtype,
# how inputs were tokenized, which examples the training run held out for evaluation, and how it scored them.
INHERITED = {
    "model": ("dtype",),
    "data": (
        "text_column",
        "text_column_delimiter",
        "text_pair_column",
        "label_column",
        "label_separator",
        "max_length",
        "padding",
        "pad_to_multiple_of",
        "validation_split_percentage",
        "max_eval_samples",
    ),
    "train": ("seed", "metrics", "metric_average"),
}


def console(argv: list[str] | None = None) -> int:
    """The `tuneloop` console script (and `python -m tuneloop`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv[:1] in (["-h"], ["--help"]):
            print(usage())
            return 0
        print(
            usage() if not argv else f"tuneloop: error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module, function = COMMANDS[argv[0]][0].split(":")
    return run_command(getattr(importlib.import_module(module), function), argv[1:])


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "usage: tuneloop COMMAND [options]   (COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """train.py: `tuneloop train`."""
    return run_command(train_command, argv)


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. A worker of a multi-process launch ends with `os._exit` once its work is done,
    saved and its stdio flushed: every file it writes is closed by then (atomic writes, trackers finished by
    end_training), and interpreter finalization is where torch 2.13's gloo threads, still owned by a DDP or DeepSpeed
    wrapper after the process group is destroyed, aborted a rank in CI ("terminate called without an active
    exception", SIGABRT) after runs that had finished and saved everything, three times in one day, even past a
    barrier. One process (no process group) exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def say_line(line: str) -> None:
    """One line on stderr in one write: launched workers run unbuffered (`python -u`), where print's text and its
    newline are two writes, and another rank's line could land between them."""
    sys.stderr.write(line + "\n")


def run_command(command, argv: list[str] | None) -> int:
    main_rank = is_main_launched_process()  # every rank reaches the same end; one message is enough
    try:
        return command(argv) or 0
    except UserError as e:
        if main_rank or getattr(e, "failed_alone", False):  # (runtime.agree: a rank that failed alone says why)
            say_line(f"tuneloop: error: {e}")
        return 2
    except Preempted as stop:
        if main_rank:
            say_line(
                f"tuneloop: {stop}; resume with --resume_from_checkpoint latest (exit {REQUEUE_EXIT_CODE}: requeue)"
            )
        return REQUEUE_EXIT_CODE


# Each command parses its arguments before importing the loop (datasets, evaluate, matplotlib...): a mistyped flag is
# answered in a second, not after the whole training stack has loaded.


def train_command(argv: list[str] | None) -> int:
    from tuneloop.config import parse_args

    config = parse_args(argv)
    from tuneloop.loop import train

    train(config)  # --do_train false: the model as loaded is evaluated and/or predicts
    return 0


def evaluate_command(argv: list[str] | None) -> int:
    """An evaluation-only run of the saved model (`do_train` false): the same set-up, scoring and report as
    training's."""
    config = saved_model_config(argv, "evaluate")
    from tuneloop.loop import train

    train(config)
    return 0


def predict_command(argv: list[str] | None) -> int:
    """A prediction-only run of the saved model: its classes are the model's own (its config's id2label)."""
    config = saved_model_config(argv, "predict")
    from tuneloop.loop import train

    train(config)
    return 0


def saved_model_config(argv: list[str] | None, command: str):
    """All of train.py's options, plus --model and --data; defaults from the saved run's run_config.json (INHERITED)."""
    from tuneloop.config import make_parser, parse_args
    from tuneloop.sources import file_builder

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    parser.prog = f"tuneloop {command}"
    parser.description = COMMANDS[command][1] + ". Results go to --output_dir (default: MODEL/" + command + ")."
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="The saved model: a tuneloop output_dir, a LoRA adapter folder (output_dir/adapter, or "
        "output_dir of a --merge_adapter false run), or any fine-tuned classifier folder or Hub id.",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="A .csv/.json/.jsonl/.parquet file, a dataset folder, a Hub dataset id or builtin:bbc_news. "
        "evaluate scores its eval split (the split training held out, for the same source); "
        "predict runs on the file, or on --test_split of a dataset. With --streaming also a folder or a glob of "
        "data files ('shards/*.jsonl.gz'), read as it is scored: evaluate scores all of it (or the "
        "dataset's --validation_split), predict writes one row per input row, in order.",
    )

    def use_model_and_data(config, extra) -> None:
        config.model.model_name_or_path = extra.model
        # With --streaming a folder or a glob of data files is opened as a dataset name is (stream.open_stream).
        if file_builder(extra.data) and (os.path.isfile(extra.data) or not config.data.streaming):
            if command == "evaluate":
                config.data.validation_file = [extra.data]
            else:
                config.data.test_file = extra.data
        else:
            config.data.dataset_name = extra.data
        if config.train.output_dir is None:
            if not os.path.isdir(os.path.expanduser(extra.model)):
                raise UserError(f"--model {extra.model!r} is not a local folder: pass --output_dir for the results")
            config.train.output_dir = os.path.join(extra.model, command)

    known = parser.parse_known_args(argv)[0]
    inherited = inherited_settings(known.model)
    if known.streaming:  # a stream has no seeded subset (predict.open_streamed_set): the saved run's does not apply
        inherited.pop("max_eval_samples", None)
    fixed = dict(do_train=False, do_eval=command == "evaluate", do_predict=command == "predict", output_dir=None)
    return parse_args(argv, parser, inherited, fixed, use_model_and_data)


def inherited_settings(model: str) -> dict:
    """INHERITED from the saved run_config.json of `model` (a tuneloop output_dir or its adapter folder), checked."""
    from tuneloop.config import make_parser, option_value
    from tuneloop.lora import is_adapter
    from tuneloop.outputs import CONFIG_FILE
    from tuneloop.problem import BUILTIN_METRIC_NAMES

    path = os.path.join(os.path.expanduser(model), CONFIG_FILE)
    if not os.path.isfile(path) and is_adapter(model):
        path = os.path.join(os.path.expanduser(model), os.pardir, CONFIG_FILE)  # output_dir/adapter (lora.ADAPTER_DIR)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
        settings = {
            key: saved[section][key]
            for section, keys in INHERITED.items()
            for key in keys
            if key in saved.get(section, {})
        }
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not tuneloop's {section: {option: value}}
        raise UserError(f"{path} is not a tuneloop run_config.json ({e}): fix or remove it") from None
    parser, problems = make_parser(), []
    for key, value in settings.items():  # checked as the same flag would be: the file may have been edited
        try:
            settings[key] = option_value(parser, key, value)
        except ValueError as e:
            problems.append(f"{key} {e}")
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems) + ": fix the file, or give those options as flags")
    main_rank = is_main_launched_process()
    # A model folder may come from anyone: a metric that is not built in is code (evaluate.load runs it), and only
    # the user's own --metrics (with --trust_remote_code) may name one. Dropped rather than refused: the evaluation
    # still runs, with the built-in metrics, and the note says how to get the other back.
    saved_metrics = settings.get("metrics") or []
    if dropped := [name for name in saved_metrics if name not in BUILTIN_METRIC_NAMES]:
        settings["metrics"] = [name for name in saved_metrics if name in BUILTIN_METRIC_NAMES] or None
        if main_rank:
            print(
                f"tuneloop: metrics {', '.join(dropped)} of {path} not used: not built in, loading them runs their "
                f"code; if you trust it: --metrics {' '.join(dropped)} --trust_remote_code"
            )
    if main_rank:
        print(f"tuneloop: as trained ({path}): " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return settings
