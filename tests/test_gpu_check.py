"""benchmarks/gpu_check.py in its --cpu mode: the GPU check's plumbing, run on every CI run though no GPU is.

The rows that need CUDA must say so (skipped, with the reason); every other row must pass; and the rows must be on
disk as they are measured, so a time limit on the GPU machine still leaves the ones done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.multiprocess  # it launches training runs, the doctor and its probes

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NEED_CUDA = {"fp16_overflow_skips", "compile_tf32_false", "fsdp_x1", "zero3_x1", "lora_fsdp_x1"}
ROWS = [
    "environment",
    "one_device_bf16_reload",
    "fp16_overflow_skips",
    "compile_tf32_false",
    "preempt_resume",
    "fsdp_x1",
    "zero3_x1",
    "lora_fsdp_x1",
    "doctor_one_device",
    "doctor_sharded",
    "throughput_tuneloop_64",
    "throughput_trainer_64",
]


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cpu_mode_runs_every_row_or_says_why_not(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    rows = read_rows(out)
    assert [r["name"] for r in rows] == ROWS, done.stdout[-3000:]
    for row in rows:
        assert set(row) == {"name", "status", "seconds", "details"}
        if row["name"] in NEED_CUDA:
            assert row["status"] == "skipped" and row["details"]["reason"], row
        else:
            assert row["status"] == "ok", row
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    by_name = {r["name"]: r["details"] for r in rows}
    assert by_name["environment"]["mode"] == "cpu"
    assert by_name["one_device_bf16_reload"]["reloaded_accuracy"] > 0.45  # learned, and the saved model holds it
    assert by_name["preempt_resume"]["exit_status"] == 75
    assert by_name["doctor_sharded"]["probe"].startswith("ok: MULTI_CPU x1 on cpu")  # --num_processes 1 reached it
    for loop in ("tuneloop", "trainer"):
        figures = by_name[f"throughput_{loop}_64"]
        assert figures["samples_per_second"] > 0 and figures["mfu"] > 0 and figures["peak_memory_gib"] > 0
    assert "| throughput_trainer_64 |" in done.stdout  # the table printed at the end


def test_rows_already_written_survive_a_kill(tmp_path):
    """Killed (SIGKILL: no handler, no exit code runs) while its second row is being measured: the first row is on
    disk, whole. A row written only at exit, or left in a buffer, would be lost."""
    out = tmp_path / "rows.jsonl"
    command = [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (out.is_file() and out.read_text().endswith("\n")):
            assert proc.poll() is None, "the script ended before its first row"
            assert time.monotonic() < deadline, "no row after 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the training run it started
        proc.wait(timeout=60)
    rows = read_rows(out)
    assert [r["name"] for r in rows] == ["environment"] and rows[0]["status"] == "ok"
