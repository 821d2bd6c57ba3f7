"""The GPU check on a real GPU: benchmarks/gpu_check.py in its GPU mode (needs CUDA; skipped without it, so CI skips
it).

Every row must pass, except ZeRO-3 where deepspeed is not installed (skipped, saying so). The rows' figures stay in
the output file for RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_check_passes_on_this_gpu(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(out.read_text())  # the figures, in the test log
    assert rows and rows[0]["name"] == "environment" and rows[0]["details"]["mode"] == "gpu"
    for row in rows:
        allowed = ("ok", "skipped") if row["name"] == "zero3_x1" else ("ok",)
        assert row["status"] in allowed, row
    assert {r["name"] for r in rows} >= {"fsdp_x1", "throughput_tuneloop_512", "throughput_trainer_512"}
    assert done.returncode == 0, done.stdout[-3000:]
