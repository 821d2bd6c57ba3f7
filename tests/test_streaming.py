"""Streamed training data (issue 26): shard folders read as they train, split between ranks, exact resume after
SIGTERM and SIGKILL, uneven ends, and what --streaming refuses. Real processes on this CPU; the runs never stopped are
the references, and datasets' own shuffle and split of the shards are the oracle of which rows each step uses."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import launch, make_rows, read_json, run_in_process, saved_state_only, tiny_args, write_rows
from test_checkpoint import interrupt, weights
from test_elastic import relative_error, samples_per_step
from tuneloop import stream
from tuneloop.config import parse_args
from tuneloop.errors import UserError
from tuneloop.options import DataArguments
from tuneloop.preemption import REQUEUE_EXIT_CODE
from tuneloop.setup import resume_plan

LOG_SAMPLES = {"TUNELOOP_LOG_SAMPLE_IDS": "1"}
# Four shards of unequal size: on 2 processes each rank reads two whole shards, 120 or 80 rows or 140 and 60...
# depending on the epoch's shard order, so one rank runs out first every epoch.
SHARD_ROWS = (60, 60, 60, 20)
BATCH = 8
RUN = dict(
    streaming="true",
    shuffle_buffer_size=32,
    per_device_train_batch_size=BATCH,
    logging_steps=1,
    eval_strategy="no",
    save_strategy="steps",
    save_steps=4,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A folder of JSON-lines shards (one compressed), 200 labelled rows in all."""
    folder = tmp_path_factory.mktemp("shards")
    for number, count in enumerate(SHARD_ROWS):
        rows = make_rows(count, seed=10 + number)
        if number == 3:
            with gzip.open(folder / f"part-{number}.jsonl.gz", "wt") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
        else:
            write_rows(folder / f"part-{number}.jsonl", rows)
    return folder


def stream_args(model_dir: str, shards: Path, toy_files: dict, output_dir, **overrides) -> list[str]:
    files = {"train_file": str(shards), "validation_file": toy_files["validation_file"]}
    return tiny_args(model_dir, files, output_dir, **{**RUN, **overrides})


def expected_steps(shards: Path, processes: int, steps: int, workers: int = 0) -> dict[int, list[int]]:
    """Step -> the row ids it must use, from datasets' own seeded shuffle and split of the stream (the oracle): each
    epoch, rank r's part in order, cut into batches; the epoch ends at the last step every rank can fill. With
    dataloader workers, rank r's worker k reads part r x workers + k of the stream split over processes x workers
    (whole shards: this folder's count divides by it) and cuts its own batches; the rank takes them from its
    workers in turn, and its data ends at the first turn a worker cannot fill."""
    rows = stream.open_stream(str(shards), DataArguments())
    shuffled = rows.shuffle(seed=0, buffer_size=RUN["shuffle_buffer_size"])
    readers = max(workers, 1)
    parts_of = [
        [stream.for_rank(shuffled, rank * readers + k, processes * readers) for k in range(readers)]
        for rank in range(processes)
    ]
    expected, epoch = {}, 0
    while len(expected) < steps:
        batches = []  # each rank's batches of the epoch, in turn
        for parts in parts_of:
            ids = []
            for part in parts:
                part.set_epoch(epoch)
                ids.append([row[stream.ROW_ID] for row in part])
            batches.append(in_turn(ids))
        for k in range(min(len(rank) for rank in batches)):
            expected[len(expected) + 1] = [i for rank in batches for i in rank[k]]
        epoch += 1
    return {step: ids for step, ids in expected.items() if step <= steps}


def in_turn(parts: list[list[int]]) -> list[list[int]]:
    """The batches of `parts` (each cut into full batches) taken from each part in turn, up to the first turn whose
    part has no full batch left."""
    taken = []
    while len(part := parts[len(taken) % len(parts)]) >= (len(taken) // len(parts) + 1) * BATCH:
        first = len(taken) // len(parts) * BATCH
        taken.append(part[first : first + BATCH])
    return taken


@contextlib.contextmanager
def one_thread():
    """In-process runs with the one thread a launched process gets (OMP_NUM_THREADS=1): a run resumed here from a
    launched one's checkpoint then sums in the same order, and its weights can be compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def loss_fell(output_dir: Path) -> bool:
    losses = [e["train/loss"] for e in read_json(output_dir / "log_history.json") if "train/loss" in e]
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


# ---- 1 process, in this process; SIGKILL and a resume from the last checkpoint ----


@pytest.fixture(scope="module")
def one_process(dropout_model_dir, shards, toy_files, tmp_path_factory) -> Path:
    """One process, --count_rows (200 rows: 25 steps an epoch, 4 epochs), never stopped; dropout on, so that a
    resume must also draw the same dropout masks."""
    out = tmp_path_factory.mktemp("stream-1")
    with pytest.MonkeyPatch.context() as patch, one_thread():
        patch.setenv(*next(iter(LOG_SAMPLES.items())))
        run_in_process(stream_args(dropout_model_dir, shards, toy_files, out, count_rows="true", num_train_epochs=4))
    return out


@pytest.mark.trains
def test_one_process_streams_a_shard_folder(one_process, shards):
    """Trains from a folder of shards (one gzipped): the loss falls, the eval set is scored, every step uses the rows
    the seeded shuffle gives, and the counting pass sized the schedule. Guards a stream read in another order than its
    seed gives (a resume could not replay it), rows tokenized wrongly (no learning), a wrong plan."""
    results = read_json(one_process / "all_results.json")
    assert results["global_step"] == 100 and results["num_processes"] == 1
    assert results["final_learning_rate"] == pytest.approx(0.0, abs=1e-12)  # the schedule ends where it should
    assert loss_fell(one_process) and results["eval_accuracy"] > 0.5  # 3 classes: chance is 1/3
    assert samples_per_step(one_process) == expected_steps(shards, 1, 100)


@pytest.mark.multiprocess
def test_sigkill_then_resume_from_the_last_checkpoint_is_exact(
    one_process, dropout_model_dir, shards, toy_files, tmp_path
):
    """SIGKILL after the first checkpoint (mid-epoch); the rerun resumes from it and uses exactly the rows the
    uninterrupted run used at every later step, ending with its weights. Guards a position counted in batches after
    dropped rows, a replay that tokenizes or shuffles differently, a buffer refilled from the shards (datasets' own
    state_dict), a loader that draws its seed from the global RNG (the resumed run's dropout masks shift)."""
    out = tmp_path / "run"
    args = stream_args(dropout_model_dir, shards, toy_files, out, count_rows="true", num_train_epochs=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(*next(iter(LOG_SAMPLES.items())))
        code, stderr = interrupt(args, out, signal.SIGKILL, 1)
        assert code == -signal.SIGKILL, stderr[-3000:]
        shutil.rmtree(out / "sample_ids")  # the killed run's steps after its checkpoint are done again
        with one_thread():
            run_in_process([*args, "--resume_from_checkpoint", "latest"])
    got, expected = samples_per_step(out), samples_per_step(one_process)
    first = min(got)
    assert first % RUN["save_steps"] == 1, "resumed after a checkpoint (every 4 steps: never at an epoch's end)"
    assert sorted(got) == list(range(first, 101)) and all(got[s] == expected[s] for s in got)
    expected, got = weights(one_process), weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected), relative_error(expected, got)


# ---- 2 processes: uneven shards; SIGTERM to one rank and a resume ----


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, shards, toy_files, tmp_path_factory) -> Path:
    """Two processes, 24 steps (--max_steps): more than 2 epochs of this uneven folder."""
    out = tmp_path_factory.mktemp("stream-2")
    launch(stream_args(tiny_model_dir, shards, toy_files, out, max_steps=24), 2, env=LOG_SAMPLES, timeout=240)
    return out


@pytest.mark.multiprocess
def test_two_processes_split_the_shards_and_end_each_epoch_together(two_processes, shards):
    """Each rank reads its own shards; when one rank's part ends, every rank ends the epoch there (no hang: the
    launch's timeout), and each step uses exactly the rows the oracle gives. Guards Accelerate dispatching or
    re-sharding the stream, a rank that trains on alone (a hang, or steps out of line), a last step of mixed epochs."""
    results = read_json(two_processes / "all_results.json")
    assert (results["num_processes"], results["distributed_type"], results["global_step"]) == (2, "MULTI_CPU", 24)
    assert loss_fell(two_processes)
    assert samples_per_step(two_processes) == expected_steps(shards, 2, 24)


@pytest.mark.multiprocess
def test_sigterm_to_one_rank_then_resume_is_exact(two_processes, tiny_model_dir, shards, toy_files, tmp_path):
    """SIGTERM to rank 1 only, mid-epoch: both stop at one step with one checkpoint holding each rank's place in its
    stream; the resumed run uses the same rows at every step as the run never stopped, and ends with its weights.
    Guards a position saved for one rank only, or counted in batches of the wrong rank."""
    out = tmp_path / "run"
    args = stream_args(tiny_model_dir, shards, toy_files, out, max_steps=24)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(*next(iter(LOG_SAMPLES.items())))
        code, stderr = interrupt(args, out, signal.SIGTERM, 2)
    assert code != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in stderr, stderr[-3000:]
    stopped_at = read_json(out / "preempted.json")["step"]
    assert 4 <= stopped_at < 24
    ranks = [read_json(Path(read_json(out / "preempted.json")["checkpoint"]) / f"loop_state_{r}.json") for r in (0, 1)]
    assert all("stream_rows" in rank and "stream_epoch" in rank for rank in ranks)

    launch([*args, "--resume_from_checkpoint", "latest"], 2, env=LOG_SAMPLES, timeout=240)
    assert samples_per_step(out) == samples_per_step(two_processes)
    assert relative_error(weights(two_processes), weights(out)) <= 1e-6


# ---- 2 processes with 2 dataloader workers each: a SIGTERM and a resume ----

WORKERS = 2


@pytest.fixture(scope="module")
def two_processes_with_workers(tiny_model_dir, shards, toy_files, tmp_path_factory) -> Path:
    """Two processes with 2 dataloader workers each, 16 steps: each worker reads one of the 4 unequal shards, so an
    epoch ends after 4 to 5 steps, when the 20-row shard's worker has no batch left."""
    out = tmp_path_factory.mktemp("stream-2-workers")
    args = stream_args(tiny_model_dir, shards, toy_files, out, max_steps=16, dataloader_num_workers=WORKERS)
    launch(args, 2, env=LOG_SAMPLES, timeout=240)
    return out


@pytest.mark.multiprocess
def test_workers_take_turns_and_end_each_epoch_together(two_processes_with_workers, shards):
    """Each rank's 2 workers read their own shards and the rank takes their batches in turn; when one worker's part
    has no full batch left, every rank ends the epoch there (no hang: the launch's timeout), and each step uses
    exactly the rows the oracle gives. Guards datasets splitting the stream again between workers (a worker would
    read half its part), an epoch that goes on with the other worker alone (an order no resume rebuilds), a worker
    that reads the whole rank's part (rows twice)."""
    results = read_json(two_processes_with_workers / "all_results.json")
    assert (results["num_processes"], results["global_step"]) == (2, 16)
    assert samples_per_step(two_processes_with_workers) == expected_steps(shards, 2, 16, WORKERS)


@pytest.mark.multiprocess
def test_sigterm_then_resume_with_workers_is_exact(
    two_processes_with_workers, tiny_model_dir, shards, toy_files, tmp_path
):
    """SIGTERM to rank 1 mid-run with 2 workers per rank: the checkpoint holds each worker's part's rows read and whose
    turn is next, and the resumed run uses the same rows at every step as the run never stopped, ending with its
    weights. Guards a resume whose worker 0 reads the part that was not next, or a part restarted from its rank's
    count of rows."""
    out = tmp_path / "run"
    args = stream_args(tiny_model_dir, shards, toy_files, out, max_steps=16, dataloader_num_workers=WORKERS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(*next(iter(LOG_SAMPLES.items())))
        code, stderr = interrupt(args, out, signal.SIGTERM, 2)
    assert code != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in stderr, stderr[-3000:]
    saved = Path(read_json(out / "preempted.json")["checkpoint"])
    ranks = [read_json(saved / f"loop_state_{r}.json") for r in (0, 1)]
    assert all(len(rank["stream_rows"]) == WORKERS and "stream_next_part" in rank for rank in ranks)

    launch([*args, "--resume_from_checkpoint", "latest"], 2, env=LOG_SAMPLES, timeout=240)
    assert samples_per_step(out) == samples_per_step(two_processes_with_workers)
    assert relative_error(weights(two_processes_with_workers), weights(out)) <= 1e-6


# ---- What the stream is, and what --streaming refuses (no training) ----


def test_a_stream_numbers_its_rows_and_splits_them_between_ranks(shards):
    """Row ids are file number x 2**32 + row in the file, in file order; two ranks' parts are disjoint and cover the
    stream. Guards ids that collide between files or ranks (predictions and the sample log key on them)."""
    rows = stream.open_stream(str(shards), DataArguments())
    ids = [row[stream.ROW_ID] for row in rows]
    assert ids == [n * stream.ROWS_PER_FILE + i for n, count in enumerate(SHARD_ROWS) for i in range(count)]
    parts = [[row[stream.ROW_ID] for row in stream.for_rank(rows, rank, 2)] for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == ids and not set(parts[0]) & set(parts[1])


def test_each_file_is_read_in_small_pieces_with_the_streams_types(tmp_path, monkeypatch):
    """datasets' shuffle reads up to 10 shards at once, one reader each: until the first shuffled row, each reader
    parses one small piece of its file, and no file's types are inferred again (open_stream read the first file's).
    Guards the peak memory and start-up time growing with the shard count: with datasets' 10 MB pieces, and every
    file's first piece parsed twice, 40 shards of 250,000 rows peaked at 1.08 GiB against 0.73 GiB for 4."""
    import pyarrow.json

    for number in range(4):
        write_rows(tmp_path / f"part-{number}.jsonl", make_rows(30_000, seed=number))  # about 2 MB each
    parse, parsed = pyarrow.json.read_json, []

    def counted(source, **options):
        parsed.append(len(source.getbuffer()))
        return parse(source, **options)

    monkeypatch.setattr(pyarrow.json, "read_json", counted)
    rows = stream.open_stream(str(tmp_path), DataArguments())
    parsed.clear()  # (the first file's types, read once)
    first = next(iter(rows.shuffle(seed=0, buffer_size=100)))
    assert first[stream.ROW_ID] % stream.ROWS_PER_FILE < 30_000 and set(first) == {"text", "label", stream.ROW_ID}
    assert 0 < sum(parsed) <= 4 * (stream.READ_JSON_BYTES + 1000), parsed  # one piece (and a line) per file


def test_a_file_that_does_not_fit_the_first_files_types_is_refused_naming_it(tmp_path):
    """Every file of a stream is read with its first file's columns and types: a later file whose label would not
    convert (1.5 into the first file's integers) stops the stream in one line naming the file, the types and the fix.
    Guards a value silently cut to the first file's type (the stream used to give label 1 for 1.5)."""
    write_rows(tmp_path / "a.jsonl", [{"text": "goal team", "label": 1}, {"text": "song", "label": 2}])
    write_rows(tmp_path / "b.jsonl", [{"text": "chip robot", "label": 1.5}])
    rows = stream.open_stream(str(tmp_path), DataArguments())
    said = r"data file '.*b\.jsonl' .*first file's columns and types \(text string, label int64\): fix or convert it"
    with pytest.raises(UserError, match=said) as refused:
        list(rows)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({}, "needs the schedule's length: pass --max_steps N, or --train_rows N"),
        ({"max_steps": 5, "max_tokens_per_batch": 256}, "max_tokens_per_batch cuts batches"),
        ({"max_steps": 5, "train_sampling_strategy": "group_by_length"}, "group_by_length sorts the whole"),
        ({"max_steps": 5, "max_train_samples": 10}, "max_train_samples draws a random subset"),
        ({"max_steps": 5, "validation_file": None}, "cannot hold out --validation_split_percentage"),
        ({"max_steps": 5, "class_weights": "auto"}, "class_weights auto counts every training label"),
        ({"max_steps": 5, "shuffle_buffer_size": 0}, "shuffle_buffer_size must be >= 1"),
        ({"max_steps": 5, "train_file": "nowhere/*.jsonl"}, "matches no data file"),
        ({"streaming": "false", "count_rows": "true"}, "count_rows size(s) a training stream: add --streaming"),
    ],
)
def test_what_streaming_refuses_is_one_line_with_the_fix(options, said, shards, tiny_model_dir, toy_files, tmp_path):
    """Each option streaming cannot work with is refused before anything loads, in one line naming the fix."""
    overrides = {**RUN, **options}
    files = {"train_file": overrides.pop("train_file", str(shards))}
    if overrides.pop("validation_file", toy_files["validation_file"]):
        files["validation_file"] = toy_files["validation_file"]
    args = tiny_args(tiny_model_dir, files, tmp_path / "run", **overrides)
    with pytest.raises(UserError, match="invalid configuration") as refused:
        parse_args(args)
    assert said in str(refused.value) and "\n" not in str(refused.value)


def test_a_stream_resumes_only_on_its_process_count(shards, tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """Each rank's place is in its own part of the stream: another process count is refused naming the one that
    works, before anything loads. Guards an elastic resume that would silently skip or repeat rows."""
    out = tmp_path / "run"
    saved_state_only(
        out,
        step=6,
        batches_in_epoch=6,
        num_processes=2,
        per_device_train_batch_size=BATCH,
        settings={"streaming": True},
    )
    args = stream_args(tiny_model_dir, shards, toy_files, out, max_steps=24, resume_from_checkpoint="latest")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match=r"written by 2 processes each reading its own part .* resume on 2 processes"):
        resume_plan(parse_args(args))


def test_the_classes_come_from_the_first_rows_or_the_counting_pass(tiny_model_dir, tmp_path):
    """Without --count_rows the classes are the first --shuffle_buffer_size rows' (said in one line), and a later row
    with another label stops the run naming it and --count_rows; with it, every label is known and each row's label is
    encoded as loaded data's is. Guards a label silently mapped to a wrong id, or a second label encoding."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tuneloop import problem

    texts = {"sports": "goal team", "music": "song band", "tech": "chip robot"}
    write_rows(tmp_path / "shards" / "a.jsonl", [{"text": texts[n], "label": n} for n in ("sports", "music", "tech")])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    one_process = SimpleNamespace(process_index=0, num_processes=1)

    def examples(d: DataArguments):
        splits = stream.load_splits(one_process, d, 0, None, None)
        prepare = stream._preparer(splits, tokenizer, d, problem.of(splits.problem_type))
        return splits, list(stream.Examples(splits.stream.rows, prepare))

    peeked = DataArguments(train_file=str(tmp_path / "shards"), streaming=True, shuffle_buffer_size=2)
    with pytest.raises(UserError, match=r"labels \['tech'\] in the training stream .* pass --count_rows"):
        examples(peeked)
    splits, rows = examples(DataArguments(**{**peeked.__dict__, "count_rows": True}))
    assert splits.label_names == ["music", "sports", "tech"] and splits.stream.count == 3
    assert [row["labels"] for row in rows] == [1, 0, 2] and [row[stream.POSITION] for row in rows] == [1, 2, 3]
    assert "3 rows" in splits.notes[0]


@pytest.mark.engines
def test_deepspeed_zero2_reads_the_stream_as_ddp_does(tiny_model_dir, shards, toy_files, tmp_path):
    """The data path does not depend on the engine: under DeepSpeed ZeRO-2 on 2 processes each step uses the rows the
    oracle gives, and the model learns. Guards DeepSpeed's prepare taking over (or wanting) the stream's loader."""
    out = tmp_path / "zero2"
    args = stream_args(tiny_model_dir, shards, toy_files, out, max_steps=12)
    launch(args, 2, config="deepspeed_zero2_cpu.yaml", env=LOG_SAMPLES, timeout=600)
    results = read_json(out / "all_results.json")
    assert (results["distributed_type"], results["num_processes"], results["global_step"]) == ("DEEPSPEED", 2, 12)
    assert loss_fell(out) and samples_per_step(out) == expected_steps(shards, 2, 12)


@pytest.mark.parametrize(
    ("labels", "names", "encoded"),
    [
        ([["sports", "tech"], [], ["tech"]], ["sports", "tech"], [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]),
        ([0.5, 2.0, -1.25], ["label"], [0.5, 2.0, -1.25]),
    ],
    ids=["multi-label", "regression"],
)
def test_each_problem_type_is_encoded_as_it_streams(labels, names, encoded, tiny_model_dir, tmp_path):
    """Multi-label lists and regression values stream through problem.py's own encoding: multi-hot vectors, floats.
    Guards a stream path that only knows single-label classes."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tuneloop import problem

    write_rows(tmp_path / "s" / "a.jsonl", [{"text": "goal team song", "label": label} for label in labels])
    d = DataArguments(train_file=str(tmp_path / "s"), streaming=True)
    splits = stream.load_splits(SimpleNamespace(process_index=0, num_processes=1), d, 0, None, None)
    prepare = stream._preparer(
        splits, AutoTokenizer.from_pretrained(tiny_model_dir), d, problem.of(splits.problem_type)
    )
    assert splits.label_names == names
    assert [row["labels"] for row in stream.Examples(splits.stream.rows, prepare)] == encoded


def test_bad_rows_are_refused_or_dropped_and_the_position_counts_them(tiny_model_dir, tmp_path):
    """An empty text stops the run naming the stream (or, with --drop_bad_rows, is dropped), and each example's
    position counts the raw rows read, dropped ones too: a resume skips raw rows. Guards a position counted in kept
    examples, which would resume a stream with dropped rows at the wrong row."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tuneloop import problem

    rows = [
        {"text": "goal team", "label": "sports"},
        {"text": " ", "label": "music"},
        {"text": "song", "label": "music"},
    ]
    write_rows(tmp_path / "s" / "a.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def examples(d: DataArguments) -> list[dict]:
        splits = stream.load_splits(SimpleNamespace(process_index=0, num_processes=1), d, 0, None, ["music", "sports"])
        return list(
            stream.Examples(splits.stream.rows, stream._preparer(splits, tokenizer, d, problem.of(splits.problem_type)))
        )

    d = DataArguments(train_file=str(tmp_path / "s"), streaming=True, drop_bad_rows=True)
    assert [(row[stream.POSITION], row["labels"]) for row in examples(d)] == [(1, 1), (3, 0)]
    with pytest.raises(UserError, match=r"training stream .* has 1 row\(s\) with an empty text"):
        examples(DataArguments(**{**d.__dict__, "drop_bad_rows": False, "shuffle_buffer_size": 1}))


# ---- Dataloader workers in this process: their turns, a resume between them, their errors ----


def worker_loader(train_file: str, tokenizer_dir: str, workers: int, **options) -> stream.StreamLoader:
    """One process's StreamLoader over `train_file` with `workers` dataloader workers, each batch tagged with its
    rows' ids (as the sample-id log tags them)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tuneloop import batches, problem

    options = {"shuffle_buffer_size": RUN["shuffle_buffer_size"], **options}
    d = DataArguments(train_file=train_file, streaming=True, **options)
    t = SimpleNamespace(seed=0, data_seed=None, dataloader_num_workers=workers)
    one_process = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    splits = stream.load_splits(one_process, d, 0, None, None)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = stream.train_examples(one_process, splits, tokenizer, d, t, problem.of(splits.problem_type))
    collate = batches.collator(tokenizer, None)
    return stream.StreamLoader(examples.tag_samples("id"), collate, BATCH, 1, one_process, workers)


def epoch_batches(loader: stream.StreamLoader, epoch: int, stop_after: int = 0) -> tuple[list[list[int]], dict]:
    """The ids of each batch `loader` gives in `epoch` (up to `stop_after` batches), and its position then."""
    loader.set_epoch(epoch)
    got = []
    for batch in loader:
        got.append(batch["id"].tolist())
        if len(got) == stop_after:
            break
    return got, loader.position()


@pytest.mark.parametrize("split", ["by shards", "by rows"])
def test_workers_take_turns_and_a_resume_gives_the_next_turn_to_worker_0(split, shards, tiny_model_dir, tmp_path):
    """Two workers in one process: worker k reads part k (its shards when 4 shards divide between them; else every
    other row of the one file, which each worker reads whole), the loader takes their batches in turn and ends the
    epoch at the first turn a part cannot fill; a loader resumed from the position after 5 batches (part 1's turn
    next) gives exactly the batches that followed. Guards a resume that restarts the turns at part 0, a position
    counted in the other part's rows, rows of another worker's share prepared twice or never."""
    if split == "by rows":  # one file: one shard, which 2 workers cannot share out whole
        source = tmp_path / "one.jsonl"
        source.write_text("".join(line for path in sorted(shards.iterdir()) for line in _lines(path)))
    else:
        source = shards
    shuffled = stream.open_stream(str(source), DataArguments()).shuffle(seed=0, buffer_size=RUN["shuffle_buffer_size"])
    shuffled.set_epoch(1)
    if split == "by rows":
        ids = [row[stream.ROW_ID] for row in shuffled]
        parts = [ids[0::2], ids[1::2]]
    else:
        parts = []
        for k in range(2):
            part = stream.for_rank(shuffled, k, 2)
            part.set_epoch(1)
            parts.append([row[stream.ROW_ID] for row in part])
    expected = in_turn(parts)

    whole, _ = epoch_batches(worker_loader(str(source), tiny_model_dir, 2), epoch=1)
    assert whole == expected and len(whole) >= 8
    first, position = epoch_batches(worker_loader(str(source), tiny_model_dir, 2), epoch=1, stop_after=5)
    assert position["stream_next_part"] == 1 and len(position["stream_rows"]) == 2
    resumed = worker_loader(str(source), tiny_model_dir, 2)
    resumed.resume_at(json.loads(json.dumps(position)))  # as a checkpoint gives it back
    rest, _ = epoch_batches(resumed, epoch=1)
    assert first + rest == expected and resumed.ended


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return f.readlines()


def test_a_bad_row_met_in_a_worker_is_one_line(tiny_model_dir, tmp_path):
    """A row with an empty text, read in a dataloader worker, stops the run with the same one line as without
    workers, not the worker's traceback (torch re-raises a worker's error with it). Guards a user shown a traceback
    from inside the DataLoader for a problem in their data."""
    rows = [{"text": "goal team", "label": "sports"}, {"text": "song", "label": "music"}] * 10
    write_rows(tmp_path / "s" / "a.jsonl", [*rows, {"text": " ", "label": "music"}])  # after the 4 rows peeked
    loader = worker_loader(str(tmp_path / "s"), tiny_model_dir, 1, shuffle_buffer_size=4)
    with pytest.raises(UserError, match=r"training stream .* has 1 row\(s\) with an empty text") as refused:
        epoch_batches(loader, epoch=0)
    assert "\n" not in str(refused.value) and "Traceback" not in str(refused.value)


@pytest.mark.parametrize(("saved_rows", "workers", "said"), [([40, 32], 0, "2"), (64, 2, "0 (or 1)"), (64, 1, None)])
def test_a_stream_resumes_only_with_its_worker_count(
    saved_rows, workers, said, shards, tiny_model_dir, toy_files, tmp_path, monkeypatch
):
    """Each worker's place is in its own part of the stream: a checkpoint of 2 workers' parts resumes only with 2,
    one of a single part with 0 or 1 (they read the same part in the same order); another count is refused before
    anything loads, naming the one that works. Guards a resume that would silently skip or repeat rows."""
    out = tmp_path / "run"
    saved = saved_state_only(
        out,
        step=6,
        batches_in_epoch=6,
        num_processes=1,
        per_device_train_batch_size=BATCH,
        settings={"streaming": True},
    )
    (saved / "loop_state_0.json").write_text(json.dumps({"stream_epoch": 0, "stream_rows": saved_rows}))
    args = stream_args(
        tiny_model_dir,
        shards,
        toy_files,
        out,
        max_steps=24,
        resume_from_checkpoint="latest",
        dataloader_num_workers=workers,
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    if said is None:
        assert resume_plan(parse_args(args))[1] == str(saved)
        return
    with pytest.raises(
        UserError, match=re.escape(f"cannot continue exactly: resume with --dataloader_num_workers {said} ")
    ):
        resume_plan(parse_args(args))
