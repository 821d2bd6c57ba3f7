"""Where a training step's time goes: tuneloop's own set-up, then timed forward / backward / clip / optimizer phases.

    .venv/bin/python benchmarks/step_phases.py --dataset_name builtin:bbc_news --max_train_samples 256 --max_length 512
    .venv/bin/python benchmarks/step_phases.py --dataset_name builtin:bbc_news_headlines --profile   # + top ops

Any train.py option works (e.g. --fast_cpu_dropout false). bf16 and --train_sampling_strategy group_by_length are preset, as in the
benchmark's "same maths" row. --steps/--warmup are this script's own.
"""

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tuneloop import config, loop  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    own, rest = p.parse_known_args()
    run = loop.setup(config.parse_args(["--output_dir", "/tmp/tuneloop-step-phases", "--eval_strategy", "no",
                                        "--mixed_precision", "bf16", "--train_sampling_strategy", "group_by_length", *rest]))
    model, optimizer, scheduler, accelerator = run.model, run.optimizer, run.scheduler, run.accelerator
    model.train()
    batches = iter(run.train_dl)
    phases, samples = collections.defaultdict(float), 0

    def step(timed: bool) -> None:
        nonlocal samples
        batch = next(batches)
        marks = [time.perf_counter()]
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            marks.append(time.perf_counter())
            accelerator.backward(loss)
            marks.append(time.perf_counter())
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            marks.append(time.perf_counter())
            optimizer.step()
            scheduler.step()
            marks.append(time.perf_counter())
            optimizer.zero_grad()
            marks.append(time.perf_counter())
        if timed:
            for name, start, end in zip(["forward", "backward", "clip", "optimizer", "zero_grad"], marks, marks[1:]):
                phases[name] += end - start
            samples += batch["input_ids"].shape[0]

    for _ in range(own.warmup):
        step(timed=False)
    for _ in range(own.steps):
        step(timed=True)
    total = sum(phases.values())
    print(", ".join(f"{name} {1000 * t / own.steps:.1f} ms" for name, t in phases.items()),
          f"| {1000 * total / own.steps:.1f} ms/step, {samples / total:.1f} samples/s")
    if own.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(min(own.steps, 3)):
                step(timed=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
