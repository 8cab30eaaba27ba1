"""The import graph of the code base: no cycle, counting imports inside functions too (an import
moved into a function to dodge a cycle still is one), and the compute core never imports the
Dagster layer."""

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sae_platform", "assets", "resources", "jobs")
DAGSTER_LAYER = ("assets", "resources", "jobs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports anywhere in its source (``from x import y`` names
    module ``x.y`` when that is a module of the project, else ``x``)."""
    files = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{path}:{node.lineno}: a relative import; write the absolute module name")
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                         for alias in node.names]
            else:
                continue
            edges |= {name for name in names if name in files and name != module}
            edges |= {package for name in names for package in _packages_entered(module, name) if package in files}
        graph[module] = edges
    return graph


def _packages_entered(module: str, name: str) -> list[str]:
    """The packages whose ``__init__`` importing ``name`` runs first (``a.b`` and ``a`` for
    ``a.b.c``), but for those ``module`` is inside: a package's own modules may import siblings."""
    parts = name.split(".")
    packages = [".".join(parts[:i]) for i in range(1, len(parts))]
    return [p for p in packages if not (module == p or module.startswith(p + "."))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, …, a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_a_package_init_is_part_of_the_graph():
    assert _packages_entered("sae_platform.freshness", "sae_platform.browser.publish") == ["sae_platform.browser"]
    assert _packages_entered("assets.features", "sae_platform.browser.publish") == [
        "sae_platform", "sae_platform.browser"]
    assert _packages_entered("sae_platform.sae.topk", "sae_platform.sae.base") == []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in import_graph() if m.startswith("sae_platform")))
def test_core_never_imports_the_dagster_layer(module):
    layer = sorted(m for m in import_graph()[module] if m.split(".")[0] in DAGSTER_LAYER)
    assert not layer, f"{module} imports {layer}: the compute core must not depend on the Dagster layer"


def test_core_never_imports_dagster():
    for path in (REPO / "sae_platform").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0].startswith("dagster") for n in names), f"{path} imports {names}"


MAX_MODULE_LINES = 800  # one concept per module: a module this long holds two (split it along its seams)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "sae_platform").rglob("*.py")))
def test_core_modules_stay_small(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines < MAX_MODULE_LINES, f"{path} has {lines} lines: split it along the seams its sections mark"


# Calls that build an fsspec filesystem; only sae_platform.filesystems may make them, with listing
# caching off, so that no long-lived process decides what exists from a stale listing.
FILESYSTEM_BUILDERS = {"url_to_fs", "filesystem", "open", "open_files", "get_fs_token_paths", "S3FileSystem",
                       "from_url"}
FILESYSTEMS_MODULE = "sae_platform/filesystems.py"


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def filesystems_opened_elsewhere(source: str) -> list[str]:
    """Calls in ``source`` that build an fsspec filesystem without sae_platform.filesystems: fsspec's
    or s3fs's constructors, and zarr's ``FsspecStore.from_url`` unless its ``storage_options`` is
    ``fs_options(...)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        if last not in FILESYSTEM_BUILDERS or not (head.startswith(("fsspec", "s3fs")) or "FsspecStore" in head
                                                   or name == "S3FileSystem"):
            continue
        options = next((k.value for k in node.keywords if k.arg == "storage_options"), None)
        if "FsspecStore" in head and isinstance(options, ast.Call) and _dotted(options.func) == "fs_options":
            continue
        found.append(f"line {node.lineno}: {name}(...)")
    return found


def test_the_filesystem_check_finds_the_kinds_it_should():
    assert filesystems_opened_elsewhere("fs, p = fsspec.core.url_to_fs(u)\nf = fsspec.open(u)\n"
                                        "s = s3fs.S3FileSystem()\n"
                                        "z = zarr.storage.FsspecStore.from_url(u, storage_options=o)") == [
        "line 1: fsspec.core.url_to_fs(...)", "line 2: fsspec.open(...)", "line 3: s3fs.S3FileSystem(...)",
        "line 4: zarr.storage.FsspecStore.from_url(...)"]
    assert filesystems_opened_elsewhere("z = zarr.storage.FsspecStore.from_url(u, storage_options=fs_options(o))\n"
                                        "x = fsspec.available_compressions()\nopen(p)") == []


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for package in PACKAGES
                                        for p in (REPO / package).rglob("*.py")))
def test_every_filesystem_is_opened_with_fresh_listings(path):
    if path == FILESYSTEMS_MODULE:
        return
    found = filesystems_opened_elsewhere((REPO / path).read_text())
    assert not found, (f"{path} builds an fsspec filesystem itself ({'; '.join(found)}): its directory listings "
                       "would be cached for the life of the process; use sae_platform.filesystems.open_fs / "
                       "open_file / fs_options")
