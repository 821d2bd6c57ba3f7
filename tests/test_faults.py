"""Faults by phase: SIGKILL and SIGTERM delivered by a real run to itself while it tokenizes, takes its first step,
writes a checkpoint, loads the best model, saves the final model and writes its predictions (tests/fault_runner.py);
each time the rerun, the command a requeued job runs (`--resume_from_checkpoint latest`), carries on; nothing that was
complete before a fault is lost or torn; and the run ends with the model, metrics and predictions of a run never
interrupted.

The twelve faults hit one output folder in turn, in the order a run meets the phases: the rerun after each fault is
the run the next fault interrupts (each goes further than the one before), and a last rerun completes. That shares
the work (14 short runs, forked from one process that imported the stack once) and puts the late faults where they
are hardest: a final save or a predictions write that replaces a complete model or file from an earlier session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_env, not_in_a_unit_test, read_json, tiny_args
from tuneloop import checkpoint
from tuneloop.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.faults

# 12 steps; evaluations and checkpoints every 4; the best model is an earlier step's (greater_is_better on the loss:
# the highest eval loss, here step 8's; the final one is lower), so the run ends by loading an earlier checkpoint.
RUN = dict(
    max_steps=12,
    logging_steps=4,
    eval_strategy="steps",
    eval_steps=4,
    save_strategy="steps",
    save_steps=4,
    load_best_model_at_end="true",
    metric_for_best_model="loss",
    greater_is_better="true",
    do_predict="true",
)
TOTAL_STEPS = 12
# (phase, signal) in the order the run meets them. SIGTERM at the first step comes before SIGTERM at tokenizing so
# that the first step is the run's own first step, tokenizing then being a resumed session's.
CHAIN = [
    ("tokenize", "SIGKILL"),
    ("first_step", "SIGKILL"),
    ("first_step", "SIGTERM"),
    ("tokenize", "SIGTERM"),
    ("checkpoint", "SIGKILL"),
    ("checkpoint", "SIGTERM"),
    ("best_load", "SIGKILL"),
    ("best_load", "SIGTERM"),
    ("predictions", "SIGTERM"),
    ("predictions", "SIGKILL"),
    ("final_save", "SIGKILL"),
    ("final_save", "SIGTERM"),
]
AFTER_TRAINING = ("best_load", "final_save", "predictions")


class Runner:
    """tests/fault_runner.py --serve: each run a fork of one process that has imported the stack."""

    def __init__(self, workdir: Path):
        not_in_a_unit_test("launches processes")
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fault_runner.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=launch_env(),
            cwd=ROOT,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, phase: str, signal_name: str, args: list[str], name: str) -> tuple[int, str]:
        log = self.workdir / f"{name}.log"
        self.proc.stdin.write(json.dumps({"phase": phase, "signal": signal_name, "args": args, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the fault runner died"
        return json.loads(answer)["returncode"], log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def observe(output_dir: Path) -> dict:
    """What is on disk now: complete checkpoints, leftovers, the marker, and the files a fault must not tear."""
    fault = output_dir.with_name(output_dir.name + ".fault.json")
    before = json.loads(fault.read_text()) if fault.exists() else None
    if fault.exists():
        fault.unlink()  # the next link writes its own
    marker = output_dir / checkpoint.PREEMPTED_FILE
    return {
        "before": before,
        "checkpoints": [os.path.basename(p) for p in checkpoint.complete_checkpoints(str(output_dir))],
        "marker": read_json(marker) if marker.exists() else None,
        "files": {name: _sha(output_dir / name) for name in (before or {}).get("files", {})},
    }


def _sha(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def resumed_step(log: str) -> int | None:
    """The step a session resumed at (its set-up line), None for a fresh start."""
    found = re.search(r"resuming at step (\d+) from", log)
    return int(found.group(1)) if found else None


@pytest.fixture(scope="module")
def chain(tiny_model_dir, toy_files, test_files, tmp_path_factory) -> dict:
    """The reference run, then every fault of CHAIN on one output folder, then the completing rerun. Returns each
    link's exit status, log, and what was on disk before the fault and after it."""
    workdir = tmp_path_factory.mktemp("faults")
    runner = Runner(workdir)
    try:
        reference = workdir / "reference"
        ref_args = tiny_args(tiny_model_dir, toy_files, reference, test_file=test_files["labelled"], **RUN)
        code, log = runner.run("none", "none", ref_args, "reference")
        assert code == 0, log[-3000:]
        out = workdir / "faulted"
        # Every session is started alike, as a requeued job is: the first one finds no checkpoint and starts fresh.
        args = [
            *tiny_args(tiny_model_dir, toy_files, out, test_file=test_files["labelled"], **RUN),
            "--resume_from_checkpoint",
            "latest",
        ]
        links = {}
        for phase, signal_name in CHAIN:
            name = f"{phase}-{signal_name}"
            code, log = runner.run(phase, signal_name, args, name)
            links[(phase, signal_name)] = {"code": code, "log": log, **observe(out)}
        code, log = runner.run("none", "none", args, "completion")
        links["completion"] = {"code": code, "log": log, **observe(out)}
        # Each link's rerun is the next link (and the completion the last one's).
        names = [*CHAIN, "completion"]
        for link, rerun in zip(names, names[1:]):
            links[link]["rerun"] = links[rerun]
    finally:
        runner.close()
    return {"links": links, "reference": reference, "output_dir": out}


@pytest.mark.parametrize("phase, signal_name", CHAIN, ids=[f"{p}-{s}" for p, s in CHAIN])
def test_a_fault_loses_nothing_and_the_rerun_carries_on(chain, phase, signal_name):
    """A SIGKILL anywhere leaves every checkpoint and file that was complete before it complete (a kill mid-write of
    the final model or of the predictions must not tear the ones an earlier session left); a SIGTERM anywhere, set-up
    and the phases after the last step included, ends as a preemption does: a checkpoint, exit 75, the marker. The
    rerun resumes from the newest complete checkpoint, and after training resumes at the last step and only finishes
    (no training again). Guards a SIGTERM that kills the job outside the training loop, a last step or finish with no
    checkpoint, and a write that replaces a complete file in place."""
    link = chain["links"][(phase, signal_name)]
    before, log, rerun = link["before"], link["log"], link["rerun"]
    assert before is not None, f"the run never reached {phase} (exit {link['code']}):\n{log[-3000:]}"
    lost = [name for name in before["checkpoints"] if name not in link["checkpoints"]]
    assert not lost, f"complete before the fault, gone or torn after it: {lost}"
    torn = [name for name, sha in before["files"].items() if link["files"][name] != sha]
    assert not torn, f"complete before the fault, changed after it: {torn}"

    if signal_name == "SIGKILL":
        assert link["code"] == -9, log[-3000:]
    else:
        assert link["code"] == REQUEUE_EXIT_CODE, f"exit {link['code']}, not 75:\n{log[-3000:]}"
        marker = link["marker"]
        assert marker and marker["signal"] == "SIGTERM", marker
        assert os.path.basename(marker["checkpoint"]) in link["checkpoints"], (marker, link["checkpoints"])
        assert marker["checkpoint"].endswith(f"step_{marker['step']:07d}")
        if phase in AFTER_TRAINING:  # the checkpoint of the last step: the requeued job only finishes
            assert marker["step"] == TOTAL_STEPS, marker

    # The rerun starts where the newest complete checkpoint is (from scratch when there is none).
    newest = link["checkpoints"][-1] if link["checkpoints"] else None
    expected = int(newest.removeprefix("step_")) if newest else None
    assert resumed_step(rerun["log"]) == expected, rerun["log"][-3000:]
    if phase in AFTER_TRAINING:  # nothing is trained again after the last step
        assert expected == TOTAL_STEPS, f"after training, the newest checkpoint is {newest}"


def test_the_interrupted_run_ends_as_the_uninterrupted_one(chain):
    """After all twelve faults the last rerun ends with exit 0, no marker, and the same weights, metrics, training
    losses and predictions as the run never interrupted. Guards any state a fault or a resume at the end loses."""
    done, reference, out = chain["links"]["completion"], chain["reference"], chain["output_dir"]
    assert done["code"] == 0, done["log"][-3000:]
    assert done["marker"] is None
    expected, got = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ref_results, results = read_json(reference / "all_results.json"), read_json(out / "all_results.json")
    for key in (
        "eval_loss",
        "eval_accuracy",
        "train_loss",
        "global_step",
        "best_step",
        "best_eval_loss",
        "final_learning_rate",
    ):
        assert results[key] == ref_results[key], key
    assert results["best_step"] < TOTAL_STEPS, "the run must end by loading an earlier best checkpoint"

    def losses(folder):
        return {e["step"]: e["train/loss"] for e in read_json(folder / "log_history.json") if "train/loss" in e}

    def evaluations(folder):
        return [(e["step"], e["eval_loss"]) for e in read_json(folder / "log_history.json") if "eval_loss" in e]

    assert losses(out) == losses(reference)
    assert evaluations(out) == evaluations(reference)
    assert (out / "predictions.jsonl").read_text() == (reference / "predictions.jsonl").read_text()
    assert (out / "report" / "README.md").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".partial-*"))
