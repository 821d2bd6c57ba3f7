"""The last moments of a run: a stop signal at the last step, non-finite final weights, NaN evaluations, and the
best-checkpoint pointer. (Signals during the final evaluation, best-model load, final save and predictions, and the
reruns after them, are in test_faults.py.)"""

from __future__ import annotations

import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json, reset_accelerate_state, run_in_process, tiny_args
from tuneloop import checkpoint, optim
from tuneloop.errors import UserError
from tuneloop.preemption import Preempted


def test_a_nan_evaluation_is_never_the_best():
    """A NaN metric (a diverged model's loss) recorded first became the best, and then no later evaluation could
    beat it (every comparison with NaN is false): --load_best_model_at_end kept the NaN model."""
    state = checkpoint.TrainerState()
    assert not state.record_eval(math.nan, greater_is_better=False)
    assert state.best_metric is None and state.evals_without_improvement == 1
    state.step = 2
    assert state.record_eval(0.7, greater_is_better=False) and (state.best_metric, state.best_step) == (0.7, 2)
    state.step = 3
    assert not state.record_eval(math.nan, greater_is_better=False) and state.best_step == 2
    assert state.evals_without_improvement == 1  # a NaN counts as an evaluation without improvement


@pytest.mark.trains
def test_a_stop_at_the_last_step_checkpoints_it_and_the_rerun_only_finishes(
    tiny_model_dir, toy_files, tmp_path, monkeypatch
):
    """SIGTERM during the last optimizer step: the run saved no checkpoint and went on to the end as if nothing had
    come (the signal was agreed and dropped). Now it checkpoints the last step and stops (Preempted: exit 75), and the
    requeued run resumes there and only finishes: final evaluation, model, results, without one training step."""
    steps = 6
    args = tiny_args(tiny_model_dir, toy_files, tmp_path, max_steps=steps, eval_strategy="no", save_strategy="no")
    calls = []

    def step_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == steps:  # the last step (no accumulation: one call per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)

    original = optim.clip_and_step
    monkeypatch.setattr(optim, "clip_and_step", step_then_signal)
    with pytest.raises(Preempted) as stopped:
        run_in_process(args)
    assert stopped.value.step == steps
    assert stopped.value.checkpoint_dir == checkpoint.checkpoint_path(str(tmp_path), steps)
    assert read_json(tmp_path / checkpoint.PREEMPTED_FILE)["step"] == steps
    assert not (tmp_path / "model.safetensors").exists()
    reset_accelerate_state()

    calls.clear()
    results = run_in_process([*args, "--resume_from_checkpoint", "latest"])
    assert not calls, "the rerun trained again"
    assert results["global_step"] == steps and "eval_accuracy" in results
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / checkpoint.PREEMPTED_FILE).exists()


# A learning rate that makes the loss NaN/inf after the first step, but fewer times in a row than
# --max_nonfinite_steps by the end: the run is not stopped as diverged.
EXPLODING = dict(
    learning_rate=1e9,
    max_grad_norm=0,
    adam_epsilon=1e-30,
    max_steps=4,
    logging_steps=1,
    max_nonfinite_steps=100,
    eval_strategy="steps",
    eval_steps=1,
    save_strategy="steps",
    save_steps=1,
)


@pytest.mark.trains
def test_non_finite_final_weights_are_never_saved_as_the_model(tiny_model_dir, toy_files, tmp_path):
    """The last steps' loss was NaN/inf (fewer than --max_nonfinite_steps): the run saved those NaN weights as its
    model. Now it refuses in one line naming the best checkpoint, which stays; no model is written."""
    refused = (
        r"NaN/inf in the last \d+ optimizer step\(s\) .*not saving those weights as the model; "
        r"kept: the best checkpoint .*step_0000001 \(step 1\)"
    )
    with pytest.raises(UserError, match=refused):
        run_in_process(tiny_args(tiny_model_dir, toy_files, tmp_path, **EXPLODING))
    assert not (tmp_path / "model.safetensors").exists()
    best = checkpoint.checkpoint_path(str(tmp_path), 1)
    assert best in checkpoint.complete_checkpoints(str(tmp_path))
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(best, "model.safetensors")).values())


@pytest.mark.trains
def test_non_finite_final_weights_with_load_best_end_on_the_best(tiny_model_dir, toy_files, tmp_path):
    """The refusal is only for NaN weights that would be saved: with --load_best_model_at_end the model saved is the
    best checkpoint's (step 1: its accuracy is never beaten), so the run ends normally. (A guard for the refusal above,
    which must not stop such a run; it passes on the code before it too.)"""
    results = run_in_process(tiny_args(tiny_model_dir, toy_files, tmp_path, load_best_model_at_end="true", **EXPLODING))
    assert results["best_step"] == 1
    saved = load_file(str(tmp_path / "model.safetensors"))
    best = load_file(os.path.join(checkpoint.checkpoint_path(str(tmp_path), 1), "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert saved.keys() & best.keys() and all(torch.equal(saved[k], best[k]) for k in saved.keys() & best.keys())


def test_the_best_checkpoint_is_found_after_the_run_folder_moved(tmp_path):
    """The best-checkpoint pointer is a path recorded in the checkpoint: after the run folder moved (or is spelled
    another way), rotation no longer recognised the best (and deleted it) and --load_best_model_at_end loaded a folder
    that is not there. The pointer is found again under this session's output_dir, and a best whose checkpoint is gone
    is forgotten rather than loaded."""
    from types import SimpleNamespace

    from conftest import saved_state_only
    from tuneloop.loop import keep_best_in_reach

    old, moved = tmp_path / "old", tmp_path / "moved"
    for step in (2, 4, 6):
        saved_state_only(moved, step=step)
    state = checkpoint.TrainerState(
        step=6, best_step=2, best_metric=0.5, best_checkpoint=checkpoint.checkpoint_path(str(old), 2)
    )
    run = SimpleNamespace(
        config=SimpleNamespace(train=SimpleNamespace(output_dir=str(moved))),
        training=SimpleNamespace(state=state),
        accelerator=SimpleNamespace(is_main_process=True),
    )
    assert keep_best_in_reach(run) == state.best_checkpoint == checkpoint.checkpoint_path(str(moved), 2)
    deleted = checkpoint.rotate_checkpoints(str(moved), 1, state.best_checkpoint)
    assert deleted == [checkpoint.checkpoint_path(str(moved), 4)]  # not the best (step 2)

    shutil.rmtree(checkpoint.checkpoint_path(str(moved), 2))  # gone (deleted by hand)
    assert keep_best_in_reach(run) is None
    assert (state.best_checkpoint, state.best_step, state.best_metric) == (None, None, None)
