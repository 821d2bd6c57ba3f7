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
                return path[path.index(target) :] + [target] if target in path else [node, target]
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
    assert find_cycle({"loop": {"predict"}, "predict": {"report"}, "report": {"loop"}}) == [
        "loop",
        "predict",
        "report",
        "loop",
    ]
    assert find_cycle({"loop": {"predict", "report"}, "predict": {"report"}, "report": set()}) is None


def test_runtime_is_a_leaf_for_data_model_and_reports():
    """The doctor's probe builds an Accelerator through runtime: it must not drag in the data and report stack."""
    assert reachable(import_graph(), "runtime").isdisjoint(
        {"data", "model", "metrics", "predict", "report", "loop", "cli"}
    )
    heavy = ("datasets", "evaluate", "matplotlib", "sklearn")
    code = f"import sys, tuneloop.runtime, tuneloop.doctor; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_the_data_rooms_import_one_way():
    """data reads its splits from sources; batches batches what data tokenized. Neither room imports data (nor the
    other): both are leaves that read options and raise UserError, as config's validation imports them."""
    graph = import_graph()
    assert {"sources", "batches", "data"} <= graph.keys()
    assert "sources" in graph["data"]
    assert reachable(graph, "sources") <= {"errors", "options"}, reachable(graph, "sources")
    assert reachable(graph, "batches") <= {"errors", "options"}, reachable(graph, "batches")


def test_sources_stays_light_for_the_options_check():
    """config imports sources to check data paths on every start (`--help` included): a top-level `import datasets`
    (or pandas, pyarrow, torch) there would put seconds on each one."""
    heavy = ("datasets", "pandas", "pyarrow", "numpy", "torch", "transformers")
    code = f"import sys, tuneloop.sources; print([m for m in {heavy!r} if m in sys.modules])"
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


def test_data_file_types_are_named_only_in_sources():
    """FILE_BUILDERS and COMPRESSIONS are the one list of data-file extensions: a second module comparing a path with
    '.csv' or '.zst' itself is a second copy that drifts (config's validation compared with '.zst' until the
    file checks moved into sources)."""
    extensions = {".csv", ".tsv", ".json", ".jsonl", ".parquet", ".gz", ".bz2", ".xz", ".zst"}

    def extensions_in(path: Path) -> list[str]:
        """Plain string constants that are an extension; f-string parts (the names of files written) are not."""
        tree = ast.parse(path.read_text())
        in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
        return sorted(
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and id(node) not in in_fstrings and node.value in extensions
        )

    found = {path.name: extensions_in(path) for path in PACKAGE.glob("*.py") if path.name != "sources.py"}
    assert not {name: values for name, values in found.items() if values}
    assert extensions_in(PACKAGE / "sources.py"), "the check finds nothing: sources.py names them all"


def test_the_checkpoint_rooms_import_one_way():
    """checkpoint.py (state, discovery, atomic writes) is the base: elastic.py (another layout, universal conversion,
    RNG) and outputs.py (final model, results, the folder's checks) build on it and not on each other. Guards a helper
    moved back into checkpoint.py that drags elastic's or outputs' code in with it (a cycle, or one room again)."""
    graph = import_graph()
    assert "checkpoint" in graph["elastic"] and "checkpoint" in graph["outputs"]
    assert reachable(graph, "checkpoint").isdisjoint({"elastic", "outputs"}), graph["checkpoint"]
    assert "outputs" not in reachable(graph, "elastic") and "elastic" not in reachable(graph, "outputs")


def global_batch_products(source: str, module: str) -> list[str]:
    """Where `source` multiplies a batch size, an accumulation and a process count: the global batch, as
    `module:Class.function`."""

    def factors(node) -> list[str]:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return factors(node.left) + factors(node.right)
        return [node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""]

    found, scope = [], []

    def visit(node) -> None:
        names = [n.lower() for n in factors(node)] if isinstance(node, ast.BinOp) else []
        if (
            any("batch" in n and "batches" not in n for n in names)
            and any("accum" in n for n in names)
            and any("process" in n for n in names)
        ):
            found.append(f"{module}:{'.'.join(scope)}")
            return
        named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if named:
            scope.append(node.name)
        for child in ast.iter_child_nodes(node):
            visit(child)
        if named:
            scope.pop()

    visit(ast.parse(source))
    return found


def test_the_global_batch_is_computed_in_one_place():
    """The global batch (per-device batch x accumulation x processes) had two homes: the options' global_batch_size
    and the elastic Layout. Guards a second copy of the product anywhere in src/tuneloop."""
    found = [site for path in PACKAGE.glob("*.py") for site in global_batch_products(path.read_text(), path.stem)]
    assert len(found) == 1 and found[0].endswith(":TrainArguments.global_batch"), found


def test_the_global_batch_finder_finds_a_copy():
    """Guards the test above: the Layout's own product, as it was, must be found."""
    old_layout = (
        "class Layout:\n    def global_batch(self):\n"
        "        return self.processes * self.per_device_batch * self.accumulation\n"
    )
    assert global_batch_products(old_layout, "elastic") == ["elastic:Layout.global_batch"]
    elastic_position = "samples = saved.batches_in_epoch * before.processes * before.per_device_batch\n"
    assert global_batch_products(elastic_position, "elastic") == []


# ---------------------------------------------------------------- rules decided once

PROBLEM_TYPE_NAMES = {"single_label_classification", "multi_label_classification", "regression"}


def problem_type_switches(source: str) -> list[str]:
    """Where code decides by the problem type's name: the constants SINGLE/MULTI/REGRESSION, a comparison with a
    problem type's name or with a `problem_type`, a table keyed by the names. (A Literal of the choices, a default
    value or help text decides nothing.)"""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Name)
            and node.id in ("SINGLE", "MULTI", "REGRESSION")
            or isinstance(node, ast.Attribute)
            and node.attr in ("SINGLE", "MULTI", "REGRESSION")
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [
                o
                for o in operands
                if isinstance(o, ast.Constant)
                and o.value in PROBLEM_TYPE_NAMES
                or isinstance(o, ast.Attribute)
                and o.attr == "problem_type"
                or isinstance(o, ast.Name)
                and o.id == "problem_type"
            ]
            if names:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and any(
            isinstance(k, ast.Constant) and k.value in PROBLEM_TYPE_NAMES for k in node.keys
        ):
            found.append(f"line {node.lineno}: a table keyed by problem type")
    return found


def test_only_problem_py_decides_by_the_problem_type():
    """Each problem type is one class in problem.py that owns its labels, loss, metrics, predictions and report lines;
    the rest of the code asks the run's problem object. Guards a new `if problem_type == ...` (or a table keyed by
    the type) elsewhere, which is how adding a type once touched 12 files."""
    found = {
        path.name: switches
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "problem.py"
        if (switches := problem_type_switches(path.read_text()))
    }
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
