r"""tuneloop against transformers' Trainer on the same data, model, truncation and hardware, in one invocation.

    .venv/bin/python benchmarks/speed.py                      # both workloads, 2 alternating runs of every setting
    .venv/bin/python benchmarks/speed.py --workload long --runs 3
    .venv/bin/python benchmarks/speed.py --quick              # a minute: checks the harness, measures nothing
    .venv/bin/python benchmarks/speed.py --workload long_full --runs 1 --settings "T2b+alloc T2b + MALLOC_ env" \
        "tuneloop same maths" "tuneloop fastest"              # accuracy after 107 steps

Settings (issue 9): T1 Trainer with the tutorial's padding to max_length, fp32; T2 Trainer with dynamic padding and
group_by_length; T2b T2 + bf16; T2b+alloc, T2b given the allocator set-up by environment; "tuneloop plain loop" (its
CPU switches off); "tuneloop same maths" (its defaults: bf16 and the model's own dropout as T2b, the allocator set-up
and CPU dropout kernels, which keep the maths); "tuneloop fastest" (attention dropout 0: different maths, own row).
Every run is a fresh process; settings alternate so that drifts of this noisy machine hit all of them alike. Ratios
use medians.

Most settings run in bf16: a fair comparison only where the hardware computes in it (a GPU from Ampere on, a CPU with
amx_bf16 or avx512_bf16). Elsewhere torch emulates bf16, about 13x slower than fp32, so the report says which
precisions this host compares fairly (with its CPU flags) and marks the bf16 rows "bf16 emulated".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from tuneloop import runtime, throughput  # noqa: E402

WORKLOADS = {
    # Long: BBC articles, median 421 tokens; 256 training articles, the whole held-out split for accuracy.
    "long": dict(dataset_name="builtin:bbc_news", max_length=512, max_train_samples=256, t1_max_steps=None),
    # Short: the headlines (median 9 tokens), the full training split. T1 pads them to 512 (~1 sample/s), so it runs
    # 16 steps for its throughput only (no accuracy).
    # Long, all 1,701 training articles (107 steps): the accuracy check, too slow for every setting (T1 ~25 min).
    "long_full": dict(dataset_name="builtin:bbc_news", max_length=512, max_train_samples=None, t1_max_steps=None),
    "short": dict(dataset_name="builtin:bbc_news_headlines", max_length=512, max_train_samples=None, t1_max_steps=16),
}
# glibc's allocator told to keep big blocks, as tuneloop's --tune_cpu_allocator does from inside the process.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
SETTINGS = {
    "T1 Trainer tutorial": dict(peer=True, padding="max_length", precision="no"),
    "T2 Trainer dynamic+grouped": dict(peer=True, padding="longest", group=True, precision="no"),
    "T2b T2 + bf16": dict(peer=True, padding="longest", group=True, precision="bf16"),
    # Trainer given the allocator set-up by environment: what a Trainer user who knows the trick gets.
    "T2b+alloc T2b + MALLOC_ env": dict(peer=True, padding="longest", group=True, precision="bf16", env=ALLOCATOR_ENV),
    # tuneloop with its CPU switches off: the plain loop, to show what the switches add.
    "tuneloop plain loop": dict(
        peer=False,
        precision="bf16",
        extra=[
            "--train_sampling_strategy",
            "group_by_length",
            "--tune_cpu_allocator",
            "false",
            "--fast_cpu_dropout",
            "false",
        ],
    ),
    # tuneloop's defaults (allocator set-up, CPU dropout kernels) at T2b's maths: bf16, the model's own dropout.
    "tuneloop same maths": dict(peer=False, precision="bf16", extra=["--train_sampling_strategy", "group_by_length"]),
    "tuneloop fastest": dict(
        peer=False, precision="bf16", extra=["--train_sampling_strategy", "group_by_length", "--attention_dropout", "0"]
    ),
    # Issue 19, item 2: batches by a token budget (different maths: batch sizes vary, far more texts per step on short
    # texts). Learning rate by the square-root rule from the 16-text batch the other rows use, at 1e-4: on the
    # headlines 256 tokens make batches of 29 texts on average (x1.8: 1.34e-4), 512 of 57 (x3.5: 1.88e-4); the
    # "linear" rows scale it by the batch instead (3.5e-4; 1024 tokens: 106 texts, x6.6: 6.6e-4). Not run by default.
    "tuneloop tokens 256": dict(
        peer=False, precision="bf16", extra=["--max_tokens_per_batch", "256", "--learning_rate", "1.34e-4"]
    ),
    "tuneloop tokens 512": dict(
        peer=False, precision="bf16", extra=["--max_tokens_per_batch", "512", "--learning_rate", "1.88e-4"]
    ),
    "tuneloop tokens 512 linear lr": dict(
        peer=False, precision="bf16", extra=["--max_tokens_per_batch", "512", "--learning_rate", "3.5e-4"]
    ),
    "tuneloop tokens 1024 linear lr": dict(
        peer=False, precision="bf16", extra=["--max_tokens_per_batch", "1024", "--learning_rate", "6.6e-4"]
    ),
    # Not run by default (see RESULTS.md): torch.compile on top of the same maths, compile time included.
    "tuneloop same maths + compile": dict(
        peer=False, precision="bf16", extra=["--train_sampling_strategy", "group_by_length", "--torch_compile", "true"]
    ),
}
DEFAULT_SETTINGS = [name for name in SETTINGS if not name.endswith("compile") and "tokens" not in name]


def command(
    setting: dict, workload: dict, model: str, out: str, quick: bool, processes: int = 1, seed: int = 42
) -> list[str]:
    samples = 32 if quick else workload["max_train_samples"]
    # Several processes: both sides under the same `accelerate launch` (cpu_2proc.yaml: torchrun workers, gloo).
    python = (
        [sys.executable]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
            "--num_processes",
            str(processes),
        ]
    )
    if setting["peer"]:
        cmd = [
            *python,
            str(ROOT / "benchmarks" / "trainer_peer.py"),
            "--dataset_name",
            workload["dataset_name"],
            "--model_name_or_path",
            model,
            "--max_length",
            str(workload["max_length"]),
            "--padding",
            setting["padding"],
        ]
        cmd += ["--group_by_length"] * setting.get("group", False) + ["--bf16"] * (setting["precision"] == "bf16")
        steps = (
            2
            if quick and setting["padding"] == "max_length"
            else workload["t1_max_steps"]
            if setting["padding"] == "max_length"
            else None
        )
        cmd += ["--max_steps", str(steps)] if steps else []
    else:
        cmd = [
            *python,
            str(ROOT / "train.py"),
            "--dataset_name",
            workload["dataset_name"],
            "--model_name_or_path",
            model,
            "--max_length",
            str(workload["max_length"]),
            "--num_train_epochs",
            "1",
            "--eval_strategy",
            "no",
            "--output_dir",
            out,
            "--mixed_precision",
            setting["precision"],
            *setting["extra"],
        ]
    cmd += ["--max_train_samples", str(samples)] if samples else []
    cmd += ["--seed", str(seed)]
    return cmd + (["--max_eval_samples", "32"] if quick else [])


def run_once(name: str, workload: dict, model: str, quick: bool, processes: int = 1, seed: int = 42) -> dict:
    setting = SETTINGS[name]
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            command(setting, workload, model, out, quick, processes, seed),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **setting.get("env", {})},
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = (
            json.loads(done.stdout.strip().splitlines()[-1])
            if setting["peer"]
            else json.loads((Path(out) / "all_results.json").read_text())
        )
    # A multi-process row must be real data parallelism (both sides report it), not N independent runs.
    if result.get("num_processes", 1) != processes or (processes > 1 and result["distributed_type"] == "NO"):
        raise SystemExit(
            f"{name}: asked for {processes} processes, the run had {result.get('num_processes')} "
            f"({result.get('distributed_type')})"
        )
    return result


def fair_precisions(device: torch.device) -> tuple[str, bool]:
    """A line saying which precisions this host compares fairly, and whether its bf16 is emulated."""
    if device.type == "cuda":
        emulated = not runtime.fast_bf16_available()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        return (
            f"precision: GPU compute capability {capability}: "
            + (
                "bf16 emulated (below 8.0): compare fp32 (or fp16) rows only"
                if emulated
                else "bf16 and fp32 both native: every row compares fairly"
            )
        ), emulated
    flags = runtime.cpu_flags()
    shown = " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))) or "none read"
    emulated = not runtime.cpu_has_bf16_units(flags)
    return (
        f"precision: CPU flags {shown}: "
        + (
            "no amx_bf16 or avx512_bf16, bf16 is emulated (about 13x slower than fp32): only rows of the same "
            "precision compare fairly, fp32 against fp32 (T1, T2); the bf16 rows are marked"
            if emulated
            else "bf16 matrix units present: bf16 and fp32 rows both run natively"
        )
    ), emulated


def table(results: dict[str, list[dict]], peaks: dict[str, float], bf16_emulated: bool = False) -> str:
    median = {name: statistics.median(r["train_samples_per_second"] for r in runs) for name, runs in results.items()}
    peers = [n for n in results if SETTINGS[n]["peer"]]
    head = [
        "setting",
        "samples/s min / median",
        "real tokens/s",
        "model TFLOP/s",
        "MFU",
        "peak memory GiB",
        "eval accuracy mean (per run)",
        *(f"x {n.split()[0]}" for n in peers),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, runs in results.items():
        rates = [r["train_samples_per_second"] for r in runs]
        tflops = statistics.median(r["model_tflops_per_second"] for r in runs)
        accuracy = [r["eval_accuracy"] for r in runs if r.get("eval_accuracy") is not None]
        emulated = bf16_emulated and SETTINGS[name]["precision"] == "bf16"
        row = [
            name + " (bf16 emulated)" * emulated,
            f"{min(rates):.2f} / {median[name]:.2f}",
            f"{statistics.median(r['train_tokens_per_second'] for r in runs):.0f}",
            f"{tflops:.3f}",
            f"{tflops / peaks[SETTINGS[name]['precision']]:.1%}",
            f"{max(r['peak_memory_gib'] for r in runs):.1f}",
            (
                f"{statistics.mean(accuracy):.4f}"
                + (f" ({' / '.join(f'{x:.4f}' for x in accuracy)})" if len(accuracy) > 1 else "")
            )
            if accuracy
            else "— (capped run)",
            *(f"{median[name] / median[p]:.2f}" for p in peers),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both", help="both: long and short")
    p.add_argument("--runs", type=int, default=2, help="runs of every setting, alternating")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[42],
        help="run r of every setting uses seed r mod len(seeds) (model head, dropout, order, held-out split)",
    )
    p.add_argument("--model", default="builtin:all-MiniLM-L6-v2", help="e.g. google-bert/bert-base-cased on a GPU")
    p.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every setting runs")
    p.add_argument(
        "--processes", type=int, default=1, help="data-parallel processes for every setting (accelerate launch)"
    )
    p.add_argument("--write", metavar="FILE", help="append the tables, command, machine and date to FILE (RESULTS.md)")
    a = p.parse_args()

    # The peaks MFU is measured against: this CPU's matmul rate at the runs' thread count (cached), or a GPU's
    # datasheet.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peaks = {precision: throughput.peak_tflops(device, precision, None) or float("nan") for precision in ("no", "bf16")}
    report = [
        f"## {datetime.date.today()}: `{' '.join(['benchmarks/speed.py', *sys.argv[1:]])}`",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else ''}; peak TFLOP/s fp32 {peaks['no']:.3f}, "
        f"bf16 {peaks['bf16']:.3f}; model {a.model}.",
    ]
    precision_line, bf16_emulated = fair_precisions(device)
    report.append(precision_line)
    print(precision_line, file=sys.stderr, flush=True)
    for workload in ["long", "short"] if a.workload == "both" else [a.workload]:
        results = {name: [] for name in a.settings}
        for run in range(a.runs):
            for name in a.settings if run % 2 == 0 else reversed(a.settings):
                seed = a.seeds[run % len(a.seeds)]
                results[name].append(run_once(name, WORKLOADS[workload], a.model, a.quick, a.processes, seed))
                print(
                    f"{workload} run {run + 1} (seed {seed}): {name}: "
                    f"{results[name][-1]['train_samples_per_second']:.2f} samples/s, "
                    f"accuracy {results[name][-1].get('eval_accuracy')}",
                    file=sys.stderr,
                    flush=True,
                )
        on = f", {a.processes} processes" if a.processes > 1 else ""
        report += [f"\n### {workload}{on}: {WORKLOADS[workload]}\n", table(results, peaks, bf16_emulated)]
    text = "\n".join(report) + "\n"
    print(text)
    if a.write:
        with open(a.write, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
