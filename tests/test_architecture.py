"""The shape of src/tuneloop: modules import each other without cycles, and the runtime leaf stays a leaf.

Imports are read from the source (every `import`, including those inside functions and under `if TYPE_CHECKING`),
because a cycle that only type checkers or one code path close is still one a reader has to untangle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "src" / "tuneloop"


def imported_modules(path: Path) -> set[str]:
    """tuneloop modules this file imports anywhere in it, by module name (`loop`, `model`, ...)."""
    modules = set(p.stem for p in PACKAGE.glob("*.py"))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tuneloop.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "tuneloop":
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tuneloop."):
            found.add(node.module.split(".")[1])
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {path.stem: imported_modules(path) for path in PACKAGE.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_import_cycle_among_tuneloop_modules():
    graph = import_graph()
    assert {"loop", "predict", "report", "runtime", "cli"} <= graph.keys()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    """Guards the test above: a checker that never reports anything would pass it too."""
    assert find_cycle({"loop": {"predict"}, "predict": {"report"}, "report": {"loop"}}) == ["loop", "predict", "report", "loop"]
    assert find_cycle({"loop": {"predict", "report"}, "predict": {"report"}, "report": set()}) is None


def test_runtime_is_a_leaf_for_data_model_and_reports():
    """The doctor's probe builds an Accelerator through runtime: it must not drag in the data and report stack."""
    assert reachable(import_graph(), "runtime").isdisjoint({"data", "model", "metrics", "predict", "report", "loop", "cli"})
    heavy = ("datasets", "evaluate", "matplotlib", "sklearn")
    code = f"import sys, tuneloop.runtime, tuneloop.doctor; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


# ---------------------------------------------------------------- rules decided once

PROBLEM_TYPE_NAMES = {"single_label_classification", "multi_label_classification", "regression"}


def problem_type_switches(source: str) -> list[str]:
    """Where code decides by the problem type's name: the constants SINGLE/MULTI/REGRESSION, a comparison with a
    problem type's name or with a `problem_type`, a table keyed by the names. (A Literal of the choices, a default
    value or help text decides nothing.)"""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and node.id in ("SINGLE", "MULTI", "REGRESSION") or \
                isinstance(node, ast.Attribute) and node.attr in ("SINGLE", "MULTI", "REGRESSION"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [o for o in operands if isinstance(o, ast.Constant) and o.value in PROBLEM_TYPE_NAMES
                     or isinstance(o, ast.Attribute) and o.attr == "problem_type"
                     or isinstance(o, ast.Name) and o.id == "problem_type"]
            if names:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in PROBLEM_TYPE_NAMES
                                                for k in node.keys):
            found.append(f"line {node.lineno}: a table keyed by problem type")
    return found


def test_only_problem_py_decides_by_the_problem_type():
    """Each problem type is one class in problem.py that owns its labels, loss, metrics, predictions and report lines;
    the rest of the code asks the run's problem object. Guards a new `if problem_type == ...` (or a table keyed by
    the type) elsewhere, which is how adding a type once touched 12 files."""
    found = {path.name: switches for path in sorted(PACKAGE.glob("*.py")) if path.name != "problem.py"
             if (switches := problem_type_switches(path.read_text()))}
    assert not found, f"decided by the problem type outside problem.py: {found}"


def test_the_problem_type_switch_finder_finds_switches():
    """Guards the test above: a finder that never reports anything would pass it too."""
    assert len(problem_type_switches("if problem.problem_type == problems.MULTI:\n    pass\n")) == 2
    assert problem_type_switches('kind = "pos_weight" if t == "multi_label_classification" else None\n')
    assert problem_type_switches('what = {"regression": "target"}\n')
    assert problem_type_switches('ok = d.problem_type in ("regression",)\n')
    assert not problem_type_switches('def f(problem_type: str = "regression"):\n    return problem.units\n')


# Each rule's message, and the one module that may phrase it: a second copy of the check is a second copy of the text.
RULE_OWNERS = {
    "are for classification": "problem.py",  # regression takes no class weights or label smoothing
    "is not computed": "problem.py",  # metric_for_best_model must be a computed metric
    "multi_label_threshold must be": "problem.py",
    "given by --problem_type": "problem.py",  # deciding the problem type
    "the model's saved problem_type": "problem.py",
    "does not apply to": "problem.py",  # --loss against the problem type
}


def test_each_rule_is_phrased_in_one_module():
    """The problem-type rules that were decided twice (config.validate and loop.make_problem; data.load_splits and
    loop.make_problem) live in problem.py only. Guards a copy of one of them drifting back into another module."""
    sources = {path.name: path.read_text() for path in PACKAGE.glob("*.py")}
    for text, owner in RULE_OWNERS.items():
        assert [name for name, source in sources.items() if text in source] == [owner], text
