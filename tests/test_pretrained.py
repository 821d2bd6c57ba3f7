"""The real offline default: pretrained MiniLM-L6 on BBC News, through `accelerate launch`, for a few steps."""

import math

import pytest
from transformers import pipeline

from conftest import launch, read_json
from tuneloop.sources import load_bbc_news

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_minilm_on_bbc_through_accelerate_launch(tmp_path):
    """The default model and data train through the launcher, and the saved model answers with the corpus's topic
    names in the corpus's own order. Guards a model saved without its class names (a pipeline answering LABEL_3)
    or with them permuted (every answer named after the wrong topic)."""
    result = launch(
        [
            "--output_dir",
            str(tmp_path),
            "--max_train_samples",
            "96",
            "--max_eval_samples",
            "40",
            "--max_length",
            "64",
            "--max_steps",
            "6",
            "--logging_steps",
            "2",
        ],
        num_processes=1,
    )
    results = read_json(tmp_path / "all_results.json")
    assert results["global_step"] == 6 and results["eval_samples"] == 40
    assert math.isfinite(results["train_loss"])
    losses = [h["train/loss"] for h in read_json(tmp_path / "log_history.json") if "train/loss" in h]
    assert losses[-1] < losses[0]  # six steps of a pretrained model already move the loss down
    assert "tuneloop: NO x1 on cpu" in result.stdout + result.stderr
    topics = load_bbc_news().features["label"].names  # class id i is the i-th name
    assert read_json(tmp_path / "config.json")["id2label"] == {str(i): name for i, name in enumerate(topics)}
    classify = pipeline("text-classification", model=str(tmp_path), device="cpu", top_k=None)
    (scores,) = classify(["The central bank raised interest rates as inflation rose."])  # one text: all its classes
    assert sorted(s["label"] for s in scores) == sorted(topics)
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)
