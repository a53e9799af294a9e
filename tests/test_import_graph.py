"""The package's import graph: no cycles, and every import goes down the floors DESIGN.md draws.

Every module under ``src/secateurs`` is parsed with ``ast`` (nothing is imported, so a cycle that
Python happens to tolerate today is still found); imports inside functions count, since a
function-level import is how a cycle usually hides. Each top-level package or module of
``secateurs`` stands on one floor of :data:`FLOORS`; a module may import its own package and the
packages on lower floors only. Floor-mates are independent: the three pruning families import none of
each other, as ``engine/`` and ``kernels/`` do not.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "secateurs"
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors",),  # what every module may raise
    ("files", "device", "progress", "jsondoc", "record", "options", "schema"),  # the helpers every layer shares
    ("model", "data"),  # architectures, loading and surgery; calibration text
    ("engine", "kernels"),  # running a model: block by block, or on sparse kernels
    ("evaluate",),  # losses, perplexity, agreement, speed (bench runs the kernels)
    ("training",),  # the one training loop and its checkpoints
    ("sparsity", "structured", "depth", "moe"),  # the pruning families
    ("recover",),  # recovery: trains a pruned model; LoRAPrune and iterative pruning prune as they train
    ("api",),  # one verb per stage
    ("stages", "runs"),  # stage specs; runs read back from output folders
    ("recipe", "report"),  # recipes of stages; reports of runs
    ("cli",),  # the commands
    ("__main__", "secateurs"),  # python -m secateurs; the package's lazy names (imported by name on first use)
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names, resolving ``from .`` / ``from ..``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (module or function level).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
    """
    graph = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, is_package)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else base)
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def unit(module: str) -> str:
    """The top-level package or module of ``secateurs`` a module belongs to (``secateurs.model.load`` ->
    ``model``); the package's own ``__init__`` is ``secateurs``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor_violations(graph: dict[str, set[str]], floors: tuple[tuple[str, ...], ...]) -> list[str]:
    """Every import of another package on the importer's floor or above, one line each."""
    floor = {name: level for level, names in enumerate(floors) for name in names}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = unit(module), unit(target)
            if here == there or floor[there] < floor[here]:
                continue
            why = "floor-mates are independent" if floor[there] == floor[here] else "it is above"
            found.append(f"{module} (floor {floor[here]}, {here}/) imports {target} (floor {floor[there]}, {there}/): {why}")
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_the_graph_sees_module_and_function_level_imports(tmp_path):
    """The checker itself: relative, absolute and function-level imports all become edges, and a
    cycle through a function-level import is found (so a passing test below means something)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("from ..b import thing\n")
    (pkg / "b.py").write_text("import os\n\ndef f():\n    from pkg.sub.a import x\n")
    (pkg / "c.py").write_text("from .b import thing\n")
    found = import_graph(module_files(pkg))
    assert found == {
        "pkg": set(), "pkg.sub": {"pkg.sub.a"}, "pkg.sub.a": {"pkg.b"}, "pkg.b": {"pkg.sub.a"}, "pkg.c": {"pkg.b"},
    }
    assert cycles(found) == [["pkg.b", "pkg.sub.a"]]


def test_the_graph_covers_the_package(graph):
    assert {"secateurs.model.slice", "secateurs.model.groups", "secateurs.engine.sequential", "secateurs.training.loop",
            "secateurs.__main__", "secateurs"} <= graph.keys()
    assert {"secateurs.model.groups", "secateurs.model.per_layer"} <= graph["secateurs.model.slice"]
    assert "secateurs.training.loop" in graph["secateurs.structured.shearing.driver"]


def test_no_import_cycle(graph):
    found = cycles(graph)
    described = [
        " | ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in found
    ]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_the_floor_check_finds_imports_up_and_across():
    """The checker itself: an import of a higher floor and one of a floor-mate are reported, one down
    is not (so a passing test below means something)."""
    graph = {
        "pkg.low.a": {"pkg.high.b", "pkg.low.z"}, "pkg.low.z": set(), "pkg.high.b": {"pkg.low.a"},
        "pkg.mid": {"pkg.side.d"}, "pkg.side.d": set(),
    }
    found = floor_violations(graph, (("low",), ("mid", "side"), ("high",)))
    assert found == [
        "pkg.low.a (floor 0, low/) imports pkg.high.b (floor 2, high/): it is above",
        "pkg.mid (floor 1, mid/) imports pkg.side.d (floor 1, side/): floor-mates are independent",
    ]


def test_every_package_has_one_floor(graph):
    listed = [name for names in FLOORS for name in names]
    assert len(listed) == len(set(listed)), f"a package on two floors: {sorted(listed)}"
    present = {unit(module) for module in graph}
    assert not present - set(listed), f"give each new package a floor in FLOORS (and DESIGN.md): {sorted(present - set(listed))}"
    assert not set(listed) - present, f"FLOORS names packages that are gone: {sorted(set(listed) - present)}"


def test_every_import_goes_down_the_floors(graph):
    found = floor_violations(graph, FLOORS)
    assert not found, (
        "imports against the floor order (FLOORS here, 'Layers' in DESIGN.md); move the shared code to a "
        "floor below both, never import up or across:\n" + "\n".join(found)
    )


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)


def test_the_loader_imports_the_kernels_folder_formats_by_name():
    """model/load.py restores sparse exports without importing kernels/ (a lower layer imports no upper
    one): it imports the modules :data:`FOLDER_FORMAT_MODULES` names the first time it inspects a folder."""
    done = _fresh("from secateurs.model.load import folder_formats; print(sorted(folder_formats()))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['compressed-tensors', 'deci', 'sparse']"


HEAVY = ("torch", "transformers", "triton")
IMPORTED_HEAVY = f"import sys; print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"


@pytest.mark.parametrize("module", ["secateurs", "secateurs.cli.app", "secateurs.cli", "secateurs.stages"])
def test_the_package_and_the_cli_import_no_torch(module):
    """``secateurs --help`` (every command is built from the stage specs) and ``import secateurs`` cost
    seconds when torch, transformers and Triton come with them: the verbs import those when called."""
    done = _fresh(f"import {module}; {IMPORTED_HEAVY}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"import {module} imports {done.stdout.strip()}"


def test_every_command_builds_its_help_without_torch():
    """Rendering each command's --help (its options, defaults and the registries' names in them)."""
    code = (
        "from typer.main import get_command; from secateurs.cli import app; import click; "
        "group = get_command(app); ctx = click.Context(group); "
        "[group.get_command(ctx, name).get_help(click.Context(group.get_command(ctx, name))) for name in group.list_commands(ctx)]; "
        + IMPORTED_HEAVY
    )
    done = _fresh(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--sparsity" in done.stdout and "--rank" in done.stdout  # the help was rendered (typer prints it)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_every_public_name_resolves():
    """``secateurs.<name>`` is imported on first use: each name of ``__all__`` exists where it says."""
    import secateurs

    assert sorted(secateurs.__all__) == sorted(secateurs._EXPORTS)
    for name in secateurs.__all__:
        assert getattr(secateurs, name) is not None
    with pytest.raises(AttributeError):
        secateurs.no_such_name  # noqa: B018


def test_readme_python_path_to_a_stage_works_after_a_plain_import():
    """README's `secateurs.stages.run(secateurs.stages.STAGES["prune"].parse(...))` after `import secateurs`
    alone: the lazy package must import a subpackage on first use, as an eager one would."""
    code = (
        "import secateurs\n"
        "request = secateurs.stages.STAGES['prune'].parse('smollm2-135m', 'out', method='magnitude')\n"
        "print(type(request).__name__, callable(secateurs.stages.run))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PruneRequest", "True"]
