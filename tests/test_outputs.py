"""The output folder (outputs.py): one run per folder, one writer at a time, a final model never torn, and a resume
that refuses changed settings (checkpoint.check_settings)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    ROOT,
    launch,
    launch_env,
    make_rows,
    read_json,
    run_in_process,
    saved_state_only,
    tiny_args,
    write_rows,
)
from tuneloop import checkpoint
from tuneloop.cli import console
from tuneloop.config import parse_args
from tuneloop.errors import UserError
from tuneloop.setup import resume_plan

QUICK = dict(max_steps=4, eval_strategy="no", logging_steps=2)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ item 4: the lock
def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    """Guards two runs writing one folder: while a lock is held (another open file description: as another process
    would hold it), taking it again fails in one line naming the holder; released, it is free."""
    from tuneloop.outputs import FolderLock

    first = FolderLock(str(tmp_path))
    with pytest.raises(
        UserError,
        match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}, "
        r"started .* UTC: .*\): wait for it to end",
    ):
        FolderLock(str(tmp_path))
    first.release()
    FolderLock(str(tmp_path)).release()


@pytest.mark.multiprocess
def test_a_second_run_stops_while_the_first_lives_and_a_killed_holder_never_blocks(tiny_model_dir, toy_files, tmp_path):
    """A real second `python train.py` into a folder another live process holds stops with one line naming the
    holder's pid; once that holder is SIGKILLed (no clean-up runs), its lock file no longer blocks. Guards a second run
    deleting the first's checkpoints, and a lock file that outlives its process."""
    from tuneloop.outputs import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tuneloop.outputs import FolderLock; FolderLock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=launch_env(),
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = tiny_args(tiny_model_dir, toy_files, out, **QUICK)
        refused = launch(args, launcher=False, check=False, timeout=180)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}" in refused.stderr
        assert not (out / "model.safetensors").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads((out / ".tuneloop.lock").read_text())["pid"] == holder.pid  # the dead holder's file stays
    FolderLock(str(out)).release()  # and does not block: the kernel dropped the lock with its process


# ------------------------------------------------------------------------------------ item 3: one run per folder
@pytest.mark.trains
def test_a_fresh_start_into_another_runs_folder_is_refused_and_overwrite_moves_it_aside(
    tiny_model_dir, toy_files, tmp_path
):
    """A fresh start into a folder holding another run's checkpoint stops in one line naming both ways on (before
    training); --overwrite_output_dir moves the whole earlier run aside, untouched, and trains in an empty folder.
    Guards the new run's checkpoints rotated away in favour of the old run's, and `latest` resuming the old run."""
    out = tmp_path / "run"
    old = saved_state_only(out, step=90)
    (out / "config.json").write_text("{}")  # and the earlier run's final model
    args = tiny_args(tiny_model_dir, toy_files, out, save_strategy="steps", save_steps=2, **QUICK)
    with pytest.raises(
        UserError,
        match=r"holds another run's work \(1 checkpoint of run \w+ up to step_0000090; a "
        r"final model\): continue it with --resume_from_checkpoint latest, or start "
        r"over with --overwrite_output_dir \(moves the folder to .*run\.old-<time>",
    ):
        run_in_process(args)
    assert old.is_dir()

    run_in_process([*args, "--overwrite_output_dir"])
    aside = list(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / old.name / checkpoint.STATE_FILE).is_file()
    assert (aside[0] / "config.json").read_text() == "{}"
    saved = checkpoint.saved_checkpoints(str(out))
    assert [Path(p).name for p in saved] == ["step_0000002"]  # step 4 is the end: the final model, no checkpoint
    run_id = read_json(out / "run.json")["run_id"]
    assert checkpoint.read_state(saved[0]).tracker_run_id == run_id


@pytest.mark.trains
def test_latest_resumes_only_the_folders_own_run(tiny_model_dir, toy_files, tmp_path, capsys):
    """What a requeued job runs (`--resume_from_checkpoint latest` from the first start): the first session records
    the run in run.json and in each checkpoint; a checkpoint of another run found in the folder later (a higher step
    number) is refused by name, never resumed. Guards `latest` picking the highest step of whatever run."""
    out = tmp_path / "run"
    args = tiny_args(
        tiny_model_dir,
        toy_files,
        out,
        save_strategy="steps",
        save_steps=2,
        resume_from_checkpoint="latest",
        **{**QUICK, "max_steps": 3},
    )
    run_in_process(args)
    run_id = read_json(out / "run.json")["run_id"]
    assert checkpoint.read_state(checkpoint.checkpoint_path(str(out), 2)).tracker_run_id == run_id
    foreign = saved_state_only(out, step=90, tracker_run_id="0therrun0000")
    with pytest.raises(
        UserError,
        match=r"holds work of another run than the one resumed \(1 checkpoint of run "
        r"0therrun0000 up to step_0000090\)",
    ):
        resume_plan(parse_args(args))
    shutil.rmtree(foreign)
    _, resumed, state, _ = resume_plan(parse_args(args))
    assert Path(resumed).name == "step_0000002" and state.tracker_run_id == run_id


def test_latest_in_a_folder_of_an_earlier_tuneloop_adopts_its_one_run_or_asks_which(tmp_path):
    """A folder without run.json (written before runs recorded themselves, or checkpoints copied in): `latest` takes
    its one run's newest checkpoint; of two runs, it asks which instead of taking the highest step."""
    first = saved_state_only(tmp_path, step=4, tracker_run_id="aaaaaaaaaaaa", per_device_train_batch_size=16)
    args = ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest", "--seed", "0"]
    assert resume_plan(parse_args(args))[1] == str(first)
    saved_state_only(tmp_path, step=8, tracker_run_id="bbbbbbbbbbbb", per_device_train_batch_size=16)
    with pytest.raises(
        UserError,
        match=r"checkpoints of 2 runs and no run.json .*: pass one with "
        r"--resume_from_checkpoint PATH",
    ):
        resume_plan(parse_args(args))


# ------------------------------------------------------------------------------- item 5: settings that must not change
@pytest.fixture(scope="module")
def settings_run(tiny_model_dir, toy_files, tmp_path_factory) -> Path:
    """A run with a checkpoint at step 2 (of 4), every setting recorded. Tests copy it."""
    out = tmp_path_factory.mktemp("settings-run")
    run_in_process(tiny_args(tiny_model_dir, toy_files, out, save_strategy="steps", save_steps=2, **QUICK))
    return out


def changed_data(toy_files, folder: Path, kind: str) -> dict:
    rows = make_rows(240, seed=1)
    if kind == "one row":
        rows[7] = {**rows[7], "text": rows[7]["text"] + " again"}
    else:  # a fourth class
        rows[7] = {**rows[7], "label": "weather"}
    return {**toy_files, "train_file": write_rows(folder / "train.csv", rows)}


@pytest.mark.trains
@pytest.mark.parametrize(
    "change, refused",
    [
        ({"model": "dropout"}, r"model_name_or_path .* -> .*"),
        ({"data": "one row"}, r"training data 240 examples, sha256 \w+ -> 240 examples, sha256 \w+"),
        ({"data": "fourth class"}, r"labels \['music', 'sports', 'tech'\] -> \['music', 'sports', 'tech', 'weather'\]"),
        ({"max_length": 64}, r"max_length 32 -> 64"),
        ({"label_separator": ";"}, r"problem_type single_label_classification -> multi_label_classification"),
        ({"use_peft": "true"}, r"use_peft False -> True"),
        ({"learning_rate": 1e-3}, r"learning_rate 0.003 -> 0.001"),
        ({"train_sampling_strategy": "group_by_length"}, r"train_sampling_strategy random -> group_by_length"),
    ],
)
def test_resume_refuses_a_changed_setting_naming_it(settings_run, tiny_model_dir, toy_files, tmp_path, change, refused):
    """Each family of what must not change on resume (model, training data, label set, tokenization, problem type,
    LoRA, optimizer, data order) is refused in one line naming the setting old -> new, before training. Guards a
    resume that went on silently with another model or data (same shapes), ignored a new learning rate (the
    optimizer state brings the old one back), or died in a traceback (LoRA keys)."""
    out = tmp_path / "run"
    shutil.copytree(settings_run, out)
    files, model, options = toy_files, tiny_model_dir, dict(change)
    if "data" in options:
        files = changed_data(toy_files, tmp_path / "data", options.pop("data"))
    if options.pop("model", None):
        model = str(tmp_path / "other-model")
        shutil.copytree(tiny_model_dir, model)
        config = json.loads(Path(model, "config.json").read_text())
        Path(model, "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.1}))
    args = tiny_args(
        model, files, out, save_strategy="steps", save_steps=2, resume_from_checkpoint="latest", **{**QUICK, **options}
    )
    with pytest.raises(
        UserError,
        match=rf"checkpoint .*step_0000002 was written with other settings "
        rf"\(.*{refused}.*\): "
        r"resume with the settings it was written with, or start a new run",
    ):
        run_in_process(args)
    assert not (out / "checkpoints" / "step_0000004").exists()


def test_a_token_budget_run_keeps_its_padding_multiple(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    """Token-budget batches are cut by padded lengths: another --pad_to_multiple_of puts other texts together, so a
    budget run refuses it (the budget itself is refused by check_resumable); without a budget it may change."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    budget = dict(max_tokens_per_batch=64, resume_from_checkpoint="latest")
    written = parse_args(tiny_args(tiny_model_dir, toy_files, tmp_path, pad_to_multiple_of=8, **budget))
    saved_state_only(
        tmp_path,
        step=3,
        batches_in_epoch=3,
        per_device_train_batch_size=8,
        max_tokens_per_batch=64,
        settings=checkpoint.resume_settings(written),
    )
    with pytest.raises(UserError, match=r"other settings \(pad_to_multiple_of 8 -> 16\)"):
        resume_plan(parse_args(tiny_args(tiny_model_dir, toy_files, tmp_path, pad_to_multiple_of=16, **budget)))
    unbudgeted = parse_args(tiny_args(tiny_model_dir, toy_files, tmp_path))
    assert "pad_to_multiple_of" not in checkpoint.resume_settings(unbudgeted)


@pytest.mark.trains
def test_resume_may_change_length_logging_evaluation_saving_and_the_data_files_path(
    settings_run, tiny_model_dir, toy_files, tmp_path
):
    """What README says may change on resume does: more steps, other logging, evaluation and save settings, and the
    same training file under another path (its content is what is recorded)."""
    out = tmp_path / "run"
    shutil.copytree(settings_run, out)
    moved = {**toy_files, "train_file": str(shutil.copy(toy_files["train_file"], tmp_path / "moved.csv"))}
    results = run_in_process(
        tiny_args(
            tiny_model_dir,
            moved,
            out,
            max_steps=6,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=3,
            save_strategy="steps",
            save_steps=3,
            save_total_limit=1,
            resume_from_checkpoint=str(out / "checkpoints" / "step_0000002"),
        )
    )
    assert results["global_step"] == 6 and "eval_accuracy" in results


# ------------------------------------------------------------------------------------------ item 6: the final model
@pytest.fixture
def tiny_classifier(tiny_model_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    return Accelerator(cpu=True), model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_crash_while_the_final_model_is_written_leaves_the_old_one_loadable(tiny_classifier, tmp_path, monkeypatch):
    """transformers deletes and rewrites model.safetensors in place: a fault mid-write (injected: half the bytes, then
    an error) left no model at all. Written beside it and moved in, the old model loads, bit for bit."""
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForSequenceClassification

    from tuneloop.outputs import save_final_model

    accelerator, model, tokenizer = tiny_classifier
    save_final_model(accelerator, model, tokenizer, str(tmp_path))
    before = weights(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = modeling_utils.safe_save_file

    def fail_mid_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise RuntimeError("injected: the process died mid-write")

    monkeypatch.setattr(modeling_utils, "safe_save_file", fail_mid_write)
    with pytest.raises(RuntimeError, match="injected"):
        save_final_model(accelerator, model, tokenizer, str(tmp_path))
    assert same_weights(weights(tmp_path), before)
    AutoModelForSequenceClassification.from_pretrained(str(tmp_path))  # loads


def test_a_crash_between_the_moves_is_finished_by_the_next_run(tiny_classifier, tmp_path, monkeypatch):
    """Killed while the new files replace the old ones (injected after the first): the complete new model waits in
    .new-model (loadable as it is), and the next run's start puts it in place; a stale shard of the old model goes."""
    from transformers import AutoModelForSequenceClassification

    from tuneloop import outputs

    accelerator, model, tokenizer = tiny_classifier
    outputs.save_final_model(accelerator, model, tokenizer, str(tmp_path))
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    new = {k: v.clone() for k, v in model.state_dict().items()}
    real_replace, moves = os.replace, []

    def die_after_one(source, target):
        if moves:
            raise KeyboardInterrupt("injected: killed between two moves")
        moves.append(target)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        outputs.save_final_model(accelerator, model, tokenizer, str(tmp_path))
    monkeypatch.setattr(os, "replace", real_replace)
    ready = tmp_path / outputs.READY_DIR
    assert same_weights(weights(ready), {k: v for k, v in new.items() if k in weights(ready)})
    AutoModelForSequenceClassification.from_pretrained(str(ready))

    outputs.finish_interrupted_save(str(tmp_path))
    assert not ready.exists() and not (tmp_path / "model-00002-of-00002.safetensors").exists()
    assert same_weights(weights(tmp_path), {k: v for k, v in new.items() if k in weights(tmp_path)})
    assert not list(tmp_path.glob(".*.incoming"))


def test_the_model_trained_from_or_evaluated_is_never_the_output_dir(
    trained, tiny_model_dir, toy_files, tmp_path, capsys
):
    """`--model_name_or_path X --output_dir X` would overwrite the model it trains from; `tuneloop evaluate --model M
    --output_dir M` the evaluated model's run_config.json and results. Both stop in one line, M untouched."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    with pytest.raises(UserError, match=r"is \(or holds\) the model being trained from"):
        run_in_process(tiny_args(str(model), toy_files, model, **QUICK))
    model_dir, _ = trained
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    for output_dir in (model_dir, model_dir / ".." / model_dir.name):
        assert (
            console(
                [
                    "evaluate",
                    "--model",
                    str(model_dir),
                    "--data",
                    toy_files["validation_file"],
                    "--output_dir",
                    str(output_dir),
                ]
            )
            == 2
        )
        assert "is (or holds) the model being evaluated" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before


def test_evaluate_and_predict_lock_their_own_output_dir(trained, toy_files, test_files, capsys):
    """`tuneloop evaluate` and `predict` write MODEL/evaluate and MODEL/predict: a second one into a folder a live
    run holds stops naming it, instead of both rewriting the same results and report."""
    from tuneloop.outputs import FolderLock

    model_dir, _ = trained
    for command, data in (("evaluate", toy_files["validation_file"]), ("predict", test_files["unlabelled"])):
        (model_dir / command).mkdir(exist_ok=True)
        held = FolderLock(str(model_dir / command))
        try:
            assert console([command, "--model", str(model_dir), "--data", data]) == 2
            assert f"is in use by another run (pid {os.getpid()}" in capsys.readouterr().err
        finally:
            held.release()
