"""The sbatch scripts on a real SLURM: slurm-wlm and munge, started by slurm/local_cluster.sh as 2 nodes on this host.

Jobs are submitted exactly as a user submits them, from the repository root, with the knobs a user has: sbatch
options (no GPU, 1 CPU, a short time limit, where the log goes), the scripts' environment variables (the CPU
accelerate config, the venv this test runs in) and train.py arguments (a tiny model and small data). Each run records
the world size it really had in all_results.json, and the tests assert it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_json, tiny_args

pytestmark = pytest.mark.slurm

CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def slurm(conf: str, *command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "SLURM_CONF": conf})
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result.stdout


def submit(conf: str, script: str, args: list[str], logs: Path, *sbatch_options: str, **env: str) -> str:
    """`sbatch slurm/<script> ARGS` from the repository root, on CPU; returns the job id."""
    env = {
        **os.environ,
        "SLURM_CONF": conf,
        "TUNELOOP_VENV": sys.prefix,
        "TUNELOOP_ACCELERATE_CONFIG": str(CPU_2PROC),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    command = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={logs}/%x-%j.out",
        *sbatch_options,
        f"slurm/{script}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(conf: str, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (there is no accounting database for sacct; finished jobs stay 5 minutes)."""
    return dict(re.findall(r"(\w+)=(\S*)", slurm(conf, "scontrol", "--oneliner", "show", "job", job_id)))


def wait_for_job(conf: str, job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (info := job_info(conf, job_id))["JobState"] not in FINAL_STATES:
        if time.monotonic() > deadline:
            slurm(conf, "scancel", job_id)
            pytest.fail(f"job {job_id} still {info['JobState']} after {timeout} s; log:\n{read_log(log)[-3000:]}")
        time.sleep(0.5)
    return info


def wait_for_line(log: Path, pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, read_log(log), re.MULTILINE):
        assert time.monotonic() < deadline, f"no line matching {pattern!r} after {timeout} s:\n{read_log(log)[-3000:]}"
        time.sleep(0.2)


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


# Long enough that a signal sent at step 25 lands mid-run (it takes a second or two, tens of steps, to arrive); no
# periodic checkpoints, so a preemption's is the only one.
LONG_RUN = dict(max_steps=300, eval_strategy="no", logging_steps=25, warmup_steps=0.1)


@pytest.fixture(scope="module")
def uninterrupted_job(slurm_conf, tiny_model_dir, toy_files, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """One single-node job of LONG_RUN, run to the end: what the single-node test checks and what a preempted job of
    the same run must reproduce bit for bit. Returns (output folder, `scontrol show job`, log)."""
    folder = tmp_path_factory.mktemp("slurm-uninterrupted")
    out = folder / "out"
    job = submit(slurm_conf, "train_single_node.sbatch", tiny_args(tiny_model_dir, toy_files, out, **LONG_RUN), folder)
    log = folder / f"tuneloop-{job}.out"  # %x-%j.out: the job name from the script's #SBATCH line
    return out, wait_for_job(slurm_conf, job, log), log


def test_single_node_job_trains_and_saves(uninterrupted_job):
    """Guards a job that ends "COMPLETED" without having trained: 2 processes, every step, a model that learned."""
    out, info, log = uninterrupted_job
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), read_log(log)[-3000:]
    results = read_json(out / "all_results.json")
    assert (results["num_processes"], results["distributed_type"]) == (2, "MULTI_CPU")
    assert results["global_step"] == 300
    assert results["eval_samples"] == 45 and results["eval_accuracy"] >= 0.9  # chance is 1/3
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "log_history.json"} <= set(os.listdir(out))
    assert "training finished" in read_log(log)


def test_multi_node_job_spans_both_nodes(slurm_conf, tiny_model_dir, toy_files, tmp_path):
    """2 nodes x 2 processes: one srun task per node, each an `accelerate launch` with its machine rank."""
    out = tmp_path / "out"
    job = submit(
        slurm_conf,
        "train_multi_node.sbatch",
        tiny_args(tiny_model_dir, toy_files, out, num_train_epochs=2),
        tmp_path,
        "--nodes=2",
        TUNELOOP_PROCS_PER_NODE="2",
    )
    log = tmp_path / f"tuneloop-multi-{job}.out"
    info = wait_for_job(slurm_conf, job, log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), read_log(log)[-3000:]
    assert (info["NumNodes"], info["NodeList"]) == ("2", "n[1-2]")
    # Each launcher starts only its node's 2 processes; a world of 4 means both nodes met at the rendezvous.
    results = read_json(out / "all_results.json")
    assert (results["num_processes"], results["distributed_type"]) == (4, "MULTI_CPU")
    assert results["global_step"] == 2 * 8  # 240 examples / (4 processes x batch 8), rounded up, 2 epochs
    assert (out / "model.safetensors").exists()
    assert "--num_machines 2 --num_processes 4 --main_process_ip 127.0.0.1" in read_log(log)


def test_failed_job_is_not_requeued(slurm_conf, tiny_model_dir, toy_files, tmp_path):
    """A real error inside the trainer (a missing label column) ends the job as failed, once."""
    out = tmp_path / "out"
    job = submit(
        slurm_conf,
        "train_single_node.sbatch",
        tiny_args(tiny_model_dir, toy_files, out, label_column="topic"),
        tmp_path,
    )
    log = tmp_path / f"tuneloop-{job}.out"
    info = wait_for_job(slurm_conf, job, log)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), read_log(log)[-3000:]
    assert "column 'topic' not in the train split" in read_log(log)
    assert "not requeuing" in read_log(log)


def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_conf, uninterrupted_job, tiny_model_dir, toy_files, tmp_path
):
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): checkpoint, requeue, resume, and
    the same final weights, bit for bit, as the same job never interrupted."""
    out = tmp_path / "out"
    job = submit(
        slurm_conf, "train_single_node.sbatch", tiny_args(tiny_model_dir, toy_files, out, **LONG_RUN), tmp_path
    )
    log = tmp_path / f"tuneloop-{job}.out"
    wait_for_line(log, r"\b25/300 ")  # the progress bar, redrawn at each logging step: training is under way
    slurm(slurm_conf, "scancel", "--signal=USR1", "--batch", job)
    info = wait_for_job(slurm_conf, job, log)
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-5000:]
    assert "SIGUSR1" in text and "requeuing" in text
    assert re.search(r"run 2\] accelerate launch .*--resume_from_checkpoint latest", text), text[-3000:]

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(checkpoints) == 1, checkpoints  # no periodic checkpoints were asked for: this one is the preemption's
    step = int(checkpoints[0].removeprefix("step_"))
    assert 25 <= step < 300, f"preempted at step {step}: the signal should land mid-training"
    results = read_json(out / "all_results.json")
    assert (results["num_processes"], results["global_step"]) == (2, 300)
    assert not (out / "preempted.json").exists()

    final, expected = load_file(out / "model.safetensors"), load_file(uninterrupted_job[0] / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=0, msg=name)
