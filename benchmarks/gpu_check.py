r"""One GPU check: everything the first GPU user would run, on one GPU, each result on disk the moment it is measured.

    python benchmarks/gpu_check.py [--out gpu_check.jsonl]       # one CUDA GPU, no network, a few minutes
    python benchmarks/gpu_check.py --cpu [--out FILE]             # the same plumbing on CPU, tiny model, < 2 minutes
    python benchmarks/gpu_check.py --only fsdp_x1,doctor_sharded  # some rows again

Every row is one JSON line {"name", "status": "ok" | "failed" | "skipped", "seconds", "details"}, appended to --out
and flushed to disk as soon as it is measured, so a time limit or a kill still leaves every row done before it.
Rows, in order (GPU mode; --cpu runs the same code with cpu.yaml / cpu_2proc.yaml, and skips, saying why, what needs
CUDA):
  environment             versions, device, bf16; stops here if CUDA (or a package train.py needs) is missing
  one_device_bf16_reload  gpu.yaml, bf16: train a tiny BERT, then reload the saved model in plain transformers
  fp16_overflow_skips     fp16 with a model whose gradients overflow at the start: skipped steps are counted and
                          the learning-rate schedule does not advance on them
  compile_tf32_false      --torch_compile --tf32 false --mixed_precision no: both TF32 switches stay off after the run
  preempt_resume          SIGUSR1 mid-run -> checkpoint, exit 75 -> --resume_from_checkpoint latest ends the run
  fsdp_x1                 fsdp.yaml, 1 process: train with a checkpoint, resume from it, reload the saved model, and
                          `tuneloop evaluate` it under FSDP
  zero3_x1                deepspeed_zero3.yaml, 1 process: train, reload (skipped when deepspeed is not installed)
  lora_fsdp_x1            fsdp.yaml, 1 process: --use_peft --activation_checkpointing --dtype bfloat16; reload the
                          merged model in plain transformers, `tuneloop evaluate` the adapter folder under FSDP
  doctor_one_device       the doctor on gpu.yaml (with `accelerate test`)
  doctor_sharded          the doctor on fsdp.yaml --num_processes 1 (the probe; `accelerate test` left to the row above)
  throughput_*            a bert-base-sized model built from a config (no download), bf16, 128 and 512 tokens (no
                          padding): tuneloop and transformers' Trainer (benchmarks/trainer_peer.py), each in a fresh
                          process, in one run: samples/s, MFU (the datasheet peak), peak memory
Exit status 0 when no row failed.

No network, no Hub and no offline model or corpus packages: the models are built from configs with a word-level
tokenizer, the data is generated. What it does need is train.py's own dependencies. On a GPU image with torch,
transformers and accelerate but not the rest (the lent GPU machines have no datasets, evaluate or deepspeed), carry
wheels for: datasets (with pyarrow, dill, xxhash, multiprocess, pandas), evaluate, scikit-learn (scipy, joblib,
threadpoolctl), matplotlib, and deepspeed for the ZeRO-3 row; `pip install --no-index --find-links wheels/ ...`.
Run from the repository root with PYTHONPATH=src (or tuneloop installed). The environment row names what is missing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

NEEDED = (
    "transformers",
    "accelerate",
    "datasets",
    "evaluate",
    "sklearn",
    "matplotlib",
    "yaml",
)  # what train.py imports
# Three topics, each signalled by one of its keywords hidden among filler words (as tests/conftest.py's toy task).
KEYWORDS = {
    "sports": ["goal", "match", "team"],
    "tech": ["chip", "software", "robot"],
    "music": ["song", "album", "band"],
}
FILLER = "the a of and to in was is on for with that this it at by from new year said people".split()


class Skipped(Exception):
    """The row cannot apply here; the message says why."""


class CheckFailed(Exception):
    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


def expect(condition: bool, message: str, **details) -> None:
    if not condition:
        raise CheckFailed(message, **details)


class Check:
    """What every row uses: the mode, a work folder, the tiny model and toy data, the subprocess environment."""

    def __init__(self, cpu: bool, work: Path):
        self.cpu, self.work = cpu, work
        self.device = "cpu" if cpu else "cuda"
        self.one_device = "cpu.yaml" if cpu else "gpu.yaml"
        self.timeout = 300 if cpu else 600
        self.env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would turn engines off
        self.env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            WANDB_MODE="disabled",
            TOKENIZERS_PARALLELISM="false",
        )
        self._tiny_model = self._files = None

    @property
    def tiny_model(self) -> str:
        if self._tiny_model is None:
            self._tiny_model = make_model(self.work / "tiny-bert", hidden=32, layers=2, heads=2, intermediate=64)
        return self._tiny_model

    @property
    def files(self) -> dict[str, str]:
        if self._files is None:
            self._files = {
                "train_file": write_csv(self.work / "train.csv", toy_rows(240, seed=1)),
                "validation_file": write_csv(self.work / "validation.csv", toy_rows(45, seed=2)),
            }
        return self._files

    def run(self, command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=self.timeout, env=self.env, cwd=ROOT, **kwargs
        )
        expect(result.returncode == 0, f"{what} exited with status {result.returncode}: {last_error(result)}")
        return result

    def launch(
        self, config: str, args: list[str], *flags: str, what: str = "training", program: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        """`accelerate launch --config_file accelerate_configs/<config> [flags] train.py args`, as a user types it."""
        program = program or (str(ROOT / "train.py"),)
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / config),
            *flags,
            *program,
            *args,
        ]
        return self.run(command, what)


def last_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "tuneloop: error:" in line]
    return (errors[0] if errors else " | ".join(lines[-4:]))[:1500]


# ---- tiny models and generated data ---------------------------------------------------------------------------------


def make_model(
    folder: Path,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int = 128,
    classifier_std: float | None = None,
) -> str:
    """A random BERT with a word-level tokenizer over the toy vocabulary, saved as a model folder (no download).

    `classifier_std`: save a 3-class classifier whose weights have this spread (large: fp16 gradients overflow)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in KEYWORDS.values() for w in ws)]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, model_max_length=max_positions).save_pretrained(
        folder
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if classifier_std is None:
        BertModel(config).save_pretrained(folder)
    else:
        names = sorted(KEYWORDS)
        config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
        model = BertForSequenceClassification(config)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, classifier_std)
        model.save_pretrained(folder)
    return str(folder)


def bert_base(folder: Path) -> str:
    """BERT-base's shape (12 layers, 768 wide, 12 heads, 3072 FFN, 110 M parameters with its 30,522-word vocabulary),
    random weights, the toy tokenizer: the FLOPs of bert-base per token."""
    from transformers import BertConfig, BertModel

    make_model(folder, hidden=32, layers=1, heads=1, intermediate=32, max_positions=512)  # the tokenizer
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(folder)  # BertConfig's defaults are bert-base-uncased's
    return str(folder)


def toy_rows(n: int, seed: int, words: tuple[int, int] = (4, 14)) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(KEYWORDS)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        text = rng.choices(FILLER, k=rng.randint(*words))
        text.insert(rng.randint(0, len(text)), rng.choice(KEYWORDS[label]))
        rows.append({"text": " ".join(text), "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def train_args(model: str, files: dict[str, str], output_dir: Path, **overrides) -> list[str]:
    """train.py arguments for a fast run on the toy task (240 rows, batch 8: 30 steps per epoch; it reaches about 1.0
    accuracy in 6 epochs, so few borderline samples are left to flip between precisions)."""
    options = {
        "model_name_or_path": model,
        **files,
        "output_dir": str(output_dir),
        "max_length": 32,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-3,
        "num_train_epochs": 6,
        "logging_steps": 5,
        "warmup_steps": 0,
        "seed": 0,
        **overrides,
    }
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def read_json(path) -> dict | list:
    return json.loads(Path(path).read_text())


def plain_transformers_accuracy(model_dir, validation_file: str, precision: str) -> float:
    """Load the saved model as any user would, in this process on CPU, and score it on the validation file in the
    run's precision (a tiny model has borderline samples that bf16 and fp32 logits decide differently)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(validation_file, newline="") as f:
        rows = list(csv.DictReader(f))
    inputs = tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        predictions = model(**inputs).logits.argmax(dim=-1)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return (predictions == labels).float().mean().item()


def same_within_one_sample(a: float, b: float, n: int) -> bool:
    """Accuracies of one model scored by the run and reloaded here: the same precision, but another device, batching
    and padding, so one borderline sample may flip."""
    return abs(round(a * n) - round(b * n)) <= 1


def logged_losses(output_dir) -> dict[int, float]:
    return {e["step"]: e["train/loss"] for e in read_json(Path(output_dir) / "log_history.json") if "train/loss" in e}


# ---- the rows ------------------------------------------------------------------------------------------------------


def environment(c: Check) -> dict:
    details = {
        "mode": "cpu" if c.cpu else "gpu",
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("transformers", "accelerate", "datasets", "evaluate", "deepspeed"):
        try:
            details[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            details[name] = None
    if torch.cuda.is_available():
        details["gpus"] = [
            f"{torch.cuda.get_device_name(i)}, capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))}, "
            f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB"
            for i in range(torch.cuda.device_count())
        ]
        details["bf16_in_hardware"] = torch.cuda.is_bf16_supported(including_emulation=False)
    missing = [name for name in NEEDED if not can_import(name)]
    expect(
        not missing,
        f"train.py cannot run: {', '.join(missing)} not installed (carry their wheels: see this script's docstring)",
        **details,
    )
    expect(c.cpu or torch.cuda.is_available(), "no CUDA device: run on a GPU machine, or with --cpu", **details)
    return details


def can_import(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def one_device_bf16_reload(c: Check) -> dict:
    out = c.work / "bf16"
    c.launch(c.one_device, train_args(c.tiny_model, c.files, out, mixed_precision="bf16"))
    results = read_json(out / "all_results.json")
    ran = (results["distributed_type"], results["num_processes"], results["device"], results["mixed_precision"])
    expect(ran == ("NO", 1, c.device, "bf16"), f"ran as {ran}", results=results)
    expect(results["eval_accuracy"] > 0.45, "it did not learn (chance is 1/3)", eval_accuracy=results["eval_accuracy"])
    reloaded = plain_transformers_accuracy(out, c.files["validation_file"], "bf16")
    details = {
        "config": c.one_device,
        "eval_accuracy": results["eval_accuracy"],
        "reloaded_accuracy": reloaded,
        "train_samples_per_second": results["train_samples_per_second"],
    }
    expect(
        same_within_one_sample(reloaded, results["eval_accuracy"], 45),
        "the reloaded model scores differently from the run's own evaluation",
        **details,
    )
    return details


def fp16_overflow_skips(c: Check) -> dict:
    if c.cpu:
        raise Skipped(
            "fp16 loss scaling needs CUDA: Accelerate builds no GradScaler on CPU (fp16 runs in fp32 there); "
            "tests cover the skip detection with torch.amp.GradScaler('cpu')"
        )
    # Classifier weights with spread 50: the loss stays finite, but with GradScaler's first scale (65536) the fp16
    # gradients overflow, so the first several steps are skipped while the scale halves (8 of them in a CPU
    # simulation with autocast fp16 and GradScaler('cpu')).
    model = make_model(c.work / "overflow-bert", hidden=32, layers=2, heads=2, intermediate=64, classifier_std=50.0)
    out, steps, learning_rate = c.work / "fp16", 30, 1e-3
    c.launch(
        c.one_device,
        train_args(
            model,
            c.files,
            out,
            mixed_precision="fp16",
            max_steps=steps,
            learning_rate=learning_rate,
            logging_steps=1,
            lr_scheduler_type="linear",
        ),
    )
    results = read_json(out / "all_results.json")
    skipped = results.get("skipped_steps", 0)
    logged = [e["train/skipped_steps"] for e in read_json(out / "log_history.json") if "train/skipped_steps" in e]
    # A linear schedule without warmup that advanced only on the steps that ran ends at lr * skipped / steps.
    details = {
        "skipped_steps": skipped,
        "logged_skipped_steps": logged[-1] if logged else None,
        "final_learning_rate": results["final_learning_rate"],
        "expected_final_learning_rate": learning_rate * skipped / steps,
    }
    expect(skipped > 0, "no skipped step reported although the gradients overflowed", **details)
    expect(logged and logged[-1] == skipped, "train/skipped_steps disagrees with the final count", **details)
    expect(
        abs(results["final_learning_rate"] - learning_rate * skipped / steps) <= 1e-6 * learning_rate,
        "the learning-rate schedule advanced on skipped steps",
        **details,
    )
    return details


TF32_DRIVER = """import json, sys, torch
from tuneloop.config import parse_args
from tuneloop.loop import train
results = train(parse_args(sys.argv[1:]))
print("gpu_check:" + json.dumps({"matmul": torch.backends.cuda.matmul.allow_tf32,
                                 "cudnn": torch.backends.cudnn.allow_tf32, "global_step": results["global_step"],
                                 "time_to_first_step": results["time_to_first_step"]}))
"""


def compile_tf32_false(c: Check) -> dict:
    if c.cpu:
        raise Skipped(
            "TF32 exists on CUDA only (Accelerate turns it on under torch.compile only for CUDA devices); "
            "--torch_compile itself is tested on CPU by tests/test_throughput.py"
        )
    out = c.work / "compile"
    args = train_args(
        c.tiny_model,
        c.files,
        out,
        torch_compile="true",
        tf32="false",
        mixed_precision="no",
        max_steps=20,
        eval_strategy="no",
    )
    result = c.run([sys.executable, "-c", TF32_DRIVER, *args], "training with --torch_compile")
    seen = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("gpu_check:"))[10:])
    expect(not seen["matmul"] and not seen["cudnn"], "--tf32 false but TF32 was on after the run", **seen)
    reloaded = plain_transformers_accuracy(out, c.files["validation_file"], "no")  # no compiled-module key names
    return {**seen, "reloaded_accuracy": reloaded}


def preempt_resume(c: Check) -> dict:
    from tuneloop import checkpoint
    from tuneloop.preemption import REQUEUE_EXIT_CODE

    out, steps = c.work / "preempt", 120 if c.cpu else 400
    args = train_args(
        c.tiny_model,
        c.files,
        out,
        max_steps=steps,
        save_strategy="steps",
        save_steps=10,
        logging_steps=1,
        eval_strategy="no",
        do_eval="false",
    )
    command = [sys.executable, str(ROOT / "train.py"), *args]  # one process, as gpu.yaml runs it
    with open(c.work / "preempt.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=c.env, cwd=ROOT)
        deadline = time.monotonic() + c.timeout
        while not checkpoint.complete_checkpoints(str(out)):
            expect(
                proc.poll() is None,
                "the run ended before its first checkpoint",
                log=(c.work / "preempt.log").read_text()[-1500:],
            )
            expect(time.monotonic() < deadline, "no checkpoint in time")
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=120)
    marker = read_json(out / "preempted.json") if (out / "preempted.json").is_file() else {}
    details = {"exit_status": code, "stopped_at_step": marker.get("step"), "planned_steps": steps}
    expect(
        code == REQUEUE_EXIT_CODE,
        f"exit status {code}, not {REQUEUE_EXIT_CODE}",
        log=(c.work / "preempt.log").read_text()[-1500:],
        **details,
    )
    expect(
        marker.get("signal") == "SIGUSR1" and os.path.isdir(marker.get("checkpoint", "")) and marker["step"] < steps,
        "no usable preempted.json marker",
        marker=marker,
    )
    c.run([*command, "--resume_from_checkpoint", "latest"], "the resumed run")
    results = read_json(out / "all_results.json")
    details["resumed_global_step"] = results["global_step"]
    expect(
        results["global_step"] == steps and not (out / "preempted.json").exists(),
        "the resumed run did not end the planned run",
        **details,
    )
    expect(sorted(logged_losses(out)) == list(range(1, steps + 1)), "some step was lost or logged twice", **details)
    return details


def fsdp_x1(c: Check) -> dict:
    if c.cpu:
        raise Skipped(
            "FSDP needs CUDA: Accelerate enables it only for GPU process groups (tuneloop refuses it on CPU); "
            "tests/test_engines.py checks fsdp.yaml as the launcher parses it and the evaluation-only branch"
        )
    first, resumed, evaluated = c.work / "fsdp", c.work / "fsdp-resumed", c.work / "fsdp-evaluate"
    common = dict(max_steps=30, save_strategy="steps", save_steps=10, logging_steps=1, eval_strategy="no")
    c.launch("fsdp.yaml", train_args(c.tiny_model, c.files, first, **common), "--num_processes", "1")
    results = read_json(first / "all_results.json")
    expect((results["distributed_type"], results["num_processes"]) == ("FSDP", 1), "not FSDP x1", results=results)
    saved = first / "checkpoints" / "step_0000010"
    expect(saved.is_dir(), f"no checkpoint {saved}")
    c.launch(
        "fsdp.yaml",
        [*train_args(c.tiny_model, c.files, resumed, **common), "--resume_from_checkpoint", str(saved)],
        "--num_processes",
        "1",
        what="the resumed run",
    )
    expected, got = logged_losses(first), logged_losses(resumed)
    worst = max(abs(expected[s] - got.get(s, float("inf"))) / max(1.0, abs(expected[s])) for s in expected if s > 10)
    reloaded = plain_transformers_accuracy(first, c.files["validation_file"], "bf16")  # fsdp.yaml's precision
    c.launch(
        "fsdp.yaml",
        ["--model", str(first), "--data", c.files["validation_file"], "--output_dir", str(evaluated)],
        "--num_processes",
        "1",
        what="tuneloop evaluate",
        program=("-m", "tuneloop", "evaluate"),
    )
    scored = read_json(evaluated / "all_results.json")
    details = {
        "eval_accuracy": results["eval_accuracy"],
        "reloaded_accuracy": reloaded,
        "evaluate_accuracy": scored["eval_accuracy"],
        "evaluate_distributed_type": scored["distributed_type"],
        "resume_worst_relative_loss_difference": worst,
    }
    expect(worst <= 1e-3, "the resumed run's losses differ from the first run's", **details)
    expect(
        same_within_one_sample(reloaded, results["eval_accuracy"], 45),
        "the reloaded model scores differently",
        **details,
    )
    expect(
        scored["distributed_type"] == "FSDP"
        and same_within_one_sample(scored["eval_accuracy"], results["eval_accuracy"], 45),
        "`tuneloop evaluate` under FSDP scores differently",
        **details,
    )
    return details


def zero3_x1(c: Check) -> dict:
    if c.cpu:
        raise Skipped(
            "ZeRO-3 on CPU needs 2 gloo processes (deepspeed_zero3_cpu.yaml) and compiles a DeepSpeed op on "
            "first use (~45 s): tests/test_engines.py runs it; this mode stays under 2 minutes"
        )
    if not can_import("deepspeed"):
        raise Skipped("deepspeed is not installed (carry its wheel to run this row)")
    out = c.work / "zero3"
    c.launch("deepspeed_zero3.yaml", train_args(c.tiny_model, c.files, out), "--num_processes", "1")
    results = read_json(out / "all_results.json")
    expect(
        (results["distributed_type"], results["num_processes"]) == ("DEEPSPEED", 1), "not DeepSpeed x1", results=results
    )
    reloaded = plain_transformers_accuracy(out, c.files["validation_file"], "bf16")  # the config's precision
    details = {"eval_accuracy": results["eval_accuracy"], "reloaded_accuracy": reloaded}
    expect(
        same_within_one_sample(reloaded, results["eval_accuracy"], 45),
        "the reloaded model scores differently",
        **details,
    )
    return details


def lora_fsdp_x1(c: Check) -> dict:
    """LoRA + activation checkpointing under FSDP (FSDP's own checkpoint wrapper), bf16 base weights: the merged model
    loads in plain transformers and scores what training scored; the adapter folder evaluates the same."""
    if c.cpu:
        raise Skipped(
            "FSDP needs CUDA; tests/test_peft.py runs LoRA + activation checkpointing on 1 process, DDP, "
            "ZeRO-2 and ZeRO-3 on CPU"
        )
    out, evaluated = c.work / "lora-fsdp", c.work / "lora-fsdp-evaluate"
    c.launch(
        "fsdp.yaml",
        train_args(
            c.tiny_model,
            c.files,
            out,
            use_peft="true",
            activation_checkpointing="true",
            dtype="bfloat16",
            learning_rate=1e-2,
            lora_dropout=0.0,
            eval_strategy="no",
        ),
        "--num_processes",
        "1",
    )
    results = read_json(out / "all_results.json")
    expect((results["distributed_type"], results["num_processes"]) == ("FSDP", 1), "not FSDP x1", results=results)
    reloaded = plain_transformers_accuracy(out, c.files["validation_file"], "bf16")
    c.launch(
        "fsdp.yaml",
        ["--model", str(out / "adapter"), "--data", c.files["validation_file"], "--output_dir", str(evaluated)],
        "--num_processes",
        "1",
        what="tuneloop evaluate of the adapter",
        program=("-m", "tuneloop", "evaluate"),
    )
    scored = read_json(evaluated / "all_results.json")
    details = {
        "eval_accuracy": results["eval_accuracy"],
        "eval_loss": results["eval_loss"],
        "reloaded_accuracy": reloaded,
        "adapter_evaluate_accuracy": scored["eval_accuracy"],
    }
    expect(results["eval_loss"] < 1.09, "LoRA did not lower the loss below the uniform guess's (ln 3)", **details)
    expect(
        same_within_one_sample(reloaded, results["eval_accuracy"], 45), "the merged model scores differently", **details
    )
    expect(
        same_within_one_sample(scored["eval_accuracy"], results["eval_accuracy"], 45),
        "the adapter folder scores differently",
        **details,
    )
    return details


def run_doctor(c: Check, config: str, flags: list[str], seen: str) -> dict:
    result = c.run(
        [sys.executable, "-m", "tuneloop.doctor", "--config_file", str(CONFIGS / config), *flags], "the doctor"
    )
    lines = [line.strip() for line in result.stdout.splitlines()]
    details = {
        "config": config,
        "flags": flags,
        "probe": next((line for line in lines if line.startswith("ok:")), None),
        "accelerate_test": next((line for line in lines if line.startswith(("passed", "attempt"))), None),
    }
    expect(
        f"ok: {seen}" in result.stdout and "doctor: all checks passed" in result.stdout,
        f"the doctor's probe did not report {seen}",
        **details,
    )
    return details


def doctor_one_device(c: Check) -> dict:
    # On CPU `accelerate test` would add about 20 s to a mode that must stay under 2 minutes; the engine tests run it.
    return run_doctor(c, c.one_device, ["--skip_accelerate_test"] if c.cpu else [], f"NO x1 on {c.device}")


def doctor_sharded(c: Check) -> dict:
    # The 8-process config on one device, through the doctor's --num_processes; `accelerate test` ran in the row above.
    config, seen = ("cpu_2proc.yaml", "MULTI_CPU x1 on cpu") if c.cpu else ("fsdp.yaml", "FSDP x1 on cuda")
    return run_doctor(c, config, ["--num_processes", "1", "--skip_accelerate_test"], seen)


def throughput_rows(c: Check) -> list[tuple[str, callable]]:
    """tuneloop and Trainer at each length, alternating, each in a fresh process, on the same model and data."""
    lengths = (64,) if c.cpu else (128, 512)
    batch, steps = (8, 20) if c.cpu else (32, 100)
    shared = {}

    def setup(length: int) -> tuple[str, str]:
        if "model" not in shared:
            shared["model"] = (
                make_model(c.work / "tiny-wide", hidden=64, layers=2, heads=2, intermediate=128, max_positions=128)
                if c.cpu
                else bert_base(c.work / "bert-base")
            )
        if length not in shared:  # every text longer than the length: truncated, so every token is real
            # tuneloop and Trainer hold out 20% (the default split) for evaluation: the rest covers every step.
            rows = toy_rows(int(batch * steps / 0.8) + batch, seed=3, words=(length + 8, length + 16))
            shared[length] = write_csv(c.work / f"long-{length}.csv", rows)
        return shared["model"], shared[length]

    def tuneloop_row(length: int):
        def row(c: Check) -> dict:
            model, data = setup(length)
            out = c.work / f"throughput-{length}"
            args = [
                "--model_name_or_path",
                model,
                "--train_file",
                data,
                "--output_dir",
                str(out),
                "--max_length",
                str(length),
                "--per_device_train_batch_size",
                str(batch),
                "--max_steps",
                str(steps),
                "--do_eval",
                "false",
                "--mixed_precision",
                "bf16",
                "--learning_rate",
                "1e-4",
                "--logging_steps",
                str(steps),
            ]
            c.launch(c.one_device, args)
            r = read_json(out / "all_results.json")
            return {
                "samples_per_second": r["train_samples_per_second"],
                "mfu": r["mfu"],
                "model_tflops_per_second": r["model_tflops_per_second"],
                "peak_memory_gib": r["peak_memory_gib"],
                "padding_fraction": r["padding_fraction"],
                "batch": batch,
                "steps": steps,
            }

        return row

    def trainer_row(length: int):
        def row(c: Check) -> dict:
            from tuneloop import throughput

            model, data = setup(length)
            result = c.run(
                [
                    sys.executable,
                    str(ROOT / "benchmarks" / "trainer_peer.py"),
                    "--train_file",
                    data,
                    "--model_name_or_path",
                    model,
                    "--max_length",
                    str(length),
                    "--max_steps",
                    str(steps),
                    "--padding",
                    "longest",
                    "--bf16",
                    "--batch_size",
                    str(batch),
                    "--learning_rate",
                    "1e-4",
                ],
                "Trainer",
            )
            r = json.loads(result.stdout.strip().splitlines()[-1])
            peak = throughput.peak_tflops(torch.device(c.device), "bf16", None)
            return {
                "samples_per_second": round(r["train_samples_per_second"], 3),
                "mfu": round(r["model_tflops_per_second"] / peak, 4) if peak else None,
                "model_tflops_per_second": round(r["model_tflops_per_second"], 4),
                "peak_memory_gib": round(r["peak_memory_gib"], 3),
                "batch": batch,
                "steps": steps,
            }

        return row

    return [
        (f"throughput_{loop}_{length}", make(length))
        for length in lengths
        for loop, make in (("tuneloop", tuneloop_row), ("trainer", trainer_row))
    ]


def all_rows(c: Check) -> list[tuple[str, callable]]:
    return [
        ("environment", environment),
        ("one_device_bf16_reload", one_device_bf16_reload),
        ("fp16_overflow_skips", fp16_overflow_skips),
        ("compile_tf32_false", compile_tf32_false),
        ("preempt_resume", preempt_resume),
        ("fsdp_x1", fsdp_x1),
        ("zero3_x1", zero3_x1),
        ("lora_fsdp_x1", lora_fsdp_x1),
        ("doctor_one_device", doctor_one_device),
        ("doctor_sharded", doctor_sharded),
        *throughput_rows(c),
    ]


# ---- running and recording -----------------------------------------------------------------------------------------


def write_row(path: Path, row: dict) -> None:
    """Append one row and put it on disk now: a kill or a time limit after this keeps it."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def measure(c: Check, name: str, row) -> dict:
    start = time.perf_counter()
    try:
        status, details = "ok", row(c)
    except Skipped as e:
        status, details = "skipped", {"reason": str(e)}
    except CheckFailed as e:
        status, details = "failed", {"error": str(e), **e.details}
    except Exception as e:  # a bug or an unexpected library error: recorded as this row's failure, the rest go on
        status, details = "failed", {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    return {"name": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "details": details}


def throughput_table(rows: list[dict]) -> str:
    lines = ["| row | samples/s | MFU | peak memory (GiB) |", "| --- | --- | --- | --- |"]
    for row in rows:
        if row["name"].startswith("throughput_") and row["status"] == "ok":
            d = row["details"]
            lines.append(f"| {row['name']} | {d['samples_per_second']} | {d['mfu']} | {d['peak_memory_gib']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU configs, a tiny model: checks the plumbing")
    parser.add_argument("--out", default="gpu_check.jsonl", help="JSON lines file the rows are appended to")
    parser.add_argument("--only", help="comma-separated row names to run (environment always runs)")
    parser.add_argument("--workdir", help="keep the runs' folders here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tuneloop-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    c = Check(args.cpu, work)
    rows = all_rows(c)
    wanted = set(args.only.split(",")) | {"environment"} if args.only else {name for name, _ in rows}
    unknown = wanted - {name for name, _ in rows}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(name for name, _ in rows)}")
    done = []
    try:
        for name, row in rows:
            if name not in wanted:
                continue
            result = measure(c, name, row)
            write_row(Path(args.out), result)
            done.append(result)
            shown = result["details"].get("reason") or result["details"].get("error") or ""
            print(f"{result['status']:7} {name} ({result['seconds']} s) {shown}"[:300], flush=True)
            if name == "environment" and result["status"] == "failed":
                break  # nothing else can run
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(throughput_table(done))
    return 1 if any(r["status"] == "failed" for r in done) else 0


if __name__ == "__main__":
    sys.exit(main())
