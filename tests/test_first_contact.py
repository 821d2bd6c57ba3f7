"""The two commands a fresh machine starts with: README's opening block, what .ci/run runs, and the Makefile behind it.

The install itself is faked (a `python` that makes a venv whose `pip` only logs), so these run in well under a second
and still execute the real Makefile rules: when the install is done, redone, skipped and retried.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    # Under `make test` the outer make's flags and ARGS would reach this one through the environment.
    outer_make = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    clean_env = {key: value for key, value in os.environ.items() if key not in outer_make}
    return subprocess.run(["make", *args], cwd=cwd, env={**clean_env, **(env or {})}, capture_output=True, text=True)


def test_readme_opens_with_the_two_commands_ci_runs():
    """Guards against README and .ci/run drifting apart: CI would stop at once, or run something else than
    documented."""
    ci_script = (ROOT / ".ci" / "run").read_text()
    awk_program = re.search(r"awk '([^']+)' README\.md", ci_script).group(1)
    extracted = subprocess.run(["awk", awk_program, "README.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert extracted.stdout.splitlines() == ["make train", "make test"]
    assert '"${#commands[@]}" -ne 2' in ci_script


def test_train_and_test_install_first_torch_pinned_then_pass_args_on():
    """Guards against a pip that resolves torch with everything else (GBs of CUDA), and ARGS silently dropped."""
    fresh_venv = "/nonexistent/venv"  # so the dry run shows the whole install whatever the checkout's .venv holds
    train = make("-n", "train", f"VENV={fresh_venv}", "ARGS=recipes/x.yaml --learning_rate 3e-5")
    assert train.returncode == 0, train.stderr
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    assert train.stdout.splitlines() == [
        f"rm -f {fresh_venv}/.installed",
        f"rm -rf {fresh_venv} && python3 -m venv {fresh_venv}",
        f"{fresh_venv}/bin/pip install {torch_pin}",
        f'{fresh_venv}/bin/pip install -c constraints.txt -e ".[test]"',
        f"touch {fresh_venv}/.installed",
        f"{fresh_venv}/bin/accelerate launch train.py recipes/x.yaml --learning_rate 3e-5",
    ]
    test = make("-n", "test", f"VENV={fresh_venv}", "ARGS=-m unit -x")
    assert test.stdout.splitlines()[-1] == f"{fresh_venv}/bin/python -m pytest -m unit -x"


FAKE_PYTHON = """#!/bin/sh
# Stands for "python3 -m venv DIR": a venv whose pip logs its arguments and fails when FAIL_PIP is set.
mkdir -p "$3/bin"
ln -s "$0" "$3/bin/python"
printf '#!/bin/sh\\necho "$*" >> "%s"\\nexit ${FAIL_PIP:-0}\\n' "$PIP_LOG" > "$3/bin/pip"
chmod +x "$3/bin/pip"
"""


@pytest.fixture
def checkout(tmp_path):
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)
    return tmp_path


def test_install_is_done_skipped_redone_and_retried_when_it_should(checkout):
    """Guards against a stamp that lies: an install skipped after pyproject.toml changed or after a failed install,
    a broken venv never remade, or a full reinstall on every `make test`."""
    log = checkout / "pip.log"
    env = {"PIP_LOG": str(log)}
    stamp = checkout / ".venv" / ".installed"

    def install(**extra_env) -> list[str]:
        log.unlink(missing_ok=True)
        make("install", f"PYTHON={checkout / 'fake_python'}", cwd=checkout, env={**env, **extra_env})
        return log.read_text().splitlines() if log.exists() else []

    def edit_after_install(name: str):  # clear gaps between the times, whatever the file system's resolution
        now = time.time()
        for path in (checkout / "pyproject.toml", checkout / "constraints.txt", stamp):
            os.utime(path, (now - 20, now - 20) if path != stamp else (now - 10, now - 10))
        os.utime(checkout / name, (now, now))

    assert install() == ["install torch==2.13.0", "install -c constraints.txt -e .[test]"] and stamp.exists()
    assert install() == []

    edit_after_install("pyproject.toml")
    assert len(install()) == 2
    assert install() == []

    edit_after_install("constraints.txt")
    assert install(FAIL_PIP="1") == ["install torch==2.13.0"] and not stamp.exists()
    assert len(install()) == 2 and stamp.exists()

    (checkout / ".venv" / "bin" / "python").unlink()  # e.g. the system Python the venv pointed to was removed
    assert len(install()) == 2 and (checkout / ".venv" / "bin" / "python").exists()
