"""The training run: build everything, `accelerator.prepare` once, then one plain loop.

Reads top to bottom like Accelerate's `complete_nlp_example.py`: set-up (cheap checks first, then data, model,
optimizer, schedule), the loop, evaluation, the final save. A "step" always means an optimizer step.
"""

from __future__ import annotations

import ctypes
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import TorchDynamoPlugin, set_seed
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from tuneloop import checkpoint, cpu_dropout, data, engines, metrics, model as models, predict, report, throughput, tracking
from tuneloop.config import Config, TrainArguments, make_scheduler
from tuneloop.errors import UserError
from tuneloop.preemption import StopRequest

COMPILE_LENGTH_BUCKET = 64  # tokens; batch lengths are rounded up to this under --torch_compile


class Preempted(Exception):
    """A stop signal arrived at optimizer step `step`; `checkpoint_dir` is the newest complete checkpoint."""

    def __init__(self, signal_name: str, checkpoint_dir: str | None, step: int):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint_dir}")
        self.signal_name, self.checkpoint_dir, self.step = signal_name, checkpoint_dir, step


class TrainingDiverged(UserError):
    """The loss stayed NaN/inf: stopping keeps the last good checkpoint instead of saving a broken model."""


@dataclass
class Plan:
    """Step counts derived once from the prepared dataloader (per process), never written back into the config."""

    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup_steps: int


def fast_bf16_available() -> bool:
    """bf16 that runs faster than fp32: tensor cores from Ampere on; AMX or AVX-512 bf16 matrix units on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()[0] >= 8
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def make_accelerator(t: TrainArguments) -> Accelerator:
    # With no GPU, Accelerator(cpu=True) is what turns a multi-process launch into real gloo data parallelism;
    # without it each process believes it is alone and trains independently. DeepSpeed is the exception: it sets
    # up its own process group, which on CPU must be told to use gloo.
    no_gpu = not torch.accelerator.is_available()
    deepspeed = engines.requested("DEEPSPEED")
    accelerator = Accelerator(
        cpu=no_gpu and not deepspeed,
        mixed_precision=("bf16" if fast_bf16_available() else "no") if t.mixed_precision == "auto" else t.mixed_precision,
        # Regional compilation compiles one transformer block and reuses it for the others: a fraction of the compile
        # time of the whole model. Static shapes, because the lengths come in few buckets (see `setup`).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True, dynamic=False)
        if t.torch_compile else None,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=tracking.log_with(t),
        project_dir=t.output_dir,
        # A seeded sampler makes the data order a function of (seed, epoch) alone: reproducible and resumable.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The timeout covers the longest wait of one rank for another: rank 0 tokenizing a large dataset while the
        # others wait in main_process_first, or a slow node joining (torch's NCCL default is 10 minutes).
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo" if no_gpu and deepspeed else None,
                                                timeout=datetime.timedelta(seconds=t.ddp_timeout))],
    )
    engines.reconcile(accelerator, t)  # the engine asked for is the one running, and agrees with the trainer's flags
    return accelerator


def use_all_cpu_cores(accelerator: Accelerator) -> None:
    """Undo `accelerate launch`'s default of one thread per process on CPU.

    Without a CPU accelerate config (`--num_cpu_threads_per_process` unset, OMP_NUM_THREADS not exported), the launcher
    hands its workers OMP_NUM_THREADS=1: the offline default then ran 1.4 s/step instead of 0.77 on 2 cores. Any other
    thread count, set by the user or the launcher, is left alone.
    """
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by `accelerate launch` for every worker
    if accelerator.device.type != "cpu" or not launched or os.environ.get("OMP_NUM_THREADS") != "1":
        return
    threads = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if threads > torch.get_num_threads():
        torch.set_num_threads(threads)
        say(accelerator, f"tuneloop: {threads} CPU threads per process (accelerate launch passed OMP_NUM_THREADS=1; "
                         "set --num_cpu_threads_per_process to choose)")


def set_up_kernels(t: TrainArguments, device: torch.device) -> None:
    """Process-wide speed settings, before the model exists: TF32 on Ampere+ GPUs, glibc's allocator on CPU."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 and t.tf32 is not False:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t.tune_cpu_allocator and device.type == "cpu":
        # The same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>: big tensors reuse heap memory instead of a
        # fresh mmap/munmap (and page faults) every step.
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
            raise UserError("--tune_cpu_allocator needs glibc's mallopt, which refused: drop the option")


def make_plan(num_batches: int, t: TrainArguments) -> Plan:
    steps_per_epoch = math.ceil(num_batches / t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup_steps = t.get_warmup_steps(total_steps)
    return Plan(steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch), warmup_steps)


def make_optimizer(model: torch.nn.Module, t: TrainArguments, device: torch.device) -> torch.optim.AdamW:
    # Biases and LayerNorm weights (the 1-D tensors) get no weight decay, as in BERT and transformers' Trainer.
    # Under DeepSpeed ZeRO-3 the model is created already partitioned: each local tensor is a flat 1-D shard and the
    # true shape is in `ds_shape`, so tensors are classified by that shape (by `ndim` every tensor looked 1-D: the
    # decay group came out empty, DeepSpeed dropped it and the scheduler's first step failed).
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    groups = [
        {"params": [p for p, m in zip(params, matrix) if m], "weight_decay": t.weight_decay},
        {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu", "xpu", "mps")  # the single-kernel AdamW; torch has it on these devices
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=fused)


@dataclass
class Run:
    """Everything the loop touches, built once by `setup` and prepared by Accelerate."""

    config: Config
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: object
    train_dl: object
    eval_dl: object
    metric_modules: dict
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    plan: Plan | None = None
    state: checkpoint.TrainerState | None = None
    rank_state: dict | None = None  # this process's running sums, when resuming
    started_at: float = 0.0  # perf_counter() when set-up began
    peak_tflops: float | None = None  # the device's peak for the precision in use, for MFU
    eval_outputs: object = None  # the latest evaluation's gathered logits and labels (predict.Outputs)


def train(config: Config) -> dict:
    """The whole job: set up, train (or only evaluate), save. Returns the final metrics.

    Raises `Preempted` after saving a checkpoint when a stop signal arrived; the caller exits with REQUEUE_EXIT_CODE.
    """
    run = setup(config)
    if not config.train.do_train:
        results = evaluate(run) | describe(run.accelerator)
        say(run.accelerator, format_metrics("eval", results))
        checkpoint.save_results(run.accelerator, config, results)
    else:
        try:
            results = fit(run)
        except Preempted as stop:
            if run.accelerator.is_main_process:
                checkpoint.write_preempted(config.train.output_dir, stop.checkpoint_dir, stop.step, stop.signal_name)
            # No rank exits before the marker exists: a job script that sees one rank gone must find it.
            run.accelerator.wait_for_everyone()
            run.accelerator.end_training()
            raise
        checkpoint.save_final_model(run.accelerator, run.model, run.tokenizer, config.train.output_dir)
        checkpoint.save_results(run.accelerator, config, results, run.state.history)
    finish(run, results, run.state.history if config.train.do_train else None)
    run.accelerator.end_training()
    return results


def finish(run: Run, results: dict, history: list[dict] | None) -> None:
    """After training: predictions on the test split, the report (the confusion matrix and per-class table are the
    final model's, from its evaluation), the summary table."""
    t = run.config.train
    test_results = predict.predict_test_split(run, describe(run.accelerator)) if t.do_predict else None
    report.write_report(run, results, history, run.eval_outputs if t.do_eval else None, test_results)
    say(run.accelerator, report.summary_table({**results, **(test_results or {})}, t.output_dir))


def setup(config: Config) -> Run:
    started_at = time.perf_counter()
    m, d, t = config.model, config.data, config.train
    accelerator = make_accelerator(t)
    use_all_cpu_cores(accelerator)
    set_up_kernels(t, accelerator.device)
    if not accelerator.is_local_main_process:
        hf_logging.set_verbosity_error()
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        say(accelerator, "warning: fp16 on CPU runs in fp32 (no fast fp16 kernels); use --mixed_precision bf16")
    set_seed(t.seed)

    # Cheap checks first: output folder, checkpoint to resume, tracker, model config, data; weights load last.
    checkpoint.check_writable(t.output_dir)
    state = checkpoint.TrainerState(num_processes=accelerator.num_processes, seed=t.seed,
                                    per_device_train_batch_size=t.per_device_train_batch_size,
                                    gradient_accumulation_steps=t.gradient_accumulation_steps)
    resume_from = find_resume_checkpoint(accelerator, t)
    if resume_from:
        saved = checkpoint.read_state(resume_from)
        checkpoint.check_resumable(saved, state, resume_from)
        state = saved
    tracking.start(accelerator, config, state.tracker_run_id)
    model_config = models.load_config(m)
    classes = None if t.do_train else models.trained_label_names(model_config)  # evaluating a fine-tuned model
    splits = data.load_splits(d, t.seed, m.num_labels, need_train=t.do_train, model_classes=classes)
    if t.metric_average == "binary" and len(splits.label_names) != 2:
        raise UserError(f"metric_average=binary needs 2 classes, the data has {len(splits.label_names)}: use macro")
    tokenizer = models.load_tokenizer(m, d.max_length)
    with accelerator.main_process_first():
        train_set = data.tokenize(splits.train, splits, tokenizer, d) if t.do_train else None
        eval_set = data.tokenize(splits.eval, splits, tokenizer, d)
        metric_modules = metrics.load_metrics(t.metrics)
    model = models.load_model(m, splits.label_names, tokenizer.pad_token_id)
    if t.fast_cpu_dropout and t.do_train and accelerator.device.type == "cpu":
        if swapped := cpu_dropout.install(model):
            say(accelerator, f"tuneloop: CPU dropout kernels for {' and '.join(swapped)} (--fast_cpu_dropout)")
    if accelerator.is_main_process:
        checkpoint.check_free_space(t.output_dir, model, checkpointing=t.do_train)

    # Under torch.compile every new batch shape is a new graph: 64-token buckets make that at most max_length / 64.
    compile_bucket = min(COMPILE_LENGTH_BUCKET, d.max_length) if t.torch_compile else None
    pad_to_multiple_of = d.pad_to_multiple_of or compile_bucket or (8 if accelerator.mixed_precision in ("fp16", "bf16") else None)
    train_dl, eval_dl = data.make_dataloaders(
        train_set, eval_set, tokenizer, t, pad_to_multiple_of, pin_memory=accelerator.device.type == "cuda",
        length_window=d.length_grouping_window if d.train_sampling_strategy == "group_by_length" else None,
    )
    if not t.do_train:
        model, eval_dl = engines.prepare_for_evaluation(accelerator, model, eval_dl)
        return Run(config, accelerator, model, tokenizer, None, eval_dl, metric_modules)

    # Accelerate shards batches across processes (even_batches: every rank gets ceil(n / world) of them). The schedule
    # is sized in this rank's optimizer steps; the prepared scheduler steps once per process per optimizer step, hence
    # the factor num_processes, as in transformers' run_glue_no_trainer.py.
    plan = make_plan(math.ceil(len(train_dl) / accelerator.num_processes), t)
    optimizer = make_optimizer(model, t, accelerator.device)
    scheduler = make_scheduler(t.lr_scheduler_type, t.lr_scheduler_kwargs, optimizer, plan.warmup_steps, plan.total_steps,
                               accelerator.num_processes)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    if math.ceil(len(train_dl) / t.gradient_accumulation_steps) != plan.steps_per_epoch:
        raise RuntimeError(f"prepared dataloader has {len(train_dl)} batches, planned for {plan.steps_per_epoch} steps")
    rank_state = checkpoint.load_checkpoint(accelerator, resume_from) if resume_from else None
    say(
        accelerator,
        f"tuneloop: {accelerator.distributed_type.value} x{accelerator.num_processes} on {accelerator.device}, "
        f"mixed_precision={accelerator.mixed_precision}, {len(splits.train)} train / {len(splits.eval)} eval examples, "
        f"{len(splits.label_names)} classes, global batch "
        f"{t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes}, "
        f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {plan.warmup_steps} warmup)"
        + (f", resuming at step {state.step} from {resume_from}" if resume_from else ""),
    )
    # Measured before training (a one-second matmul probe on CPU, cached), so it never eats into the timed loop.
    peak = throughput.peak_tflops(accelerator.device, accelerator.mixed_precision, t.peak_tflops)
    return Run(config, accelerator, model, tokenizer, train_dl, eval_dl, metric_modules, optimizer, scheduler, plan,
               state, rank_state, started_at, peak)


def find_resume_checkpoint(accelerator: Accelerator, t: TrainArguments) -> str | None:
    """The checkpoint to resume, if any; also clears what an earlier, interrupted session left behind."""
    if accelerator.is_main_process and t.do_train:
        checkpoint.clean_partial_checkpoints(t.output_dir)
        checkpoint.clear_preempted(t.output_dir)
    accelerator.wait_for_everyone()
    if not (t.resume_from_checkpoint and t.do_train):
        return None
    path = checkpoint.find_checkpoint(t.output_dir, t.resume_from_checkpoint)
    if path is None:
        say(accelerator, f"tuneloop: no checkpoint in {os.path.join(t.output_dir, checkpoint.CHECKPOINTS_DIR)}: "
                         "starting from scratch")
    return path


class LossMeter:
    """Training-loss sums kept on the device (read only at logging steps: no host sync in the hot loop), and the
    count of consecutive optimizer steps whose loss was not finite."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        saved = saved or {}
        self.window = torch.tensor(saved.get("window_loss", 0.0), device=device)  # since the last log
        self.window_count = saved.get("window_count", 0)
        self.total = torch.tensor(saved.get("total_loss", 0.0), device=device)  # the whole run
        self.total_count = saved.get("total_count", 0)
        self.step_loss = torch.zeros((), device=device)
        self.nonfinite_streak = torch.tensor(saved.get("nonfinite_streak", 0), device=device)
        self.skipped_steps = saved.get("skipped_steps", 0)  # optimizer steps the fp16 grad scaler skipped

    def add(self, loss: torch.Tensor) -> None:
        self.window += loss.detach()
        self.window_count += 1
        self.step_loss += loss.detach()

    def end_step(self, skipped: bool) -> None:
        finite = torch.isfinite(self.step_loss)
        self.nonfinite_streak = torch.where(finite, torch.zeros_like(self.nonfinite_streak), self.nonfinite_streak + 1)
        self.step_loss.zero_()
        self.skipped_steps += int(skipped)

    def take_window(self, accelerator: Accelerator) -> float:
        """Mean loss since the last log, averaged over processes (a collective)."""
        value = accelerator.reduce(self.window / self.window_count, "mean").item()
        self.total += self.window
        self.total_count += self.window_count
        self.window.zero_()
        self.window_count = 0
        return value

    def worst_streak(self, accelerator: Accelerator) -> int:
        return int(accelerator.gather(self.nonfinite_streak.reshape(1)).max())

    def state_dict(self) -> dict:
        return {"window_loss": self.window.item(), "window_count": self.window_count, "total_loss": self.total.item(),
                "total_count": self.total_count, "nonfinite_streak": int(self.nonfinite_streak),
                "skipped_steps": self.skipped_steps}


def fit(run: Run) -> dict:
    """The training loop. Returns the final metrics; the history of every log and evaluation is in `run.state`.

    Everything needed to continue is in `run.state` (global) and the loss meter (per process), so a checkpoint taken
    at any optimizer step resumes into exactly the same run. Raises `Preempted` once the checkpoint of a stop signal
    is written.
    """
    t, plan, accelerator, state = run.config.train, run.plan, run.accelerator, run.state
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    meter = LossMeter(accelerator.device, run.rank_state)
    speed = throughput.SpeedMeter(accelerator.unwrap_model(model), accelerator.device, run.started_at)
    start, grad_norm, early_stopped = time.perf_counter(), None, False
    earlier_sessions = state.train_runtime

    def save() -> None:
        state.train_runtime = earlier_sessions + time.perf_counter() - start
        save_checkpoint(run, meter)

    # In a log file (CI, SLURM) a bar redrawn every second is noise: redraw every 30 s there.
    progress = tqdm(total=plan.total_steps, initial=state.step, desc="training", disable=not accelerator.is_local_main_process,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    with StopRequest(accelerator.num_processes, accelerator.device) as stop, progress:
        for epoch in range(state.epoch, plan.num_epochs):
            model.train()
            run.train_dl.set_epoch(epoch)
            batches = run.train_dl
            if state.batches_in_epoch:  # resuming mid-epoch: the same order, minus what was already trained on
                batches = accelerator.skip_first_batches(run.train_dl, state.batches_in_epoch)
                batches.set_epoch(epoch)  # a new loader would otherwise replay epoch 0's order
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # clip_grad_norm_ returns the pre-clip norm; with clipping off, an infinite bound only measures it.
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                meter.add(loss)
                speed.add_batch(batch)
                state.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                meter.end_step(skipped=accelerator.optimizer_step_was_skipped)
                speed.end_step()
                progress.update(1)
                if state.step % t.logging_steps == 0 or state.step == plan.total_steps:
                    log_step(run, meter, grad_norm, progress)
                new_best = t.do_eval and t.eval_strategy == "steps" and state.step % t.eval_steps == 0 and evaluate_and_log(run)
                signal_name = stop.agreed()  # collective: every rank gets the same answer
                early_stopped = early_stop(run)
                if state.step < plan.total_steps and (signal_name or checkpoint_due(t, state.step, new_best)):
                    save()
                if signal_name and state.step < plan.total_steps:
                    saved = checkpoint.complete_checkpoints(t.output_dir)
                    raise Preempted(signal_name, saved[-1] if saved else None, state.step)
                if early_stopped or state.step >= plan.total_steps:
                    break
            if early_stopped:
                break
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            new_best = t.do_eval and t.eval_strategy == "epoch" and evaluate_and_log(run, epoch=epoch + 1)
            early_stopped = early_stop(run)
            if state.step < plan.total_steps and checkpoint_due(t, state.step, new_best, epoch_end=True):
                save()
            if early_stopped or state.step >= plan.total_steps:
                break
    runtime = time.perf_counter() - start
    if meter.window_count:  # early stopping between logging steps
        log_step(run, meter, grad_norm, progress)
    if t.load_best_model_at_end and state.best_checkpoint and state.best_step != state.step:
        say(accelerator, f"tuneloop: loading the best model (step {state.best_step}, "
                         f"{best_metric_key(t)}={state.best_metric:.4f}) from {state.best_checkpoint}")
        accelerator.load_state(state.best_checkpoint)
        evaluate_and_log(run)
    elif t.do_eval and state.last_eval.get("step") != state.step:  # no evaluation yet of the final weights
        evaluate_and_log(run)

    speed_figures = speed.summary(accelerator, run.peak_tflops, runtime)
    accelerator.log({f"speed/{k}": v for k, v in speed_figures.items() if v is not None}, step=state.step)
    final = {
        **{k: v for k, v in state.last_eval.items() if k != "step"},
        "train_loss": accelerator.reduce(meter.total / meter.total_count, "mean").item(),  # mean over the whole run
        "train_runtime": round(earlier_sessions + runtime, 2),  # all sessions of this run
        **speed_figures,  # this session's own throughput
        "global_step": state.step,
        "epochs": plan.num_epochs,
        "final_learning_rate": scheduler.get_last_lr()[0],
        **({"best_step": state.best_step, f"best_{best_metric_key(t)}": state.best_metric} if state.best_step else {}),
        **({"stopped_early": True} if early_stopped else {}),
        **({"skipped_steps": meter.skipped_steps} if accelerator.mixed_precision == "fp16" else {}),
        **describe(accelerator),
    }
    say(accelerator, format_metrics("final", final))
    return final


def checkpoint_due(t: TrainArguments, step: int, new_best: bool, epoch_end: bool = False) -> bool:
    if new_best and (t.load_best_model_at_end or t.save_strategy == "best"):
        return True  # the best weights must survive until the end
    if t.save_strategy == "epoch":
        return epoch_end
    return t.save_strategy == "steps" and not epoch_end and step % t.save_steps == 0


def log_step(run: Run, meter: LossMeter, grad_norm, progress) -> None:
    """Log the loss window; also where a diverged run is caught (a sync point anyway)."""
    accelerator, plan, state = run.accelerator, run.plan, run.state
    logs = {
        "train/loss": meter.take_window(accelerator),
        "train/learning_rate": run.scheduler.get_last_lr()[0],
        "train/epoch": state.step / plan.steps_per_epoch,
    }
    if grad_norm is not None:
        logs["train/grad_norm"] = float(grad_norm)
    if accelerator.mixed_precision == "fp16":
        logs["train/skipped_steps"] = meter.skipped_steps
    accelerator.log(logs, step=state.step)
    progress.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/learning_rate']:.2e}")
    state.history.append({"step": state.step, **logs})
    check_health(run, meter)


def check_health(run: Run, meter: LossMeter) -> int:
    """Stop a diverged run; otherwise return the current streak of non-finite steps (the worst over processes)."""
    t = run.config.train
    streak = meter.worst_streak(run.accelerator)
    if streak >= t.max_nonfinite_steps:
        found = checkpoint.complete_checkpoints(t.output_dir)
        raise TrainingDiverged(
            f"the training loss was NaN/inf for {streak} optimizer steps in a row (step {run.state.step}): lower "
            "--learning_rate, keep --max_grad_norm on, prefer bf16 to fp16, or check the data; last good checkpoint: "
            + (found[-1] if found else "none (set --save_strategy to keep one)")
        )
    return streak


def save_checkpoint(run: Run, meter: LossMeter) -> None:
    t, state, accelerator = run.config.train, run.state, run.accelerator
    if check_health(run, meter):  # never put a state whose loss is NaN/inf next to the good ones
        say(accelerator, f"tuneloop: not saving step {state.step}: its training loss is not finite")
        return
    if state.best_step == state.step:
        state.best_checkpoint = checkpoint.checkpoint_path(t.output_dir, state.step)
    path = checkpoint.save_checkpoint(accelerator, t.output_dir, state, meter.state_dict())
    if accelerator.is_main_process:
        checkpoint.rotate_checkpoints(t.output_dir, t.save_total_limit, state.best_checkpoint)
    say(accelerator, f"tuneloop: checkpoint {path}")


def best_metric_key(t: TrainArguments) -> str:
    return "eval_" + (t.metric_for_best_model or t.metrics[0]).removeprefix("eval_")


def early_stop(run: Run) -> bool:
    patience = run.config.train.early_stopping_patience
    if not run.state.patience_exhausted(patience):
        return False
    say(run.accelerator, f"tuneloop: early stopping: no improvement of {best_metric_key(run.config.train)} "
                         f"in {patience} evaluations (best {run.state.best_metric:.4f} at step {run.state.best_step})")
    return True


def describe(accelerator: Accelerator) -> dict:
    """What actually ran: recorded with every result, so a '2-process' figure is provably from two processes."""
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device.type),
    }


def evaluate(run: Run) -> dict:
    """Gather the logits and labels of the eval set from every process; score them once.

    `gather_for_metrics` drops the samples that even batching repeated at the end of the eval set, so the result
    is the same for any process count (predict.gather; `tuneloop evaluate` scores saved models with the same two calls).
    """
    outputs = predict.gather(run.accelerator, run.model, run.eval_dl)
    run.eval_outputs = outputs  # the final evaluation's are the report's confusion matrix: no extra pass
    return predict.score(outputs, run.metric_modules, run.config.train.metric_average, prefix="eval")


def evaluate_and_log(run: Run, epoch: int | None = None) -> bool:
    """Evaluate, log, record in the history and the best-model tracker; True when this is the new best."""
    t, state = run.config.train, run.state
    results = evaluate(run)
    run.model.train()
    run.accelerator.log({k.replace("eval_", "eval/", 1): v for k, v in results.items()}, step=state.step)
    state.history.append({"step": state.step, **({"epoch": epoch} if epoch else {}), **results})
    state.last_eval = {**results, "step": state.step}
    say(run.accelerator, format_metrics(f"epoch {epoch}" if epoch else f"step {state.step}", results))
    greater = t.greater_is_better if t.greater_is_better is not None else not best_metric_key(t).endswith("loss")
    return state.record_eval(results[best_metric_key(t)], greater, t.early_stopping_threshold)


def say(accelerator: Accelerator, message: str) -> None:
    """Print once (main process), above the progress bar rather than through it."""
    if accelerator.is_main_process:
        tqdm.write(message)


def format_metrics(prefix: str, values: dict) -> str:
    shown = (f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return f"{prefix}: " + " ".join(shown)
