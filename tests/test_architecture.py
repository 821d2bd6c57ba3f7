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


def test_options_are_declarations_that_import_nothing_heavy():
    """options.py is what --help reads and every module imports: a tuneloop import there would bring its checks (and
    torch) back onto the start-up path, an import of a heavy library would cost seconds per process."""
    allowed = {"__future__", "dataclasses", "json", "math", "os", "re", "typing", "transformers.hf_argparser"}
    imported = set()
    for node in ast.walk(ast.parse((PACKAGE / "options.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= allowed, f"options.py imports {sorted(imported - allowed)}"


def test_help_and_a_mistyped_flag_load_no_heavy_library():
    """`train.py --help`, a mistyped flag and `tuneloop predict --help` answer before torch, peft, datasets or the
    loop load (they cost 4-8 s of start-up here): one of them imported at the top of config, cli, options, errors
    or preemption would make this fail."""
    code = """if True:
        import contextlib, io, sys
        from tuneloop.cli import console, main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for run in (lambda: main(["--help"]), lambda: console(["predict", "--help"])):
                try:
                    run()
                except SystemExit as e:
                    assert e.code == 0, e.code
            assert main(["--learning_rte", "3"]) == 2
        heavy = ("torch", "peft", "datasets", "evaluate", "accelerate", "transformers.trainer_utils", "tuneloop.loop")
        print([name for name in heavy if name in sys.modules])
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def source_lines_mentioning(text: str) -> dict[str, int]:
    """{module: number of lines} of src/tuneloop that contain `text`."""
    counts = {path.stem: sum(text in line for line in path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    return {module: count for module, count in counts.items() if count}


def test_each_rule_decided_twice_has_one_owner():
    """The rules that had two copies each keep one: which launched process is the main one (errors), what makes a
    folder an adapter folder (lora), and parsing options into a Config (config.parse_args). A second copy is the
    start of a drift: the CLI once padded differently from the set-up it copied."""
    assert source_lines_mentioning('environ.get("RANK"') == {"errors": 1}
    assert source_lines_mentioning('"adapter_config.json"') == {"lora": 1}
    for parsing_step in ("parse_into_dataclasses(", "read_recipe(", "validate("):
        outside = {module for module in source_lines_mentioning(parsing_step) if module not in ("config", "options")}
        assert not outside, f"{parsing_step} outside config.py: {sorted(outside)} (call config.parse_args instead)"
