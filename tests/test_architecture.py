"""The package's shape (docs/architecture.md): layers that only point down, no import cycle, short functions.

Read from the source with ``ast`` (every ``import`` and ``from ... import`` in ``src/covidseg``, also those inside
functions and under ``TYPE_CHECKING``), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "covidseg"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("covidseg", "covidseg.errors", "covidseg.io.atomic", "covidseg.progress")),
    ("settings", ("covidseg.config", "covidseg.runtime", "covidseg.targets")),
    ("images and intensities", ("covidseg.io", "covidseg.intensity", "covidseg.phantom")),
    ("datasets and networks", ("covidseg.data", "covidseg.models")),
    ("model files", ("covidseg.checkpoint", "covidseg.exchange")),
    ("measures", ("covidseg.losses", "covidseg.metrics", "covidseg.report")),
    ("inferers", ("covidseg.inference.sliding_window", "covidseg.inference.backends")),
    ("workflows", ("covidseg.training", "covidseg.inference", "covidseg.export", "covidseg.evaluation")),
    ("applications", ("covidseg.demo", "covidseg.semiseg")),
    ("command line", ("covidseg.cli",)),
    ("entry point", ("covidseg.__main__",)),
)
"""Layers, lowest first; each holds components (a module, or a package with its modules). A module may import its
own component and any lower layer; never a higher layer, nor another component of its own layer (components of a
layer are independent). ``covidseg`` itself (the version) is the package's ``__init__`` only. The table of
docs/architecture.md lists the same layers."""

MAX_FUNCTION_LINES = 100
"""Longest function allowed, from its ``def`` line to its last line."""
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {
}
"""Temporary exceptions to :data:`MAX_FUNCTION_LINES` (``path::name`` under ``src/covidseg``). An entry that is no
longer too long fails the test: remove it."""


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules()


def _known(name: str) -> str:
    """The deepest module of the package that ``name`` is or lies inside."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import of the package in ``module``."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield _known(alias.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # ``from covidseg.training import distributed`` imports a module
                full = f"{source}.{alias.name}"
                yield (full if full in MODULES else _known(source)), node.lineno


GRAPH: dict[str, dict[str, int]] = {}
for _name in MODULES:
    GRAPH[_name] = {}
    for _target, _line in _imports(_name):
        if _target != _name:
            GRAPH[_name].setdefault(_target, _line)


def _component(module: str) -> tuple[int, str]:
    """``(layer index, component)`` of a module: its longest listed prefix."""
    best: tuple[int, str] | None = None
    for index, (_, components) in enumerate(LAYERS):
        for comp in components:
            inside = module == comp or (comp != PACKAGE and module.startswith(comp + "."))
            if inside and (best is None or len(comp) > len(best[1])):
                best = (index, comp)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS (and to docs/architecture.md)")
    return best


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 50
    for module in MODULES:
        _component(module)


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_only_point_down() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        layer, comp = _component(module)
        for target, line in targets.items():
            t_layer, t_comp = _component(target)
            if t_comp == comp or t_layer < layer:
                continue
            how = "a higher layer" if t_layer > layer else "a sibling component"
            wrong.append(f"{MODULES[module][0].relative_to(SRC)}:{line}: {module} ({LAYERS[layer][0]}) imports "
                         f"{target} ({LAYERS[t_layer][0]}), {how}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_checker_sees_lazy_imports() -> None:
    """The graph is built from every import statement: a lazy one inside a function counts."""
    assert "covidseg.inference.sliding_window" in GRAPH["covidseg.training.trainer"]  # imported inside a function
    assert GRAPH["covidseg.cli.segment"].keys() >= {"covidseg.inference.pipeline"}  # idem, in run()
    assert _component("covidseg.inference.sliding_window") == (6, "covidseg.inference.sliding_window")
    assert _component("covidseg.inference.pipeline")[1] == "covidseg.inference"
    assert _component("covidseg")[1] == "covidseg" and _component("covidseg.io.image")[1] == "covidseg.io"


def _functions() -> Iterator[tuple[str, int]]:
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                key = f"{path.relative_to(SRC / PACKAGE).as_posix()}::{node.name}"
                yield key, node.end_lineno - node.lineno + 1


def test_no_function_over_100_lines() -> None:
    lengths = dict(_functions())
    too_long = {k: n for k, n in lengths.items() if n > MAX_FUNCTION_LINES and k not in LONG_FUNCTIONS_ALLOWED}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (cut them into steps): {too_long}"


def test_allowed_long_functions_are_still_long() -> None:
    lengths = dict(_functions())
    shorter = {entry: lengths.get(entry, "gone") for entry in LONG_FUNCTIONS_ALLOWED
               if lengths.get(entry, 0) <= MAX_FUNCTION_LINES}
    assert not shorter, f"remove these from LONG_FUNCTIONS_ALLOWED: {shorter}"
