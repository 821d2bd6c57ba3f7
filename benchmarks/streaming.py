r"""Streamed training data (issue 26): time to the first step, peak memory and samples/s at 1M and 10M rows, against
map-style tuneloop and transformers' Trainer given the same kind of IterableDataset; the samples a resume after SIGTERM
repeats or skips; streamed prediction against Trainer.predict on a map-style set.

    PYTHONPATH=src .venv/bin/python benchmarks/streaming.py --model /tmp/tiny-minilm   # all parts, about 15 minutes
        [--rows 1000000 10000000] [--steps 1000] [--workers 0 [2 ...]] [--peer_workers N] [--runs 1]
        [--parts train map resume predict]
        [--predict_rows 1000000] [--work /tmp/tuneloop-streaming] [--baseline_src OTHER/src]

The tuneloop measured is the one on PYTHONPATH (run from another branch's src/ to measure it). The model is
benchmarks/make_tiny_model.py's 2-layer BERT by default: a step costs almost nothing, so the data pipeline (reading,
shuffling and tokenizing on the fly) is what the rates compare, the hardest case for streaming.

Data: generated headline-length rows (large_files.py's words and rule), as jsonl shards of at most 250,000 rows under
--work, never in the repository: written once per size and kept for later invocations. Every text ends with the row's
number, its position in the shards' sorted order, so any reader can tell which row it holds.

Parts (each run a fresh process, monitored from outside every 0.1 s):
  train    per size: `train.py --streaming` and Trainer given `load_dataset(streaming=True).shuffle().map(tokenize)`
           (max_steps, the same batch, seed, buffer, workers and optimizer settings): launch to first step, the
           set-up-to-first-step clock each reports, samples/s between step 50 and the last (from the ids each logs
           per step, one clock for both) and as each reports it, peak resident memory of the main process and of the
           largest worker (VmHWM), and the peak PSS summed over the process tree (forked workers share pages).
  map      the same tuneloop run map-style (`--dataset_name FOLDER`: load, hold out 1%, tokenize, then train) at the
           smallest size only: its samples/s is the reference streaming must keep (target >= 0.95x).
  resume   SIGTERM at a mid-epoch step, then a resume, against the same run never stopped, for tuneloop and for
           Trainer (killed by the signal, resumed from its last checkpoint, every 60 steps: its resume skips
           `global_step` batches of the stream): (a) in the first epoch of the smallest size; (b) in the second
           epoch of a 1,600-row stream (100 steps per epoch). Counts the samples repeated or skipped in the history
           of the final weights (the last run of each step wins), the samples of steps that were redone, the steps
           whose batch differs, and the final weights' difference.
  predict  `tuneloop predict --streaming` (if the tuneloop on PYTHONPATH has it) over --predict_rows rows, and
           Trainer.predict on a map-style set of the first 1M rows (fewer if the largest size is smaller).

Prints JSON lines as it goes, then markdown tables for benchmarks/RESULTS.md with the host and versions.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_files import FILLER, TOPICS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARD_ROWS = 250_000
MAX_LENGTH, BATCH, LEARNING_RATE, SEED, BUFFER = 32, 16, 1e-4, 42, 10_000
WARM_STEPS = 50  # samples/s is measured from this step on: the shuffle buffer is full and the workers are running
LOG = "ids.jsonl"  # the Trainer peer's own sample-id log; tuneloop's is sample_ids/rank_0.jsonl (batches.SampleIdLog)
# The Trainer peer checkpoints every 60 steps: in the second-epoch scenario (100 steps per epoch, SIGTERM at step
# 150) its last checkpoint is then at step 120, inside the second epoch, where its resume of a stream goes wrong.
PEER_SAVE_STEPS = 60


# ---------------------------------------------------------------------------------------------------------------- data
def shard_folder(work: Path, rows: int) -> Path:
    """jsonl shards of `rows` headline-length rows under `work`, written once (a marker file beside the folder says
    they are complete). A row: {"text": "<5-11 words> <row number>", "label": "<topic>"}."""
    folder, done = work / f"rows-{rows}", work / f"rows-{rows}.complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    import numpy as np

    # 65,536 word sequences made by large_files.py's rule (a topic's keyword or two among filler words), each already
    # cut into its JSON line's halves: a row is then two string joins around its number, about 1 us in Python.
    rng, names = random.Random(0), sorted(TOPICS)
    templates = []
    for t in range(1 << 16):
        label = names[t % 5]
        words = rng.choices(FILLER, k=rng.randint(3, 8)) + rng.choices(TOPICS[label], k=rng.randint(1, 3))
        rng.shuffle(words)
        templates.append(('{"text": "' + " ".join(words).capitalize() + " ", '", "label": "' + label + '"}\n'))
    picks = np.random.default_rng(0)
    per_shard = min(SHARD_ROWS, math.ceil(rows / 4))  # at least 4 shards: enough for the workers to share
    for first in range(0, rows, per_shard):
        with open(folder / f"shard-{first // per_shard:05d}.jsonl", "w") as f:
            for chunk in range(first, min(first + per_shard, rows), 50_000):
                end = min(chunk + 50_000, first + per_shard, rows)
                chosen = picks.integers(0, len(templates), end - chunk).tolist()
                f.write("".join(templates[t][0] + str(i) + templates[t][1] for i, t in zip(range(chunk, end), chosen)))
    size = sum(p.stat().st_size for p in folder.iterdir())
    done.write_text(json.dumps({"rows": rows, "bytes": size}))
    print(
        json.dumps(
            {
                "generated_rows": rows,
                "shards": len(list(folder.iterdir())),
                "mib": round(size / 2**20),
                "seconds": round(time.perf_counter() - start, 1),
            }
        ),
        flush=True,
    )
    return folder


def first_rows(work: Path, source: Path, rows: int) -> Path:
    """A folder of links to the first shards of `source` holding `rows` rows (whole shards)."""
    shards = sorted(source.glob("shard-*.jsonl"))
    per_shard = sum(1 for _ in open(shards[0]))
    wanted = shards[: max(1, rows // per_shard)]
    folder = work / f"first-{len(wanted) * per_shard}-of-{source.name}"
    if not folder.is_dir():
        folder.mkdir()
        for shard in wanted:
            (folder / shard.name).symlink_to(shard)
    return folder


# ----------------------------------------------------------------------------------------------------------- measuring
def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def _children(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                kids = [int(k) for k in open(task).read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def monitored(
    command: list[str], env: dict, ids: Path, transcript: Path, stop_at_step: int = 0, expect: tuple = (0,)
) -> dict:
    """Run `command`, its output to `transcript`; every 0.1 s read the peak resident memory (VmHWM) of it and of each
    descendant, the PSS summed over them all, and the last step its sample-id log `ids` holds. With `stop_at_step`,
    send SIGTERM to the process once the log reaches that step. Returns the figures and the output."""
    out_path = transcript
    out_path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(out_path, "w") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        # A resumed run appends to the log of the run it continues: its progress counts from what is there.
        main_peak, worker_peak, tree_pss, steps, progress, signalled = 0, 0, 0, logged_steps(ids), [], None
        while process.poll() is None:
            try:
                main_peak = max(main_peak, _status(process.pid, "VmHWM"))
                pss = _pss(process.pid)
                for child in _children(process.pid):
                    try:
                        worker_peak = max(worker_peak, _status(child, "VmHWM"))
                        pss += _pss(child)
                    except (OSError, StopIteration):
                        pass
                tree_pss = max(tree_pss, pss)
            except (OSError, StopIteration):
                pass
            now = logged_steps(ids)
            if now != steps:
                steps = now
                progress.append((time.perf_counter() - start, steps))
            if stop_at_step and steps >= stop_at_step and signalled is None:
                process.send_signal(signal.SIGTERM)
                signalled = steps
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    output = out_path.read_text()
    if process.returncode not in expect:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}, not {expect}:\n{output[-4000:]}")
    if (now := logged_steps(ids)) != steps:
        progress.append((seconds, now))
    return {
        "wall_s": round(seconds, 1),
        "launch_to_first_step_s": round(progress[0][0], 1) if progress else None,
        "steady_samples_per_s": steady_rate(progress),
        "main_peak_rss_gib": round(main_peak / 2**30, 3),
        "worker_peak_rss_gib": round(worker_peak / 2**30, 3) if worker_peak else None,
        "tree_peak_pss_gib": round(tree_pss / 2**30, 3),
        "load_average": round(load, 1),
        "signalled_at_step": signalled,
        "exit": process.returncode,
        "output": output,
    }


def logged_steps(ids: Path) -> int:
    """The highest step in a sample-id log so far (a line per micro-batch: {"step", "ids"})."""
    try:
        with open(ids, "rb") as f:
            f.seek(max(0, os.path.getsize(ids) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def steady_rate(progress: list[tuple[float, int]]) -> float | None:
    """Samples/s from the first time the log held WARM_STEPS steps to the last step, on the monitor's clock."""
    warm = next(((t, s) for t, s in progress if s >= WARM_STEPS), None)
    if warm is None or progress[-1][1] <= warm[1]:
        return None
    return round((progress[-1][1] - warm[1]) * BATCH / (progress[-1][0] - warm[0]), 1)


def json_lines(output: str) -> list[dict]:
    found = []
    for line in output.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            found.append(item)
    return found


# ------------------------------------------------------------------------------------------------------------ commands
def environment(work: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(work / "datasets-cache"),
        "TUNELOOP_LOG_SAMPLE_IDS": "1",
        "WANDB_MODE": "disabled",
        # One thread per process, both trainers: on this shared 2-core host two OpenMP threads under load made the
        # tiny model's step 15-60x slower and erratic (7 ms with one thread, 100-400 ms with two at load 5).
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def tuneloop_train(source: Path, out: Path, a, steps: int, streaming: bool, *extra: str, workers: int = 0) -> list[str]:
    data = (
        ["--train_file", str(source), "--streaming", "true", "--shuffle_buffer_size", str(BUFFER)]
        if streaming
        # map-style: the folder as a dataset (every shard), 1% held out as tuneloop always does without an eval set
        else ["--dataset_name", str(source), "--validation_split_percentage", "1", "--preprocessing_num_workers", "2"]
    )
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *data,
        "--model_name_or_path",
        a.model,
        "--max_length",
        str(MAX_LENGTH),
        "--per_device_train_batch_size",
        str(BATCH),
        "--learning_rate",
        str(LEARNING_RATE),
        "--max_steps",
        str(steps),
        "--mixed_precision",
        "no",
        "--dataloader_num_workers",
        str(workers if streaming else 0),
        "--do_eval",
        "false",
        "--eval_strategy",
        "no",
        "--logging_steps",
        "100",
        "--seed",
        str(SEED),
        "--output_dir",
        str(out),
        *extra,
    ]


def peer_train_command(source: Path, out: Path, a, steps: int, *extra: str, workers: int = 0) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--peer_train",
        str(source),
        "--out",
        str(out),
        "--model",
        a.model,
        "--steps",
        str(steps),
        "--workers",
        str(workers if a.peer_workers is None else a.peer_workers),
        *extra,
    ]


def tuneloop_ids(out: Path) -> Path:
    return out / "sample_ids" / "rank_0.jsonl"


def transcript(a, name: str) -> Path:
    """Where a run's output goes: beside the runs, never inside an output_dir (tuneloop checks what one holds)."""
    return a.work / "transcripts" / (name.replace(" ", "_").replace(",", "").replace("/", "-") + ".txt")


def run_tuneloop(
    name, source, out, a, steps, streaming=True, stop_at_step=0, resume=False, expect=(0,), workers=None, src=None
) -> dict:
    """One `train.py` run into `out` (emptied first unless resuming); its monitored figures and its own. `src`: the
    PYTHONPATH of the tuneloop run (default: this process's)."""
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    extra = ("--resume_from_checkpoint", "latest") if resume else ()
    workers = a.workers[0] if workers is None else workers
    command = tuneloop_train(source, out, a, steps, streaming, *extra, workers=workers)
    env = {**environment(a.work), **({"PYTHONPATH": src} if src else {})}
    r = monitored(command, env, tuneloop_ids(out), transcript(a, name), stop_at_step, expect)
    results = out / "all_results.json"
    own = json.loads(results.read_text()) if results.exists() and r["exit"] == 0 else {}
    r.update(
        name=name,
        own_time_to_first_step_s=own.get("time_to_first_step"),
        own_samples_per_s=own.get("train_samples_per_second"),
        own_peak_memory_gib=own.get("peak_memory_gib"),
    )
    return report(r)


def run_peer(name, source, out, a, steps, stop_at_step=0, resume=False, save=False, workers=None) -> dict:
    """One Trainer run into `out` (emptied first unless resuming); with `save`, a checkpoint every PEER_SAVE_STEPS
    steps. A SIGTERM ends it where it is (Trainer installs no handler unless enable_jit_checkpoint): exit -15."""
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    saving = ["--save_steps", str(PEER_SAVE_STEPS)] if save else []
    workers = a.workers[0] if workers is None else workers
    command = peer_train_command(source, out, a, steps, *saving, *["--resume"] * resume, workers=workers)
    expect = (-signal.SIGTERM,) if stop_at_step else (0,)
    r = monitored(command, environment(a.work), out / LOG, transcript(a, name), stop_at_step, expect)
    own = next((line for line in json_lines(r["output"]) if "time_to_first_step" in line), {})
    r.update(
        name=name,
        own_time_to_first_step_s=own.get("time_to_first_step"),
        own_samples_per_s=own.get("train_samples_per_second"),
        own_peak_memory_gib=None,
        global_step=own.get("global_step"),
    )
    return report(r)


def streamed_name(who: str, rows: int, workers: int, a) -> str:
    """A streamed run's name: with several worker counts measured, the count is part of it."""
    return f"{who} streaming {rows:,}" + (f", {workers} workers" if len(a.workers) > 1 else "")


def report(r: dict) -> dict:
    print(json.dumps({k: v for k, v in r.items() if k != "output"}), flush=True)
    return r


# ------------------------------------------------------------------------------------------------- Trainer peer
def peer_train(a) -> None:
    """transformers' Trainer given what its user writes for a stream: `load_dataset(..., streaming=True)`, a seeded
    shuffle buffer, tokenizing `.map`; max_steps; the sample ids logged per step as tuneloop logs them."""
    start = time.perf_counter()
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    imported = time.perf_counter()
    names = sorted(TOPICS)
    tokenizer = AutoTokenizer.from_pretrained(a.model)

    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=MAX_LENGTH)
        encoded["labels"] = [names.index(label) for label in batch["label"]]
        encoded["row_id"] = [int(text.rsplit(" ", 1)[1]) for text in batch["text"]]
        return encoded

    files = sorted(glob.glob(os.path.join(a.peer_train, "*.jsonl")))
    stream = (
        datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        .shuffle(seed=SEED, buffer_size=BUFFER)
        .map(encode, batched=True, remove_columns=["text", "label"])
    )
    set_seed(SEED)  # before the classifier head is made, as tuneloop seeds before loading the model
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=len(names))
    first = {}
    log = open(os.path.join(a.out, LOG), "a")

    class IdLoggingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs.pop("row_id")  # no model input
            log.write(json.dumps({"step": self.state.global_step + 1, "ids": ids.tolist()}) + "\n")
            log.flush()
            return super().training_step(model, inputs, num_items_in_batch)

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            first.setdefault("s", time.perf_counter() - imported)

    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        weight_decay=0.01,
        warmup_steps=math.ceil(0.1 * a.steps),  # tuneloop's default warmup share, rounded up as tuneloop does
        lr_scheduler_type="linear",
        max_steps=a.steps,
        seed=SEED,
        use_cpu=True,
        dataloader_num_workers=a.workers[0],
        remove_unused_columns=False,  # keep row_id: training_step takes it out
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        eval_strategy="no",
        report_to="none",
        logging_steps=10**6,
        disable_tqdm=True,
    )
    trainer = IdLoggingTrainer(
        model=model,
        args=args,
        train_dataset=stream,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[FirstStep()],
    )
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    seconds = time.perf_counter() - began
    done = trainer.state.global_step >= a.steps
    if done:
        trainer.save_model(os.path.join(a.out, "final"))
    session_steps = sum(1 for line in open(os.path.join(a.out, LOG)) if line.strip())  # lines this process wrote
    print(
        json.dumps(
            {
                "time_to_first_step": round(first.get("s", float("nan")), 2),
                "imports_s": round(imported - start, 2),
                "train_samples_per_second": round(min(session_steps, a.steps) * BATCH / seconds, 1)
                if not a.resume
                else None,
                "global_step": trainer.state.global_step,
                "complete": done,
            }
        )
    )


def peer_predict(a) -> None:
    """Trainer.predict as its user writes it for a file: a map-style set, tokenized with `.map`, all logits returned."""
    start = time.perf_counter()
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    imported = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    files = sorted(glob.glob(os.path.join(a.peer_predict, "*.jsonl")))
    rows = datasets.load_dataset("json", data_files=files, split="train")
    encoded = rows.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH),
        batched=True,
        num_proc=2,
        remove_columns=rows.column_names,
    )
    model = AutoModelForSequenceClassification.from_pretrained(a.model)
    args = TrainingArguments(
        output_dir=a.out, per_device_eval_batch_size=256, use_cpu=True, report_to="none", disable_tqdm=True
    )
    began = time.perf_counter()
    predictions = Trainer(model=model, args=args, processing_class=tokenizer).predict(encoded).predictions
    seconds = time.perf_counter() - began
    print(
        json.dumps(
            {
                "rows": len(predictions),
                "predict_s": round(seconds, 1),
                "predict_rows_per_s": round(len(predictions) / seconds, 1),
                "set_up_s": round(began - imported, 1),
                "imports_s": round(imported - start, 1),
            }
        )
    )


# ------------------------------------------------------------------------------------------------------------- resume
def history(log: Path) -> tuple[dict[int, list[int]], int]:
    """The samples behind the final weights, step -> ids, from a sample-id log that several runs appended to (one
    line per step: gradient accumulation 1). A run resumed from a checkpoint older than where the previous run got to
    logs those steps again, and its run of a step is the one whose update the final weights hold. Also the number of
    samples whose step was run again (work lost and redone)."""
    effective, redone, last = {}, 0, 0
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["step"] <= last:  # a resumed run, starting at or before where the previous one ended
            redone += sum(len(ids) for step, ids in effective.items() if step >= entry["step"])
            effective = {step: ids for step, ids in effective.items() if step < entry["step"]}
        effective[entry["step"]] = entry["ids"]
        last = entry["step"]
    return effective, redone


def compared(reference: Path, resumed: Path) -> dict:
    """Samples the stopped-and-resumed run repeated or skipped against the reference run, both in step order."""
    ref, _ = history(reference)
    got, redone = history(resumed)
    want = collections.Counter(i for ids in ref.values() for i in ids)
    have = collections.Counter(i for ids in got.values() for i in ids)
    return {
        "steps": len(got),
        "reference_steps": len(ref),
        "repeated": sum((have - want).values()),
        "skipped": sum((want - have).values()),
        "steps_with_another_batch": sum(ref.get(s) != got.get(s) for s in set(ref) | set(got)),
        "redone_samples": redone,
    }


def weights_difference(a: Path, b: Path) -> float | None:
    """|b - a| / |a| over all weights of two saved models (safetensors), or None if either is missing."""
    if not (a.exists() and b.exists()):
        return None
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return None
    difference = sum(((y[k].double() - x[k].double()) ** 2).sum() for k in x) ** 0.5
    return float(difference / sum((x[k].double() ** 2).sum() for k in x) ** 0.5)


def resume_pair(label: str, source: Path, a, steps: int, stop: int) -> list[dict]:
    """tuneloop and Trainer: the run never stopped, then the same run stopped by SIGTERM at step `stop` and resumed."""
    rows, work = [], a.work / "resume" / label.split(" (")[0].replace(" ", "-")
    # tuneloop: SIGTERM -> it finishes the step, saves, exits 75; `--resume_from_checkpoint latest` continues.
    ref, cut = work / "tuneloop-reference", work / "tuneloop-stopped"
    run_tuneloop(f"tuneloop {label} reference", source, ref, a, steps)
    stopped = run_tuneloop(f"tuneloop {label} stopped", source, cut, a, steps, stop_at_step=stop, expect=(75,))
    resumed = run_tuneloop(f"tuneloop {label} resumed", source, cut, a, steps, resume=True)
    rows.append(
        {
            "scenario": label,
            "trainer": "tuneloop (`--resume_from_checkpoint latest`)",
            "signalled_at_step": stopped["signalled_at_step"],
            "resume_launch_to_first_step_s": resumed["launch_to_first_step_s"],
            **compared(tuneloop_ids(ref), tuneloop_ids(cut)),
            "weights_rel_diff": weights_difference(ref / "model.safetensors", cut / "model.safetensors"),
        }
    )
    # Trainer: killed by the SIGTERM, resumed from its last periodic checkpoint by `train(resume_from_checkpoint=True)`
    # (it skips `global_step` batches of the stream). enable_jit_checkpoint would save on SIGTERM instead (after 3 s),
    # which changes the work redone, not how the resume finds its place in the stream.
    ref, cut = work / "trainer-reference", work / "trainer-stopped"
    run_peer(f"Trainer {label} reference", source, ref, a, steps)
    stopped = run_peer(f"Trainer {label} stopped", source, cut, a, steps, stop_at_step=stop, save=True)
    resumed = run_peer(f"Trainer {label} resumed", source, cut, a, steps, resume=True, save=True)
    rows.append(
        {
            "scenario": label,
            "trainer": f"Trainer (checkpoints every {PEER_SAVE_STEPS} steps, `train(resume_from_checkpoint=True)`)",
            "signalled_at_step": stopped["signalled_at_step"],
            "resume_launch_to_first_step_s": resumed["launch_to_first_step_s"],
            **compared(ref / LOG, cut / LOG),
            "weights_rel_diff": weights_difference(
                ref / "final" / "model.safetensors", cut / "final" / "model.safetensors"
            ),
        }
    )
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------- predict
def predict_rows(a) -> list[dict]:
    """`tuneloop predict --streaming` over the first N rows for each N of --predict_rows, and Trainer.predict on a
    map-style set of the first 1M rows (fewer if the largest size is smaller); one model for both, trained here for
    20 streamed steps."""
    rows, model = [], a.work / "predict-model"
    biggest = shard_folder(a.work, max(a.rows))
    if not (model / "model.safetensors").exists():
        run_tuneloop("tuneloop model for predict", biggest, model, a, 20)
    env = {**environment(a.work), "PYTHONPATH": a.predict_src or environment(a.work)["PYTHONPATH"]}
    for n in a.predict_rows:
        source, out = first_rows(a.work, biggest, n), a.work / f"predict-{n}"
        shutil.rmtree(out, ignore_errors=True)
        name = f"tuneloop predict --streaming, {n:,} rows"
        command = [sys.executable, "-m", "tuneloop", "predict", "--model", str(model), "--data", str(source)]
        command += ["--streaming", "true", "--per_device_eval_batch_size", "256", "--output_dir", str(out)]
        try:
            r = monitored(command, env, out / "no-ids", transcript(a, name))
        except SystemExit as failed:  # a tuneloop without `predict --streaming`: say so, measure the rest
            print(json.dumps({name: "failed", "why": str(failed)[-600:]}), flush=True)
            continue
        r.update(name=name, rows=n, rows_per_s=round(n / r["wall_s"], 1))
        rows.append(report(r))
    source, out = first_rows(a.work, biggest, min(1_000_000, max(a.rows))), a.work / "predict-trainer"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env["HF_DATASETS_CACHE"] = str(out / "datasets-cache")  # the map-style set is converted and tokenized cold
    name = "Trainer.predict, map-style"
    command = [sys.executable, str(Path(__file__).resolve()), "--peer_predict", str(source), "--out", str(out)]
    r = monitored([*command, "--model", str(model)], env, out / "no-ids", transcript(a, name))
    own = next(line for line in json_lines(r["output"]) if "predict_rows_per_s" in line)
    r.update(own)
    r.update(name=f"{name}, {own['rows']:,} rows", rows_per_s=round(own["rows"] / r["wall_s"], 1))
    rows.append(report(r))
    shutil.rmtree(out / "datasets-cache", ignore_errors=True)
    return rows


# -------------------------------------------------------------------------------------------------------------- tables
def host_lines(a) -> list[str]:
    info = open("/proc/cpuinfo").read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    shown = " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))) or "none read"
    spec = importlib.util.find_spec("tuneloop")
    where = Path(spec.origin).parents[2] if spec and spec.origin else None
    commit = (
        subprocess.run(
            ["git", "-C", str(where), "log", "-1", "--format=%h %s"], capture_output=True, text=True
        ).stdout.strip()[:90]
        if where
        else "?"
    )
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "datasets"))
    return [
        f"Host `{platform.node()}`: {os.cpu_count()} cores, {model}; CPU flags {shown}. {versions}. "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"tuneloop measured: {where} (`{commit}`); model {a.model}; batch {BATCH}, max_length {MAX_LENGTH}, fp32, "
        f"dataloader workers of the streams: tuneloop {' / '.join(map(str, a.workers))}, Trainer "
        f"{' / '.join(map(str, a.workers)) if a.peer_workers is None else a.peer_workers} (the run's name says "
        f"which); shuffle buffer {BUFFER:,}.",
    ]


def ratio(x, y) -> str:
    return f"{x / y:.2f}" if x and y else "—"


def tables(a, train: list[dict], resumes: list[dict], predicts: list[dict]) -> str:
    lines = ["", *host_lines(a), ""]
    if train:
        lines += [
            "| run | launch to first step s | set-up to first step s (own clock) | samples/s steps 50..end "
            "(own figure) | peak RSS main GiB | peak RSS largest worker GiB | peak PSS tree GiB | load avg |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in train:
            lines.append(
                f"| {r['name']} | {r['launch_to_first_step_s']} | {r['own_time_to_first_step_s']} | "
                f"{r['steady_samples_per_s']} ({r['own_samples_per_s']}) | {r['main_peak_rss_gib']} | "
                f"{r['worker_peak_rss_gib']} | {r['tree_peak_pss_gib']} | {r['load_average']} |"
            )
        by = {r["name"]: r for r in train}
        lines.append("")
        for rows in a.rows:
            mapped = by.get(f"tuneloop map-style {rows:,}")
            for w in a.workers:
                stream = by.get(streamed_name("tuneloop", rows, w, a))
                peer = by.get(streamed_name("Trainer", rows, w, a))
                if stream and peer:
                    lines.append(
                        f"- {rows:,} rows, {w} workers: tuneloop streaming / Trainer streaming samples/s "
                        f"{ratio(stream['steady_samples_per_s'], peer['steady_samples_per_s'])}"
                    )
                if stream and mapped:
                    lines.append(
                        f"- {rows:,} rows, {w} workers: tuneloop streaming / map-style samples/s "
                        f"{ratio(stream['steady_samples_per_s'], mapped['steady_samples_per_s'])} (target >= 0.95)"
                    )
        w = a.workers[0]
        for who in ("tuneloop", "tuneloop (baseline)", "Trainer"):
            small = by.get(streamed_name(who, min(a.rows), w, a))
            large = by.get(streamed_name(who, max(a.rows), w, a))
            if small and large and small is not large:
                lines.append(
                    f"- {who} streaming peak RSS main {max(a.rows):,} / {min(a.rows):,} rows: "
                    f"{ratio(large['main_peak_rss_gib'], small['main_peak_rss_gib'])}; tree PSS "
                    f"{ratio(large['tree_peak_pss_gib'], small['tree_peak_pss_gib'])} (target within 10%)"
                )
    if resumes:
        lines += [
            "",
            "| scenario | trainer | SIGTERM at step | steps | repeated | skipped | steps with another batch | "
            "samples redone | final weights rel. diff | resumed: launch to first step s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in resumes:
            diff = f"{r['weights_rel_diff']:.2e}" if r["weights_rel_diff"] is not None else "—"
            lines.append(
                f"| {r['scenario']} | {r['trainer']} | {r['signalled_at_step']} | {r['steps']} of "
                f"{r['reference_steps']} | {r['repeated']} | {r['skipped']} | {r['steps_with_another_batch']} | "
                f"{r['redone_samples']} | {diff} | {r['resume_launch_to_first_step_s']} |"
            )
    if predicts:
        lines += [
            "",
            "| prediction | rows | wall s | rows/s (wall) | peak RSS main GiB | peak RSS largest worker GiB | "
            "peak PSS tree GiB | load avg |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in predicts:
            lines.append(
                f"| {r['name']} | {r['rows']:,} | {r['wall_s']} | {r['rows_per_s']} | {r['main_peak_rss_gib']} | "
                f"{r['worker_peak_rss_gib']} | {r['tree_peak_pss_gib']} | {r['load_average']} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every training run")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0],
        help="dataloader workers of the streamed runs: each count in turn",
    )
    p.add_argument(
        "--peer_workers", type=int, help="dataloader workers of Trainer's streamed runs (default: --workers)"
    )
    p.add_argument("--runs", type=int, default=1, help="runs of the train part, alternating the order")
    p.add_argument("--parts", nargs="+", default=["train", "map", "resume", "predict"])
    p.add_argument("--predict_rows", type=int, nargs="+", default=[1_000_000])
    p.add_argument(
        "--predict_src",
        help="PYTHONPATH of the `tuneloop predict --streaming` runs, where another branch has it (default: PYTHONPATH)",
    )
    p.add_argument(
        "--baseline_src",
        help="also run the train part's tuneloop from this PYTHONPATH (another commit's src/), named 'tuneloop "
        "(baseline)': a change measured before and after in one invocation",
    )
    p.add_argument("--model", default="/tmp/tiny-minilm", help="benchmarks/make_tiny_model.py's output")
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneloop-streaming"))
    # What the script passes to itself to run the Trainer peer in a process of its own.
    for hidden in ("--peer_train", "--peer_predict", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--save_steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.peer_train:
        return peer_train(a)
    if a.peer_predict:
        return peer_predict(a)

    a.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.work).free
    print(json.dumps({"work": str(a.work), "free_gib": round(free / 2**30, 1)}), flush=True)
    if free < max(a.rows) * 100:  # about 85 bytes a row as jsonl
        raise SystemExit(
            f"{a.work}: {free / 2**30:.1f} GiB free, {max(a.rows):,} rows need about "
            f"{max(a.rows) * 85 / 2**30:.1f} GiB: pass smaller --rows"
        )
    folders = {rows: shard_folder(a.work, rows) for rows in a.rows}
    train, resumes, predicts = [], [], []

    def streamed(rows: int, who: str, workers: int) -> dict:
        name = streamed_name(who, rows, workers, a)
        if who == "tuneloop (baseline)":
            folder = a.work / "runs" / "tuneloop"
            return run_tuneloop(name, folders[rows], folder, a, a.steps, workers=workers, src=a.baseline_src)
        if who == "tuneloop":
            return run_tuneloop(name, folders[rows], a.work / "runs" / "tuneloop", a, a.steps, workers=workers)
        return run_peer(name, folders[rows], a.work / "runs" / "trainer", a, a.steps, workers=workers)

    if "train" in a.parts:
        for run in range(a.runs):  # alternating orders, so that a drift of this shared machine hits both alike
            order = ("tuneloop", *["tuneloop (baseline)"] * bool(a.baseline_src), "Trainer")
            order = order if run % 2 == 0 else order[::-1]
            for rows in a.rows if run % 2 == 0 else reversed(a.rows):
                for workers in a.workers if run % 2 == 0 else reversed(a.workers):
                    train += [streamed(rows, who, workers) for who in order]
    if "map" in a.parts:
        rows = min(a.rows)
        name = f"tuneloop map-style {rows:,}"
        train.append(run_tuneloop(name, folders[rows], a.work / "runs" / "map", a, a.steps, streaming=False))
    if "resume" in a.parts:
        resumes += resume_pair("first epoch", folders[min(a.rows)], a, a.steps, max(WARM_STEPS + 50, a.steps // 2))
        resumes += resume_pair("second epoch (1,600 rows)", shard_folder(a.work, 1600), a, 200, 150)
    if "predict" in a.parts:
        predicts = predict_rows(a)
    print(tables(a, train, resumes, predicts))


if __name__ == "__main__":
    main()
