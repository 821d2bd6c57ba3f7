"""Run configuration: the option dataclasses (options.py), parsed by `transformers.HfArgumentParser` from a YAML recipe
plus CLI flags, and checked as a whole (`validate`) before anything expensive loads.

Options also take their other names (run_glue_no_trainer's, run_classification's, tuneloop's earlier ones) as ALIASES,
on the command line and in recipes; `--help` and run_config.json show only the canonical names.

Precision can be set here, but process count, DeepSpeed and FSDP belong to the accelerate config
(`accelerate launch --config_file accelerate_configs/...`): the trainer reads them from the `Accelerator`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import fields

import yaml
from transformers.hf_argparser import HfArgumentParser, string_to_bool

from tuneloop.errors import OneLineArgumentErrors, UserError
from tuneloop.options import REPORT_TO_CHOICES, Config, DataArguments, ModelArguments, TrainArguments
from tuneloop.sources import eval_sources, file_problems

SECTIONS = (ModelArguments, DataArguments, TrainArguments)

# Other scripts' names for these options: run_glue_no_trainer.py's (tuneloop's own until it took Trainer's), then
# run_classification.py's, then TrainingArguments' precision switches. Each maps its value to the canonical option(s)
# it sets, on the command line and in recipes alike (see `canonical`). The switches take an optional true/false.
ALIASES = {
    # alias: (the canonical option, how the value maps to canonical options; None: unchanged)
    "max_train_steps": ("max_steps", None),
    "num_warmup_steps": ("warmup_steps", None),
    "warmup_ratio": ("warmup_steps", None),
    "checkpointing_steps": (
        "save_strategy",
        lambda every: (
            {"save_strategy": "epoch"} if every == "epoch" else {"save_strategy": "steps", "save_steps": every}
        ),
    ),
    "project_name": ("project", None),
    "group_by_length": (
        "train_sampling_strategy",
        lambda on: {"train_sampling_strategy": "group_by_length" if on else "random"},
    ),
    "text_column_names": ("text_column", None),
    "label_column_name": ("label_column", None),
    "max_seq_length": ("max_length", None),
    "pad_to_max_length": ("padding", lambda on: {"padding": "max_length" if on else "longest"}),
    "metric_name": ("metrics", lambda name: {"metrics": [name]}),
    "train_split_name": ("train_split", None),
    "validation_split_name": ("validation_split", None),
    "test_split_name": ("test_split", None),
    "shuffle_seed": ("data_seed", None),
    "gradient_checkpointing": ("activation_checkpointing", None),  # TrainingArguments' earlier name
    "fp16": ("mixed_precision", lambda on: {"mixed_precision": "fp16"} if on else {}),
    "bf16": ("mixed_precision", lambda on: {"mixed_precision": "bf16"} if on else {}),
    # Accepted so that run_classification.py command lines run unchanged; tuneloop does this anyway.
    "shuffle_train_dataset": (None, lambda on: {}),  # the training order is reshuffled every epoch
}
SWITCHES = ("gradient_checkpointing", "group_by_length", "pad_to_max_length", "fp16", "bf16", "shuffle_train_dataset")


def canonical(name: str, value) -> dict:
    """An option and its value as canonical option(s) and values: an alias is translated, anything else passes."""
    if name not in ALIASES:
        return {name: value}
    target, translate = ALIASES[name]
    if name in SWITCHES:
        value = string_to_bool(value)
    return translate(value) if translate else {target: value}


class OptionParser(OneLineArgumentErrors, HfArgumentParser):
    """HfArgumentParser with ALIASES, and one-line errors naming the closest options (never a traceback)."""

    def parse_into_dataclasses(self, argv: list[str]) -> tuple:
        *parsed, unknown = self.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
        if unknown:
            self.error("unrecognized arguments: " + " ".join(unknown))
        return tuple(parsed)

    def add_aliases(self) -> None:
        by_target = {}
        for alias, (target, _) in ALIASES.items():
            switch = dict(nargs="?", const=True, type=string_to_bool) if alias in SWITCHES else {}
            self.add_argument(
                f"--{alias}",
                dest=alias,
                action=SetCanonical,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
                **switch,
            )
            by_target.setdefault(target, []).append(f"--{alias}")
        for target, aliases in by_target.items():
            if target is not None:
                action = self._option_string_actions[f"--{target}"]
                action.help += f" Also accepted as {', '.join(aliases)}."
        self.description += (
            f" Accepted for run_classification.py command lines, with no effect: {', '.join(by_target[None])}."
        )


class SetCanonical(argparse.Action):
    """An alias on the command line sets its canonical option(s) where it stands: the later of an alias and its
    canonical option wins, and either wins over a recipe. The value is converted as the canonical option's would be."""

    def __call__(self, parser, namespace, values, option_string=None):
        for name, value in canonical(self.dest, values).items():
            convert = parser._option_string_actions[f"--{name}"].type
            try:
                if convert and isinstance(value, str):
                    value = convert(value)
            except (TypeError, ValueError):
                parser.error(f"argument {option_string}: invalid value {value!r}")
            setattr(namespace, name, value)


def make_parser() -> OptionParser:
    parser = OptionParser(SECTIONS, description="Fine-tune a 🤗 Transformers model for text classification.")
    parser.add_argument(
        "--config", metavar="RECIPE.yaml", help="YAML recipe of the options below; flags given on the command line win."
    )
    parser.add_aliases()
    return parser


def parse_args(
    argv: list[str] | None = None,
    parser: OptionParser | None = None,
    inherited: dict | None = None,
    fixed: dict | None = None,
    complete=None,
) -> Config:
    """YAML recipe (`--config x.yaml`, or for train.py a leading positional `x.yaml`) first, then command-line flags
    on top, then `validate`: the one parsing path of every command. A command with options of its own
    (cli.saved_model_config) passes its `parser`, the `inherited` settings under the recipe, the `fixed` ones over
    it, and `complete(config, extra)` to apply its own options (the `extra` namespace) before the checks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if parser is None and argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    parser = parser or make_parser()
    recipe_path = parser.parse_known_args(argv)[0].config
    defaults = (inherited or {}) | (read_recipe(recipe_path, parser) if recipe_path else {}) | (fixed or {})
    if defaults:
        parser.set_defaults(**defaults)
    model_args, data_args, train_args, extra = parser.parse_into_dataclasses(argv)  # extra: --config, the command's
    config = Config(model_args, data_args, train_args)
    if complete:
        complete(config, extra)
    validate(config)
    return config


def read_recipe(path: str, parser: OptionParser | None = None) -> dict:
    """A flat YAML mapping of option names (or ALIASES) to values, returned under the canonical names; unknown keys are
    an error, with the closest valid name. Each value is checked and converted as the same flag's would be
    (`option_value`): a recipe is the user's own input, as the command line is, and gets the same checks."""
    if not os.path.isfile(path):
        raise UserError(f"recipe {path!r} does not exist: pass the path of a YAML file (see recipes/)")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path!r} is not valid YAML ({' '.join(str(e).split())}): fix the file") from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path!r} must be a mapping of option: value, got {type(recipe).__name__}")
    known = [f.name for section in SECTIONS for f in fields(section)] + list(ALIASES)
    parser = parser or make_parser()
    problems, settings = [], {}
    for key, value in recipe.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        try:
            translated = canonical(key, value)
        except argparse.ArgumentTypeError as e:  # an alias switch that is not true/false
            problems.append(f"{key}: {e}")
            continue
        for name, given in translated.items():
            try:
                settings[name] = option_value(parser, name, given)
            except ValueError as e:
                problems.append(f"{key} {e}" if name == key else f"{key} (as {name}) {e}")
    if problems:
        raise UserError(f"recipe {path!r}: " + "; ".join(problems) + "; `python train.py --help` lists every option")
    return settings


def option_value(parser: OptionParser, name: str, value):
    """A value for option `name` that did not come from the command line (a recipe's, a saved run's), made what the
    command line would make of it: converted by the option's own type, checked against its choices (both as
    HfArgumentParser built them from the dataclass field), and one value where the option takes several made a
    one-item list. argparse would only convert a string default, and check no choices. Raises ValueError."""
    action = parser._option_string_actions[f"--{name}"]
    takes_list = action.nargs in ("+", "*")
    if value is None or isinstance(value, dict):  # None: unset; a mapping: eval sets as {name: path}, scheduler kwargs
        return value
    if isinstance(value, list) and not takes_list:
        raise ValueError(f"{value!r} is a list: the option takes one value")
    values = [flag_value(action, item) for item in (value if isinstance(value, list) else [value])]
    return values if takes_list else values[0]


def flag_value(action: argparse.Action, value):
    """One value as the command line would read it: its text through the option's type, then its choices."""
    if isinstance(value, (list, dict)):
        raise ValueError(f"{value!r} is not a single value")
    if isinstance(value, bool) and action.type is string_to_bool:
        return value
    if isinstance(value, bool):  # YAML reads no, off, false as False: for an option with a "no" choice, that is it
        text = "no" if not value and "no" in (action.choices or ()) else str(value).lower()
    else:
        text = value if isinstance(value, str) else str(value)
    kinds = {int: "a whole number", float: "a number", string_to_bool: "true or false"}
    try:
        converted = action.type(text) if action.type else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{value!r} is not {kinds.get(action.type, 'a valid value')}") from None
    if action.choices is not None and converted not in action.choices:
        close = difflib.get_close_matches(text, [str(c) for c in action.choices], n=1)
        raise ValueError(
            f"{value!r} is not one of {', '.join(map(str, action.choices))}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return converted


def project_problem(project: str) -> str | None:
    """--project names a folder inside output_dir (TensorBoard's logs): a path there could write anywhere."""
    if project and project not in (".", "..") and not any(sep in project for sep in ("/", "\\", "\0")):
        return None
    return f"project must be a plain name, no path (got {project!r}): e.g. --project my-experiments"


def validate(config: Config) -> None:
    """Check every option that can be checked without loading anything; report all problems in one line."""
    from tuneloop import (  # the features' own checks: torch, which --help never needs
        batches,
        lora,
        optim,
        problem,
        stream,
    )

    m, d, t = config.model, config.data, config.train
    problems = training_problems(m, t) + problem.option_problems(t)
    if d.problem_type and (type_problem := problem.of(d.problem_type).options_problem(t, reason=None)):
        problems.append(type_problem)
    problems += model_problems(m, d, t, lora.lora_problems(m))
    problems += batches.token_budget_problems(d, t) + stream.stream_problems(d, t)
    problems += data_problems(d) + file_problems(d) + eval_set_problems(d)
    problems += optim.scheduler_problems(t) + checkpoint_problems(t)
    if best_problem := problem.best_metric_problem(
        t.metric_for_best_model, t.metrics, list(eval_sources(d)), d.problem_type, decided=False
    ):
        problems.append(best_problem)
    problems += run_problems(d, t)
    if problems:
        raise UserError("invalid configuration: " + "; ".join(problems))


def failed(*checks: tuple[bool, str | None]) -> list[str]:
    """The problems of the (ok, problem) checks that failed, in order."""
    return [problem for ok, problem in checks if not ok]


def training_problems(m: ModelArguments, t: TrainArguments) -> list[str]:
    """The numbers and switches of training, and what --metrics may run."""
    from tuneloop.problem import untrusted_metrics

    batch_sizes = (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    )
    return failed(
        (t.learning_rate > 0, f"learning_rate must be > 0 (got {t.learning_rate})"),
        *((getattr(t, name) >= 1, f"{name} must be >= 1 (got {getattr(t, name)})") for name in batch_sizes),
        (t.weight_decay >= 0, f"weight_decay must be >= 0 (got {t.weight_decay})"),
        (t.max_grad_norm >= 0, f"max_grad_norm must be >= 0, 0 disables clipping (got {t.max_grad_norm})"),
        (t.max_steps > 0 or t.num_train_epochs > 0, f"num_train_epochs must be > 0 (got {t.num_train_epochs})"),
        (
            t.warmup_steps >= 0 and (t.warmup_steps < 1 or t.warmup_steps == int(t.warmup_steps)),
            f"warmup_steps must be a share of all steps below 1 or a whole number of steps (got {t.warmup_steps})",
        ),
        (t.eval_strategy != "steps" or (t.eval_steps or 0) >= 1, "eval_strategy=steps needs --eval_steps N (N >= 1)"),
        (not t.eval_on_start or t.do_eval and t.do_train, "eval_on_start needs --do_train and --do_eval"),
        (t.do_train or t.do_eval or t.do_predict, "nothing to do: do_train, do_eval and do_predict are all false"),
        (t.metrics is None or bool(t.metrics), "metrics is empty: name at least one, e.g. --metrics accuracy"),
        (not (problem := untrusted_metrics(t.metrics, m.trust_remote_code)), problem),
        (not (problem := project_problem(t.project)), problem),
    )


def model_problems(m: ModelArguments, d: DataArguments, t: TrainArguments, lora_problems: list[str]) -> list[str]:
    """The model's options (LoRA's checked by lora.py), the trackers and the lengths of the inputs."""
    return failed(
        (d.label_separator != "", "label_separator must not be empty"),
        (
            m.attention_dropout is None or 0 <= m.attention_dropout < 1,
            f"attention_dropout must be in [0, 1) (got {m.attention_dropout})",
        ),
        *((False, problem) for problem in lora_problems),
        (m.num_labels is None or m.num_labels >= 2, f"num_labels must be >= 2 (got {m.num_labels})"),
        (
            set(t.report_to) <= set(REPORT_TO_CHOICES) and ("none" not in t.report_to or len(t.report_to) == 1),
            f"report_to must be none, or any of wandb, tensorboard, all (got {' '.join(t.report_to)})",
        ),
        (d.length_grouping_window >= 1, f"length_grouping_window must be >= 1 (got {d.length_grouping_window})"),
        (d.max_length >= 8, f"max_length must be >= 8 tokens (got {d.max_length})"),
    )


def data_problems(d: DataArguments) -> list[str]:
    """Padding, the held-out share and the subset sizes."""
    samples = ("max_train_samples", "max_eval_samples", "max_predict_samples")
    return failed(
        (
            d.pad_to_multiple_of is None or d.pad_to_multiple_of >= 1,
            f"pad_to_multiple_of must be >= 1 (got {d.pad_to_multiple_of})",
        ),
        (
            0 < d.validation_split_percentage < 100,
            f"validation_split_percentage must be between 0 and 100 (got {d.validation_split_percentage})",
        ),
        *(
            (getattr(d, name) is None or getattr(d, name) >= 1, f"{name} must be >= 1 (got {getattr(d, name)})")
            for name in samples
        ),
    )


def eval_set_problems(d: DataArguments) -> list[str]:
    """Several eval sets: one kind of source, and names that can be part of a metric's name."""
    eval_names = list(eval_sources(d))
    several = eval_names if len(eval_names) > 1 else []  # one eval set is "eval": its name appears nowhere
    bad_names = [n for n in several if not re.fullmatch(r"\w+", n) or n == d.train_split]
    return failed(
        (
            not (d.validation_file and d.validation_split),
            "validation_file and validation_split both name eval sets: give one of them",
        ),
        (
            not bad_names,
            f"eval set name(s) {bad_names} must be letters, digits and _ and not the train split's name: "
            "name them, e.g. --validation_file in_domain=a.csv out_of_domain=b.csv",
        ),
        (
            len(eval_names) == len(d.validation_file or d.validation_split or []),
            "two eval sets have the same name: name them, e.g. --validation_file a=x/test.csv b=y/test.csv",
        ),
    )


def checkpoint_problems(t: TrainArguments) -> list[str]:
    """When checkpoints are saved and kept, and early stopping."""
    return failed(
        (t.save_strategy != "steps" or (t.save_steps or 0) >= 1, "save_strategy=steps needs --save_steps N (N >= 1)"),
        (
            t.save_steps is None or t.save_strategy != "no",
            "save_steps is set but save_strategy is 'no': add --save_strategy steps",
        ),
        (
            t.save_total_limit is None or t.save_total_limit >= 1,
            f"save_total_limit must be >= 1 (got {t.save_total_limit})",
        ),
        (
            t.early_stopping_patience is None or t.early_stopping_patience >= 1,
            f"early_stopping_patience must be >= 1 (got {t.early_stopping_patience})",
        ),
    )


def run_problems(d: DataArguments, t: TrainArguments) -> list[str]:
    """Options that only work together: evaluations for the best model, local files for every split used."""
    return failed(
        (t.ddp_timeout >= 1, f"ddp_timeout must be >= 1 second (got {t.ddp_timeout})"),
        (t.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be >= 1 (got {t.max_nonfinite_steps})"),
        (
            t.do_eval
            and t.eval_strategy != "no"
            or not (t.load_best_model_at_end or t.early_stopping_patience or t.save_strategy == "best"),
            "load_best_model_at_end, early_stopping_patience and save_strategy=best need evaluations: "
            "set --eval_strategy epoch or steps",
        ),
        (
            d.validation_file is None or d.train_file is not None or not t.do_train,
            "validation_file needs train_file too (or --do_train false)",
        ),
        (
            not t.do_predict or d.test_file is not None or d.train_file is None,
            "do_predict with local data files needs --test_file too",
        ),
    )
