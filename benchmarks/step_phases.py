"""Where a training step's time goes: tuneloop's own set-up, then timed forward / backward / clip / optimizer phases.

    .venv/bin/python benchmarks/step_phases.py --dataset_name builtin:bbc_news --max_train_samples 256 --max_length 512
    .venv/bin/python benchmarks/step_phases.py --dataset_name builtin:bbc_news_headlines --profile   # + top ops

    .venv/bin/python benchmarks/step_phases.py --dataset_name builtin:bbc_news_headlines --fold_clip both  # A/B

Any train.py option works (e.g. --fast_cpu_dropout false). bf16 and --train_sampling_strategy group_by_length are
preset, as in the benchmark's "same maths" row. --steps/--warmup/--profile/--fold_clip are this script's own. The
step is the loop's own: its loss (problem.py) and `optim.clip_and_step`, the clip folded into fused AdamW unless
--fold_clip no; "both" runs every batch twice, folded and not (which first alternates), and prints a line for each.
"""

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tuneloop import config, optim, setup  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    p.add_argument("--fold_clip", choices=["yes", "no", "both"], default="yes")
    p.add_argument(
        "--keep_embedding_grad",
        choices=["yes", "no"],
        default="yes",
        help="optim.KeptEmbeddingGradient, as the loop installs it (no: the dense zero-filled gradient)",
    )
    own, rest = p.parse_known_args()
    run = setup.setup(
        config.parse_args(
            [
                "--output_dir",
                "/tmp/tuneloop-step-phases",
                "--eval_strategy",
                "no",
                "--mixed_precision",
                "bf16",
                "--train_sampling_strategy",
                "group_by_length",
                *rest,
            ]
        )
    )
    model, accelerator = run.model, run.accelerator
    optimizer, scheduler = run.training.optimizer, run.training.scheduler
    model.train()
    batches = iter(run.training.train_dl)
    kept = optim.KeptEmbeddingGradient.install(accelerator, model) if own.keep_embedding_grad == "yes" else None
    folds = {"yes": [True], "no": [False], "both": [True, False]}[own.fold_clip]
    phases = {fold: collections.defaultdict(float) for fold in folds}
    samples = dict.fromkeys(folds, 0)

    def step(batch: dict, timed: bool, fold: bool = True) -> None:
        batch = dict(batch)  # "both" runs each batch twice
        marks = [time.perf_counter()]
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            loss = run.problem.loss(model(**batch).logits, labels)
            marks.append(time.perf_counter())
            accelerator.backward(loss)
            marks.append(time.perf_counter())
            optim.clip_and_step(accelerator, model, optimizer, run.config.train.max_grad_norm, fold_clip=fold)
            scheduler.step()
            marks.append(time.perf_counter())
            optimizer.zero_grad()
            if kept:
                kept.zero_grad()
            marks.append(time.perf_counter())
        if timed:
            for name, start, end in zip(["forward", "backward", "clip+optimizer", "zero_grad"], marks, marks[1:]):
                phases[fold][name] += end - start
            samples[fold] += labels.shape[0]

    for i, timed in enumerate([False] * own.warmup + [True] * own.steps):
        batch = next(batches)
        for fold in folds if i % 2 else folds[::-1]:  # which goes first alternates
            step(batch, timed, fold)
    for fold in folds:
        total = sum(phases[fold].values())
        print(
            f"clip folded into AdamW: {'yes' if fold else 'no '} |",
            ", ".join(f"{name} {1000 * t / own.steps:.1f} ms" for name, t in phases[fold].items()),
            f"| {1000 * total / own.steps:.1f} ms/step, {samples[fold] / total:.1f} samples/s",
        )
    if own.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(min(own.steps, 3)):
                step(next(batches), timed=False, fold=folds[0])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
