"""Shared fixtures: a tiny random BERT with its own word-level tokenizer, and a small learnable text task.

Everything is made here, offline, in seconds: the real MiniLM weights appear only in test_pretrained.py.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Three topics, each signalled by one of its keywords hidden among filler words.
KEYWORDS = {"sports": ["goal", "match", "team"], "tech": ["chip", "software", "robot"], "music": ["song", "album", "band"]}
FILLER = "the a of and to in was is on for with that this it at by from new year said people".split()


def make_rows(n: int, seed: int, label_as: str = "name") -> list[dict]:
    rng = random.Random(seed)
    names = sorted(KEYWORDS)
    rows = []
    for i in range(n):
        label = i % len(names)
        words = rng.choices(FILLER, k=rng.randint(4, 14))
        words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[names[label]]))
        rows.append({"text": " ".join(words), "label": names[label] if label_as == "name" else label})
    rng.shuffle(rows)
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT (random weights, no dropout so runs compare exactly) and a word-level tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in KEYWORDS.values() for w in ws)]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, model_max_length=128).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory) -> dict[str, str]:
    """Train (240 rows) and validation (45 rows: not divisible by 2 processes x any batch size used) CSV files."""
    out = tmp_path_factory.mktemp("toy-data")
    return {
        "train_file": write_rows(out / "train.csv", make_rows(240, seed=1)),
        "validation_file": write_rows(out / "validation.csv", make_rows(45, seed=2)),
    }


def tiny_args(model_dir: str, files: dict[str, str], output_dir, **overrides) -> list[str]:
    """CLI arguments for a fast run on the toy task; overrides are option=value pairs."""
    options = {
        "model_name_or_path": model_dir, **files, "output_dir": str(output_dir), "max_length": 32,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 3e-3,
        "num_train_epochs": 6, "logging_steps": 5, "warmup_steps": 0, "seed": 0,
    }
    options.update(overrides)
    args = []
    for key, value in options.items():
        args += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return args


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; each in-process run must start from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def run_in_process(args: list[str]) -> dict:
    from tuneloop.config import parse_args
    from tuneloop.loop import train

    return train(parse_args(args))


def launch(args: list[str], num_processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """A real `accelerate launch` of train.py with the 2-process CPU config (one process: the 1-process config)."""
    config = ROOT / "accelerate_configs" / ("cpu_2proc.yaml" if num_processes == 2 else "cpu.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(ROOT / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def read_json(path) -> dict | list:
    return json.loads(Path(path).read_text())
