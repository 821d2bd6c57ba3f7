"""Set-up for every command: the plan of a run, its `Run`, and `setup`, which builds it and prepares it once.

Reads top to bottom: the checkpoint to resume and the Accelerator, the output folder, then the data (splits, the
problem they pose, tokenized sets, dataloaders), then the model and the engine (weights, optimizer, schedule,
`accelerator.prepare`, the checkpoint's state). Cheap checks come first, weights last. Training, `tuneloop evaluate`
and `tuneloop predict` all start here: what is built follows do_train / do_eval / do_predict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers.utils import logging as hf_logging

from tuneloop import (
    batches,
    checkpoint,
    cpu_speedups,
    data,
    elastic,
    engines,
    lora,
    metrics,
    optim,
    outputs,
    predict,
    runtime,
    sources,
    stream,
    throughput,
    tracking,
)
from tuneloop import (
    model as models,
)
from tuneloop import (
    problem as problems,
)
from tuneloop.errors import UserError
from tuneloop.optim import make_scheduler
from tuneloop.options import Config, DataArguments, TrainArguments
from tuneloop.preemption import StopRequest
from tuneloop.runtime import say


@dataclass
class Plan:
    """Step counts derived once from the prepared dataloader (per process), never written back into the config."""

    steps_per_epoch: int  # a stream's: estimated from its row count; 0 when unknown (--max_steps alone)
    total_steps: int
    num_epochs: int | None  # None: unknown (a stream of unknown length)
    warmup_steps: int
    # The epochs the loop may begin: num_epochs, or for a stream as many as the steps need (its epochs may be shorter
    # than estimated: StreamLoader ends each one at the first step some rank cannot fill)
    epoch_limit: int | None = None

    @property
    def epochs_to_run(self) -> int:
        return self.epoch_limit or self.num_epochs


def make_plan(num_batches: int, t: TrainArguments) -> Plan:
    steps_per_epoch = math.ceil(num_batches / t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup_steps = t.get_warmup_steps(total_steps)
    return Plan(steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch), warmup_steps)


def make_stream_plan(rows: int | None, t: TrainArguments, processes: int) -> Plan:
    """A training stream's plan: --max_steps, else --num_train_epochs of the steps its `rows` make (--train_rows or
    --count_rows) when each process takes full steps of an equal share. The loop runs epochs until the steps are done.
    """
    rows_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps  # on each process
    steps_per_epoch = rows // processes // rows_per_step if rows else 0
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    if total_steps == 0:
        raise UserError(
            f"the training stream's {rows} rows make no optimizer step: each of {processes} process(es) needs "
            f"{rows_per_step} rows (--per_device_train_batch_size x --gradient_accumulation_steps) for one"
        )
    num_epochs = math.ceil(total_steps / steps_per_epoch) if steps_per_epoch else None
    return Plan(steps_per_epoch, total_steps, num_epochs, t.get_warmup_steps(total_steps), epoch_limit=total_steps)


@dataclass
class Training:
    """What only a training job has, prepared by Accelerate; a run that only evaluates or predicts has none."""

    train_dl: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    plan: Plan
    state: checkpoint.TrainerState  # the run's progress, continued from the checkpoint when resuming
    rank_state: dict | None  # this process's running sums, when resuming
    train_size: int | None  # training examples (a stream's row count; None when unknown)
    texts_in_train: dict | None  # per eval set: how many of its texts are training texts too
    peak_tflops: float | None  # the device's peak for the precision in use, for MFU
    samples: batches.SampleIdLog  # which examples each step used (a debugging aid, off by default)
    stop: StopRequest | None = None  # the job's stop signals, connected by `loop.train`
    session: object = None  # the loop's `Session` (live counters), once `fit` has begun

    def epoch_used_up(self) -> bool:
        """Whether this epoch's data is used up: a stream says so (its ranks agreed that it ended), a loaded split's
        loader by its length."""
        if isinstance(self.train_dl, stream.StreamLoader):
            return self.train_dl.ended
        return self.state.batches_in_epoch >= len(self.train_dl)


@dataclass
class Run:
    """Everything a command works with, built once by `setup` and prepared by Accelerate. Private to set-up and the
    loop: the other modules are handed the pieces they use."""

    config: Config
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: object
    class_names: list[str]  # the model's classes, in id order (regression: its targets)
    metric_modules: dict
    problem: problems.Problem  # what the labels are: the loss, and how logits are read
    # The eval sets' loaders by metric prefix: {"eval": loader} for one set, {"eval_<name>": loader, ...} for several
    # (--validation_file / --validation_split naming several); empty when neither training nor evaluating.
    eval_dls: dict
    test_dl: object  # with --do_predict: the test split, each example carrying its position; else None
    test_split: data.Splits | None
    started_at: float  # perf_counter() when set-up began
    training: Training | None  # None when only evaluating / predicting


def setup(config: Config) -> Run:
    """Build what the run needs, cheap checks first (output folder, checkpoint, model config, data), weights last, and
    `accelerator.prepare` it once."""
    started_at = time.perf_counter()
    # The checkpoint is read before the Accelerator is built: its gradient accumulation is fixed then, and an elastic
    # resume (another process count) may have to choose a new one.
    config, resume_from, state, notes = resume_plan(config)
    m, d, t = config.model, config.data, config.train
    accelerator = start_accelerator(t, state, notes, resuming=resume_from is not None)
    start_output_folder(accelerator, config, state)
    model_config = check_model_config(accelerator, config)

    # The data: splits, the problem they pose, tokenized sets, dataloaders.
    splits, test_split, class_names, problem = load_data(accelerator, config, model_config, resume_from, state)
    tokenizer = models.load_tokenizer(m, d.max_length)
    train_set, eval_sets, test_set, metric_modules = tokenize(
        accelerator, config, splits, test_split, tokenizer, problem
    )
    samples = batches.SampleIdLog(t.output_dir, accelerator.process_index)
    train_set = samples.tag(train_set) if train_set is not None else None
    train_dl, eval_dls, test_dl = make_dataloaders(
        accelerator, config, tokenizer, train_set, eval_sets, test_set, state
    )

    # The model and the engine.
    model = load_model(accelerator, config, class_names, tokenizer, problem)
    for line in splits.notes if splits else ():
        say(accelerator, line)
    training = None
    if t.do_train:
        model, eval_dls, training = start_training(
            accelerator, config, model, train_dl, eval_dls, splits, state, resume_from, samples
        )
        say_what_trains(accelerator, config, splits, class_names, problem, training.plan, state, resume_from)
    else:  # only evaluating and/or predicting: no optimizer, schedule or checkpoint
        model, *prepared = engines.prepare_for_evaluation(accelerator, model, *eval_dls.values())
        eval_dls = dict(zip(eval_dls, prepared))
    return Run(
        config,
        accelerator,
        model,
        tokenizer,
        class_names,
        metric_modules,
        problem,
        eval_dls,
        test_dl,
        test_split,
        started_at,
        training,
    )


def resume_plan(config: Config) -> tuple[Config, str | None, checkpoint.TrainerState, list[str]]:
    """Before the Accelerator: the checkpoint to resume (if any), the state to continue from, and the config this
    session trains with. On another process count (--elastic_resume) that config has the per-device batch and
    accumulation that keep the checkpoint's global batch. Also returns the lines to print once the Accelerator is up.

    Every process reads the same files here; nothing is written until the Accelerator exists."""
    t = config.train
    state = checkpoint.TrainerState(
        num_processes=runtime.launched_processes(),
        seed=t.seed,
        data_seed=t.data_seed,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        length_group_batch_size=t.per_device_train_batch_size,
        max_tokens_per_batch=t.max_tokens_per_batch,
    )
    notes = []
    if not t.do_train:
        return config, None, state, notes
    # Which run this is: a new one, or the one output_dir holds (refusing to mix two runs in one folder).
    path, state.tracker_run_id = outputs.choose_run(t, report=notes.append)
    state.settings = checkpoint.resume_settings(config)
    if path is None:
        if t.resume_from_checkpoint:
            notes.append(
                f"tuneloop: no checkpoint of this run in "
                f"{os.path.join(t.output_dir, checkpoint.CHECKPOINTS_DIR)}: starting from scratch"
            )
        return config, None, state, notes
    saved = checkpoint.read_state(path)
    resumed = elastic.resume_state(saved, state, path, t.elastic_resume)
    checkpoint.check_settings(saved, state.settings, path)
    if config.data.streaming:  # each dataloader worker's place in the stream is its own
        stream.check_resume_workers(path, t.dataloader_num_workers)
    resumed.settings = state.settings
    if resumed.num_processes != saved.num_processes:
        notes.append(
            f"tuneloop: elastic resume: {elastic.layout_of(saved)} -> {elastic.layout_of(resumed)} "
            f"(global batch {elastic.layout_of(resumed).global_batch} kept), "
            f"step {resumed.step}, epoch {resumed.epoch} at micro-batch {resumed.batches_in_epoch}"
        )
        config = dataclasses.replace(
            config,
            train=dataclasses.replace(
                t,
                per_device_train_batch_size=resumed.per_device_train_batch_size,
                gradient_accumulation_steps=resumed.gradient_accumulation_steps,
            ),
        )
    return config, path, resumed, notes


def start_accelerator(
    t: TrainArguments, state: checkpoint.TrainerState, notes: list[str], resuming: bool
) -> Accelerator:
    """The Accelerator, the CPU threads and kernels, the seed; prints the resume plan's notes."""
    accelerator = runtime.make_accelerator(t)
    if resuming and accelerator.num_processes != state.num_processes:  # the layout was chosen for WORLD_SIZE
        raise RuntimeError(
            f"the launcher announced {state.num_processes} processes (WORLD_SIZE), the Accelerator has "
            f"{accelerator.num_processes}"
        )
    for line in notes:
        say(accelerator, line)
    runtime.use_all_cpu_cores(accelerator)
    runtime.set_up_kernels(t, accelerator.device)
    if not accelerator.is_local_main_process:
        hf_logging.set_verbosity_error()
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        say(accelerator, "warning: fp16 on CPU runs in fp32 (no fast fp16 kernels); use --mixed_precision bf16")
    if emulated := runtime.emulated_bf16(accelerator.mixed_precision, accelerator.device.type):
        say(accelerator, f"warning: {emulated}")
    set_seed(t.seed)
    return accelerator


def start_output_folder(accelerator: Accelerator, config: Config, state: checkpoint.TrainerState) -> None:
    """Check the output folder, make it this run's, clear an interrupted session's leftovers, start the trackers."""
    t = config.train
    outputs.check_writable(t.output_dir)
    if t.do_train and accelerator.is_main_process:  # the folder's run is this one from now on
        outputs.record_run(t.output_dir, state.tracker_run_id)
    clean_after_interruption(accelerator, t)
    with checkpoint.writing(t.output_dir, t.output_dir, together=accelerator):  # the trackers start on the main process
        tracking.start(accelerator, config, state.tracker_run_id)


def clean_after_interruption(accelerator: Accelerator, t: TrainArguments) -> None:
    """Clear what an earlier, interrupted session left behind: half-written checkpoints and the requeue marker."""
    with checkpoint.writing(t.output_dir, t.output_dir, together=accelerator):
        if accelerator.is_main_process and t.do_train:
            checkpoint.clean_partial_checkpoints(t.output_dir)
            checkpoint.clear_preempted(t.output_dir)


def check_model_config(accelerator: Accelerator, config: Config):
    """The model's config (no weights yet), checked against the dtype and LoRA settings."""
    m, t = config.model, config.train
    model_config = models.load_config(m)
    if dtype_warning := models.check_dtype(m, model_config, accelerator, training=t.do_train):
        say(accelerator, dtype_warning)
    if m.use_peft and t.do_train:
        lora.check(m, model_config)
    return model_config


# ---- The data ----


def load_data(
    accelerator: Accelerator, config: Config, model_config, resume_from: str | None, state: checkpoint.TrainerState
) -> tuple[data.Splits | None, data.Splits | None, list[str], problems.Problem]:
    """The train/eval splits (when training or evaluating), the test split (when predicting), the class names and the
    problem they pose. A training job records its data settings in the state, checked against the checkpoint's."""
    m, d, t = config.model, config.data, config.train
    splits = None
    if d.streaming and t.do_train:  # a fine-tuned model trained further keeps its classes
        splits = stream.load_splits(accelerator, d, t.seed, m.num_labels, models.trained_label_names(model_config))
    elif t.do_train or (t.do_eval and not d.streaming):  # a streamed eval set is opened by `tokenize`, read as scored
        trained_classes = None if t.do_train else models.trained_label_names(model_config)  # a fine-tuned model's
        splits = data.load_splits(
            d,
            t.seed,
            m.num_labels,
            need_train=t.do_train,
            model_classes=trained_classes,
            model_problem_type=None if t.do_train else model_config.problem_type,
        )
    class_names = splits.label_names if splits else models.class_names(model_config)
    problem, lines = problems.make_problem(d, t, list(sources.eval_sources(d)), splits, model_config, class_names)
    for line in lines:
        say(accelerator, line)
    if t.do_train:  # the data, its labels and problem type: recorded in every checkpoint, checked on resume
        trained_on = checkpoint.data_settings(splits, problem.problem_type)
        if resume_from:
            checkpoint.check_settings(checkpoint.read_state(resume_from), trained_on, resume_from)
        state.settings = {**state.settings, **trained_on}
    # A streamed test set is opened by `tokenize` and read as it is predicted on.
    test_split = (
        data.load_test_split(d, class_names, problem.problem_type) if t.do_predict and not d.streaming else None
    )
    if average_problem := problem.average_problem(t.metric_average):
        raise UserError(average_problem)
    return splits, test_split, class_names, problem


def tokenize(
    accelerator: Accelerator,
    config: Config,
    splits: data.Splits | None,
    test_split: data.Splits | None,
    tokenizer,
    problem: problems.Problem,
) -> tuple:
    """The tokenized train set (when training), eval sets and test set, and the metric modules; the main process
    first, so the others read its cache."""
    m, d, t = config.model, config.data, config.train
    with accelerator.main_process_first():
        train_set = None
        if t.do_train and splits.stream is not None:  # tokenized as it is read
            train_set = stream.train_examples(accelerator, splits, tokenizer, d, t, problems.of(problem.problem_type))
        elif t.do_train:
            train_set = data.tokenize(splits.train, splits, tokenizer, d)
        # Only evaluating (`tuneloop evaluate --streaming`): this rank's part of each streamed eval set, checked on
        # its first row, tokenized as it is read. A training stream's eval sets are loaded (stream.load_splits):
        # they name the classes with the stream's first rows.
        if d.streaming and not t.do_train:
            eval_sets = streamed_eval_sets(accelerator, d, problem) if t.do_eval else {}
        else:
            eval_sets = (
                {name: data.tokenize(split, splits, tokenizer, d) for name, split in splits.eval_sets.items()}
                if splits
                else {}
            )
        if d.streaming:  # a streamed test set: this rank's part, read as it is predicted on
            test_set = (
                predict.open_streamed_set(
                    d.test_file or d.dataset_name, d.test_split, "test", d, problem, accelerator, scored=False
                )
                if t.do_predict
                else None
            )
        else:
            test_set = data.tokenize(test_split.test, test_split, tokenizer, d) if test_split else None
        metric_modules = metrics.load_metrics(
            problems.metric_names(problem.problem_type, t.metrics), trust_remote_code=m.trust_remote_code
        )
    return train_set, eval_sets, test_set, metric_modules


def streamed_eval_sets(accelerator: Accelerator, d: DataArguments, problem: problems.Problem) -> dict:
    """With --streaming: this rank's part of each eval set, by name: the files of --validation_file (a file, a folder
    or a glob each), else the --validation_split splits of --dataset_name, else its "validation" split. A stream has
    no held-out share: training on files names its eval set."""
    named = sources.eval_sources(d)
    if not named and d.train_file:
        raise UserError(
            "--streaming takes no held-out share of the training files for evaluation: name the eval set with "
            "--validation_file, or pass --do_eval false"
        )
    if d.validation_file:
        wanted = {name: (path, "validation") for name, path in named.items()}
    else:
        wanted = {name: (d.dataset_name, split) for name, split in (named or {"validation": "validation"}).items()}
    shown = {name: name if len(wanted) > 1 else "eval" for name in wanted}  # a single eval set is "the eval set"
    return {
        name: predict.open_streamed_set(source, split, shown[name], d, problem, accelerator, scored=True)
        for name, (source, split) in wanted.items()
    }


def make_dataloaders(
    accelerator: Accelerator,
    config: Config,
    tokenizer,
    train_set,
    eval_sets: dict,
    test_set,
    state: checkpoint.TrainerState,
) -> tuple[object, dict, object]:
    """The train loader (None unless training), the eval loaders by metric prefix, and the test loader, prepared now
    (it never trains): each test example carries its position, to check that every one comes back once, in order.
    A streamed eval or test set is this rank's part already: batched here, never prepared (predict.StreamedSet)."""
    d, t = config.data, config.train
    pad_to_multiple_of = runtime.pad_to_multiple_of(d, t, accelerator.mixed_precision, accelerator.device)
    pin_memory = accelerator.device.type == "cuda"
    streamed = isinstance(train_set, stream.Examples)
    train_dl, _ = batches.make_dataloaders(
        None if streamed else train_set,
        None,
        tokenizer,
        t,
        pad_to_multiple_of,
        pin_memory,
        length_window=d.length_grouping_window if d.train_sampling_strategy == "group_by_length" else None,
        length_group_batch_size=state.length_group_batch_size,
    )
    if streamed:
        train_dl = stream.StreamLoader(
            train_set,
            batches.collator(tokenizer, pad_to_multiple_of),
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            accelerator,
            t.dataloader_num_workers,
        )
    prefixes = {name: "eval" if len(eval_sets) == 1 else f"eval_{name}" for name in eval_sets}
    eval_dls = {
        prefixes[name]: split.batched(tokenizer, t.per_device_eval_batch_size, pad_to_multiple_of)
        if isinstance(split, predict.StreamedSet)  # a rank's part of a stream, batched as it is read
        else batches.make_dataloaders(None, split, tokenizer, t, pad_to_multiple_of, pin_memory)[1]
        for name, split in eval_sets.items()
    }
    test_dl = None
    if isinstance(test_set, predict.StreamedSet):
        test_dl = test_set.batched(tokenizer, t.per_device_eval_batch_size, pad_to_multiple_of)
    elif test_set is not None:
        test_set = test_set.add_column(predict.INDEX_COLUMN, list(range(len(test_set))))
        _, test_dl = batches.make_dataloaders(None, test_set, tokenizer, t, pad_to_multiple_of, pin_memory)
        test_dl = accelerator.prepare_data_loader(test_dl)
    return train_dl, eval_dls, test_dl


# ---- The model and the engine ----


def load_model(
    accelerator: Accelerator, config: Config, class_names: list[str], tokenizer, problem: problems.Problem
) -> torch.nn.Module:
    """The weights, with what training adds (activation checkpointing, the LoRA adapter) and the CPU speed-ups; then
    the check that the output folder's disk can hold what this run will write."""
    m, t = config.model, config.train
    model = models.load_model(m, class_names, tokenizer.pad_token_id, problem.problem_type)
    if t.activation_checkpointing and t.do_train:
        say(accelerator, models.enable_activation_checkpointing(model, accelerator))
    if m.use_peft and t.do_train:
        model = lora.add_adapter(model, m)
        say(accelerator, lora.describe(model, m))
    if accelerator.device.type == "cpu":
        dropout = t.fast_cpu_dropout and t.do_train
        for line in cpu_speedups.install(model, allocator=t.tune_cpu_allocator, dropout=dropout):
            say(accelerator, line)
    with checkpoint.writing(t.output_dir, t.output_dir, together=accelerator):  # a refusal stops every rank
        if accelerator.is_main_process:
            outputs.check_free_space(t.output_dir, model, checkpointing=t.do_train)
    return model


def start_training(
    accelerator: Accelerator,
    config: Config,
    model: torch.nn.Module,
    train_dl,
    eval_dls: dict,
    splits: data.Splits,
    state: checkpoint.TrainerState,
    resume_from: str | None,
    samples: batches.SampleIdLog,
) -> tuple[torch.nn.Module, dict, Training]:
    """`prepare` once, load the checkpoint (if resuming) into what it returned, and build the Run's training part.
    Returns the prepared model and eval loaders too."""
    rows = splits.stream.count if splits.stream is not None else None
    model, train_dl, optimizer, scheduler, eval_dls, plan = prepare(
        accelerator, config, model, train_dl, eval_dls, rows
    )
    rank_state = resume(accelerator, config, state, resume_from, train_dl, scheduler)
    # Measured before training (a one-second matmul probe on CPU, cached), so it never eats into the timed loop.
    peak_tflops = throughput.peak_tflops(accelerator.device, accelerator.mixed_precision, config.train.peak_tflops)
    training = Training(
        train_dl,
        optimizer,
        scheduler,
        plan,
        state,
        rank_state,
        splits.stream.count if splits.stream is not None else len(splits.train),
        splits.texts_in_train,
        peak_tflops,
        samples,
    )
    return model, eval_dls, training


def prepare(
    accelerator: Accelerator, config: Config, model: torch.nn.Module, train_dl, eval_dls: dict, rows: int | None = None
) -> tuple:
    """The plan, optimizer and schedule, then `accelerator.prepare` once. Returns the prepared model, train loader,
    optimizer, scheduler and eval loaders, and the plan. `rows`: a training stream's row count, when known."""
    m, t = config.model, config.train
    streamed = isinstance(train_dl, stream.StreamLoader)
    # Accelerate shards batches across processes (even_batches: every rank gets ceil(n / world) of them). The schedule
    # is sized in this rank's optimizer steps; the prepared scheduler steps once per process per optimizer step, hence
    # the factor num_processes, as in transformers' run_glue_no_trainer.py.
    if streamed:
        plan = make_stream_plan(rows, t, accelerator.num_processes)
    else:
        plan = make_plan(math.ceil(len(train_dl) / accelerator.num_processes), t)
    optimizer = optim.make_optimizer(model, t, accelerator.device)
    scheduler = make_scheduler(
        t.lr_scheduler_type,
        t.lr_scheduler_kwargs,
        optimizer,
        plan.warmup_steps,
        plan.total_steps,
        accelerator.num_processes,
    )
    if streamed:  # each rank reads its own part of the stream, its batches not dealt by Accelerate: stream.StreamLoader
        model, optimizer, scheduler, *prepared = accelerator.prepare(model, optimizer, scheduler, *eval_dls.values())
    else:
        model, optimizer, train_dl, scheduler, *prepared = accelerator.prepare(
            model, optimizer, train_dl, scheduler, *eval_dls.values()
        )
        if math.ceil(len(train_dl) / t.gradient_accumulation_steps) != plan.steps_per_epoch:
            raise RuntimeError(
                f"prepared dataloader has {len(train_dl)} batches, planned for {plan.steps_per_epoch} steps"
            )
    if m.use_peft:  # checkpoints hold what trains (adapter, head) and its optimizer state, not the frozen base
        accelerator.register_save_state_pre_hook(checkpoint.keep_trained_weights)
    return model, train_dl, optimizer, scheduler, dict(zip(eval_dls, prepared)), plan


def resume(
    accelerator: Accelerator,
    config: Config,
    state: checkpoint.TrainerState,
    resume_from: str | None,
    train_dl,
    scheduler,
) -> dict | None:
    """Load the checkpoint into what `prepare` returned; returns this process's running sums (None for a new run)."""
    if not resume_from:
        return None
    if isinstance(train_dl, stream.StreamLoader):  # same process count only (elastic.resume_state)
        rank_state = elastic.load_checkpoint(accelerator, resume_from, scheduler, trained_only=config.model.use_peft)
        train_dl.resume_at(rank_state)  # this rank's position in its part of the stream
        return rank_state
    # Accelerate counts micro-steps from the start of each epoch, and from 0 at its end
    micro_step = state.batches_in_epoch if state.batches_in_epoch < len(train_dl) else 0
    return elastic.load_checkpoint(accelerator, resume_from, scheduler, micro_step, trained_only=config.model.use_peft)


def say_what_trains(
    accelerator: Accelerator,
    config: Config,
    splits: data.Splits,
    class_names: list[str],
    problem: problems.Problem,
    plan: Plan,
    state: checkpoint.TrainerState,
    resume_from: str | None,
) -> None:
    """One line: engine, precision, data, classes, batch, steps, and where a resumed run continues."""
    t = config.train
    if splits.stream is None:
        train = f"{len(splits.train)} train"
    else:
        train = f"a training stream of {splits.stream.count or 'unknown'} rows"
    steps_per_epoch = plan.steps_per_epoch or "unknown"
    say(
        accelerator,
        f"tuneloop: {accelerator.distributed_type.value} x{accelerator.num_processes} on {accelerator.device}, "
        f"mixed_precision={accelerator.mixed_precision}, {train} / "
        f"{' + '.join(str(len(split)) for split in splits.eval_sets.values())} eval examples, "
        f"{len(class_names)} {problem.units}, {t.describe_batch(accelerator.num_processes)}, "
        f"{plan.total_steps} steps ({steps_per_epoch}/epoch, {plan.warmup_steps} warmup)"
        + (f", resuming at step {state.step} from {resume_from}" if resume_from else ""),
    )
