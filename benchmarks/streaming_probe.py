r"""Where a training process's time goes per batch of a stream, with and without a dataloader worker (issue 26's
workers): the process's own CPU time (time.process_time: another session's load and the worker's CPU do not count) to
get one batch of 16 from tuneloop's StreamLoader (a) preparing it in-process (read, shuffle, tokenize, collate:
--dataloader_num_workers 0) and (b) receiving it from one worker (the IPC: torch moves each tensor through shared
memory), and the wall time per batch of (b), which is the worker's own pace.

    PYTHONPATH=src .venv/bin/python benchmarks/streaming_probe.py /tmp/tuneloop-streaming/rows-1000000 /tmp/tiny-minilm

The folder: benchmarks/streaming.py's generated shards; the model: benchmarks/make_tiny_model.py's. One thread.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from types import SimpleNamespace

import torch

BATCHES = 300  # timed, after the shuffle buffer (10,000 rows) is full


def main() -> None:
    from transformers import AutoTokenizer

    from tuneloop import batches, problem, stream
    from tuneloop.options import DataArguments

    torch.set_num_threads(1)
    source, model = sys.argv[1], sys.argv[2]
    d = DataArguments(train_file=source, streaming=True, shuffle_buffer_size=10_000, max_length=32)
    one_process = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    splits = stream.load_splits(one_process, d, 42, None, None)
    tokenizer = AutoTokenizer.from_pretrained(model)
    kind = problem.of(splits.problem_type)
    found = {}
    for workers in (0, 1):
        t = SimpleNamespace(seed=42, data_seed=None, dataloader_num_workers=workers)
        examples = stream.train_examples(one_process, splits, tokenizer, d, t, kind)
        loader = stream.StreamLoader(examples, batches.collator(tokenizer, None), 16, 1, one_process, workers)
        loader.set_epoch(0)
        loaded = iter(loader)
        for _ in itertools.islice(loaded, 700):  # the buffer fills (and the worker starts)
            pass
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in itertools.islice(loaded, BATCHES):
            pass
        found[f"{workers} workers"] = {
            "main_cpu_ms_per_batch": round((time.process_time() - cpu) / BATCHES * 1000, 2),
            "wall_ms_per_batch": round((time.perf_counter() - wall) / BATCHES * 1000, 2),
        }
        del loaded
    print(json.dumps(found))


if __name__ == "__main__":
    main()
