"""The real offline default: pretrained MiniLM-L6 on BBC News, through `accelerate launch`, for a few steps."""

import math

import pytest
from transformers import pipeline

from conftest import launch, read_json

pytestmark = pytest.mark.slow


def test_minilm_on_bbc_through_accelerate_launch(tmp_path):
    result = launch(["--output_dir", str(tmp_path), "--max_train_samples", "96", "--max_eval_samples", "40",
                     "--max_length", "64", "--max_steps", "6", "--logging_steps", "2"], num_processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_json(tmp_path / "all_results.json")
    assert results["global_step"] == 6 and results["eval_samples"] == 40
    assert math.isfinite(results["train_loss"])
    losses = [h["train/loss"] for h in read_json(tmp_path / "log_history.json") if "train/loss" in h]
    assert losses[-1] < losses[0]  # six steps of a pretrained model already move the loss down
    assert "tuneloop: NO x1 on cpu" in result.stdout + result.stderr
    classify = pipeline("text-classification", model=str(tmp_path), device="cpu")
    topics = {"business", "entertainment", "politics", "sports", "tech"}
    assert classify("The central bank raised interest rates as inflation rose.")[0]["label"] in topics
