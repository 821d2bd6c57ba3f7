"""The training run: `train` builds it with `setup.setup`, then runs its phases: the loop (`fit`), evaluation, the
final save, predictions and the report.

Reads top to bottom like the loop of Accelerate's `complete_nlp_example.py`: the entry, the phases, the loop, the
step/epoch boundary, evaluation. A "step" always means an optimizer step.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from tuneloop import checkpoint, elastic, optim, outputs, predict, report, stream, throughput
from tuneloop import problem as problems
from tuneloop.errors import UserError
from tuneloop.options import Config, TrainArguments
from tuneloop.preemption import Preempted, StopRequest
from tuneloop.runtime import describe, end_together, say
from tuneloop.setup import Run, setup


class TrainingDiverged(UserError):
    """The loss stayed NaN/inf: stopping keeps the last good checkpoint instead of saving a broken model."""


def train(config: Config) -> dict:
    """The whole job, for every command: set up, then train, or only evaluate, and/or predict; save; report.
    Returns the final metrics.

    Raises `Preempted` after saving a checkpoint when a stop signal arrived; the caller exits with REQUEUE_EXIT_CODE.
    A training job records stop signals from its first line to its last (the handlers only record them): the ranks
    agree on one at the end of every optimizer step and after every phase that follows the last step, so a signal
    during set-up, the final evaluation, the final save or the predictions ends the job like one during training.
    """
    stopping = StopRequest() if config.train.do_train else contextlib.nullcontext()
    with outputs.claimed(config), stopping as stop:  # the output folder is this run's alone until it returns
        run = setup(config)
        accelerator, output_dir = run.accelerator, run.config.train.output_dir
        if stop:  # a training job
            run.training.stop = stop
            stop.connect(accelerator.num_processes, accelerator.device)
        try:
            return run_phases(run)
        except Preempted as stopped:
            # Every rank waits for the marker (or stops with the main process's failure to write it): a job script
            # that sees one rank gone must find it.
            checkpoint.write_preempted(
                accelerator, output_dir, stopped.checkpoint_dir, stopped.step, stopped.signal_name
            )
            end_together(accelerator)
            raise


def run_phases(run: Run) -> dict:
    """What `train` does once everything is built: train (or only evaluate), save, predict, report."""
    config, accelerator = run.config, run.accelerator  # an elastic resume chooses its own batch layout
    t = config.train
    results, history, eval_outputs = {}, None, None
    if t.do_train:
        results, eval_outputs = fit(run)
        history = run.training.state.history
        run.problem.record_in(accelerator.unwrap_model(run.model).config)
        outputs.save_final_model(accelerator, run.model, run.tokenizer, t.output_dir, config.model.merge_adapter)
        outputs.save_results(accelerator, config, results, history)
        stop_if_asked(run)
    elif t.do_eval:  # evaluating the model as loaded
        results, eval_outputs = evaluate(run)
        results |= describe(accelerator)
        say(accelerator, format_metrics("eval", results))
        outputs.save_results(accelerator, config, results)
    test_results = None
    if t.do_predict:
        with checkpoint.writing(t.output_dir, t.output_dir, together=accelerator):
            test_results = predict.predict_test_split(
                accelerator,
                run.model,
                run.test_dl,
                run.test_split,
                run.problem,
                run.metric_modules,
                t,
                describe(accelerator),
                config.data.label_separator,
            )
        if t.do_train:
            stop_if_asked(run)
    if t.do_train or t.do_eval:  # the confusion matrix and per-class table are the final model's, from its evaluation
        with checkpoint.writing(t.output_dir, t.output_dir, together=accelerator):
            report.write_report(
                accelerator,
                config,
                results,
                run.problem,
                history,
                eval_outputs,
                test_results,
                run.training.train_size if run.training else None,
            )
    say(accelerator, report.summary_table({**results, **(test_results or {})}, t.output_dir))
    end_together(accelerator)
    return results


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
        return {
            "window_loss": self.window.item(),
            "window_count": self.window_count,
            "total_loss": self.total.item(),
            "total_count": self.total_count,
            "nonfinite_streak": int(self.nonfinite_streak),
            "skipped_steps": self.skipped_steps,
        }


@dataclass
class Session:
    """This process's live counters for one session of a run (a resumed run is a new session of the same run)."""

    meter: LossMeter
    speed: throughput.SpeedMeter
    stop: StopRequest
    progress: tqdm
    started: float  # perf_counter() when this session's loop began
    earlier_runtime: float  # seconds of training in earlier sessions
    grad_norm: torch.Tensor | None = None  # the latest optimizer step's pre-clip norm
    eval_outputs: predict.Outputs | None = None  # the latest evaluation's, for the report


def fit(run: Run) -> tuple[dict, predict.Outputs | None]:
    """The training loop. Returns the final metrics and the final evaluation's gathered outputs; the history of every
    log and evaluation is in the run's `training.state`.

    Everything needed to continue is in that state (global) and the loss meter (per process), so a checkpoint taken
    at any optimizer step resumes into exactly the same run. Raises `Preempted` once the checkpoint of a stop signal
    is written. A run resumed at its end (a stop after the last step: the checkpoint is the last step's) trains no
    further and goes straight to the finish.
    """
    t, plan, accelerator, state = run.config.train, run.training.plan, run.accelerator, run.training.state
    model, optimizer, scheduler = run.model, run.training.optimizer, run.training.scheduler
    # In a log file (CI, SLURM) a bar redrawn every second is noise: redraw every 30 s there.
    progress = tqdm(
        total=plan.total_steps,
        initial=state.step,
        desc="training",
        disable=not accelerator.is_local_main_process,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    # The word embedding's gradient kept between steps, only its used rows zeroed (same maths, no vocabulary-sized fill)
    kept_embedding_grad = None if t.torch_compile else optim.KeptEmbeddingGradient.install(accelerator, model)
    keep_best_in_reach(run)
    with progress:
        session = run.training.session = Session(
            LossMeter(accelerator.device, run.training.rank_state),
            throughput.SpeedMeter(accelerator.unwrap_model(model), accelerator.device, run.started_at),
            run.training.stop,
            progress,
            time.perf_counter(),
            state.train_runtime,
        )
        if t.eval_on_start and state.step == 0:  # a baseline to compare with, not a candidate for the best model
            session.eval_outputs = evaluate_and_log(run, best_candidate=False)
        ended = (
            "max steps"
            if state.step >= plan.total_steps
            else "early stopping"
            if state.patience_exhausted(t.early_stopping_patience)
            else None
        )
        for epoch in range(state.epoch, plan.epochs_to_run) if not ended else ():
            model.train()
            for batch in epoch_batches(run, epoch):
                run.training.samples.record(state.step + 1, batch)
                with accelerator.accumulate(model):
                    # The loss is the loop's own (problem.py), the same function evaluation uses.
                    labels = batch.pop("labels")  # (the model would compute its own loss from them, and discard it)
                    loss = run.problem.loss(model(**batch).logits, labels)
                    accelerator.backward(
                        weighted_for_global_mean(accelerator, loss, len(labels)) if t.max_tokens_per_batch else loss
                    )
                    grad_norm, skipped = optim.clip_and_step(accelerator, model, optimizer, t.max_grad_norm)
                    session.grad_norm = grad_norm if grad_norm is not None else session.grad_norm
                    if not skipped:  # an fp16 overflow updated nothing: the schedule waits with the weights
                        scheduler.step()
                    optimizer.zero_grad()
                    if kept_embedding_grad and accelerator.sync_gradients:
                        kept_embedding_grad.zero_grad()
                session.meter.add(loss)
                session.speed.add_batch(batch)
                state.batches_in_epoch += 1
                if accelerator.sync_gradients:
                    state.step += 1
                    session.meter.end_step(skipped)
                    session.speed.end_step()
                    progress.update(1)
                    if ended := boundary(run, session, epoch_end=False):
                        break
            if ended == "early stopping":
                break
            if run.training.epoch_used_up():
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            if ended or (ended := boundary(run, session, epoch_end=True)):
                break
    return finish_training(run, session, stopped_early=ended == "early stopping")


def weighted_for_global_mean(accelerator: Accelerator, loss: torch.Tensor, count: int) -> torch.Tensor:
    """This rank's mean loss weighted by its share of the step's samples, so that the gradient DDP/DeepSpeed average
    over ranks is the mean over all samples (token-budget batches differ in size between ranks): with w_r = n_r * N /
    sum(n), sum_r(w_r * g_r) / N = sum_r(n_r * g_r) / sum(n). One scalar all-reduce per micro-step. (With
    --class_weights it keeps each rank's class-weighted mean, equal to one process's only when ranks' weights match.)"""
    if accelerator.num_processes == 1:
        return loss
    total = accelerator.reduce(torch.tensor(float(count), device=loss.device), "sum")
    return loss * (count * accelerator.num_processes / total)


def epoch_batches(run: Run, epoch: int):
    """This epoch's batches in their seeded order; resuming mid-epoch, the same order minus what was trained on."""
    training = run.training
    training.train_dl.set_epoch(epoch)
    if not training.state.batches_in_epoch or isinstance(training.train_dl, stream.StreamLoader):
        return training.train_dl  # (a stream skips to its checkpoint's position itself: StreamLoader.resume_at)
    batches = run.accelerator.skip_first_batches(training.train_dl, training.state.batches_in_epoch)
    batches.set_epoch(epoch)  # a new loader would otherwise replay epoch 0's order
    return batches


def boundary(run: Run, session: Session, epoch_end: bool) -> str | None:
    """Everything that happens between optimizer steps, once and in this order: log, evaluate, agree on a stop
    signal, early stopping, checkpoint, preempt. At the end of a step, or of an epoch (`epoch_end`).

    Returns why training ends here ("max steps" or "early stopping"), or None to go on. The final weights are
    evaluated after the loop (`finish_training`), not here.
    """
    t, state = run.config.train, run.training.state
    last_step = state.step >= run.training.plan.total_steps
    if not epoch_end and (state.step % t.logging_steps == 0 or last_step or t.logging_first_step and state.step == 1):
        log_step(run, session)
    evaluated = not last_step and t.do_eval and evaluation_due(t, state.step, epoch_end)
    if evaluated:  # weights whose last step's loss was not finite are never the best: their checkpoint is refused
        session.eval_outputs = evaluate_and_log(
            run, epoch=state.epoch if epoch_end else None, best_candidate=not check_health(run, session.meter)
        )
    new_best = evaluated and state.best_step == state.step
    signal_name = session.stop.agreed()  # collective: every rank gets the same answer
    stopped_early = evaluated and early_stop(run)
    if signal_name:  # at the last step too: the requeued job resumes there and only finishes
        stop_here(run, session, signal_name)
    if not last_step and checkpoint_due(t, state.step, new_best, epoch_end):
        save_checkpoint(run, session)
    return "max steps" if last_step else "early stopping" if stopped_early else None


def evaluation_due(t: TrainArguments, step: int, epoch_end: bool) -> bool:
    if t.eval_strategy == "epoch":
        return epoch_end
    return t.eval_strategy == "steps" and not epoch_end and step % t.eval_steps == 0


def checkpoint_due(t: TrainArguments, step: int, new_best: bool, epoch_end: bool = False) -> bool:
    if new_best and (t.load_best_model_at_end or t.save_strategy == "best"):
        return True  # the best weights must survive until the end
    if t.save_strategy == "epoch":
        return epoch_end
    return t.save_strategy == "steps" and not epoch_end and step % t.save_steps == 0


def finish_training(run: Run, session: Session, stopped_early: bool) -> tuple[dict, predict.Outputs | None]:
    """After the last step: log what is left, evaluate the final (or, with --load_best_model_at_end, the best) weights,
    and put the run's figures together. Final weights whose last steps' loss was not finite are refused."""
    t, state, accelerator = run.config.train, run.training.state, run.accelerator
    runtime_seconds = time.perf_counter() - session.started
    if session.meter.window_count:  # early stopping between logging steps
        log_step(run, session)
    # Read before loading the best state brings back its scheduler.
    final_learning_rate = run.training.scheduler.get_last_lr()[0]
    # The last steps' loss was NaN/inf, fewer times in a row than --max_nonfinite_steps (which would have stopped the
    # run): such weights are never saved as the model, nor are they ever the best.
    nonfinite = check_health(run, session.meter)
    best = keep_best_in_reach(run) if t.load_best_model_at_end else None
    if nonfinite and not best:
        refuse_nonfinite_model(run, nonfinite)
    outputs = session.eval_outputs
    if t.do_eval and state.last_eval.get("step") != state.step:  # the final weights, not evaluated yet
        outputs = evaluate_and_log(
            run, epoch=state.epoch if state.batches_in_epoch == 0 else None, best_candidate=not nonfinite
        )
    stop_if_asked(run)  # a stop during the final evaluation
    if best and state.best_step != state.step:
        # Checkpoint the final step before its weights are replaced: a stop from here on resumes into the finish.
        if not this_step_saved(run):
            save_checkpoint(run, session)
        say(
            accelerator,
            f"tuneloop: loading the best model (step {state.best_step}, "
            f"{best_metric_key(run)}={state.best_metric:.4f}) from {best}",
        )
        elastic.load_checkpoint(accelerator, best, trained_only=run.config.model.use_peft)
        outputs = evaluate_and_log(run)
        stop_if_asked(run)
    elif t.do_eval and outputs is None:
        # Resumed at the end after the final evaluation (it is in the history already): its outputs (the report's
        # confusion matrix, a tuned multi-label threshold) are computed again, not logged twice.
        _, outputs = evaluate(run)

    speed_figures = session.speed.summary(accelerator, run.training.peak_tflops, runtime_seconds)
    accelerator.log({f"speed/{k}": v for k, v in speed_figures.items() if v is not None}, step=state.step)
    plan = run.training.plan  # (a stream's epochs end where its ranks' parts do: the epochs begun)
    epochs = plan.num_epochs if plan.epoch_limit is None else state.epoch + bool(state.batches_in_epoch)
    meter = session.meter
    final = {
        **{k: v for k, v in state.last_eval.items() if k != "step"},
        "train_loss": accelerator.reduce(meter.total / meter.total_count, "mean").item(),  # mean over the whole run
        "train_runtime": round(session.earlier_runtime + runtime_seconds, 2),  # all sessions of this run
        **speed_figures,  # this session's own throughput
        "global_step": state.step,
        "epochs": epochs,
        "final_learning_rate": final_learning_rate,
        **(
            {"best_step": state.best_step, f"best_{best_metric_key(run)}": state.best_metric} if state.best_step else {}
        ),
        **({"stopped_early": True} if stopped_early else {}),
        **({"texts_in_train_and_eval": run.training.texts_in_train} if run.training.texts_in_train else {}),
        **({"skipped_steps": meter.skipped_steps} if accelerator.mixed_precision == "fp16" else {}),
        **describe(accelerator),
    }
    say(accelerator, format_metrics("final", final))
    return final, outputs


def refuse_nonfinite_model(run: Run, streak: int) -> None:
    """Stop before NaN/inf weights become the model; name the checkpoint to use instead."""
    t, state = run.config.train, run.training.state
    saved = checkpoint.complete_checkpoints(t.output_dir)
    kept = (
        f"the best checkpoint {state.best_checkpoint} (step {state.best_step})"
        if state.best_checkpoint in saved
        else f"the last good checkpoint {saved[-1]}"
        if saved
        else "no checkpoint"
    )
    raise TrainingDiverged(
        f"the training loss was NaN/inf in the last {streak} optimizer step(s) (to step {state.step}; fewer than "
        f"--max_nonfinite_steps {t.max_nonfinite_steps}): not saving those weights as the model; kept: {kept}. "
        "Lower --learning_rate, keep --max_grad_norm on, or end on the best weights with --load_best_model_at_end true"
    )


def keep_best_in_reach(run: Run) -> str | None:
    """The best checkpoint, found under this session's output_dir (the folder may have moved since the checkpoint
    recorded it), or None. A best whose checkpoint is gone (deleted by hand, torn) is forgotten, with a line: the
    pointer never names a checkpoint that --load_best_model_at_end could not load."""
    t, state = run.config.train, run.training.state
    if not state.best_checkpoint:
        return None
    name = os.path.basename(os.path.normpath(state.best_checkpoint))
    here = os.path.join(t.output_dir, checkpoint.CHECKPOINTS_DIR, name)
    if here in checkpoint.complete_checkpoints(t.output_dir):
        state.best_checkpoint = here
        return here
    say(
        run.accelerator,
        f"warning: the best checkpoint {state.best_checkpoint} (step {state.best_step}) is gone: "
        "the best model is chosen again from the evaluations to come",
    )
    state.best_checkpoint = state.best_step = state.best_metric = None
    return None


def this_step_saved(run: Run) -> bool:
    """Whether this step's checkpoint is on disk, complete (saved at this step, or resumed from)."""
    t, state = run.config.train, run.training.state
    return checkpoint.checkpoint_path(t.output_dir, state.step) in checkpoint.complete_checkpoints(t.output_dir)


def stop_here(run: Run, session: Session, signal_name: str, save: bool = True) -> None:
    """End the job as a preemption: this step's checkpoint (`save`), then `Preempted`, which the job turns into the
    requeue marker and exit 75."""
    saved = save_checkpoint(run, session) if save else None
    if saved is None:  # saved before, or not saved (its loss was not finite): the newest complete one, listed after
        # the save's last agreement, so no rank lists while the main process rotates
        saved = next(reversed(checkpoint.complete_checkpoints(run.config.train.output_dir)), None)
    raise Preempted(signal_name, saved, run.training.state.step)


def stop_if_asked(run: Run) -> None:
    """Between the phases after the last step (final evaluation, best-model load, final save, predictions): a stop
    signal agreed here ends the job as one during training does. Its checkpoint is the last step's, so the requeued
    job (--resume_from_checkpoint latest) resumes at the end and only finishes what is left."""
    if signal_name := run.training.stop.agreed():  # once the best weights are loaded, the last step's checkpoint exists
        stop_here(run, run.training.session, signal_name, save=not this_step_saved(run))


def log_step(run: Run, session: Session) -> None:
    """Log the loss window; also where a diverged run is caught (a sync point anyway)."""
    accelerator, state, meter = run.accelerator, run.training.state, session.meter
    logs = {
        "train/loss": meter.take_window(accelerator),
        "train/learning_rate": run.training.scheduler.get_last_lr()[0],
        # a stream of unknown length: the epochs begun
        "train/epoch": state.step / per_epoch if (per_epoch := run.training.plan.steps_per_epoch) else state.epoch,
    }
    if session.grad_norm is not None:
        logs["train/grad_norm"] = float(session.grad_norm)
    if accelerator.mixed_precision == "fp16":
        logs["train/skipped_steps"] = meter.skipped_steps
    accelerator.log(logs, step=state.step)
    session.progress.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/learning_rate']:.2e}")
    state.history.append({"step": state.step, **logs})
    check_health(run, meter)


def check_health(run: Run, meter: LossMeter) -> int:
    """Stop a diverged run; otherwise return the current streak of non-finite steps (the worst over processes)."""
    t, state = run.config.train, run.training.state
    streak = meter.worst_streak(run.accelerator)
    if streak >= t.max_nonfinite_steps:
        found = checkpoint.complete_checkpoints(t.output_dir)
        raise TrainingDiverged(
            f"the training loss was NaN/inf for {streak} optimizer steps in a row (step {state.step}): lower "
            "--learning_rate, keep --max_grad_norm on, prefer bf16 to fp16, or check the data; last good checkpoint: "
            + (found[-1] if found else "none (set --save_strategy to keep one)")
        )
    return streak


def save_checkpoint(run: Run, session: Session) -> str | None:
    """Save this step's checkpoint and rotate the old ones; its path (None: not saved, the loss is not finite)."""
    t, state, accelerator = run.config.train, run.training.state, run.accelerator
    if check_health(run, session.meter):  # never put a state whose loss is NaN/inf next to the good ones
        say(accelerator, f"tuneloop: not saving step {state.step}: its training loss is not finite")
        return None
    state.train_runtime = session.earlier_runtime + time.perf_counter() - session.started
    if state.best_step == state.step:  # the pointer moves with the save (in the state it writes), never without one
        state.best_checkpoint = checkpoint.checkpoint_path(t.output_dir, state.step)
    path = checkpoint.save_checkpoint(
        accelerator,
        t.output_dir,
        state,
        session.meter.state_dict() | stream.position(run.training.train_dl),  # this rank's sums and stream position
        trained_only=run.config.model.use_peft,
        keep=t.save_total_limit,
    )
    say(accelerator, f"tuneloop: checkpoint {path}")
    return path


def best_metric_key(run: Run) -> str:
    """The metric that picks the best model: --metric_for_best_model, else the first metric computed; with several
    eval sets, of the set it names (eval_<set>_<metric>), else of the first set."""
    eval_names = [prefix.removeprefix("eval_") for prefix in run.eval_dls or ["eval"]]
    metric = run.config.train.metric_for_best_model or next(iter(run.metric_modules))
    return problems.best_metric_key(metric, eval_names)


def early_stop(run: Run) -> bool:
    patience, state = run.config.train.early_stopping_patience, run.training.state
    if not state.patience_exhausted(patience):
        return False
    say(
        run.accelerator,
        f"tuneloop: early stopping: no improvement of {best_metric_key(run)} "
        f"in {patience} evaluations (best {state.best_metric:.4f} at step {state.best_step})",
    )
    return True


def evaluate(run: Run) -> tuple[dict, predict.Outputs]:
    """Gather the logits and labels of each eval set from every process; score them once. Returns the metrics (each
    set's under its prefix: eval_<metric>, or eval_<name>_<metric> with several sets) and the first set's gathered
    outputs (the report's confusion matrix comes from the final evaluation's: no extra pass).

    `gather_for_metrics` drops the samples that even batching repeated at the end of the eval set, so the result
    is the same for any process count (predict.gather).
    """
    results, first, problem = {}, None, run.problem
    for prefix, dataloader in run.eval_dls.items():
        outputs = predict.gather(run.accelerator, run.model, dataloader)
        if first is None:  # on the first set, gathered: every rank chooses the same
            problem.choose_threshold(outputs.logits, outputs.labels)
        results |= predict.score(outputs, problem, run.metric_modules, run.config.train.metric_average, prefix=prefix)
        first = outputs if first is None else first
    return results, first


def evaluate_and_log(run: Run, epoch: int | None = None, best_candidate: bool = True) -> predict.Outputs:
    """Evaluate, log, record in the history and (a `best_candidate`) in the best-model tracker: `state.best_step` is
    this step when it is the new best. Returns the gathered outputs."""
    t, state = run.config.train, run.training.state
    results, outputs = evaluate(run)
    run.model.train()
    run.accelerator.log({k.replace("eval_", "eval/", 1): v for k, v in results.items()}, step=state.step)
    state.history.append({"step": state.step, **({"epoch": epoch} if epoch else {}), **results})
    state.last_eval = {**results, "step": state.step}
    say(run.accelerator, format_metrics(f"epoch {epoch}" if epoch else f"step {state.step}", results))
    if best_candidate:
        key = best_metric_key(run)
        greater = t.greater_is_better if t.greater_is_better is not None else not problems.lower_is_better(key)
        state.record_eval(results[key], greater, t.early_stopping_threshold)
    return outputs


def format_metrics(prefix: str, values: dict) -> str:
    shown = (f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return f"{prefix}: " + " ".join(shown)
