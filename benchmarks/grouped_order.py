r"""Why Trainer's length-grouped rows end lower on the long workload's 16 steps (issue 19, item 4): the batch order.

    .venv/bin/python benchmarks/grouped_order.py --seeds 42 43 44          # 4 settings x 3 seeds, ~15 min here

Each setting trains the long workload of benchmarks/speed.py (256 BBC articles, 512 tokens, batch 16, 16 steps, bf16,
the model's own dropout) and records, batch by batch, the labels and real lengths it trained on:
- "Trainer grouped" is speed.py's T2b (transformers' LengthGroupedSampler: mega-batches of min(50, n / 4b) batches
  sorted longest first, the longest batch moved to the front);
- "Trainer, tuneloop's order" is the same Trainer loop with tuneloop's LengthGroupedSampler (windows of 50 batches
  sorted by length, then the batches shuffled): only the order changes;
- "Trainer random" is T2b without grouping (a shuffle);
- "tuneloop same maths" is speed.py's row (its batches from TUNELOOP_LOG_SAMPLE_IDS).
A seed changes the model's head, the dropout stream and the order (and the held-out split, the same for every setting).
Prints, per setting, the eval accuracy per seed, and what its batches look like: the share of the batch's most
common class (mean over batches), the mean length of each quarter of the run, and the classes of the last 4 batches.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from tuneloop import data  # noqa: E402
from tuneloop import model as models  # noqa: E402
from tuneloop.batches import token_lengths  # noqa: E402
from tuneloop.options import DataArguments, ModelArguments  # noqa: E402

MODEL, DATASET, MAX_LENGTH, SAMPLES = "builtin:all-MiniLM-L6-v2", "builtin:bbc_news", 512, 256
PEER = [
    sys.executable,
    str(ROOT / "benchmarks" / "trainer_peer.py"),
    "--dataset_name",
    DATASET,
    "--model_name_or_path",
    MODEL,
    "--max_length",
    str(MAX_LENGTH),
    "--padding",
    "longest",
    "--bf16",
    "--max_train_samples",
    str(SAMPLES),
    "--log_batches",
]
SETTINGS = {
    "Trainer grouped (T2b)": PEER + ["--group_by_length"],
    "Trainer, tuneloop's order": PEER + ["--tuneloop_grouping"],
    "Trainer random": PEER,
    "tuneloop same maths": [
        sys.executable,
        str(ROOT / "train.py"),
        "--dataset_name",
        DATASET,
        "--model_name_or_path",
        MODEL,
        "--max_length",
        str(MAX_LENGTH),
        "--num_train_epochs",
        "1",
        "--mixed_precision",
        "bf16",
        "--train_sampling_strategy",
        "group_by_length",
        "--max_train_samples",
        str(SAMPLES),
        "--eval_strategy",
        "no",
    ],
}


def run(name: str, seed: int) -> tuple[float, list[tuple[list[int], list[int]]]]:
    """One training run: its eval accuracy and its batches as (labels, lengths), in training order."""
    with tempfile.TemporaryDirectory() as out:
        cmd = SETTINGS[name] + ["--seed", str(seed)]
        tuneloop = "train.py" in cmd[1]
        cmd += ["--output_dir", out] if tuneloop else []
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TUNELOOP_LOG_SAMPLE_IDS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        if not tuneloop:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            return result["eval_accuracy"], result["batches"]
        accuracy = json.loads((Path(out) / "all_results.json").read_text())["eval_accuracy"]
        steps = [json.loads(line) for line in (Path(out) / "sample_ids" / "rank_0.jsonl").read_text().splitlines()]
    # The ids are rows of the training split: its labels and token counts, from the same split tuneloop made.
    splits = data.load_splits(
        DataArguments(dataset_name=DATASET, max_length=MAX_LENGTH, max_train_samples=SAMPLES),
        seed,
        None,
        need_train=True,
    )
    tokenizer = models.load_tokenizer(ModelArguments(model_name_or_path=MODEL), MAX_LENGTH)
    train = data.tokenize(splits.train, splits, tokenizer, DataArguments(dataset_name=DATASET, max_length=MAX_LENGTH))
    labels, lengths = train["labels"], token_lengths(train).tolist()
    return accuracy, [([labels[i] for i in s["ids"]], [lengths[i] for i in s["ids"]]) for s in steps]


def describe(batches: list[tuple[list[int], list[int]]]) -> dict:
    majority = [collections.Counter(labels).most_common(1)[0][1] / len(labels) for labels, _ in batches]
    quarter = max(1, len(batches) // 4)
    return {
        "majority share": statistics.mean(majority),
        "mean length by quarter": [
            round(statistics.mean(n for _, ls in batches[i : i + quarter] for n in ls))
            for i in range(0, len(batches), quarter)
        ],
        "last 4 batches": [dict(sorted(collections.Counter(labels).items())) for labels, _ in batches[-4:]],
        "per batch mean length": [round(statistics.mean(ls)) for _, ls in batches],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    a = p.parse_args()
    rows = {name: [] for name in a.settings}
    for seed in a.seeds:
        for name in a.settings:
            accuracy, batches = run(name, seed)
            rows[name].append((seed, accuracy, describe(batches)))
            print(
                f"seed {seed}: {name}: accuracy {accuracy:.4f}; {json.dumps(rows[name][-1][2])}",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"| setting | eval accuracy per seed ({', '.join(map(str, a.seeds))}) | mean | most common class share per "
        "batch (mean) | mean length by quarter of the run (seed "
        + str(a.seeds[0])
        + ") |\n| --- | --- | ---: | ---: | --- |"
    )
    for name, runs in rows.items():
        accuracies = [acc for _, acc, _ in runs]
        print(
            f"| {name} | {' / '.join(f'{x:.4f}' for x in accuracies)} | {statistics.mean(accuracies):.4f} | "
            f"{statistics.mean(d['majority share'] for _, _, d in runs):.2f} | {runs[0][2]['mean length by quarter']} |"
        )
    print(
        "\nPer seed, per setting: mean length of each batch in training order, and the classes of the last 4 batches:"
    )
    for name, runs in rows.items():
        for seed, _, d in runs:
            print(f"- {name}, seed {seed}: {d['per batch mean length']}; last 4: {d['last 4 batches']}")


if __name__ == "__main__":
    main()
