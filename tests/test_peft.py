"""LoRA through PEFT, activation checkpointing and dtype at load (issue 16), on the tiny BERT of conftest.

Unit tests check the options, the head found in each architecture (built on the meta device: no weights) and every
bad input's one line before any weight is read. The `trains` tests run the tiny task in this process; the `engines`
tests launch LoRA + activation checkpointing on 2-process DDP, ZeRO-2 and ZeRO-3 and hold them to each other.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json, reset_accelerate_state, run_in_process, tiny_args
from test_engines import launched as launched_engine
from tuneloop import lora
from tuneloop.config import parse_args
from tuneloop.errors import UserError
from tuneloop.options import FULL_FINETUNING_LEARNING_RATE, LORA_LEARNING_RATE, ModelArguments

# The tiny BERT is random: LoRA on a random frozen backbone needs a large step to learn the toy task in a few epochs.
LORA = dict(use_peft="true", learning_rate=1e-2, lora_dropout=0.0)


@pytest.fixture(scope="module")
def weightless_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT's config and tokenizer without its weights: a run that reaches the weights fails on the missing
    file, so an error about anything else proves it came before the weights were read."""
    out = tmp_path_factory.mktemp("tiny-bert-no-weights")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    (out / "model.safetensors").unlink()
    return str(out)


def test_learning_rate_default_is_lora_s_own_and_explicit_wins():
    assert parse_args([]).train.learning_rate == FULL_FINETUNING_LEARNING_RATE
    assert parse_args(["--use_peft"]).train.learning_rate == LORA_LEARNING_RATE != FULL_FINETUNING_LEARNING_RATE
    assert parse_args(["--use_peft", "--learning_rate", "2e-5"]).train.learning_rate == 2e-5


def test_gradient_checkpointing_is_an_alias_of_activation_checkpointing():
    assert parse_args(["--gradient_checkpointing"]).train.activation_checkpointing is True
    assert parse_args(["--activation_checkpointing", "true"]).train.activation_checkpointing is True
    assert parse_args([]).train.activation_checkpointing is False


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--lora_r", "8", "--merge_adapter", "false"], "--lora_r, --merge_adapter set without --use_peft"),
        (["--use_peft", "--lora_dropout", "1.5"], "lora_dropout must be in [0, 1)"),
        (["--use_peft", "--lora_r", "0"], "lora_r must be >= 1"),
        (["--use_peft", "--lora_target_modules", "all-linear", "query"], "'all-linear' stands alone"),
    ],
)
def test_lora_options_that_cannot_work_are_one_line(argv, line):
    with pytest.raises(UserError, match=line.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


@pytest.mark.parametrize(
    "options, line",
    [
        (dict(lora_target_modules="nothing_here"), "--lora_target_modules nothing_here does not work with"),
        (dict(dtype="float16"), "--dtype float16 on CPU"),
    ],
)
def test_bad_lora_input_stops_before_the_weights_load(weightless_model_dir, toy_files, tmp_path, options, line):
    """With no weights file at all, the run must stop on the bad option, not on the missing weights."""
    from tuneloop.loop import train

    args = tiny_args(weightless_model_dir, toy_files, tmp_path, use_peft="true", **options)
    with pytest.raises(UserError, match=line):
        train(parse_args(args))


def test_a_model_whose_head_cannot_be_found_is_one_line():
    class NoHead(torch.nn.Module):  # everything is the backbone: nothing left to train in full
        base_model_prefix = "encoder"

        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(4, 4)

    with pytest.raises(UserError, match="cannot find the classifier head of NoHead"):
        lora.add_adapter(NoHead(), ModelArguments(use_peft=True))


def _tiny(config_class, **extra):
    return config_class(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        **extra,
    )


@pytest.mark.parametrize(
    "architecture, heads",
    [
        ("bert", ["classifier"]),
        ("roberta", ["classifier"]),  # a module with its own dense + out_proj
        ("distilbert", ["pre_classifier", "classifier"]),  # both new in DistilBERT's classifier
        ("deberta-v2", ["pooler", "classifier"]),  # DeBERTa's ContextPooler is new too
        ("llama", ["score"]),
    ],
)
def test_the_head_is_trained_in_full_and_gets_no_lora(architecture, heads):
    """Guards a head left frozen or given LoRA instead of full training (PEFT's own guess, `classifier` or `score`,
    gave DeBERTa's new pooler LoRA on frozen random weights and failed on DistilBERT), and a backbone left without
    adapters."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        architecture,
        vocab_size=64,
        num_labels=3,
        **(
            dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64)
            if architecture == "distilbert"
            else dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                pooler_hidden_size=32,
                num_key_value_heads=2,
                pad_token_id=0,
            )
        ),
    )
    with torch.device("meta"):
        model = lora.add_adapter(
            AutoModelForSequenceClassification.from_config(config),
            ModelArguments(use_peft=True),
            low_cpu_mem_usage=True,
        )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    in_full = {name.split(".")[2] for name in trainable if ".modules_to_save." in name}
    assert in_full == set(heads), trainable
    assert not any("lora_" in name and name.split(".")[2] in heads for name in trainable), trainable
    assert any("lora_A" in name for name in trainable)  # the backbone is adapted
    assert lora.head_modules(model.base_model.model) == heads


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, toy_files, tmp_path_factory) -> Path:
    """LoRA + activation checkpointing on the toy task in this process: 40 steps (30 per epoch), a checkpoint at step
    20."""
    out = tmp_path_factory.mktemp("lora")
    run_in_process(
        tiny_args(
            tiny_model_dir,
            toy_files,
            out,
            **LORA,
            activation_checkpointing="true",
            max_steps=40,
            eval_strategy="no",
            save_strategy="steps",
            save_steps=20,
            logging_steps=1,
        )
    )
    reset_accelerate_state()
    return out


@pytest.mark.trains
def test_lora_learns_and_saves_adapter_and_merged_model_that_pipeline_loads(lora_run, tiny_model_dir):
    """Guards a head that does not train, an optimizer without the adapters, a merge that drops the adapter, and
    label names lost on the way to `pipeline`."""
    from transformers import AutoModelForSequenceClassification, pipeline

    results = read_json(lora_run / "all_results.json")
    # It learned: an untrained head stays at the uniform guess's loss, ln 3 = 1.0986 (to 1e-3 on this model). The frozen
    # backbone is random, so LoRA lowers the loss slowly here (about 1.06 after 60 steps).
    assert results["eval_loss"] < 1.09 and results["eval_accuracy"] > 0.4, results
    assert (lora_run / "adapter" / "adapter_config.json").is_file()
    assert (lora_run / "adapter" / "tokenizer_config.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(lora_run)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # The adapters trained and were merged in: LoRA's update starts at exactly zero.
    base = load_file(Path(tiny_model_dir) / "model.safetensors")["encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight, base)
    assert merged.config.id2label == {0: "music", 1: "sports", 2: "tech"}
    classify = pipeline("text-classification", model=str(lora_run), device="cpu")
    texts = ["the team scored a goal in the match", "a new chip for the robot"]
    assert {p["label"] for p in classify(texts)} <= {"music", "sports", "tech"}
    # The adapter on its base computes what the merged model computes.
    adapter = lora.load_for_inference(str(lora_run / "adapter"), "float32", False).eval()
    inputs = classify.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(adapter(**inputs).logits, merged.eval()(**inputs).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.trains
def test_lora_checkpoint_holds_only_what_trains_and_resumes_bitwise(lora_run, tiny_model_dir, toy_files, tmp_path):
    """The checkpoint has the adapter and head, not the frozen base; resuming from it replays the rest of the run bit
    for bit (every logged loss, the saved adapter). Guards a checkpoint that lost something, and a resume that still
    expects the base weights in it."""
    saved = lora_run / "checkpoints" / "step_0000020"
    weights = load_file(saved / "model.safetensors")
    assert weights and all("lora_" in key or "modules_to_save" in key for key in weights), sorted(weights)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert not any("word_embeddings" in key for key in weights)
    assert sum(t.numel() for t in weights.values()) < sum(t.numel() for t in base.values())

    resumed = tmp_path / "resumed"
    run_in_process(
        [
            *tiny_args(
                tiny_model_dir,
                toy_files,
                resumed,
                **LORA,
                activation_checkpointing="true",
                max_steps=40,
                eval_strategy="no",
                save_strategy="steps",
                save_steps=20,
                logging_steps=1,
            ),
            "--resume_from_checkpoint",
            str(saved),
        ]
    )
    losses = [
        {h["step"]: h["train/loss"] for h in read_json(out / "log_history.json") if "train/loss" in h}
        for out in (lora_run, resumed)
    ]
    assert losses[1] == losses[0] and len(losses[0]) == 40
    expected, got = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (lora_run, resumed))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.trains
def test_evaluate_and_predict_accept_the_adapter_folder(lora_run, toy_files, test_files, tmp_path):
    """`tuneloop evaluate --model output_dir/adapter` scores what training scored; predict writes class names."""
    from tuneloop import cli

    assert (
        cli.console(
            [
                "evaluate",
                "--model",
                str(lora_run / "adapter"),
                "--data",
                toy_files["validation_file"],
                "--output_dir",
                str(tmp_path / "evaluate"),
            ]
        )
        == 0
    )
    trained, evaluated = read_json(lora_run / "all_results.json"), read_json(tmp_path / "evaluate" / "all_results.json")
    assert evaluated["eval_accuracy"] == trained["eval_accuracy"]
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert (
        cli.console(
            [
                "predict",
                "--model",
                str(lora_run / "adapter"),
                "--data",
                test_files["unlabelled"],
                "--output_dir",
                str(tmp_path / "predict"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in open(tmp_path / "predict" / "predictions.jsonl")]
    assert len(rows) == 45 and all(set(row["probabilities"]) == {"music", "sports", "tech"} for row in rows)


@pytest.mark.trains
def test_bf16_lora_without_merge_saves_the_adapter_and_evaluates_in_its_dtype(
    tiny_model_dir, toy_files, tmp_path, capsys
):
    """The low-memory setting: the frozen base in bfloat16, the adapters in float32 (PEFT's), no warning about a
    missing master copy; --merge_adapter false leaves only the adapter in output_dir, and `tuneloop evaluate` of it
    runs in the dtype trained. Guards a merge done anyway, and evaluation falling back to float32."""
    from tuneloop import cli

    out = tmp_path / "bf16"
    run_in_process(
        tiny_args(
            tiny_model_dir,
            toy_files,
            out,
            **LORA,
            dtype="bfloat16",
            merge_adapter="false",
            max_steps=3,
            eval_strategy="no",
        )
    )
    reset_accelerate_state()
    printed = capsys.readouterr().out
    assert "no fp32 master copy" not in printed
    trainable, total = (
        int(n.replace(",", "")) for n in re.search(r"trainable parameters ([\d,]+) of ([\d,]+)", printed).groups()
    )
    assert 0 < trainable < total
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for k, t in adapter.items() if "lora_" in k} == {torch.float32}
    assert {t.dtype for k, t in adapter.items() if "classifier" in k} == {torch.bfloat16}
    assert cli.console(["evaluate", "--model", str(out), "--data", toy_files["validation_file"]]) == 0
    assert read_json(out / "evaluate" / "run_config.json")["model"]["dtype"] == "bfloat16"
    trained, evaluated = read_json(out / "all_results.json"), read_json(out / "evaluate" / "all_results.json")
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-3)


# LoRA + activation checkpointing on each engine: accumulation 2 on 2 ranks, 8 steps, a checkpoint at step 4.
ENGINE_RUN = dict(
    **LORA,
    activation_checkpointing="true",
    gradient_accumulation_steps=2,
    max_steps=8,
    eval_strategy="no",
    save_strategy="steps",
    save_steps=4,
    logging_steps=1,
)


def launched(engine: str, args: list[str]) -> Path:
    """test_engines' launch of ENGINES[engine] on 2 processes (checked), returning the run's output folder."""
    launched_engine(engine, args)
    return Path(args[args.index("--output_dir") + 1])


@pytest.fixture(scope="module")
def lora_engine_run(tiny_model_dir, toy_files, tmp_path_factory):
    runs = {}

    def get(engine: str) -> Path:
        if engine not in runs:
            runs[engine] = launched(
                engine, tiny_args(tiny_model_dir, toy_files, tmp_path_factory.mktemp(f"lora-{engine}"), **ENGINE_RUN)
            )
        return runs[engine]

    return get


def logged_losses(out: Path) -> list[float]:
    return [h["train/loss"] for h in read_json(out / "log_history.json") if "train/loss" in h]


@pytest.mark.engines
@pytest.mark.parametrize("engine", ["zero3"])  # ZeRO-2 + LoRA: tests/test_elastic.py (trained, resumed on 1 process)
def test_lora_on_deepspeed_trains_and_merges_exactly_like_ddp(engine, lora_engine_run, tiny_model_dir):
    """LoRA + activation checkpointing under ZeRO-3 follow DDP step for step, and the merged model saved from ZeRO-3's
    shards is DDP's. Guards a merge from ZeRO-3's empty local shards, an adapter left out of the gathered state, and
    an engine that steps the adapters differently."""
    ddp, ds = lora_engine_run("ddp"), lora_engine_run(engine)
    assert logged_losses(ds) == pytest.approx(logged_losses(ddp), rel=1e-5) and len(logged_losses(ddp)) == 8
    expected, got = load_file(ddp / "model.safetensors"), load_file(ds / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")["encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(got["bert.encoder.layer.0.attention.self.query.weight"], base)  # the adapter is merged in


@pytest.mark.engines
def test_lora_zero3_checkpoint_leaves_out_the_frozen_base_and_resumes(
    lora_engine_run, tiny_model_dir, toy_files, tmp_path
):
    """DeepSpeed saves only the trained parameters (exclude_frozen_parameters) and loads them non-strictly; the resumed
    run ends where the uninterrupted one did."""
    first = lora_engine_run("zero3")
    saved = first / "checkpoints" / "step_0000004"
    module = torch.load(saved / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    assert not any("word_embeddings" in key for key in module), sorted(module)
    resumed = launched(
        "zero3",
        [
            *tiny_args(tiny_model_dir, toy_files, tmp_path / "resumed", **ENGINE_RUN),
            "--resume_from_checkpoint",
            str(saved),
        ],
    )
    assert logged_losses(resumed) == pytest.approx(logged_losses(first), rel=1e-6)
    expected, got = load_file(first / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
