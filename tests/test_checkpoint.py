"""Checkpoints, exact resume, preemption, best model, early stopping, health: with real processes and real signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, launch_command, launch_env, not_in_a_unit_test, read_json, run_in_process, tiny_args
from tuneloop import checkpoint, outputs
from tuneloop.errors import UserError
from tuneloop.preemption import REQUEUE_EXIT_CODE


def weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "model.safetensors"))


def run_to_end(args: list[str], num_processes: int) -> None:
    """One process: plain `python train.py` (the signal then reaches the trainer itself); two: `accelerate launch`."""
    launch(args, num_processes, launcher=num_processes > 1)


def interrupt(args: list[str], output_dir: Path, sig: signal.Signals, num_processes: int) -> tuple[int, str]:
    """Start a real run, wait until its first periodic checkpoint exists (training is under way), then signal it.

    One process: the signal goes to the trainer itself. Two: to rank 1 only, so rank 0 must learn of it through
    the ranks' agreement; a rank that stopped alone would leave the other blocked (the timeout would catch it).
    """
    proc = subprocess.Popen(
        launch_command(args, num_processes, launcher=num_processes > 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launch_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not checkpoint.complete_checkpoints(str(output_dir)):
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    if num_processes == 1:
        proc.send_signal(sig)
    else:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        ranks = {_rank_of(pid): int(pid) for pid in children}
        ranks.pop(None, None)  # anything that is not a worker
        assert sorted(ranks) == ["0", "1"], f"expected ranks 0 and 1 under the launcher, found {ranks}"
        os.kill(ranks["1"], sig)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the interrupted run hung instead of saving and exiting") from None
    return proc.returncode, stderr


def _rank_of(pid: str) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"RANK=")), None)


def per_step_losses(output_dir) -> dict[int, float]:
    return {e["step"]: e["train/loss"] for e in read_json(Path(output_dir) / "log_history.json") if "train/loss" in e}


@pytest.mark.multiprocess
def test_sigterm_then_resume_replays_the_uninterrupted_run_bitwise(dropout_model_dir, toy_files, tmp_path):
    """A real `python train.py` stopped by SIGTERM mid-run and resumed equals the run never stopped, bit for bit:
    every logged loss, the weights, the final metrics. Guards anything a checkpoint forgets (RNG, data position, loss
    sums)."""
    common = dict(logging_steps=1, save_strategy="steps", save_steps=10, num_train_epochs=6, eval_strategy="epoch")
    reference = tmp_path / "reference"
    # The uninterrupted run goes alongside the one to interrupt: one process each, no port to share, one core each.
    with open(tmp_path / "reference.log", "w") as log:
        uninterrupted = subprocess.Popen(
            launch_command(tiny_args(dropout_model_dir, toy_files, reference, **common), 1, launcher=False),
            stdout=log,
            stderr=log,
            env=launch_env(),
            cwd=ROOT,
        )
        interrupted = tmp_path / "interrupted"
        args = tiny_args(dropout_model_dir, toy_files, interrupted, **common)
        code, stderr = interrupt(args, interrupted, signal.SIGTERM, 1)
        assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert code == REQUEUE_EXIT_CODE, stderr[-3000:]
    marker = read_json(interrupted / "preempted.json")
    assert marker["signal"] == "SIGTERM" and os.path.isdir(marker["checkpoint"])
    total = read_json(reference / "all_results.json")["global_step"]
    assert 10 <= marker["step"] < total, "the stop must land mid-run"

    run_to_end([*args, "--resume_from_checkpoint", "latest"], 1)
    assert not (interrupted / "preempted.json").exists(), "a resumed run clears the requeue marker"
    assert per_step_losses(interrupted) == per_step_losses(reference)  # every step's loss, bit for bit
    assert len(per_step_losses(reference)) == total
    expected, got = weights(reference), weights(interrupted)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ref_results, results = read_json(reference / "all_results.json"), read_json(interrupted / "all_results.json")
    assert (
        results["eval_accuracy"] == ref_results["eval_accuracy"] and results["train_loss"] == ref_results["train_loss"]
    )


@pytest.mark.multiprocess
def test_sigusr1_on_one_rank_stops_both_together_and_resumes(dropout_model_dir, toy_files, tmp_path):
    """Two real processes; SIGUSR1 reaches rank 1 only. Both stop at the same step with one checkpoint holding both
    ranks' parts, and the resumed run replays the uninterrupted one. Guards a rank that stops alone (the other would
    hang in a collective) and a checkpoint missing a rank's RNG or loss sums."""
    common = dict(
        logging_steps=1, save_strategy="steps", save_steps=8, num_train_epochs=5, per_device_train_batch_size=4
    )
    reference = tmp_path / "reference"
    run_to_end(tiny_args(dropout_model_dir, toy_files, reference, **common), 2)

    interrupted = tmp_path / "interrupted"
    args = tiny_args(dropout_model_dir, toy_files, interrupted, **common)
    code, stderr = interrupt(args, interrupted, signal.SIGUSR1, 2)
    # Both workers exit 75; `accelerate launch` turns a failed worker into its own exit 1 (torchrun's summary shows it).
    assert code != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in stderr, stderr[-3000:]
    marker = read_json(interrupted / "preempted.json")
    saved = Path(marker["checkpoint"])
    assert marker["signal"] == "SIGUSR1" and saved.name == f"step_{marker['step']:07d}"
    for rank in (0, 1):  # one checkpoint, with both processes' parts
        assert (saved / f"random_states_{rank}.pkl").is_file() and (saved / f"loop_state_{rank}.json").is_file()
    assert not list((interrupted / "checkpoints").glob(".tmp-*"))

    run_to_end([*args, "--resume_from_checkpoint", "latest"], 2)
    expected, got = per_step_losses(reference), per_step_losses(interrupted)
    assert expected.keys() == got.keys()
    assert all(abs(expected[s] - got[s]) <= 1e-6 * max(1.0, abs(expected[s])) for s in expected)
    ref_w, w = weights(reference), weights(interrupted)
    assert all(torch.allclose(ref_w[k], w[k], rtol=1e-5, atol=1e-6) for k in ref_w)
    results = read_json(interrupted / "all_results.json")
    assert (results["num_processes"], results["distributed_type"]) == (2, "MULTI_CPU")


CHECKPOINTED = dict(save_strategy="steps", save_steps=20, num_train_epochs=2, report_to="wandb")


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, toy_files, tmp_path_factory) -> Path:
    """2 epochs (60 steps) with checkpoints at steps 20 and 40, logged to an offline wandb run. Tests copy it."""
    out = tmp_path_factory.mktemp("checkpointed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        run_in_process(tiny_args(tiny_model_dir, toy_files, out, **CHECKPOINTED))
    return out


def test_latest_ignores_a_checkpoint_cut_off_mid_write(checkpointed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    complete = checkpoint.complete_checkpoints(str(out))
    assert [Path(p).name for p in complete] == ["step_0000020", "step_0000040"]
    # A kill during the write leaves a temporary folder, or (a copy by hand) a folder without its state file.
    shutil.copytree(complete[-1], out / "checkpoints" / ".tmp-step_0000060")
    shutil.copytree(complete[-1], out / "checkpoints" / "step_0000099")
    (out / "checkpoints" / "step_0000099" / checkpoint.STATE_FILE).unlink()
    assert checkpoint.find_checkpoint(str(out), "latest") == complete[-1]
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoint.find_checkpoint(str(out), str(out / "checkpoints" / "step_0000099"))


def test_resume_refuses_a_changed_batch_layout(checkpointed_run, tiny_model_dir, toy_files, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    args = tiny_args(tiny_model_dir, toy_files, out, gradient_accumulation_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(UserError, match=r"gradient_accumulation_steps 1 -> 2.*same process count"):
        run_in_process(args)


@pytest.mark.trains
def test_latest_without_checkpoints_starts_fresh(tiny_model_dir, toy_files, tmp_path, capsys):
    results = run_in_process(
        tiny_args(tiny_model_dir, toy_files, tmp_path, num_train_epochs=1, resume_from_checkpoint="latest")
    )
    assert results["global_step"] == 30 and "starting from scratch" in capsys.readouterr().out


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    for step in (10, 20, 30, 40):
        path = Path(checkpoint.checkpoint_path(str(tmp_path), step))
        path.mkdir(parents=True)
        (path / checkpoint.STATE_FILE).write_text("{}")
    best = checkpoint.checkpoint_path(str(tmp_path), 10)
    deleted = checkpoint.rotate_checkpoints(str(tmp_path), 2, best)
    assert [Path(p).name for p in deleted] == ["step_0000020"]
    assert [Path(p).name for p in checkpoint.complete_checkpoints(str(tmp_path))] == [
        "step_0000010",
        "step_0000030",
        "step_0000040",
    ]


def fake_checkpoints(output_dir: Path, steps, manifest: bool = True) -> list[Path]:
    """Checkpoint folders holding a state file, a weights file and (manifest) the manifest listing them."""
    paths = []
    for step in steps:
        path = Path(checkpoint.checkpoint_path(str(output_dir), step))
        path.mkdir(parents=True)
        (path / checkpoint.STATE_FILE).write_text("{}")
        (path / "model.safetensors").write_bytes(b"w" * 64)
        if manifest:
            sizes = {checkpoint.STATE_FILE: 2, "model.safetensors": 64}
            (path / checkpoint.MANIFEST_FILE).write_text(json.dumps(sizes))
        paths.append(path)
    return paths


@pytest.mark.parametrize("manifest", [True, False])
def test_a_checkpoint_deleted_while_the_listing_reads_it_is_not_listed(manifest, tmp_path, monkeypatch):
    """Rank 0 rotating while another rank lists the checkpoints (a stop's marker, the health check): a folder found
    by the listing and deleted before its manifest is read. Staged deterministically: the deletion happens right
    after the folder names are read. Guards a deleted checkpoint reported as the newest complete one (a folder
    without a manifest counted as an old, whole one) and a listing that raises FileNotFoundError."""
    fake_checkpoints(tmp_path, (10, 20, 30), manifest)
    names = checkpoint.saved_checkpoints

    def listed_then_rotated(output_dir):
        found = names(output_dir)
        shutil.rmtree(found[-1])  # what rank 0's rotation (or a second save of the step) does meanwhile
        return found

    monkeypatch.setattr(checkpoint, "saved_checkpoints", listed_then_rotated)
    assert [Path(p).name for p in checkpoint.complete_checkpoints(str(tmp_path))] == ["step_0000010", "step_0000020"]


def test_rotation_happens_inside_the_save_before_its_last_agreement(tmp_path, monkeypatch):
    """The ranks list checkpoints after a save (a stop's marker, the health check), so every deletion must be over
    before any rank leaves `save_checkpoint`: rotation runs on the main process before the save's last agreement
    (the barrier every rank waits in). Fakes: `runtime.agree` and `shutil.rmtree` record the order (one real
    process; the agreement is the barrier of a multi-process run). Guards rotation after the barrier (main's
    `loop.save_checkpoint` rotated once `checkpoint.save_checkpoint` had returned on every rank)."""
    from accelerate import Accelerator

    from tuneloop import runtime

    fake_checkpoints(tmp_path, (10, 20))
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    accelerator.prepare(torch.nn.Linear(4, 2), torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()))
    events, agree, rmtree = [], runtime.agree, shutil.rmtree
    monkeypatch.setattr(runtime, "agree", lambda *args: (events.append("agree"), agree(*args)))
    monkeypatch.setattr(
        shutil, "rmtree", lambda path, **kw: (events.append(("delete", Path(path).name)), rmtree(path, **kw))
    )
    checkpoint.save_checkpoint(accelerator, str(tmp_path), checkpoint.TrainerState(step=30), {}, keep=2)
    assert [Path(p).name for p in checkpoint.complete_checkpoints(str(tmp_path))] == ["step_0000020", "step_0000030"]
    assert ("delete", "step_0000010") in events and events[-1] == "agree", events


def test_rotation_deletes_a_universal_conversion_with_its_checkpoint(tmp_path):
    """A DeepSpeed elastic resume converts a checkpoint into `.universal-step_N` beside it (about its size again):
    rotation deletes the conversion when it deletes its checkpoint, and any conversion whose checkpoint is already
    gone; a kept checkpoint keeps its conversion, and what the conversion links to is never touched. Guards
    conversions that were never deleted."""
    kept_best, doomed, newest = fake_checkpoints(tmp_path, (10, 20, 30))
    root = tmp_path / "checkpoints"
    for source in (kept_best, doomed, root / "step_0000005"):  # step 5: deleted by hand earlier
        universal = root / (checkpoint.UNIVERSAL_PREFIX + source.name)
        (universal / "pytorch_model" / "zero").mkdir(parents=True)
        (universal / checkpoint.STATE_FILE).symlink_to(source / checkpoint.STATE_FILE)
    deleted = checkpoint.rotate_checkpoints(str(tmp_path), 1, str(kept_best))
    assert sorted(Path(p).name for p in deleted) == [
        ".universal-step_0000005",
        ".universal-step_0000020",
        "step_0000020",
    ]
    assert sorted(p.name for p in root.iterdir()) == [".universal-step_0000010", "step_0000010", "step_0000030"]
    assert (kept_best / checkpoint.STATE_FILE).is_file() and (newest / checkpoint.STATE_FILE).is_file()
    assert checkpoint.rotate_checkpoints(str(tmp_path), None, None) == []  # no limit: nothing more to delete


@pytest.mark.parametrize(
    "sequence, greater, patience, stops_after",
    [
        ([0.50, 0.60, 0.60, 0.55, 0.70], True, 2, 4),  # 0.60 again is no improvement
        ([0.50, 0.60, 0.61, 0.62, 0.63], True, 1, None),
        ([0.9, 0.8, 0.85, 0.7, 0.75, 0.76], False, 2, 6),  # a loss: smaller is better
    ],
)
def test_early_stopping_on_a_scripted_metric_sequence(sequence, greater, patience, stops_after):
    state = checkpoint.TrainerState()
    for evaluation, value in enumerate(sequence, start=1):
        state.step = evaluation
        state.record_eval(value, greater)
        if state.patience_exhausted(patience):
            break
    else:
        evaluation = None
    assert evaluation == stops_after
    assert state.best_metric == (max if greater else min)(sequence[: stops_after or len(sequence)])


@pytest.mark.trains
def test_load_best_model_at_end_with_rotation_and_early_stopping(tiny_model_dir, toy_files, tmp_path):
    # eval_loss keeps falling on this task for a while, then rises as the model over-fits at a high learning rate:
    # "best" is a middle epoch, early stopping ends the run after it, and the final model must be that epoch's.
    args = tiny_args(
        tiny_model_dir,
        toy_files,
        tmp_path,
        num_train_epochs=12,
        learning_rate=1e-2,
        metric_for_best_model="loss",
        load_best_model_at_end="true",
        early_stopping_patience=2,
        save_strategy="steps",
        save_steps=7,
        save_total_limit=1,
    )
    results = run_in_process(args)
    history = read_json(tmp_path / "log_history.json")
    evals = [e for e in history if "epoch" in e and "eval_loss" in e]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert results["best_step"] == best["step"] and results["best_eval_loss"] == best["eval_loss"]
    assert results["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-6), "the final model is not the best one"
    left = [Path(p).name for p in checkpoint.complete_checkpoints(str(tmp_path))]
    assert f"step_{best['step']:07d}" in left and len(left) <= 2  # the newest one, and the best one
    assert results["stopped_early"] and evals[-1]["epoch"] == best["epoch"] + 2
    # The rate the run ended on, not the best step's (loading the best state also brings back its scheduler).
    rates = {e["step"]: e["train/learning_rate"] for e in history if "train/learning_rate" in e}
    assert results["final_learning_rate"] == rates[max(rates)] < rates[best["step"]]


@pytest.mark.trains
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, toy_files, tmp_path):
    args = tiny_args(
        tiny_model_dir,
        toy_files,
        tmp_path,
        learning_rate=1e9,
        max_grad_norm=0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        max_nonfinite_steps=2,
        adam_epsilon=1e-30,
    )
    with pytest.raises(UserError, match=r"NaN/inf for 2 optimizer steps in a row .* last good checkpoint: .*step_"):
        run_in_process(args)
    assert not (tmp_path / "model.safetensors").exists()
    last = checkpoint.complete_checkpoints(str(tmp_path))[-1]
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(last, "model.safetensors")).values())


def test_wandb_resume_continues_the_same_run(checkpointed_run, tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """A resumed session logs to the tracker run the checkpoint names, not to a new one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    shutil.copytree(checkpointed_run, tmp_path, dirs_exist_ok=True)
    first = checkpoint.checkpoint_path(str(tmp_path), 20)
    # A second session, continuing from step 20.
    run_in_process([*tiny_args(tiny_model_dir, toy_files, tmp_path, **CHECKPOINTED), "--resume_from_checkpoint", first])
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    run_id = checkpoint.read_state(first).tracker_run_id
    assert len(runs) == 2 and all(name.endswith("-" + run_id) for name in runs), runs


def test_free_space_is_checked_before_training(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    outputs.check_free_space(str(tmp_path), model, checkpointing=True)  # this disk has room
    with pytest.raises(UserError, match="MiB free, a run of this model needs about"):
        outputs.check_free_space(str(tmp_path), model, checkpointing=True, free_bytes=1000)


STOP_REQUEST_SCRIPT = """
import os, signal, sys, time, torch
from tuneloop.preemption import StopRequest
with StopRequest(1, torch.device("cpu")) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded again by a launcher: not a second one
    time.sleep(0.1)
    print(stop.agreed(), flush=True)
    if sys.argv[1] == "twice":
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, later: quit at once
        time.sleep(30)
print("still running", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("presses", ["once", "twice"])
def test_ctrl_c_once_requests_a_checkpoint_twice_quits_now(presses):
    not_in_a_unit_test("starts a process")
    done = subprocess.run(
        [sys.executable, "-c", STOP_REQUEST_SCRIPT, presses], capture_output=True, text=True, timeout=20
    )
    if presses == "once":
        assert done.returncode == 0 and done.stdout.split() == ["SIGINT", "still", "running"], done
        assert "saving a checkpoint after this step" in done.stderr
    else:
        assert done.returncode == 130 and "still running" not in done.stdout and "exiting now" in done.stderr, done


@pytest.mark.parametrize(
    "options, step, new_best, epoch_end, due",
    [
        ({"save_strategy": "steps", "save_steps": 10}, 20, False, False, True),
        ({"save_strategy": "steps", "save_steps": 10}, 25, False, False, False),
        ({"save_strategy": "steps", "save_steps": 10}, 30, False, True, False),  # already saved at the step itself
        ({"save_strategy": "epoch"}, 30, False, True, True),
        ({"save_strategy": "epoch"}, 30, False, False, False),
        ({}, 30, True, True, False),  # a new best needs no checkpoint unless the best model is kept for the end
        ({"load_best_model_at_end": True}, 31, True, False, True),
        ({"save_strategy": "best"}, 31, True, False, True),
        ({"save_strategy": "best"}, 30, False, True, False),
    ],
)
def test_when_checkpoints_are_due(options, step, new_best, epoch_end, due):
    from tuneloop.loop import checkpoint_due
    from tuneloop.options import TrainArguments

    assert checkpoint_due(TrainArguments(**options), step, new_best, epoch_end) is due


def test_a_torn_checkpoint_is_skipped_and_one_without_a_manifest_still_resumes(
    checkpointed_run, tiny_model_dir, toy_files, tmp_path, capsys
):
    """Guards against `latest` picking a checkpoint whose weights a crash cut short (a SafetensorError traceback on
    resume), and against the manifest check refusing checkpoints written before manifests existed."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    first, second = checkpoint.complete_checkpoints(str(out))
    for path in (first, second):  # every file of a checkpoint is in its manifest, with its size
        listed = read_json(Path(path) / checkpoint.MANIFEST_FILE)
        on_disk = {str(p.relative_to(path)): p.stat().st_size for p in Path(path).rglob("*") if p.is_file()}
        assert listed == {k: v for k, v in on_disk.items() if k != checkpoint.MANIFEST_FILE}
        assert {"model.safetensors", "optimizer.bin", checkpoint.STATE_FILE, "loop_state_0.json"} <= listed.keys()
    weights_file = Path(second) / "model.safetensors"
    size = weights_file.stat().st_size
    os.truncate(weights_file, size // 2)  # what a node crash can leave after the rename
    (Path(first) / checkpoint.MANIFEST_FILE).unlink()  # an older tuneloop's checkpoint

    assert checkpoint.complete_checkpoints(str(out)) == [first]
    with pytest.raises(UserError, match=r"is torn \(model\.safetensors has \d+ of its \d+ bytes\)"):
        checkpoint.find_checkpoint(str(out), second)
    results = run_in_process(
        tiny_args(
            tiny_model_dir,
            toy_files,
            out,
            save_strategy="steps",
            save_steps=20,
            num_train_epochs=2,
            resume_from_checkpoint="latest",
        )
    )
    printed = capsys.readouterr().out
    skipped = [line for line in printed.splitlines() if "skipping torn checkpoint" in line]
    assert skipped == [
        f"tuneloop: skipping torn checkpoint {second}: model.safetensors has {size // 2} of its {size} "
        "bytes (a crash while it was written?)"
    ], printed
    assert "resuming at step 20" in printed and results["global_step"] == 60
    assert checkpoint.complete_checkpoints(str(out)) == [first, second]  # step 40 saved again, whole this time


def test_every_file_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    """Fakes: os.fsync and os.rename record what they were called on (a node crash cannot be staged in a test).
    Guards against a checkpoint renamed into place while its files sat in the page cache."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    accelerator.prepare(torch.nn.Linear(4, 2), torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()))
    events, fsync, rename = [], os.fsync, os.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))
    )
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", a)), rename(a, b)))
    final = Path(checkpoint.save_checkpoint(accelerator, str(tmp_path), checkpoint.TrainerState(step=7), {"sums": 1}))
    renamed = events.index(("rename", str(final.parent / ".tmp-step_0000007")))
    synced_before = {path for kind, path in events[:renamed] if kind == "fsync"}
    expected = {str(final.parent / ".tmp-step_0000007" / p.relative_to(final)) for p in final.rglob("*")}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {p.name for p in final.iterdir()}
    assert expected | {str(final.parent / ".tmp-step_0000007")} <= synced_before
    assert ("fsync", str(final.parent)) in events[renamed:]  # the rename itself


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(28, os.strerror(28), "/out/x.json"), "No space left on device"),
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
            "cut short (torch.save)",
        ),
        (
            Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
            "No space left on device",
        ),
        (RuntimeError("Gloo connectFullMesh failed"), None),
    ],
)
def test_write_failures_become_one_line(error, reason, tmp_path):
    """Each failure as torch.save, safetensors and plain file writes report a full disk (seen on a full tmpfs); any
    other error passes through untouched."""
    with (
        pytest.raises(UserError if reason else type(error)) as raised,
        checkpoint.writing(str(tmp_path / "x"), str(tmp_path)),
    ):
        raise error
    if reason:
        assert reason in str(raised.value) and re.search(
            r"\d [KMG]iB left there; no checkpoint saved", str(raised.value)
        )
        assert "\n" not in str(raised.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: room for one checkpoint of the tiny model (about 340 KB), not two."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): needs root")
    yield mount_point
    # Lazily: the failed torch.save's file stays open until the exception that references it is collected.
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.mark.trains
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(small_disk, tiny_model_dir, toy_files):
    """A real full disk: the second checkpoint's torch.save fails mid-file (a RuntimeError, not an OSError)."""
    out = small_disk / "run"
    with pytest.raises(UserError) as raised:
        run_in_process(
            tiny_args(
                tiny_model_dir, toy_files, out, max_steps=5, save_strategy="steps", save_steps=2, eval_strategy="no"
            )
        )
    message, first = str(raised.value), checkpoint.checkpoint_path(str(out), 2)
    assert "\n" not in message
    assert message.startswith(f"could not write {checkpoint.checkpoint_path(str(out), 4)}"), message
    assert re.search(r", [\d.]+ (bytes|KiB) left there; ", message), message  # what the disk has left, in its unit
    assert message.endswith(
        f"last good checkpoint: {first}: free space there, then resume with --resume_from_checkpoint latest"
    )
    assert checkpoint.complete_checkpoints(str(out)) == [first]  # whole, by its manifest
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(first, "model.safetensors")).values())


@pytest.mark.trains
@pytest.mark.parametrize("failing", ["report", "predictions"])
def test_a_failed_report_or_predictions_write_is_one_line(failing, tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """Fakes: the write raising the errno a quota or a read-only mount gives (the tmpfs test covers a real one)."""
    import errno

    from tuneloop import predict, report

    target, code = (report, errno.EDQUOT) if failing == "report" else (predict, errno.EROFS)
    name = "write_report" if failing == "report" else "write_predictions"
    path = str(tmp_path / failing)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(target, name, fail)
    args = tiny_args(
        tiny_model_dir, toy_files, tmp_path, do_train="false", do_predict="true", test_file=toy_files["validation_file"]
    )
    with pytest.raises(
        UserError,
        match=rf"^could not write {path}: {os.strerror(code)}, [\d.]+ [KMG]iB left there; "
        "no checkpoint saved: free space",
    ):
        run_in_process(args)


# train.py, with one file that cannot be written (a full disk for that file alone). Only rank 0 writes the results and
# only rank 1 its own loss sums, so the name picks the rank that fails. The failing process then stays alive instead of
# exiting: as its peers see it under NCCL, which does not notice a dead peer (gloo on one machine does, and torchrun
# then kills the rest, which hides the defect here).
FAILING_WRITE = """
import errno, os, sys, time
from tuneloop import checkpoint, cli
write, failed = checkpoint.write_json, []
def full_disk_for_one_file(path, *args, **kwargs):
    if os.path.basename(path) == sys.argv[1]:
        failed.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return write(path, *args, **kwargs)
checkpoint.write_json = full_disk_for_one_file
code = cli.main(sys.argv[2:])
if failed:
    sys.stderr.flush()
    time.sleep(600)
sys.exit(code)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("failing, rank", [("all_results.json", 0), ("loop_state_1.json", 1)])
def test_a_write_failing_on_one_rank_stops_every_rank_with_one_line(failing, rank, tiny_model_dir, toy_files, tmp_path):
    """Two real processes; one file cannot be written: the results (rank 0 alone writes them, after training) or rank
    1's part of a checkpoint (inside the loop). The other rank must stop at once, not wait in its next barrier for
    the failed one (until --ddp_timeout, 30 minutes), and each says at most one line: the failing rank its own
    error, rank 0 the rank that failed. Guards main-process-only work (and a rank's own part of a checkpoint) whose
    failure the other ranks never learn of."""
    import time

    not_in_a_unit_test("launches processes")
    wrapper = tmp_path / "train_failing_write.py"
    wrapper.write_text(FAILING_WRITE)
    args = tiny_args(
        tiny_model_dir,
        toy_files,
        tmp_path / "out",
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="no",
    )
    command = launch_command([failing, *args], 2)
    command[command.index(str(ROOT / "train.py"))] = str(wrapper)
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launch_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=180)  # about 35 s on a loaded 2-core machine
    except subprocess.TimeoutExpired:
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in workers:  # torchrun starts each in a session of its own: killing the launcher leaves them
            os.kill(int(pid), signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(
            f"rank {1 - rank} kept waiting for rank {rank}, whose write failed: hung for 180 s"
        ) from None
    took = time.monotonic() - started
    assert proc.returncode != 0
    errors = re.findall(r"tuneloop: error: (.*)", stderr)  # (rank 1's may follow rank 0's progress bar)
    assert len(errors) == (2 if rank else 1), stderr[-3000:]
    own = [e for e in errors if e.startswith(f"could not write {tmp_path / 'out'}") and failing in e]
    named = [e for e in errors if e.startswith(f"rank {rank} failed while writing ")]  # from rank 0, the one printing
    assert len(own) == 1 and len(named) == (1 if rank else 0), errors
    survivors = [line for line in stderr.splitlines() if line.startswith("[rank") and "Error" in line]
    assert not survivors, survivors  # no traceback from any rank
    print(f"both ranks stopped {took:.0f} s after the launch")
