"""Import discipline: merging_core never imports the service layer or its web/database stack,
no package has import cycles, and every import points down the layer order stated below."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"app", "fastapi", "sqlalchemy", "alembic", "httpx", "starlette", "uvicorn"}
PACKAGE = ROOT / "merging_core"

Layers = Sequence[Sequence[str]]

# Lowest layer first. A module may import modules of its own layer or of lower ones. Each name
# covers `<package>.<name>` and everything under it. The package root is exempt as an importer
# (it re-exports the public API) and counts as above every layer when imported.
LAYERS: dict[str, Layers] = {
    "merging_core": (
        ("errors", "params"),
        ("runtime",),
        ("methods",),
        ("adapters", "policies"),
        ("config",),
        ("plugins",),
        ("engine",),
        ("evaluation",),
        ("search",),
        ("cli",),
    ),
    "app": (
        ("settings",),
        ("errors",),
        ("db",),
        ("migrations",),  # alembic's env.py and revisions, shipped in the package
        ("crud",),
        ("worker",),
        ("worker_process",),
        ("ray_executor",),
        ("service",),
        ("submit",),
        ("api",),
        ("main",),
        ("cli",),
    ),
}


def test_merging_core_imports_point_down_only() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_methods_are_pure_tensor_code() -> None:
    for path in (PACKAGE / "methods").glob("*.py"):
        source = path.read_text()
        for io_name in ("open(", "safetensors", "Path(", "transformers"):
            assert io_name not in source, f"{path.name} does I/O or touches models ({io_name})"


# --- import graph -----------------------------------------------------------------------------


def discover_modules(root: Path, package: str) -> dict[str, Path | None]:
    """Map every module of the package in directory `root` to its source file.

    `pkg/a/b.py` -> `pkg.a.b`, `pkg/a/__init__.py` -> `pkg.a`. Directories without an
    `__init__.py` are namespace packages: they are importable, so they are modules too (with
    no source, hence no outgoing edges).
    """
    modules: dict[str, Path | None] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
        for depth in range(1, len(parts)):
            modules.setdefault(".".join(parts[:depth]), None)
    return modules


def _resolve_prefix(name: str, modules: dict[str, Path | None]) -> str | None:
    """The longest dotted prefix of `name` that is a module, or None if none is."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imported_modules(
    module: str, path: Path, modules: dict[str, Path | None], package: str
) -> set[str]:
    """Modules of `package` that `module` (source at `path`) imports, anywhere in the file.

    Function-level (lazy) imports count: they still form a cycle at run time. Parent packages
    are not added implicitly, so `import pkg.a.b` is one edge, to `pkg.a.b`.
    """
    # The package that relative imports are resolved against.
    own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = own_package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise ValueError(f"{path}: relative import beyond the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.append(submodule if submodule in modules else base)
        for name in names:
            if name == package or name.startswith(package + "."):
                target = _resolve_prefix(name, modules)
                if target is not None:
                    targets.add(target)
    return targets


def build_import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Import graph of the package in directory `root`: module -> modules of it that it imports.

    Imports of other top-level packages (stdlib, torch, and for `app` also merging_core) are
    left out: only edges inside the package can form its cycles or break its layers.
    """
    modules = discover_modules(root, package)
    return {
        module: (imported_modules(module, path, modules, package) if path else set())
        for module, path in modules.items()
    }


# --- cycles -----------------------------------------------------------------------------------


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, plus self-imports (Tarjan)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                lowlink[node] = min(lowlink[node], lowlink[succ])
            elif succ in on_stack:
                lowlink[node] = min(lowlink[node], index[succ])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def check_cycles(root: Path, package: str, layers: Layers) -> list[str]:
    """One message per import cycle in the package in directory `root`.

    `layers` is unused; it is accepted so every checker has the same signature.
    """
    del layers
    graph = build_import_graph(root, package)
    return ["import cycle: " + " <-> ".join(cycle) for cycle in find_cycles(graph)]


# --- layers -----------------------------------------------------------------------------------


def layer_of(module: str, package: str, layers: Layers) -> int | None:
    """Index (0 = lowest) of the layer that holds `module`, or None if none does."""
    for rank, names in enumerate(layers):
        for name in names:
            prefix = f"{package}.{name}"
            if module == prefix or module.startswith(prefix + "."):
                return rank
    return None


def _describe(rank: int, layers: Layers) -> str:
    return f"layer {rank + 1} ({', '.join(layers[rank])})"


def _entry_is_empty(prefix: str, graph: dict[str, set[str]]) -> bool:
    return not any(m == prefix or m.startswith(prefix + ".") for m in graph)


def check_layers(root: Path, package: str, layers: Layers) -> list[str]:
    """Messages for every layer-order violation in the package in directory `root`.

    Three kinds: a module in no layer (so a new module cannot dodge the rule), a layer entry
    that matches no module (a stale or not yet created entry), and an import of a module in a
    higher layer than the importer's.
    """
    graph = build_import_graph(root, package)
    problems: list[str] = []
    for rank, names in enumerate(layers):
        for name in names:
            if _entry_is_empty(f"{package}.{name}", graph):
                problems.append(
                    f"{_describe(rank, layers)} lists {package}.{name}, which does not exist"
                )
    top = len(layers)  # the package root re-exports everything, so it sits above all layers
    for module in sorted(graph):
        if module == package:
            continue
        rank = layer_of(module, package, layers)
        if rank is None:
            problems.append(f"{module} is in no layer: add it to a layer")
            continue
        for target in sorted(graph[module]):
            target_rank = top if target == package else layer_of(target, package, layers)
            if target_rank is None or target_rank <= rank:
                continue  # unlisted targets are reported once, as modules in no layer
            where = "above every layer" if target_rank == top else _describe(target_rank, layers)
            problems.append(
                f"{module} ({_describe(rank, layers)}) imports {target} ({where}):"
                " imports must point to the same or a lower layer"
            )
    return problems


def render_layers(layers: dict[str, Layers] = LAYERS) -> str:
    """The layer orders as text, one line per package, lowest layer first.

    `merging_core: errors, params < runtime < ...`; README.md states exactly this text.
    """
    return "\n".join(
        f"{package}: " + " < ".join(", ".join(names) for names in order)
        for package, order in layers.items()
    )


# --- the real tree ----------------------------------------------------------------------------


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_import_cycles(package: str) -> None:
    problems = check_cycles(ROOT / package, package, LAYERS[package])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_follow_the_layer_order(package: str) -> None:
    problems = check_layers(ROOT / package, package, LAYERS[package])
    assert not problems, "\n".join(problems)


def test_readme_states_the_layer_order() -> None:
    rendered = render_layers()
    assert rendered in (ROOT / "README.md").read_text(), f"README.md must contain:\n{rendered}"


# --- the checker on synthetic packages --------------------------------------------------------


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "fakepkg"
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import fakepkg.b\n",
            "b.py": "def late():\n    from fakepkg import a\n    return a\n",
            "c.py": "import os\nimport fakepkg.a\n",
            "d.py": "import fakepkg.d\n",
        },
    )
    assert check_cycles(root, "fakepkg", ()) == [
        "import cycle: fakepkg.a <-> fakepkg.b",
        "import cycle: fakepkg.d",
    ]


def test_checker_finds_an_upward_import_and_an_unlisted_module(tmp_path: Path) -> None:
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "from fakepkg.high import thing\n",  # the root is exempt
            "low.py": "def f():\n    from fakepkg.high import thing\n    return thing\n",
            "high.py": "from fakepkg import low\nthing = 1\n",
            "stray.py": "",
        },
    )
    layers = (("low",), ("high",), ("missing",))
    assert check_layers(root, "fakepkg", layers) == [
        "layer 3 (missing) lists fakepkg.missing, which does not exist",
        "fakepkg.low (layer 1 (low)) imports fakepkg.high (layer 2 (high)):"
        " imports must point to the same or a lower layer",
        "fakepkg.stray is in no layer: add it to a layer",
    ]
    assert check_layers(root, "fakepkg", (("low", "high", "stray"),)) == []


def test_checker_resolves_relative_imports(tmp_path: Path) -> None:
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "x.py": "",
            "y/__init__.py": "from . import z\nfrom .z import name\n",
            "y/z.py": "name = 1\n",
            "sub/__init__.py": "",
            "sub/m.py": (
                "from . import n\n"
                "from ..y import z\n"
                "from ..y import name\n"
                "from .. import x\n"
                "import torch\n"
            ),
            "sub/n.py": "",
        },
    )
    graph = build_import_graph(root, "fakepkg")
    assert graph["fakepkg.sub.m"] == {"fakepkg.sub.n", "fakepkg.y.z", "fakepkg.y", "fakepkg.x"}
    assert graph["fakepkg.y"] == {"fakepkg.y.z"}
    assert graph["fakepkg"] == set()


def test_render_layers() -> None:
    assert render_layers({"p": (("a", "b"), ("c",))}) == "p: a, b < c"
