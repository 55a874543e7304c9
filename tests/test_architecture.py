"""The code's shape: no import cycles, the package layering, no ComfyUI in the engine, small modules, docstrings.

Imports are read with `ast`, not executed: every `import` and `from` statement, including those
inside functions, resolved to the modules of this repository (named from the repository root, so
`nodes/sample.py`'s `from ..nextstep_core.engine.vae import x` reads `nextstep_core.engine.vae`).
`from pkg import name` is an import of `pkg.name` when that is a module file, else of `pkg`. Only
explicit imports are edges: importing `nextstep_core.engine.vae` also runs the `__init__` of the
packages above it, but that is Python's doing, not an import the design has to answer for.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WALKED = ("nextstep_core", "nodes")  # the modules whose imports are checked
DOCUMENTED = (*WALKED, "benchmarks", "scripts", "tests")  # the folders whose modules need a docstring
SKIPPED = ("demo_model",)  # data, not code
MAX_LINES = 400

# Layers of the engine package: the module's first name below nextstep_core ("engine" for
# nextstep_core.engine.vae, "pipeline" for nextstep_core.pipeline); "root" is nextstep_core/__init__.py,
# "nodes" the ComfyUI glue. A layer may always import its own modules.
ENGINE_LAYERS = {"root", "errors", "checks", "engine", "sampling", "memory", "request", "pipeline", "cli", "__main__",
                 "demo"}
ALLOWED = {
    "errors": set(),
    "checks": {"errors"},  # the checks of user input (checks.py), as basic as errors
    "engine": {"errors", "checks"},
    "sampling": {"engine", "errors", "checks"},
    "memory": {"engine", "errors", "checks"},
    "request": {"engine", "sampling", "errors", "checks"},  # a request resolved against an inspected folder
    "pipeline": {"engine", "sampling", "memory", "request", "errors", "checks"},
    # demo: the default model's vocabulary
    "cli": {"pipeline", "request", "sampling", "errors", "checks", "root", "demo"},
    "__main__": {"cli"},
    "root": ENGINE_LAYERS - {"demo", "cli", "__main__"},  # the public API: names re-exported from the layers
    "demo": ENGINE_LAYERS - {"cli", "__main__"},
    "nodes": ENGINE_LAYERS,
}
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "nodes"}


@dataclass(frozen=True)
class Import:
    """One import statement's edge: `source` imports `target` (a module of this repository)."""

    source: str
    target: str
    path: Path
    line: int
    statement: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} `{self.statement}` ({self.source} -> {self.target})"


def python_files(folders) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")
                  if not set(p.relative_to(ROOT).parts) & set(SKIPPED))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in python_files(WALKED)}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def resolve_relative(module: str, level: int, name: str | None) -> str:
    """The absolute name `from {'.' * level}{name} import ...` means inside `module`."""
    package = module if is_package(module) else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return ".".join(p for p in (package, name) if p)


def read_imports(module: str) -> tuple[list[Import], list[tuple[int, str, str]]]:
    """(edges to modules of this repository, (line, statement, top-level name) of every absolute
    import of something else) for one module."""
    path = MODULES[module]
    edges, external = [], []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                statement = f"import {alias.name}"
                if alias.name in MODULES:
                    edges.append(Import(module, alias.name, path, node.lineno, statement))
                else:
                    external.append((node.lineno, statement, alias.name.partition(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            statement = ast.unparse(node)
            base = resolve_relative(module, node.level, node.module) if node.level else node.module
            if base not in MODULES:
                if node.level == 0:
                    external.append((node.lineno, statement, base.partition(".")[0]))
                continue
            targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
            edges += [Import(module, target, path, node.lineno, statement) for target in sorted(targets)]
    return edges, external


IMPORTS = {module: read_imports(module) for module in MODULES}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "nodes":
        return "nodes"
    return parts[1] if len(parts) > 1 else "root"


def find_cycles(edges: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle (as its chain of imports) through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in edges.get(node, []):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or any(e.target == node for e in edges.get(node, [])):
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [cycle_within(group, edges) for group in groups]


def cycle_within(group: set[str], edges: dict[str, list[Import]]) -> list[Import]:
    """A shortest chain of imports from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in edges.get(node, []):
                if edge.target == start:
                    return paths[node] + [edge]
                if edge.target in group and edge.target not in paths:
                    paths[edge.target] = paths[node] + [edge]
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def test_the_walk_sees_the_modules_and_their_imports():
    assert {"nextstep_core", "nextstep_core.pipeline", "nextstep_core.engine.vae", "nodes.sample"} <= set(MODULES)
    targets = {edge.target for edge in IMPORTS["nodes.sample"][0]}
    assert {"nextstep_core.checks", "nextstep_core.errors", "nodes.latent"} <= targets


def test_no_import_cycles():
    cycles = find_cycles({module: edges for module, (edges, _) in IMPORTS.items()})
    messages = [" -> ".join([chain[0].source] + [e.target for e in chain]) + "\n    "
                + "\n    ".join(str(e) for e in chain) for chain in cycles]
    if cycles:
        pytest.fail("import cycles:\n  " + "\n  ".join(messages))


def test_packages_import_only_the_layers_below_them():
    wrong = [f"{edge}: {layer(edge.source)} may import only "
             f"{', '.join(sorted(ALLOWED[layer(edge.source)])) or 'nothing else in the package'}"
             for edges, _ in IMPORTS.values() for edge in edges
             if layer(edge.target) != layer(edge.source) and layer(edge.target) not in ALLOWED[layer(edge.source)]]
    if wrong:
        pytest.fail("imports against the layering:\n  " + "\n  ".join(wrong))


def test_the_engine_never_imports_comfyui():
    wrong = [f"{MODULES[module].relative_to(ROOT)}:{line} `{statement}`"
             for module, (_, external) in IMPORTS.items() if module.startswith("nextstep_core")
             for line, statement, top in external if top in COMFYUI_MODULES]
    # `import nodes` resolves to this pack's nodes/ here, and to ComfyUI's nodes.py inside ComfyUI: wrong either way
    wrong += [str(edge) for module, (edges, _) in IMPORTS.items() if module.startswith("nextstep_core")
              for edge in edges if layer(edge.target) == "nodes"]
    if wrong:
        pytest.fail("ComfyUI imported by the engine (it must run without ComfyUI):\n  " + "\n  ".join(wrong))


def test_no_module_is_longer_than_400_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in python_files(DOCUMENTED)
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    if long:
        pytest.fail(f"modules over {MAX_LINES} lines (split them):\n  " + "\n  ".join(long))


def test_every_module_opens_with_a_docstring():
    bare = [str(p.relative_to(ROOT)) for p in python_files(DOCUMENTED)
            if ast.get_docstring(ast.parse(p.read_text(), str(p))) is None]
    if bare:
        pytest.fail("modules without a docstring saying what they are for:\n  " + "\n  ".join(bare))
