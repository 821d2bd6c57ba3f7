"""The training run: build everything, `accelerator.prepare` once, then one plain loop.

Reads top to bottom like Accelerate's `complete_nlp_example.py`: set-up (cheap checks first, then data, model,
optimizer, schedule), the loop, evaluation, the final save. A "step" always means an optimizer step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from tuneloop import checkpoint, data, engines, metrics, model as models, tracking
from tuneloop.config import Config, TrainArguments
from tuneloop.errors import UserError


@dataclass
class Plan:
    """Step counts derived once from the prepared dataloader (per process), never written back into the config."""

    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup_steps: int


def make_accelerator(t: TrainArguments) -> Accelerator:
    # With no GPU, Accelerator(cpu=True) is what turns a multi-process launch into real gloo data parallelism;
    # without it each process believes it is alone and trains independently. DeepSpeed is the exception: it sets
    # up its own process group, which on CPU must be told to use gloo.
    no_gpu = not torch.accelerator.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        cpu=no_gpu and not deepspeed,
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=tracking.log_with(t),
        project_dir=t.output_dir,
        # A seeded sampler makes the data order a function of (seed, epoch) alone: reproducible and resumable.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if no_gpu and deepspeed else [],
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


def make_plan(num_batches: int, t: TrainArguments) -> Plan:
    steps_per_epoch = math.ceil(num_batches / t.gradient_accumulation_steps)
    total_steps = t.max_train_steps or math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup_steps = t.num_warmup_steps or math.ceil(t.warmup_ratio * total_steps)
    return Plan(steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch), warmup_steps)


def make_optimizer(model: torch.nn.Module, t: TrainArguments, device: torch.device) -> torch.optim.AdamW:
    # Biases and LayerNorm weights (the 1-D tensors) get no weight decay, as in BERT and transformers' Trainer.
    # Under DeepSpeed ZeRO-3 the model is created already partitioned: each local tensor is a flat 1-D shard and the
    # true shape is in `ds_shape`, so tensors are classified by that shape (else every weight loses its decay).
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


def train(config: Config) -> dict:
    """The whole job: set up, train (or only evaluate), save. Returns the final metrics."""
    run = setup(config)
    if not config.train.do_train:
        results = evaluate(run) | describe(run.accelerator)
        say(run.accelerator, format_metrics("eval", results))
        checkpoint.save_results(run.accelerator, config, results)
    else:
        results, history = fit(run)
        checkpoint.save_final_model(run.accelerator, run.model, run.tokenizer, config.train.output_dir)
        checkpoint.save_results(run.accelerator, config, results, history)
    run.accelerator.end_training()
    return results


def setup(config: Config) -> Run:
    m, d, t = config.model, config.data, config.train
    accelerator = make_accelerator(t)
    use_all_cpu_cores(accelerator)
    if not accelerator.is_local_main_process:
        hf_logging.set_verbosity_error()
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        say(accelerator, "warning: fp16 on CPU runs in fp32 (no fast fp16 kernels); use --mixed_precision bf16")
    set_seed(t.seed)

    # Cheap checks first: output folder, tracker, model config, data columns and labels; weights load last.
    checkpoint.check_writable(t.output_dir)
    tracking.start(accelerator, config)
    models.load_config(m)
    splits = data.load_splits(d, t.seed, m.num_labels, need_train=t.do_train)
    if t.metric_average == "binary" and len(splits.label_names) != 2:
        raise UserError(f"metric_average=binary needs 2 classes, the data has {len(splits.label_names)}: use macro")
    tokenizer = models.load_tokenizer(m, d.max_length)
    with accelerator.main_process_first():
        train_set = data.tokenize(splits.train, splits, tokenizer, d) if t.do_train else None
        eval_set = data.tokenize(splits.eval, splits, tokenizer, d)
        metric_modules = metrics.load_metrics(t.metrics)
    model = models.load_model(m, splits.label_names, tokenizer.pad_token_id)

    pad_to_multiple_of = d.pad_to_multiple_of or (8 if accelerator.mixed_precision in ("fp16", "bf16") else None)
    train_dl, eval_dl = data.make_dataloaders(
        train_set, eval_set, tokenizer, t, pad_to_multiple_of, pin_memory=accelerator.device.type == "cuda"
    )
    if not t.do_train:
        model, eval_dl = engines.prepare_for_evaluation(accelerator, model, eval_dl)
        return Run(config, accelerator, model, tokenizer, None, eval_dl, metric_modules)

    # Accelerate shards batches across processes (even_batches: every rank gets ceil(n / world) of them). The schedule
    # is sized in this rank's optimizer steps; the prepared scheduler steps once per process per optimizer step, hence
    # the factor num_processes, as in transformers' run_glue_no_trainer.py.
    plan = make_plan(math.ceil(len(train_dl) / accelerator.num_processes), t)
    optimizer = make_optimizer(model, t, accelerator.device)
    scheduler = get_scheduler(
        t.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=plan.warmup_steps * accelerator.num_processes,
        num_training_steps=plan.total_steps * accelerator.num_processes,
    )
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    if math.ceil(len(train_dl) / t.gradient_accumulation_steps) != plan.steps_per_epoch:
        raise RuntimeError(f"prepared dataloader has {len(train_dl)} batches, planned for {plan.steps_per_epoch} steps")
    say(
        accelerator,
        f"tuneloop: {accelerator.distributed_type.value} x{accelerator.num_processes} on {accelerator.device}, "
        f"mixed_precision={accelerator.mixed_precision}, {len(splits.train)} train / {len(splits.eval)} eval examples, "
        f"{len(splits.label_names)} classes, global batch "
        f"{t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes}, "
        f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {plan.warmup_steps} warmup)",
    )
    return Run(config, accelerator, model, tokenizer, train_dl, eval_dl, metric_modules, optimizer, scheduler, plan)


def fit(run: Run) -> tuple[dict, list[dict]]:
    """The training loop. Returns the final metrics and the history of every log and evaluation."""
    t, plan, accelerator = run.config.train, run.plan, run.accelerator
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    history, results = [], {}
    step, samples, start = 0, 0, time.perf_counter()
    # Losses are summed on the device and read only at logging steps: no host sync in the hot loop.
    window_loss, total_loss = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    window_count, total_count, grad_norm = 0, 0, None
    # In a log file (CI, SLURM) a bar redrawn every second is noise: redraw every 30 s there.
    progress = tqdm(total=plan.total_steps, desc="training", disable=not accelerator.is_local_main_process,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for epoch in range(plan.num_epochs):
        model.train()
        run.train_dl.set_epoch(epoch)
        for batch in run.train_dl:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # clip_grad_norm_ returns the pre-clip norm; with clipping off, an infinite bound only measures it.
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_loss += loss.detach()
            window_count += 1
            samples += batch["labels"].shape[0]
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % t.logging_steps == 0 or step == plan.total_steps:
                logs = {
                    "train/loss": accelerator.reduce(window_loss / window_count, "mean").item(),
                    "train/learning_rate": scheduler.get_last_lr()[0],
                    "train/epoch": epoch + (step - epoch * plan.steps_per_epoch) / plan.steps_per_epoch,
                }
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/learning_rate']:.2e}")
                history.append({"step": step, **logs})
                total_loss += window_loss
                total_count += window_count
                window_loss.zero_()
                window_count = 0
            if t.do_eval and t.eval_strategy == "steps" and step % t.eval_steps == 0:
                results = evaluate_and_log(run, step, history)
            if step >= plan.total_steps:
                break
        if t.do_eval and t.eval_strategy == "epoch":
            results = evaluate_and_log(run, step, history, epoch=epoch + 1)
        if step >= plan.total_steps:
            break
    progress.close()
    runtime = time.perf_counter() - start
    if t.do_eval and results.get("step") != step:  # no evaluation yet of the final weights
        results = evaluate_and_log(run, step, history)

    samples = accelerator.reduce(torch.tensor(samples, device=accelerator.device), "sum").item()
    final = {
        **{k: v for k, v in results.items() if k != "step"},
        "train_loss": accelerator.reduce(total_loss / total_count, "mean").item(),  # mean over the whole run
        "train_runtime": round(runtime, 2),
        "train_samples_per_second": round(samples / runtime, 3),
        "global_step": step,
        "epochs": plan.num_epochs,
        "final_learning_rate": scheduler.get_last_lr()[0],
        **describe(accelerator),
    }
    say(accelerator, format_metrics("final", final))
    return final, history


def describe(accelerator: Accelerator) -> dict:
    """What actually ran: recorded with every result, so a '2-process' figure is provably from two processes."""
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device.type),
    }


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Gather predictions, labels and per-example losses from every process; score them once.

    `gather_for_metrics` drops the samples that even batching repeated at the end of the eval set, so the result
    is the same for any process count.
    """
    run.model.eval()
    predictions, references, losses = [], [], []
    for batch in run.eval_dl:
        logits = run.model(**batch).logits
        per_example_loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        preds, labels, per_example_loss = run.accelerator.gather_for_metrics(
            (logits.argmax(dim=-1), batch["labels"], per_example_loss)
        )
        predictions.append(preds.cpu())
        references.append(labels.cpu())
        losses.append(per_example_loss.cpu())
    predictions, references = torch.cat(predictions).numpy(), torch.cat(references).numpy()
    scores = metrics.compute_metrics(run.metric_modules, predictions, references, run.config.train.metric_average)
    return {
        **{f"eval_{k}": v for k, v in scores.items()},
        "eval_loss": torch.cat(losses).mean().item(),
        "eval_samples": len(predictions),
    }


def evaluate_and_log(run: Run, step: int, history: list, epoch: int | None = None) -> dict:
    results = evaluate(run)
    run.model.train()
    run.accelerator.log({k.replace("eval_", "eval/", 1): v for k, v in results.items()}, step=step)
    history.append({"step": step, **({"epoch": epoch} if epoch else {}), **results})
    say(run.accelerator, format_metrics(f"epoch {epoch}" if epoch else f"step {step}", results))
    return {**results, "step": step}


def say(accelerator: Accelerator, message: str) -> None:
    """Print once (main process), above the progress bar rather than through it."""
    if accelerator.is_main_process:
        tqdm.write(message)


def format_metrics(prefix: str, values: dict) -> str:
    shown = (f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return f"{prefix}: " + " ".join(shown)
