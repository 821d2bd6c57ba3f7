"""The suite's two xdist workers really get whole groups (tests/conftest.py's scheduler): a group split over both
workers runs its module fixtures twice, and can start two SLURM clusters or two launches on one fixed port."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.multiprocess  # starts a pytest with two workers

# The suite's scheduler, and nothing else of its conftest (loaded under another name: this one is `conftest` too).
SCHEDULER_ONLY = """import importlib.util
spec = importlib.util.spec_from_file_location("suite_conftest", {path!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_xdist_make_scheduler = suite.pytest_xdist_make_scheduler
"""


def source_of_tests(count: int) -> str:
    return "".join(f"def test_{i}():\n    pass\n" for i in range(count))


def test_files_of_one_group_run_on_one_worker(tmp_path):
    """test_elastic.py and test_slurm.py share the "slurm" group; two other files keep the second worker busy. Handed
    out test by test (what xdist's loadgroup fell back to under pytest 9.2), the group lands on both workers."""
    (tmp_path / "conftest.py").write_text(SCHEDULER_ONLY.format(path=str(ROOT / "tests" / "conftest.py")))
    for name, count in {"test_a.py": 2, "test_b.py": 2, "test_elastic.py": 4, "test_slurm.py": 2}.items():
        (tmp_path / name).write_text(source_of_tests(count))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED \S*test_(?:elastic|slurm)\.py", done.stdout)
    assert len(ran) == 6, done.stdout[-3000:]
    assert len(set(ran)) == 1, f"the slurm group ran on several workers: {ran}"
